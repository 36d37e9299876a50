"""Autoregressive decoding with a preallocated KV cache, for sampling from the command line and for serving.

The `Engine` holds `max_batch` cache rows ("slots"); each request owns one row while it decodes, with its own
position, so requests join and leave between steps (continuous batching) and prompts of different lengths never
pad one another. Each iteration prefills newly admitted prompts (jitted, in chunks) and then queues one jitted call
of decode steps over all rows (over row 0 alone when a single request decodes: it takes the lowest free row;
STEPS_PER_CALL steps while no request waits, else one) before it takes the tokens of the call queued in the
iteration before: the next call reads them on the device, so the host's work on tokens overlaps the compute, and
the host's cost per call is shared by several tokens (SmolLM2 on 2 CPU cores, one stream through the server: int8
~1.5x the tokens/s of one step per call taken before the next). Shapes come from
a few buckets — prompt length and cache capacity in powers of two, the batch of new prompts and the rows of a step
1 or `max_batch` (a short prompt's prefill is bound by reading the weights, so padded rows cost little, and half as
many shapes compile) — so steady traffic reuses compiled functions.

Sampling: temperature (0 = greedy), top-k, top-p, per request; a request's random stream depends only on its
`seed`, `stream_id` and token index, not on what else shares the batch. Requests stop at an end token, a stop
sequence (on text), or `max_tokens`. Updates (new tokens and the text that is safe to
show) go to a per-request callback as they are produced, for streaming.

Log-probabilities (`Request.logprobs`): each generated token's log-probability and the most likely alternatives,
from the float32 logits the step computes anyway (log-softmax before temperature and filtering);
`Request.score_prompt` adds the prompt's tokens, scored in the same prefill that fills the cache (one forward over
the prompt), so `max_tokens=0` scores a text without generating.

`generate` runs a batch of prompts to completion on an `Engine`; `sample_workdir` does the same from a model
directory. A text longer than the context slides there: when a row's cache is full its last half is
prefilled again and decoding goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax import ops
from gpt_jax.model import CACHE_SLOTS, ModelConfig, init_cache

PROMPT_BUCKET = 16  # smallest prompt bucket; buckets double up to the cache length
CACHE_BUCKET = 64  # smallest cache capacity; capacities double up to the cache length
PREFILL_CHUNK = 256  # prompts are prefilled this many tokens at a time (bounds the logits held in memory)
MAX_LOGPROBS = 5  # most likely alternatives a request may ask for per token (OpenAI's limit)
STEPS_PER_CALL = 4  # decode steps run in one call while no request waits (see Engine._queue_step)


def steps_per_call(params, rows: int) -> int:
    """The most decode steps one call of `rows` rows runs: STEPS_PER_CALL, or 1 where XLA multiplies weights it
    must convert (bfloat16, int8: the CPU without the kernel, more than its rows). With such weights a loop of steps
    ran ~10x slower (SmolLM2 int8 on a CPU without the kernel, one stream: 115 → 11 tokens/s), likely because XLA
    moves the loop-invariant conversions out of the loop, making float32 copies of every weight per call (not
    confirmed in the compiled program)."""
    converted = [x for x in jax.tree.leaves(params) if x.ndim >= 2 and x.dtype != jnp.float32]
    return STEPS_PER_CALL if not converted or ops.on_cpu_kernel(rows, converted[0]) else 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def _filter_top_k_top_p(scaled, top_k, top_p):
    """Sets logits outside each row's top-k and top-p nucleus to -inf. scaled [batch, vocab]; top_k [batch] (0 =
    off); top_p [batch] (1 = off). The most likely token always stays."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [batch, 1]
    sorted_desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < top_p[:, None], axis=-1)
    n_keep = jnp.clip(jnp.where(top_p >= 1.0, k, n_keep), 1, vocab)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)


def sample_tokens(logits, keys, temperature, top_k, top_p):
    """One token per row of logits [batch, vocab] (float32), each row with its own PRNG key (keys [batch]).
    temperature, top_k (0 = all) and top_p are scalars or [batch] arrays; a temperature of 0 picks the argmax."""
    batch = logits.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))
    greedy = ops.argmax(logits)
    sampling = temperature > 0.0

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        needs_filter = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(sampling, drawn, greedy)

    return jax.lax.cond(jnp.any(sampling), sample, lambda _: greedy, None)


