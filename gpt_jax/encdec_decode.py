"""Decoding from an encoder-decoder: the source is encoded and its cross-attention keys/values computed once, then
the decoder runs one token at a time over the decoder-only model's KV cache (greedy, or sampled with temperature,
top-k and top-p through `gpt_jax.decode.sample_tokens`), inside one jitted `lax.while_loop` that stops when every
row has produced its end token; or by length-normalized beam search, in one such loop too. `translate_texts`
goes from source texts to translations with a loaded model.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax import decode
from gpt_jax.data import pairs
from gpt_jax.decode import sample_tokens
from gpt_jax.model import EncDecConfig, EncoderDecoder, init_cache

SOURCE_BUCKET = 16  # sources are padded to a multiple of this, so few shapes compile


def _row_keys(seed, batch: int, step):
    base = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.split(base, batch)


def _sampling_arrays(batch: int, temperature: float, top_k: int, top_p: float):
    return (jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_k, jnp.int32),
            jnp.full((batch,), top_p, jnp.float32))


def _start(graphdef: nnx.GraphDef, params, dec_cfg, source_ids, source_valid, copies: int, max_new_tokens: int):
    """A decoding loop's start: cross-attention keys/values computed once per source and its mask, each repeated for
    `copies` rows, an empty KV cache for those rows and its key mask (causality hides the slots not yet written)."""
    model = nnx.merge(graphdef, params)
    cross = model.decoder.cross_kv(model.encode(source_ids, source_valid))
    cross = jax.tree.map(lambda a: jnp.repeat(a, copies, axis=0), cross)
    rows = source_ids.shape[0] * copies
    return (cross, jnp.repeat(source_valid, copies, axis=0), init_cache(dec_cfg, rows, max_new_tokens),
            jnp.ones((rows, max_new_tokens), bool))


@functools.lru_cache(maxsize=8)
def _compiled_generate(graphdef: nnx.GraphDef, cfg: EncDecConfig, max_new_tokens: int):
    dec_cfg = cfg.decoder

    def run(params, source_ids, source_valid, temperature, top_k, top_p, seed):
        batch = source_ids.shape[0]
        cross, source_valid, cache, key_valid = _start(graphdef, params, dec_cfg, source_ids, source_valid, 1,
                                                       max_new_tokens)
        out = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32)
        token = jnp.full((batch,), cfg.decoder_start_id, jnp.int32)

        def cond(carry):
            i, _, _, _, done = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, token, cache, out, done = carry
            decoder = nnx.merge(graphdef, params).decoder
            positions = jnp.full((batch, 1), i)
            logits, cache = decoder(token[:, None], positions, cross_kv=cross, memory_valid=source_valid,
                                    cache=cache, cache_index=i, key_valid=key_valid)
            nxt = sample_tokens(logits[:, 0], _row_keys(seed, batch, i), temperature, top_k, top_p)
            nxt = jnp.where(done, cfg.pad_id, nxt)
            out = out.at[:, i].set(nxt)
            return i + 1, nxt, cache, out, done | (nxt == cfg.eos_id)

        carry = (jnp.int32(0), token, cache, out, jnp.zeros((batch,), bool))
        return jax.lax.while_loop(cond, body, carry)[3]

    return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _compiled_beam_search(graphdef: nnx.GraphDef, cfg: EncDecConfig, max_new_tokens: int, beam: int):
    dec_cfg = cfg.decoder

    def run(params, source_ids, source_valid, length_penalty):
        batch, rows = source_ids.shape[0], source_ids.shape[0] * beam
        cross, memory_valid, cache, key_valid = _start(graphdef, params, dec_cfg, source_ids, source_valid, beam,
                                                       max_new_tokens)
        empty = jnp.full((batch, beam, max_new_tokens), cfg.pad_id, jnp.int32)
        # the live hypotheses (raw log-probability sums; only the first is live at the start, so the beams differ)
        # and the finished ones (length-normalized scores), `beam` of each per source
        alive_score = jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf), (batch, 1))
        token = jnp.full((batch, beam), cfg.decoder_start_id, jnp.int32)

        def normalized(score, length):
            return score / jnp.asarray(length, jnp.float32) ** length_penalty

        def cond(carry):
            i, _, _, _, alive_score, _, done_score = carry
            # stop once no live hypothesis, normalized at its current length, beats the worst finished one kept
            hopeless = normalized(alive_score[:, 0], jnp.maximum(i, 1)) < done_score[:, -1]
            return (i < max_new_tokens) & ~jnp.all(hopeless)

        def body(carry):
            i, token, cache, alive_seq, alive_score, done_seq, done_score = carry
            decoder = nnx.merge(graphdef, params).decoder
            logits, cache = decoder(token.reshape(rows, 1), jnp.full((rows, 1), i), cross_kv=cross,
                                    memory_valid=memory_valid, cache=cache, cache_index=i, key_valid=key_valid)
            logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)).reshape(batch, beam, -1)
            vocab = logp.shape[-1]
            score, index = jax.lax.top_k((alive_score[..., None] + logp).reshape(batch, -1), 2 * beam)
            parent, nxt = index // vocab, index % vocab
            seq = jnp.take_along_axis(alive_seq, parent[..., None], axis=1).at[:, :, i].set(nxt)
            ended = nxt == cfg.eos_id
            # the best `beam` finished hypotheses so far, among the kept ones and those ending now
            done_cand = jnp.concatenate([done_score, jnp.where(ended, normalized(score, i + 1), -jnp.inf)], axis=1)
            done_score, keep = jax.lax.top_k(done_cand, beam)
            done_seq = jnp.take_along_axis(jnp.concatenate([done_seq, seq], axis=1), keep[..., None], axis=1)
            # the best `beam` continuing ones (2 × beam candidates leave at least `beam` without the end token)
            alive_score, keep = jax.lax.top_k(jnp.where(ended, -jnp.inf, score), beam)
            alive_seq = jnp.take_along_axis(seq, keep[..., None], axis=1)
            rows_from = (jnp.arange(batch)[:, None] * beam + jnp.take_along_axis(parent, keep, axis=1)).reshape(-1)
            cache = jax.tree.map(lambda a: a[rows_from], cache)
            return i + 1, jnp.take_along_axis(nxt, keep, axis=1), cache, alive_seq, alive_score, done_seq, done_score

        carry = (jnp.int32(0), token, cache, empty, alive_score, empty, jnp.full((batch, beam), -jnp.inf))
        _, _, _, alive_seq, alive_score, done_seq, done_score = jax.lax.while_loop(cond, body, carry)
        # a source with no finished hypothesis (all ran to max_new_tokens) keeps its best live one
        best = jnp.where(jnp.isfinite(done_score[:, 0])[:, None], done_seq[:, 0], alive_seq[:, 0])
        return best

    return jax.jit(run)


def beam_search(model: EncoderDecoder, source_ids, source_valid, max_new_tokens: int, *, beam_size: int = 4,
                length_penalty: float = 1.0) -> np.ndarray:
    """The best target tokens [batch, max_new_tokens] by beam search: `beam_size` live hypotheses per source, and the
    finished one with the highest log-probability / length ** length_penalty (the end token counts in the length;
    0 ranks by the raw sum). Laid out like `generate`'s output."""
    graphdef, params = nnx.split(model, nnx.Param)
    run = _compiled_beam_search(graphdef, model.cfg, max_new_tokens, beam_size)
    return np.asarray(run(params, jnp.asarray(source_ids), jnp.asarray(source_valid, bool),
                          jnp.float32(length_penalty)))


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
              seed: int = 0, beam_size: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    """Output token lists (end token and padding removed) for encoded sources, in their order. Sources are sorted
    by length into batches of `batch_size` rows (the last one padded), so shapes repeat. beam_size > 1 decodes by
    beam search (the sampling arguments then do not apply)."""
    cfg = model.cfg
    order = sorted(range(len(source_rows)), key=lambda i: len(source_rows[i]))
    results: list[list[int]] = [[] for _ in source_rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, valid = pad_batch([source_rows[i] for i in chunk], cfg.pad_id, batch=batch_size)
        valid[len(chunk):, 0] = True  # filler rows attend to one (padding) token rather than none
        if beam_size > 1:
            out = beam_search(model, ids, valid, max_new_tokens, beam_size=beam_size, length_penalty=length_penalty)
        else:
            out = generate(model, ids, valid, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed + start)
        for row, i in enumerate(chunk):
            results[i] = strip_output(out[row], cfg.eos_id, (cfg.pad_id, cfg.decoder_start_id))
    return results


def translate_texts(loaded, sources: Sequence[str], *, max_new_tokens: int = 96, batch_size: int = 128,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, beam_size: int = 1,
                    length_penalty: float = 1.0) -> list[str]:
    """Translations of source texts by a loaded encoder-decoder (`workdir.LoadedModel`: its model, source and
    target tokenizers, and the run config's special tokens and source length), greedy at temperature 0, by beam
    search with beam_size > 1."""
    m, config = loaded.config.model, loaded.config
    rows = pairs.encode_sources(loaded.source_tokenizer, sources, config.data.max_source_len or config.seq_len,
                                m.source_bos_id, m.source_eos_id)
    out = translate(loaded.model, rows, max_new_tokens=max_new_tokens, batch_size=min(batch_size, max(len(rows), 1)),
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, beam_size=beam_size,
                    length_penalty=length_penalty)
    return pairs.decode_targets(loaded.tokenizer, out)


class TranslationEngine:
    """What serving an encoder-decoder runs on, with `decode.Engine`'s interface: a request's prompt is the source
    (token ids of the source tokenizer, without its wrapping tokens); the waiting requests are translated together
    at the next step, each finishing with one update that holds its whole translation."""

    def __init__(self, loaded, max_batch: int = 8):
        self.loaded, self.max_batch = loaded, max_batch
        self.cfg = loaded.model_cfg.decoder
        self.max_len = self.cfg.max_seq_len
        self._pending: deque[decode.RequestState] = deque()
        self._lock = threading.Lock()

    def submit(self, request: decode.Request) -> decode.RequestState:
        state = decode.RequestState(request)
        with self._lock:
            self._pending.append(state)
        return state

    def cancel(self, state: decode.RequestState) -> None:
        state.cancelled = True

    def has_work(self) -> bool:
        return bool(self._pending)

    def load(self) -> tuple[int, int]:
        return 0, len(self._pending)

    def warmup(self, prompt_len: int = 16) -> None:
        self.submit(decode.Request([0] * min(prompt_len, 8), max_tokens=2))
        self.step()

    def fail_all(self, reason: str = "error") -> None:
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for state in pending:
            self._finish(state, [], reason)

    def step(self) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        groups: dict[tuple, list[decode.RequestState]] = {}
        for state in batch:
            if state.cancelled:
                self._finish(state, [], "cancelled")
                continue
            r = state.request
            groups.setdefault((r.sampling, r.seed, r.stream_id), []).append(state)
        m, config = self.loaded.config.model, self.loaded.config
        room = (config.data.max_source_len or config.seq_len) - (m.source_bos_id >= 0) - (m.source_eos_id >= 0)
        for (sampling, seed, _), states in groups.items():
            rows = [([m.source_bos_id] if m.source_bos_id >= 0 else []) + list(s.request.prompt)[:room]
                    + ([m.source_eos_id] if m.source_eos_id >= 0 else []) for s in states]
            out = translate(self.loaded.model, rows, max_new_tokens=max(s.request.max_tokens for s in states),
                            batch_size=len(rows), temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, seed=(seed + states[0].request.stream_id) & 0x7FFFFFFF)
            for state, tokens in zip(states, out, strict=True):
                tokens = tokens[:state.request.max_tokens]
                self._finish(state, tokens, "stop" if len(tokens) < state.request.max_tokens else "length")

    def _finish(self, state: decode.RequestState, tokens: list[int], reason: str) -> None:
        text = self.loaded.tokenizer.decode(tokens).strip() if tokens else ""
        stops = [text.find(s) for s in state.request.stop if s in text]
        if stops:
            text, reason = text[:min(stops)], "stop"
        state.token_ids, state.text, state.finish_reason = list(tokens), text, reason
        if state.request.on_update is not None:
            state.request.on_update(decode.Update(list(tokens), text, reason))
        state.done.set()
