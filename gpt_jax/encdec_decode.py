"""Decoding from an encoder-decoder: the source is encoded and its cross-attention keys/values computed once, then
the decoder runs one token at a time over the decoder-only model's KV cache (greedy, or sampled with temperature,
top-k and top-p through `gpt_jax.decode.sample_tokens`), inside one jitted `lax.while_loop` that stops when every
row has produced its end token.

`generate_uncached` recomputes the whole model for every new token; it exists to check the cached path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax.decode import sample_tokens
from gpt_jax.encdec import EncDecConfig, EncoderDecoder
from gpt_jax.model import init_cache

SOURCE_BUCKET = 16  # sources are padded to a multiple of this, so few shapes compile


def _row_keys(seed, batch: int, step):
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.split(base, batch)


def _sampling_arrays(batch: int, temperature: float, top_k: int, top_p: float):
    return (jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_k, jnp.int32),
            jnp.full((batch,), top_p, jnp.float32))


@functools.lru_cache(maxsize=8)
def _compiled_generate(graphdef: nnx.GraphDef, cfg: EncDecConfig, max_new_tokens: int):
    dec_cfg = cfg.decoder

    def run(params, source_ids, source_valid, temperature, top_k, top_p, seed):
        batch = source_ids.shape[0]
        model = nnx.merge(graphdef, params)
        memory = model.encode(source_ids, source_valid)
        cross = model.decoder.cross_kv(memory)  # once per source
        cache = init_cache(dec_cfg, batch, max_new_tokens)
        key_valid = jnp.ones((batch, max_new_tokens), bool)  # causality hides the slots not yet written
        out = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32)
        token = jnp.full((batch,), cfg.decoder_start_id, jnp.int32)

        def cond(carry):
            i, _, _, _, done = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, token, cache, out, done = carry
            decoder = nnx.merge(graphdef, params).decoder
            positions = jnp.full((batch, 1), i)
            logits, cache = decoder(token[:, None], cross, source_valid, positions, cache=cache, cache_index=i,
                                    key_valid=key_valid)
            nxt = sample_tokens(logits[:, 0], _row_keys(seed, batch, i), temperature, top_k, top_p)
            nxt = jnp.where(done, cfg.pad_id, nxt)
            out = out.at[:, i].set(nxt)
            return i + 1, nxt, cache, out, done | (nxt == cfg.eos_id)

        carry = (jnp.int32(0), token, cache, out, jnp.zeros((batch,), bool))
        return jax.lax.while_loop(cond, body, carry)[3]

    return jax.jit(run)


def generate(model: EncoderDecoder, source_ids, source_valid, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """Target tokens [batch, max_new_tokens] for source_ids [batch, src] (source_valid marks real tokens), with the
    KV cache. Each row ends with its end token (`cfg.eos_id`) and then `cfg.pad_id`, or runs to max_new_tokens.
    temperature 0 is greedy."""
    graphdef, params = nnx.split(model, nnx.Param)
    run = _compiled_generate(graphdef, model.cfg, max_new_tokens)
    batch = np.shape(source_ids)[0]
    out = run(params, jnp.asarray(source_ids), jnp.asarray(source_valid, bool),
              *_sampling_arrays(batch, temperature, top_k, top_p), jnp.uint32(seed))
    return np.asarray(out)


@jax.jit
def _sample_step(logits, seed, step, temperature, top_k, top_p):
    return sample_tokens(logits, _row_keys(seed, logits.shape[0], step), temperature, top_k, top_p)


@functools.lru_cache(maxsize=8)
def _compiled_forward(graphdef: nnx.GraphDef):
    return jax.jit(lambda params, source_ids, source_valid, inputs: nnx.merge(graphdef, params)(
        source_ids, inputs, source_valid))


def generate_uncached(model: EncoderDecoder, source_ids, source_valid, max_new_tokens: int, *,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """Like `generate`, recomputing encoder and decoder over the whole prefix for every token (no caches)."""
    cfg = model.cfg
    source_ids, source_valid = jnp.asarray(source_ids), jnp.asarray(source_valid, bool)
    batch = source_ids.shape[0]
    sampling = _sampling_arrays(batch, temperature, top_k, top_p)
    graphdef, params = nnx.split(model, nnx.Param)
    forward = functools.partial(_compiled_forward(graphdef), params, source_ids, source_valid)
    inputs = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.decoder_start_id)
    out = np.full((batch, max_new_tokens), cfg.pad_id, np.int32)
    done = np.zeros(batch, bool)
    for i in range(max_new_tokens):
        logits = forward(inputs)[:, i]  # causal: later (padding) inputs do not reach position i
        nxt = np.asarray(_sample_step(logits, jnp.uint32(seed), i, *sampling))
        nxt = np.where(done, cfg.pad_id, nxt)
        out[:, i] = nxt
        done |= nxt == cfg.eos_id
        if done.all():
            break
        if i + 1 < max_new_tokens:
            inputs = inputs.at[:, i + 1].set(nxt)
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = SOURCE_BUCKET,
              batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists to a multiple of `multiple` (and to `batch` rows): (ids, valid) [rows, length]."""
    length = max(1, max((len(r) for r in rows), default=1))
    length = -(-length // multiple) * multiple
    n = batch or len(rows)
    ids = np.full((n, length), pad_id, np.int32)
    valid = np.zeros((n, length), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        valid[i, :len(r)] = True
    return ids, valid


def strip_output(tokens: Sequence[int], eos_id: int, drop: Sequence[int] = ()) -> list[int]:
    """The tokens before the first end token, without the ids in `drop` (start, padding)."""
    out = []
    for t in tokens:
        if t == eos_id:
            break
        if t not in drop:
            out.append(int(t))
    return out


def translate(model: EncoderDecoder, source_rows: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
              batch_size: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              seed: int = 0) -> list[list[int]]:
    """Output token lists (end token and padding removed) for encoded sources, in their order. Sources are sorted
    by length into batches of `batch_size` rows (the last one padded), so shapes repeat."""
    cfg = model.cfg
    order = sorted(range(len(source_rows)), key=lambda i: len(source_rows[i]))
    results: list[list[int]] = [[] for _ in source_rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, valid = pad_batch([source_rows[i] for i in chunk], cfg.pad_id, batch=batch_size)
        valid[len(chunk):, 0] = True  # filler rows attend to one (padding) token rather than none
        out = generate(model, ids, valid, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed + start)
        for row, i in enumerate(chunk):
            results[i] = strip_output(out[row], cfg.eos_id, (cfg.pad_id, cfg.decoder_start_id))
    return results