def _row_keys(seeds, streams, counters):
    """A PRNG key per row from (seed, stream, token index)."""
    return jax.vmap(lambda s, i, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), c))(
        seeds, streams, counters)


# Per-row integer and float inputs are packed into two arrays, to keep host→device transfers few.
_I_TOKEN, _I_LENGTH, _I_TOP_K, _I_SEED, _I_STREAM, _I_COUNTER = range(6)
_F_TEMPERATURE, _F_TOP_P = range(2)


def _sample_packed(logits, ints, floats):
    keys = _row_keys(ints[:, _I_SEED].astype(jnp.uint32), ints[:, _I_STREAM], ints[:, _I_COUNTER])
    return sample_tokens(logits, keys, floats[:, _F_TEMPERATURE], ints[:, _I_TOP_K], floats[:, _F_TOP_P])


def token_logprobs(logits, tokens, top: int = MAX_LOGPROBS):
    """(log-probability of each of `tokens` [...], the `top` best (log-probabilities, token ids) [..., top]) under
    logits [..., vocab] (float32): one log-softmax feeds both, so a token that is the most likely one has exactly
    the value at the top of the list."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logp, min(top, logp.shape[-1]))
    return chosen, top_values, top_ids


# ----------------------------------------------------------------------------------------------------------------
# Jitted prefill and decode step, built once per model graph


@functools.lru_cache(maxsize=8)
def _compiled(graphdef: nnx.GraphDef, cfg: ModelConfig):
    """(prefill, write, step, sample, grow, logprobs) jitted for one model graph; shapes pick the compiled
    variant. The decode step samples its tokens itself; after a prefill, sampling is compiled on its own, once per
    batch size rather than once per prefill shape. A prefill fills a cache of its own, which `write` copies into
    the engine's rows: the model's program is compiled per prompt shape only, not again at every cache capacity."""
    last_position = cfg.max_seq_len - 1

    def prefill(params, tokens, ints, score: bool = False):
        """Prefills prompts tokens [batch, padded] (right-padded; ints[:, LENGTH] real tokens) into a cache of
        their own; returns (logits after each prompt [batch, vocab], that cache, scores). With `score`, scores are
        `token_logprobs` of every next prompt token ([batch, padded] and [batch, padded, top]: position j scores
        token j + 1), else None."""
        batch, padded = tokens.shape
        chunk = min(padded, PREFILL_CHUNK)
        lengths = ints[:, _I_LENGTH]
        key_valid = jnp.arange(padded)[None, :] < lengths[:, None]  # [batch, padded]
        next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))

        def body(carry, start):
            small, last = carry
            model = nnx.merge(graphdef, params)
            chunk_tokens = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
            positions = jnp.broadcast_to(jnp.minimum(start + jnp.arange(chunk), last_position), (batch, chunk))
            index = lengths - 1 - start  # each prompt's last position in this chunk (if there)
            at_index = lambda x: jnp.take_along_axis(x, jnp.clip(index, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
            if score:
                logits, small = model(chunk_tokens, positions, cache=small, cache_index=start, key_valid=key_valid)
                picked, scores = at_index(logits), token_logprobs(
                    logits, jax.lax.dynamic_slice_in_dim(next_tokens, start, chunk, axis=1))
            else:  # the output head for the last positions only
                hidden, small = model(chunk_tokens, positions, cache=small, cache_index=start, key_valid=key_valid,
                                      return_hidden=True)
                picked, scores = model.logits(at_index(hidden)), None
            last = jnp.where(((index >= 0) & (index < chunk))[:, None], picked, last)
            return (small, last), scores

        small = init_cache(cfg, batch, padded)
        last = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        (small, last), scores = jax.lax.scan(body, (small, last), jnp.arange(0, padded, chunk))
        if score:  # [chunks, batch, chunk, ...] → [batch, padded, ...]
            scores = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, padded, *x.shape[3:]), scores)
        return last, small, scores

    def write(cache, small, slots):
        """The cache with its rows `slots` (out-of-range ones dropped) holding a prefill's cache `small`."""
        n = min(_capacity(small), _capacity(cache))
        return [{name: _write_slots(layer[name], slots, name, new[name], n) for name in ("k", "v")}
                for layer, new in zip(cache, small, strict=True)]

    def step(params, cache, last, ints, floats, steps, rows: int):
        """`steps` (1 to steps_per_call(params, rows); traced, so one program serves every count) decode steps of the
        first `rows` rows, each writing a row's token at its position and sampling the next: returns (the last
        step's next-token logits [rows, vocab], the sampled tokens [steps_per_call, rows] (the first `steps`),
        `last` with the final ones in its first rows, cache). A row's first token is ints[:, TOKEN], or where that
        is negative the one the previous call sampled (last [max_batch]), so a call can be queued before the host
        has read the previous one's. Rows past `rows` are left as they are, so one stream in row 0 multiplies one
        row."""
        model = nnx.merge(graphdef, params)

        def one(i, carry):
            cache, last, _, sampled = carry
            lengths = ints[:rows, _I_LENGTH] + i  # each row's slot for its token: it attends to the slots up to it
            positions = jnp.minimum(lengths, last_position)[:, None]
            tokens = jnp.where((ints[:rows, _I_TOKEN] >= 0) & (i == 0), ints[:rows, _I_TOKEN], last[:rows])
            logits, cache = model(tokens[:, None], positions, cache=cache, cache_index=lengths)
            new = _sample_packed(logits[:, 0], ints[:rows].at[:, _I_COUNTER].add(i), floats[:rows])
            return cache, jax.lax.dynamic_update_slice(last, new, (0,)), logits[:, 0], sampled.at[i].set(new)

        most = steps_per_call(params, rows)
        start = (cache, last, jnp.zeros((rows, cfg.vocab_size), jnp.float32), jnp.zeros((most, rows), jnp.int32))
        cache, last, logits, sampled = jax.lax.fori_loop(0, steps, one, start) if most > 1 else one(0, start)
        return logits, sampled, last, cache

    def grow(cache, capacity: int):
        def pad(x, name):
            widths = [(0, 0)] * x.ndim
            widths[CACHE_SLOTS[name]] = (0, capacity - x.shape[CACHE_SLOTS[name]])
            return jnp.pad(x, widths)

        return [{name: pad(layer[name], name) for name in ("k", "v")} for layer in cache]

    return (jax.jit(prefill, static_argnames=("score",)), jax.jit(write, donate_argnums=(0,)),
            jax.jit(step, donate_argnums=(1,), static_argnames=("rows",)),
            jax.jit(_sample_packed), jax.jit(grow, static_argnums=(1,)), jax.jit(token_logprobs))


