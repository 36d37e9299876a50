"""Autoregressive decoding with a preallocated KV cache: jitted prefill and one-token steps, batches of prompts of
different lengths (left-padded), temperature / top-k / top-p sampling with a seed, greedy at temperature 0.

Shapes are rounded up to buckets (prompt length to a multiple of 16, cache length to a multiple of 64) so repeated
calls reuse compiled functions. A text longer than the model's context slides: when the cache is full the last half
of the context is prefilled again and decoding continues.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax.model import ModelConfig, init_cache

PROMPT_BUCKET = 16
CACHE_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0


def sample_logits(logits, key, temperature, top_k: int, top_p):
    """Picks one token per row of logits [batch, vocab] (float32). temperature 0 picks the argmax."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p: keep the smallest set of most likely tokens whose probability reaches top_p
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
    scaled = jnp.where((top_p < 1.0) & (scaled < cutoff), -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature <= 0.0, greedy, sampled)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Decoder:
    """Holds a model's parameters and its jitted prefill / step functions."""

    def __init__(self, model: nnx.Module, cfg: ModelConfig):
        self.cfg = cfg
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len",))
        self._step = jax.jit(self._step_fn, static_argnames=("top_k",), donate_argnums=(1,))

    def _forward(self, params, tokens, positions, cache, cache_index, key_valid):
        model = nnx.merge(self.graphdef, params)
        return model(tokens, positions, cache=cache, cache_index=cache_index, key_valid=key_valid)

    def _prefill_fn(self, params, tokens, pad_len, cache_len: int):
        """tokens [batch, prompt_len] left-padded by pad_len [batch] → (last logits [batch, vocab], cache)."""
        batch, prompt_len = tokens.shape
        slots = jnp.arange(cache_len)
        key_valid = slots[None, :] >= pad_len[:, None]  # [batch, cache_len]
        positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_len[:, None], 0)
        cache = init_cache(self.cfg, batch, cache_len)
        logits, cache = self._forward(params, tokens, positions, cache, 0, key_valid)
        return logits[:, -1], cache

    def _step_fn(self, params, cache, last_logits, pad_len, index, key, temperature, top_k: int, top_p):
        """Samples a token from last_logits, writes it at cache slot `index`, returns (token, next logits, cache)."""
        token = sample_logits(last_logits, key, temperature, top_k, top_p)
        key_valid = jnp.arange(cache[0]["k"].shape[1])[None, :] >= pad_len[:, None]
        positions = (index - pad_len)[:, None]
        logits, cache = self._forward(params, token[:, None], positions, cache, index, key_valid)
        return token, logits[:, -1], cache

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                 seed: int = 0, eos_id: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Continues each prompt (a list of token ids) by up to max_new_tokens tokens; returns the new tokens.

        A row stops at `eos_id` (not included) or when `should_stop(row, tokens_so_far)` is true. `on_tokens(step,
        tokens)` sees each step's token per row, for streaming."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        ctx = self.cfg.max_seq_len
        batch = len(prompts)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        key = jax.random.key(seed)
        histories = [list(p) for p in prompts]
        step_count = 0
        temperature = jnp.float32(sampling.temperature)
        top_p = jnp.float32(sampling.top_p)
        while step_count < max_new_tokens and not done.all():
            # (re)fill: the most recent tokens that leave room to decode in this segment
            keep = ctx - 1 if step_count == 0 else ctx // 2
            contexts = [h[-keep:] if len(h) > keep else h for h in histories]
            if step_count == 0 and max(len(c) for c in contexts) > ctx - 1:
                contexts = [c[-(ctx - 1):] for c in contexts]
            prompt_len = min(_round_up(max(len(c) for c in contexts), PROMPT_BUCKET), ctx - 1)
            contexts = [c[-prompt_len:] for c in contexts]
            cache_len = min(_round_up(prompt_len + (max_new_tokens - step_count), CACHE_BUCKET), ctx)
            pad_len = np.array([prompt_len - len(c) for c in contexts], np.int32)
            tokens = np.zeros((batch, prompt_len), np.int32)
            for i, c in enumerate(contexts):
                tokens[i, pad_len[i]:] = c
            pad_len = jnp.asarray(pad_len)
            last_logits, cache = self._prefill(self.params, jnp.asarray(tokens), pad_len, cache_len=cache_len)
            for index in range(prompt_len, cache_len):
                if step_count >= max_new_tokens or done.all():
                    break
                token, last_logits, cache = self._step(
                    self.params, cache, last_logits, pad_len, jnp.int32(index),
                    jax.random.fold_in(key, step_count), temperature, sampling.top_k, top_p)
                token = np.asarray(token)
                for i in range(batch):
                    if done[i]:
                        continue
                    t = int(token[i])
                    if eos_id is not None and t == eos_id:
                        done[i] = True
                        continue
                    outputs[i].append(t)
                    histories[i].append(t)
                    if should_stop is not None and should_stop(i, outputs[i]):
                        done[i] = True
                if on_tokens is not None:
                    on_tokens(step_count, [int(t) for t in token])
                step_count += 1
            # the last sampled token's logits were computed at the final slot; a new segment re-prefills
        return outputs



def sample_workdir(source: str, prompts: Sequence[str], max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, num_samples: int = 1, seed: int = 0) -> list[list[str]]:
    """Loads the model at `source` and returns, per prompt, `num_samples` generated continuations (text)."""
    from gpt_jax import pretrained
    from gpt_jax.errors import UserError

    if max_new_tokens < 0:
        raise UserError(f"--max_new_tokens={max_new_tokens} must not be negative")
    if temperature < 0:
        raise UserError(f"--temperature={temperature} must not be negative")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise UserError(f"--top_k={top_k} must not be negative")
    if num_samples < 1:
        raise UserError(f"--num_samples={num_samples} must be at least 1")
    loaded = pretrained.load(source)
    tok = loaded.tokenizer
    encoded = []
    for p in prompts:
        ids = tok.encode(p)
        if not ids:
            ids = [tok.bos_id if tok.bos_id is not None else (tok.eos_id if tok.eos_id is not None else 0)]
        encoded.append(ids)
    decoder = Decoder(loaded.model, loaded.model_cfg)
    sampling = SamplingParams(temperature, min(top_k, loaded.model_cfg.vocab_size), top_p)
    rows = [ids for ids in encoded for _ in range(num_samples)]
    out = decoder.generate(rows, max_new_tokens, sampling, seed=seed, eos_id=tok.eos_id)
    texts = [tok.decode(ids) for ids in out]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