def _capacity(cache) -> int:
    return cache[0]["k"].shape[CACHE_SLOTS["k"]]


def _write_slots(x, rows, name: str, new, n: int):
    """x (one cache array) with its rows `rows` (out-of-range ones dropped) holding the first n slots of new."""
    index = [rows] + [slice(None)] * (x.ndim - 1)
    index[CACHE_SLOTS[name]] = slice(0, n)
    new_index = [slice(None)] * x.ndim
    new_index[CACHE_SLOTS[name]] = slice(0, n)
    return x.at[tuple(index)].set(new[tuple(new_index)], mode="drop")


def _bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power-of-two multiple of `smallest` that holds n, capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


# ----------------------------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the float32 logits, before temperature and
    filtering) and the most likely tokens at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability)


@dataclasses.dataclass
class Update:
    """What a request produced in one engine iteration."""

    token_ids: list[int]  # the new tokens (an end token that stopped the request is not included)
    text: str  # new text that is safe to show (held back while it may begin a stop sequence or a character)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" once the request is over
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of the new tokens and an end token


@dataclasses.dataclass
class Request:
    """One prompt to continue. `on_update` is called from the engine's thread after each new token."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stream_id: int = 0  # requests with the same seed and different stream ids draw different samples
    stop: Sequence[str] = ()  # stop sequences (text; needs a tokenizer); the matched text is not returned
    stop_token_ids: Sequence[int] = ()  # end tokens (not returned)
    slide: bool = False  # when the context is full: keep its last half and go on (else finish with "length")
    on_update: Callable[[Update], None] | None = None
    logprobs: int | None = None  # each new token's log-probability and this many alternatives (≤ MAX_LOGPROBS)
    score_prompt: bool = False  # the same for the prompt's tokens (with `logprobs`); max_tokens may then be 0


class IncrementalText:
    """The text of a growing token list, equal to `tokenizer.decode` of the whole list, for the decoding of a few
    tokens per token added: decoding the whole list each time costs time quadratic in its length (a SmolLM2
    tokenizer: 1.5 ms per call at 8,192 tokens, per row and step).

    The text of the settled tokens (those whose text ends in a whole character) is kept; a new token's text is what
    decoding the tokens from `start` adds to decoding the settled ones from `start` alone. Decoding both from the same
    token matters: tokenizers drop the space of a string's first word (SentencePiece, Metaspace), and a token that
    decodes to nothing (a control token) would move that drop to the next word, so `start` only moves to tokens whose
    text is not empty."""

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        self._start = 0  # the decoded window begins at this token
        self._settled = 0  # tokens [:_settled] have settled text
        self._settled_text = ""  # the text of tokens [:_settled]
        self._head = ""  # the text of tokens [_start:_settled] decoded alone

    def update(self, ids: Sequence[int]) -> str:
        """The text of `ids`, the list given before with tokens appended."""
        window = self._decode(ids[self._start:])
        if window.startswith(self._head):
            text = self._settled_text + window[len(self._head):]
        else:  # a tokenizer whose text of the settled tokens changes with what follows: decode it all
            text = self._decode(ids)
        if not text.endswith("\ufffd"):  # a whole character (a partial one decodes to the replacement character)
            new = self._decode(ids[self._settled:])
            if new:
                self._start, self._head = self._settled, new
            else:
                self._head = window
            self._settled, self._settled_text = len(ids), text
        return text


class RequestState:
    """A submitted request and what it has produced so far."""

    def __init__(self, request: Request):
        self.request = request
        self.history = list(request.prompt)  # prompt + generated tokens
        self.token_ids: list[int] = []  # generated tokens
        self.text = ""  # generated text (cut at a stop sequence)
        self.logprobs: list[TokenLogprob] = []  # with request.logprobs: per generated token, then an end token's
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # with score_prompt: None for the first token
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._shown = 0  # characters of text already sent in updates
        self._stop_set = frozenset(request.stop_token_ids)
        self._text: IncrementalText | None = None  # with a tokenizer, made at the first token

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)


class _Prefill(NamedTuple):
    """A row's prefill: the request, the tokens to prefill (its context) and whether their log-probabilities are
    scored."""

    row: int
    state: RequestState
    context: list[int]
    score: bool


class Engine:
    """Continuous-batching decoder over `max_batch` KV-cache rows of up to `max_len` tokens.

    `submit` and `cancel` may be called from any thread; `step` (and `run_until_done`) from one thread only.
    """

    def __init__(self, model: nnx.Module, cfg: ModelConfig, max_batch: int = 8, max_len: int | None = None,
                 tokenizer=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} leaves no room to decode")
        # committed to one device, so every call sees the same placement (else the first call compiles twice)
        self._device = jax.local_devices()[0]
        graphdef, params = nnx.split(model, nnx.Param)
        # as plain arrays: jit flattens a dict in C++, an nnx.State per Variable in Python (SmolLM2, one stream:
        # int8 1.09x, bf16 1.04x the tokens/s)
        self.params = jax.device_put(nnx.to_pure_dict(params), self._device)
        self._steps_per_call = {n: steps_per_call(self.params, n) for n in (1, max_batch)}  # by rows, not per step
        self._prefill, self._write, self._step, self._sample, self._grow, self._logprobs = _compiled(graphdef, cfg)
        self._capacity = min(CACHE_BUCKET, self.max_len)
        self._cache = self._new_cache()
        self._rows: list[RequestState | None] = [None] * max_batch
        self._ints = np.zeros((max_batch, 6), np.int32)  # per row: see _I_*
        self._epochs = np.zeros(max_batch, np.int64)  # per row: bumped when its request or context changes
        self._last = jax.device_put(np.zeros(max_batch, np.int32), self._device)  # the tokens last sampled
        self._ahead = None  # the step queued and not yet taken (see `step`)
        self._floats = np.zeros((max_batch, 2), np.float32)
        self._lock = threading.Lock()
        self._pending: deque[RequestState] = deque()
        self._refill: list[int] = []  # rows whose context is full and slides
        self.steps = 0  # decode steps run (for statistics)

    # -- the interface ---------------------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestState:
        """Queues a request; it joins the batch at the next iteration with a free row."""
        if not request.prompt:
            raise ValueError("the prompt needs at least one token")
        if request.stop and self.tokenizer is None:
            raise ValueError("stop sequences need an engine with a tokenizer")
        if len(request.prompt) > self.max_len and (not request.slide or request.score_prompt):
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the context holds {self.max_len}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={request.logprobs} is not in [0, {MAX_LOGPROBS}]")
        if request.score_prompt and request.logprobs is None:
            raise ValueError("score_prompt needs logprobs (how many alternatives per token)")
        state = RequestState(request)
        if request.max_tokens <= 0 and not request.score_prompt:
            self._finish(state, "length")
            return state
        with self._lock:
            self._pending.append(state)
        return state

    def cancel(self, state: RequestState) -> None:
        """Asks the engine to drop a request at its next iteration (its last update says "cancelled")."""
        state.cancelled = True

    def has_work(self) -> bool:
        return bool(self._pending) or any(r is not None for r in self._rows) or self._ahead is not None

    def load(self) -> tuple[int, int]:
        """(rows decoding, requests waiting)."""
        return sum(r is not None for r in self._rows), len(self._pending)

    def step(self) -> None:
        """One iteration: admits waiting requests into free rows (prefill), queues a decode step for all rows,
        then takes the tokens of the step queued before it. The host's work on a step's tokens (stop checks, text,
        updates) thus overlaps the next step's compute; the next step reads those tokens on the device. A row that
        stopped meanwhile had one call computed in vain (none is queued when every row is sure to end)."""
        self._drop_cancelled()
        self._start_small_when_idle()
        self._admit()
        queued = self._queue_step()
        if self._ahead is not None:
            self._take(self._ahead)
        self._ahead = queued
        self._start_small_when_idle()

    def _queue_step(self):
        """Dispatches decode steps for the rows with a request, unless each of them is certain to end when the
        steps before are taken: STEPS_PER_CALL in one call while no request waits, none asks for log-probabilities
        and every row has that many tokens to go, else one. Returns (logits, tokens, steps, rows, lengths and epochs
        at dispatch) or None."""
        active = [i for i, r in enumerate(self._rows) if r is not None]
        lengths, counters = self._ints[:, _I_LENGTH], self._ints[:, _I_COUNTER]
        left = {i: min(self.max_len - lengths[i], self._rows[i].request.max_tokens - counters[i]) for i in active}
        if not any(n > 0 for n in left.values()):
            return None
        rows = 1 if active == [0] else self.max_batch  # one stream (it takes row 0) or all rows
        most = self._steps_per_call[rows]
        steps = most if not self._pending and min(left.values()) >= most and all(
            self._rows[i].request.logprobs is None for i in active) else 1
        self._ensure_capacity(int(lengths[active].max()) + steps)
        # copies: the step may read its host inputs after this returns, while the host goes on changing them
        logits, tokens, self._last, self._cache = self._step(self.params, self._cache, self._last, self._ints.copy(),
                                                             self._floats.copy(), np.int32(steps), rows=rows)
        queued = (logits, tokens, steps, rows, lengths.copy(), self._epochs.copy())
        self._ints[active, _I_TOKEN] = -1  # the next step reads the token this one samples
        self._ints[active, _I_LENGTH] += steps
        self._ints[active, _I_COUNTER] += steps
        self.steps += steps
        return queued

    def _take(self, queued) -> None:
        """Accepts the tokens queued steps sampled, in order, for the rows whose requests are still where they were
        when they were queued (same request, not prefilled again since) and have not ended."""
        logits, tokens, steps, rows, lengths, epochs = queued
        def unchanged(i):  # a release or a new prefill bumps the row's epoch
            return self._rows[i] is not None and self._epochs[i] == epochs[i]

        current = [i for i in range(rows) if unchanged(i)]
        if not current:
            return  # nothing to wait for
        tokens = np.asarray(tokens)[:steps]
        # log-probabilities are asked for only of single steps (see _queue_step)
        scored = self._score_tokens(logits, tokens[0], [self._rows[i] if i in current else None
                                                        for i in range(rows)]) if len(tokens) == 1 else [None] * rows
        for j, step_tokens in enumerate(tokens):
            for i in current:
                if unchanged(i) and i not in self._refill:  # not ended or queued to slide by an earlier token
                    self._accept(i, int(step_tokens[i]), int(lengths[i]) + 1 + j, scored[i])

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def fail_all(self, reason: str = "error") -> None:
        """Finishes every waiting and decoding request (e.g. after an exception, or at shutdown)."""
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for state in pending:
            self._finish(state, reason)
        for i, state in enumerate(self._rows):
            if state is not None:
                self._release(i, reason)
        self._refill.clear()
        self._ahead = None

    def warmup(self, prompt_len: int = PROMPT_BUCKET) -> None:
        """Compiles the decode step at the smallest capacity, sampling, and the prefill of one prompt and of
        `max_batch` prompts for every prompt bucket up to `prompt_len`, so early requests don't wait for the
        compiler."""
        prompt_len = min(prompt_len, self.max_len)
        for batch in sorted({1, self.max_batch}):
            length = min(PROMPT_BUCKET, prompt_len)
            while True:
                for _ in range(batch):
                    self.submit(Request([0] * length, max_tokens=2, sampling=SamplingParams(0.0)))
                self.run_until_done()
                if length >= prompt_len:
                    break
                length = min(length * 2, prompt_len)

    # -- internals -------------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for i, state in enumerate(self._rows):
            if state is not None and state.cancelled:
                self._release(i, "cancelled")
        with self._lock:
            if any(s.cancelled for s in self._pending):
                cancelled = [s for s in self._pending if s.cancelled]
                self._pending = deque(s for s in self._pending if not s.cancelled)
            else:
                cancelled = []
        for state in cancelled:
            self._finish(state, "cancelled")

    def _admit(self) -> None:
        jobs: list[_Prefill] = []
        for i in self._refill:
            state = self._rows[i]
            if state is not None:
                jobs.append(_Prefill(i, state, state.history[-(self.max_len // 2):], False))
        self._refill.clear()
        free = [i for i, r in enumerate(self._rows) if r is None]
        with self._lock:
            while free and self._pending:
                state = self._pending.popleft()
                i = free.pop(0)
                self._rows[i] = state
                jobs.append(_Prefill(i, state, state.history[-self.max_len:], state.request.score_prompt))
        if not jobs:
            return
        # one prefill call per prompt bucket (and whether its prompts are scored)
        groups: dict[tuple[int, bool], list[_Prefill]] = {}
        for job in jobs:
            groups.setdefault((_bucket(len(job.context), PROMPT_BUCKET, self.max_len), job.score), []).append(job)
        for (padded_len, score), group in sorted(groups.items()):
            self._ensure_capacity(padded_len)
            chunk = min(padded_len, PREFILL_CHUNK)
            padded = -(-padded_len // chunk) * chunk
            batch = 1 if len(group) == 1 else self.max_batch
            tokens = np.zeros((batch, padded), np.int32)
            slots = np.full(batch, self.max_batch, np.int32)  # out of range: dropped
            ints = np.zeros((batch, 6), np.int32)
            floats = np.zeros((batch, 2), np.float32)
            ints[:, _I_LENGTH] = 1
            for b, job in enumerate(group):
                tokens[b, :len(job.context)] = job.context
                slots[b] = job.row
                self._set_row(job.row, job.state, len(job.context))
                ints[b] = self._ints[job.row]
                floats[b] = self._floats[job.row]
            logits, small, scores = self._prefill(self.params, tokens, ints, score=score)
            self._cache = self._write(self._cache, small, slots)
            first = np.asarray(self._sample(logits, ints, floats))
            scored = self._score_tokens(logits, first, [job.state for job in group])
            if score:
                chosen, top_values, top_ids = (np.asarray(x) for x in scores)
                for b, job in enumerate(group):
                    k = job.state.request.logprobs
                    job.state.prompt_logprobs = [None] + [
                        _entry(job.context[j + 1], chosen[b, j], top_values[b, j], top_ids[b, j], k)
                        for j in range(len(job.context) - 1)]
            for b, job in enumerate(group):
                if job.state.request.max_tokens <= 0:  # scoring the prompt was all it asked for
                    self._release(job.row, "length")
                    continue
                self._ints[job.row, _I_COUNTER] += 1
                if self._accept(job.row, int(first[b]), len(job.context), scored[b]):
                    self._ints[job.row, _I_TOKEN] = first[b]

    def _score_tokens(self, logits, tokens: np.ndarray, states: list[RequestState | None]) -> list[TokenLogprob | None]:
        """Per row, the sampled token's `TokenLogprob` where its request asks for logprobs, else None."""
        wanted = [s is not None and s.request.logprobs is not None for s in states]
        if not any(wanted):
            return [None] * len(states)
        chosen, top_values, top_ids = (np.asarray(x) for x in self._logprobs(logits, tokens))
        return [_entry(int(tokens[b]), chosen[b], top_values[b], top_ids[b], states[b].request.logprobs)
                if wanted[b] else None for b in range(len(states))]

    def _start_small_when_idle(self) -> None:
        """With no row decoding, the cache goes back to the smallest capacity: the next requests step (and compile)
        at the size the warmup did, and an idle server holds no large cache."""
        smallest = min(CACHE_BUCKET, self.max_len)
        if self._capacity > smallest and all(r is None for r in self._rows):
            self._capacity = smallest
            self._cache = self._new_cache()

    def _new_cache(self) -> list[dict]:
        return jax.device_put(init_cache(self.cfg, self.max_batch, self._capacity), self._device)

    def _set_row(self, i: int, state: RequestState, length: int) -> None:
        req = state.request
        s = req.sampling
        seed = (req.seed & 0xFFFFFFFF) - ((req.seed & 0x80000000) << 1)  # as int32; the step reads it as uint32
        self._ints[i] = (0, length, max(s.top_k, 0), seed, req.stream_id, len(state.token_ids))
        self._epochs[i] += 1
        self._floats[i] = (s.temperature, s.top_p)

    def _ensure_capacity(self, needed: int) -> None:
        target = _bucket(needed, CACHE_BUCKET, self.max_len)
        if target > self._capacity:
            self._cache = self._grow(self._cache, target)
            self._capacity = target

    def _accept(self, i: int, token: int, slot: int, logprob: TokenLogprob | None = None) -> bool:
        """Handles the token just sampled for row i, to be written at `slot` (and its log-probability, when asked
        for): records it, emits an update, and stops the row (or queues it to slide); True while the row goes on."""
        state = self._rows[i]
        req = state.request
        scored = [] if logprob is None else [logprob]
        state.logprobs += scored
        if token in state._stop_set:
            self._release(i, "stop", logprobs=scored)
            return False
        state.token_ids.append(token)
        state.history.append(token)
        finish = None
        if self.tokenizer is not None:
            finish = self._update_text(state)
        if finish is None and len(state.token_ids) >= req.max_tokens:
            finish = "length"
        if finish is None and slot >= self.max_len:
            if req.slide:
                self._refill.append(i)
            else:
                finish = "length"
        if finish is not None:
            self._release(i, finish, new_tokens=[token], logprobs=scored)
            return False
        self._emit(state, [token], final=False, logprobs=scored)
        return True

    def _update_text(self, state: RequestState) -> str | None:
        if state._text is None:
            state._text = IncrementalText(self.tokenizer)
        text = state._text.update(state.token_ids)
        stops = state.request.stop
        if stops:
            start = max(0, len(state.text) - max(len(s) for s in stops))
            hits = [j for j in (text.find(s, start) for s in stops) if j >= 0]
            if hits:
                state.text = text[:min(hits)]
                return "stop"
        state.text = text
        return None

    def _safe_end(self, state: RequestState) -> int:
        """How much of the text can be shown now: not a trailing partial character, nor a tail that could be the
        beginning of a stop sequence."""
        text = state.text
        end = len(text)
        while end > state._shown and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in state.request.stop:
            for n in range(min(len(s) - 1, end), hold, -1):
                if text[end - n:end] == s[:n]:
                    hold = n
                    break
        return max(end - hold, state._shown)

    def _emit(self, state: RequestState, tokens: list[int], final: bool,
              logprobs: Sequence[TokenLogprob] = ()) -> None:
        end = len(state.text) if final else self._safe_end(state)
        delta = state.text[state._shown:end]
        state._shown = end
        if state.request.on_update is not None:
            state.request.on_update(Update(tokens, delta, state.finish_reason, list(logprobs)))

    def _release(self, i: int, reason: str, new_tokens: Sequence[int] = (),
                 logprobs: Sequence[TokenLogprob] = ()) -> None:
        state = self._rows[i]
        self._rows[i] = None
        self._ints[i] = 0
        self._epochs[i] += 1
        self._floats[i] = 0.0
        if i in self._refill:
            self._refill.remove(i)
        self._finish(state, reason, new_tokens, logprobs)

    def _finish(self, state: RequestState, reason: str, new_tokens: Sequence[int] = (),
                logprobs: Sequence[TokenLogprob] = ()) -> None:
        state.finish_reason = reason
        self._emit(state, list(new_tokens), final=True, logprobs=logprobs)
        state.done.set()


def _entry(token: int, value, top_values, top_ids, k: int) -> TokenLogprob:
    """A TokenLogprob from one position's scores; a token among the top ones takes its value from there, so a
    greedy token's log-probability is the maximum, bit for bit."""
    for t, v in zip(top_ids, top_values, strict=True):
        if int(t) == token:
            value = v
            break
    top = tuple((int(t), float(v)) for t, v in zip(top_ids[:k], top_values[:k], strict=True))
    return TokenLogprob(int(token), float(value), top)


# ----------------------------------------------------------------------------------------------------------------
# Batch generation


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids: BOS first where the model expects one (`add_bos`); an empty prompt is BOS (else EOS,
    else token 0), so there is always a token to continue."""
    ids = list(tokenizer.encode(text))
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        ids.insert(0, tokenizer.bos_id)
    return ids or [next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), 0)]


def generate(model: nnx.Module, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(0.0), *, seed: int = 0, eos_id: int | None = None,
             max_batch: int | None = None, tokenizer=None, stops: Sequence[str] = ()) -> list[RequestState]:
    """Continues each prompt (token ids) by up to max_new_tokens tokens on an `Engine` of `max_batch` rows (default:
    every prompt at once); returns the finished requests in order: `.token_ids`, and with a tokenizer `.text`, cut
    before the first of `stops`. A row ends at `eos_id` (not included); row i samples with (seed, stream i), so its
    tokens don't depend on the other rows; a text longer than the context slides (the last half of the context is
    prefilled again)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    engine = Engine(model, cfg, max_batch=min(max_batch or len(prompts), len(prompts)), tokenizer=tokenizer)
    states = [engine.submit(Request(prompt=list(prompt)[-(engine.max_len - 1):], max_tokens=max_new_tokens,
                                    sampling=sampling, seed=seed, stream_id=row, stop=tuple(stops),
                                    stop_token_ids=() if eos_id is None else (eos_id,), slide=True))
              for row, prompt in enumerate(prompts)]
    engine.run_until_done()
    return states


def sample_workdir(source: str, prompts: Sequence[str], max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, num_samples: int = 1, seed: int = 0,
                   weights: tuple[str, str] | None = None) -> list[list[str]]:
    """Loads the model at `source` (its weights stored as `weights` = (param_dtype, quantize) when given) and
    returns, per prompt, `num_samples` generated continuations (text); an encoder-decoder's are translations of
    the prompts."""
    from gpt_jax import workdir
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
    loaded = workdir.load(source, weights)
    if loaded.config.model.kind == "encoder_decoder":
        from gpt_jax import encdec_decode

        texts = [text for p in prompts for text in encdec_decode.translate_texts(
            loaded, [p] * num_samples, max_new_tokens=max(max_new_tokens, 1), temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed)]
    else:
        rows = [encode_prompt(loaded.tokenizer, p) for p in prompts for _ in range(num_samples)]
        sampling = SamplingParams(temperature, min(top_k, loaded.model_cfg.vocab_size), top_p)
        texts = [s.text for s in generate(loaded.model, loaded.model_cfg, rows, max_new_tokens, sampling, seed=seed,
                                          eos_id=loaded.tokenizer.eos_id, tokenizer=loaded.tokenizer)]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
