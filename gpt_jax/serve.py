"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching `decode.Engine`, or for an
encoder-decoder the `encdec_decode.TranslationEngine` (a completion's prompt is the source, its text the
translation; chat completions are refused).

    python -m gpt_jax.main --mode=serve --workdir=DIR [--host=127.0.0.1] [--port=8000] [--api_key=KEY]

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both stream server-sent events
with `"stream": true`), `GET /health` (no key needed). Invalid requests get a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`. One engine thread runs the model; concurrent requests share its
decode steps.

Chat prompts use the tokenizer's Jinja chat template when it has one, else a plain format: one `role: content` line
per message, then `assistant:`; with that format a line starting with `user:` also ends the reply.

Log-probabilities as OpenAI returns them: completions take `logprobs` (0-5 alternatives per token) and answer
`choices[i].logprobs` = {tokens, token_logprobs, top_logprobs, text_offset} for the generated tokens (an end token
that stopped the choice included), with `echo` for the prompt's tokens first (the very first one scores null);
`max_tokens: 0` with `echo` scores a prompt without generating (what lm-evaluation-harness' `local-completions`
sends). Chat completions take `logprobs: true` and `top_logprobs` (0-5) and answer `choices[i].logprobs.content`.
Each token's log-probability and its alternatives come from one log-softmax of the model's float32 logits (before
temperature), so a greedy token's value equals the best of its `top_logprobs` exactly. Prompts are scored in the
prefill that fills the cache, batched with other requests; streams carry the logprobs of their chunks' tokens.
Token strings are each token decoded alone; `text_offset` counts characters into the choice's `text`.

Beyond OpenAI's parameters: `top_k` (0 = off). Accepted and ignored: `user`, `stream_options` other than
`include_usage`, unknown fields. Rejected when set: `logit_bias`, non-zero `presence_penalty` /
`frequency_penalty`, `suffix`, `best_of` other than `n`, and logprobs of an encoder-decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hmac
import json
import logging
import logging.config
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt_jax import decode
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import DataError, UserError

log = logging.getLogger("gpt_jax.serve")
access_log = logging.getLogger("gpt_jax.access")

MAX_BODY_BYTES = 1 << 20  # larger JSON bodies get 413
MAX_WAITING = 512  # requests waiting for a free cache row beyond this get 429
MAX_CHOICES = 32  # prompts × n in one request
MAX_STOP = 4
FALLBACK_STOP = ("\nuser:",)


# ----------------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _finite(value: float) -> float:
    """A log-probability JSON can carry: -inf (a token the model rules out) as float32's lowest value."""
    return value if value > -math.inf else -3.4028234663852886e38


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------------------------
# Request and response bodies


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: no "1" → 1 or false → 0

    model: str = Field(description="The served model's id (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="At most the context length minus the prompt.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension: sample from the k most likely tokens; 0 = all.")
    ignore_eos: bool | None = Field(False, description="Extension (as vLLM's): go on past the model's end token, up "
                                    "to max_tokens (stop sequences still stop).")
    n: int | None = Field(None, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} stop sequences.")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported.")
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=0, description="At most the context length minus the prompt; 0 only "
                                   "with echo (the prompt alone, e.g. scored with logprobs). Default 16.")
    echo: bool | None = Field(False, description="Return the prompt before the completion (and, with logprobs, "
                              "its tokens' log-probabilities).")
    logprobs: int | None = Field(None, ge=0, le=decode.MAX_LOGPROBS, description="Log-probability of each token "
                                 "and of this many most likely alternatives.")
    best_of: int | None = Field(None, ge=1, le=16, description="Only equal to n.")
    suffix: str | None = Field(None, description="Not supported.")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=decode.MAX_LOGPROBS, description="With logprobs: this many most "
                                     "likely alternatives per token.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token of `text` (the prompt's first with echo, whose log-probability
    is null), and an end token that stopped the choice."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt_jax"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str
    decoding: int
    waiting: int


# ----------------------------------------------------------------------------------------------------------------
# The engine thread


class EngineRunner:
    """Runs `engine.step()` on its own thread while there is work; requests are submitted from any thread."""

    def __init__(self, engine: decode.Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt_jax-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: decode.Request) -> decode.RequestState:
        state = self.engine.submit(request)
        self._wake.set()
        return state

    def cancel(self, state: decode.RequestState) -> None:
        if state.finish_reason is None:
            self.engine.cancel(state)
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the loop; requests still running finish as "cancelled"."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(1.0)
                continue
            try:
                self.engine.step()
            except Exception:  # a failed step fails its requests, not the server
                log.exception("decode step failed")
                self.engine.fail_all("error")
        self.engine.fail_all("cancelled")


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, tuple[str, ...]]:
    """The prompt for chat `messages` ([{"role", "content"}]) and the stop sequences its format implies: the
    tokenizer's chat template if it has one, else `role: content` lines and `assistant:`. DataError when the
    template fails on the messages."""
    rendered = tokenizer_lib.apply_chat_template(tokenizer, messages, add_generation_prompt=True)
    if rendered is not None:
        return rendered, ()
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant:", FALLBACK_STOP


def _message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


# ----------------------------------------------------------------------------------------------------------------
# The app


class _Mailbox:
    """Carries updates from the engine thread to the event loop, waking the loop once per batch of updates rather
    than once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Choice:
    """One generation within a request: what to submit and, once done, its result."""

    def __init__(self, index: int, prompt_ids: list[int], prefix: str = ""):
        self.index = index
        self.prompt_ids = prompt_ids
        self.prefix = prefix  # echoed prompt text
        self.state: decode.RequestState | None = None


class Server:
    """The model, its engine thread and the request handling behind the routes."""

    def __init__(self, loaded, max_batch: int = 8, max_len: int | None = None, name: str | None = None):
        self.tokenizer = loaded.tokenizer
        self.name = name or loaded.name
        self.encdec = loaded.config.model.kind == "encoder_decoder"
        if self.encdec:
            from gpt_jax.encdec_decode import TranslationEngine

            self.engine = TranslationEngine(loaded, max_batch=max_batch)
        else:
            self.engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=max_batch, max_len=max_len,
                                        tokenizer=loaded.tokenizer)
        self.prompt_tokenizer = loaded.source_tokenizer if self.encdec else loaded.tokenizer  # what prompts are in
        self.context = self.engine.max_len
        self.prompt_vocab = self.prompt_tokenizer.vocab_size if self.encdec else self.engine.cfg.vocab_size
        self.runner = EngineRunner(self.engine)
        self.created = int(time.time())
        self.eos_id = getattr(self.tokenizer, "eos_id", None)
        self._mailbox: _Mailbox | None = None
        self._token_text = functools.lru_cache(maxsize=1 << 16)(lambda token: self.tokenizer.decode([token]))

    # -- validation ------------------------------------------------------------------------------------------

    def _check_common(self, body: _SamplingFields) -> None:
        if body.model != self.name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{self.name}'.",
                           "model", "model_not_found")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(body, field):
                raise APIError(400, f"{field} is not supported (only 0).", field, "unsupported_parameter")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported.", "logit_bias", "unsupported_parameter")

    def _stops(self, body: _SamplingFields) -> list[str]:
        stop = body.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop takes at most {MAX_STOP} sequences, got {len(stops)}.", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must not be empty.", "stop")
        return stops

    def _encode(self, text: str, param: str, add_bos: bool = False) -> list[int]:
        tokenizer = self.prompt_tokenizer
        try:
            ids = list(tokenizer.encode(text))
        except UserError as e:
            raise APIError(400, f"{param} cannot be encoded: {e}", param) from None
        if self.encdec:  # the engine wraps a source in its special tokens
            return ids
        bos = getattr(tokenizer, "bos_id", None)
        if add_bos and getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        if not ids:
            for name in ("bos_id", "eos_id"):
                if getattr(tokenizer, name, None) is not None:
                    return [getattr(tokenizer, name)]
            raise APIError(400, f"{param} is empty.", param)
        return ids

    def _max_tokens(self, requested: int | None, default: int | None, prompt_len: int, param: str,
                    field: str = "max_tokens") -> int:
        if requested == 0:  # the prompt alone (echo), which must fit the context
            if not self.encdec and prompt_len > self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                    f"{prompt_len} tokens.", param, "context_length_exceeded")
            return 0
        room = self.context - (0 if self.encdec else prompt_len)  # a translation's length does not include its source
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                                f"{prompt_len} tokens and leaves no room to generate.", param,
                           "context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                                f"{requested} in the completion).", field, "context_length_exceeded")
        return requested

    # -- running ---------------------------------------------------------------------------------------------

    def _submit_all(self, choices: list[_Choice], body: _SamplingFields, max_tokens: list[int], stops: list[str],
                    queue: asyncio.Queue, logprobs: int | None, score_prompt: bool) -> None:
        if self.engine.load()[1] + len(choices) > MAX_WAITING:
            raise APIError(429, "The server is overloaded; retry later.", None, "server_overloaded",
                           kind="server_error")
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        mailbox = self._mailbox
        n = body.n or 1
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        sampling = decode.SamplingParams(1.0 if body.temperature is None else body.temperature,
                                         min(body.top_k or 0, self.engine.cfg.vocab_size),
                                         1.0 if body.top_p is None else body.top_p)
        for choice in choices:
            def on_update(update: decode.Update, index=choice.index):
                if body.stream or update.finish_reason is not None:  # without streaming only the end matters
                    mailbox.put(queue, (index, update))

            choice.state = self.runner.submit(decode.Request(
                prompt=choice.prompt_ids, max_tokens=max_tokens[choice.index], sampling=sampling, seed=seed,
                stream_id=choice.index % n, stop=stops,
                stop_token_ids=() if self.eos_id is None or body.ignore_eos else (self.eos_id,), on_update=on_update,
                logprobs=logprobs, score_prompt=score_prompt))

    async def _updates(self, choices: list[_Choice], queue: asyncio.Queue):
        """Yields lists of (choice index, Update), all that arrived since the last, until every choice has
        finished; cancels what is left if abandoned (a client that went away)."""
        remaining = len(choices)
        try:
            while remaining:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for _, update in batch:
                    if update.finish_reason is not None:
                        remaining -= 1
                        if update.finish_reason == "error":
                            raise APIError(500, "The model failed while generating.", code="generation_failed",
                                           kind="server_error")
                yield batch
        finally:
            for choice in choices:
                if choice.state is not None:
                    self.runner.cancel(choice.state)

    @staticmethod
    def _finish_reason(reason: str | None) -> str | None:
        return None if reason is None else ("length" if reason == "length" else "stop")

    # -- endpoints -------------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest):
        self._check_common(body)
        if body.logprobs is not None and self.encdec:
            raise APIError(400, "logprobs is not supported for an encoder-decoder.", "logprobs",
                           "unsupported_parameter")
        if body.max_tokens == 0 and (not body.echo or self.encdec):
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo).", "max_tokens")
        if body.suffix:
            raise APIError(400, "suffix is not supported.", "suffix", "unsupported_parameter")
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, "best_of must equal n.", "best_of", "unsupported_parameter")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty.", "prompt")
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"At most {MAX_CHOICES} completions (prompts × n) per request.", "n")
        vocab = self.prompt_vocab
        encoded = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append((self._encode(p, "prompt", add_bos=True), p))
            else:
                if not p:
                    raise APIError(400, "prompt must not be empty.", "prompt")
                if any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab}).", "prompt")
                encoded.append((list(p), self.prompt_tokenizer.decode(p) if body.echo else ""))
        stops = self._stops(body)
        choices, max_tokens = [], []
        for ids, text in encoded:
            limit = self._max_tokens(body.max_tokens, None if self.encdec else 16, len(ids), "prompt")
            for _ in range(n):
                choices.append(_Choice(len(choices), ids, text if body.echo else ""))
                max_tokens.append(limit)
        score_prompt = bool(body.echo) and body.logprobs is not None
        return await self._run(choices, body, max_tokens, stops, chat=False, logprobs=body.logprobs,
                               score_prompt=score_prompt)

    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_common(body)
        if self.encdec:
            raise APIError(400, "This model is an encoder-decoder (a translation model): use /v1/completions with "
                                "the source as the prompt.", "messages", "unsupported_model")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
        n = body.n or 1
        messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
        try:
            rendered, implied_stops = render_chat(self.tokenizer, messages)
        except DataError as e:
            raise APIError(400, str(e), "messages") from None
        ids = self._encode(rendered, "messages")
        stops = self._stops(body)
        stops += [s for s in implied_stops if s not in stops]
        limit = self._max_tokens(body.max_tokens, None, len(ids), "messages")
        if body.max_completion_tokens is not None:  # the newer name wins; both must fit
            limit = self._max_tokens(body.max_completion_tokens, None, len(ids), "messages", "max_completion_tokens")
        choices = [_Choice(i, ids) for i in range(n)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self._run(choices, body, [limit] * n, stops, chat=True, logprobs=logprobs)

    async def _run(self, choices: list[_Choice], body: _SamplingFields, max_tokens: list[int], stops: list[str],
                   chat: bool, logprobs: int | None = None, score_prompt: bool = False):
        queue: asyncio.Queue = asyncio.Queue()
        self._submit_all(choices, body, max_tokens, stops, queue, logprobs, score_prompt)
        request_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        prompt_tokens = sum(len(c.prompt_ids) for c in choices[::body.n or 1])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(choices, queue, request_id, created, prompt_tokens, include_usage, chat,
                                  logprobs is not None, score_prompt)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        reasons: dict[int, str | None] = {}
        async for batch in self._updates(choices, queue):
            for index, update in batch:
                reasons[index] = self._finish_reason(update.finish_reason)
        texts = {c.index: c.prefix + c.state.text for c in choices}
        completion_tokens = sum(len(c.state.token_ids) for c in choices)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        if chat:
            out = ChatCompletionResponse(
                id=request_id, created=created, model=self.name, usage=usage,
                choices=[ChatChoice(index=c.index, message=AssistantMessage(content=texts[c.index]),
                                    logprobs=self._chat_logprobs(c.state.logprobs[:len(c.state.token_ids)])
                                    if logprobs is not None else None,
                                    finish_reason=reasons[c.index]) for c in choices])
        else:
            out = CompletionResponse(
                id=request_id, created=created, model=self.name, usage=usage,
                choices=[CompletionChoice(index=c.index, text=texts[c.index],
                                          logprobs=self._choice_logprobs(c, score_prompt)
                                          if logprobs is not None else None,
                                          finish_reason=reasons[c.index]) for c in choices])
        return JSONResponse(out.model_dump())

    # -- log-probabilities -----------------------------------------------------------------------------------

    def _pieces(self, ids: list[int], start: int) -> list[str]:
        """The text each token of ids[start:] adds to the decoded text, decoding a few tokens before it along (a
        character split over tokens, a tokenizer's leading-space rule)."""
        pieces = []
        for i in range(start, len(ids)):
            first = max(0, i - 4)
            before = self.tokenizer.decode(ids[first:i]) if i > first else ""
            upto = self.tokenizer.decode(ids[first:i + 1])
            pieces.append(upto[len(os.path.commonprefix([before, upto])):])
        return pieces

    def _legacy_logprobs(self, ids: list[int], start: int, entries: list, offset: int) -> tuple[dict, int]:
        """OpenAI's legacy logprobs of the tokens ids[start:] (`entries`: their decode.TokenLogprob, None for one
        without a score) with text offsets from `offset`; and the offset after them."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry, piece in zip(ids[start:], entries, self._pieces(ids, start), strict=True):
            out["tokens"].append(self._token_text(token))
            out["text_offset"].append(offset)
            offset += len(piece)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for t, value in (*entry.top, (entry.token, entry.logprob)):  # the alternatives and the token itself
                key = self._token_text(t)
                top[key] = max(top.get(key, -math.inf), _finite(value))
            out["token_logprobs"].append(_finite(entry.logprob))
            out["top_logprobs"].append(top)
        return out, offset

    def _choice_logprobs(self, choice: _Choice, echo: bool) -> CompletionLogprobs:
        """A finished completion's logprobs: with echo the prompt's tokens first, then the generated ones."""
        state = choice.state
        ids = list(choice.prompt_ids) + [e.token for e in state.logprobs]
        parts = []
        if echo:
            parts.append(self._legacy_logprobs(ids[:len(choice.prompt_ids)], 0, state.prompt_logprobs, 0)[0])
        parts.append(self._legacy_logprobs(ids, len(choice.prompt_ids), state.logprobs, len(choice.prefix))[0])
        end = len(choice.prefix) + len(state.text)
        merged = {key: [x for part in parts for x in part[key]] for key in parts[0]}
        merged["text_offset"] = [min(o, end) for o in merged["text_offset"]]
        return CompletionLogprobs(**merged)

    def _chat_logprobs(self, entries: list) -> ChatLogprobs:
        def item(token: int, value: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}

        return ChatLogprobs(content=[
            ChatTokenLogprob(**item(e.token, e.logprob), top_logprobs=[TopLogprob(**item(t, v)) for t, v in e.top])
            for e in entries])

    async def _stream(self, choices: list[_Choice], queue: asyncio.Queue, request_id: str, created: int,
                      prompt_tokens: int, include_usage: bool, chat: bool, logprobs: bool = False,
                      score_prompt: bool = False):
        kind = "chat.completion.chunk" if chat else "text_completion"
        # per choice: the tokens so far (for the text offsets of the next ones) and the text offset reached
        ids = {c.index: list(c.prompt_ids) for c in choices}
        offsets = {c.index: len(c.prefix) for c in choices}
        unechoed = {c.index: c for c in choices if c.prefix and score_prompt}  # echo once the prompt is scored

        def event(choice_list: list[dict], usage: dict | None = None) -> str:
            chunk: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": self.name,
                                     "choices": choice_list}
            if include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        def scores(index: int, entries: list) -> dict | None:
            if not logprobs:
                return None
            if chat:
                return self._chat_logprobs(entries).model_dump()
            start = len(ids[index])
            ids[index] += [e.token for e in entries]
            scored, offsets[index] = self._legacy_logprobs(ids[index], start, entries, offsets[index])
            return scored

        def piece(index: int, text: str | None, finish: str | None, role: bool = False, entries=()) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": scores(index, list(entries)),
                        "finish_reason": finish}
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": scores(index, list(entries)) if entries else None,
                    "finish_reason": finish}

        def echo(c: _Choice) -> str:
            prompt, _ = self._legacy_logprobs(c.prompt_ids, 0, c.state.prompt_logprobs, 0)
            return event([{"index": c.index, "text": c.prefix, "logprobs": prompt, "finish_reason": None}])

        for c in choices:
            if chat:
                yield event([piece(c.index, "", None, role=True)])
            elif c.prefix and c.index not in unechoed:
                yield event([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])
        try:
            async for batch in self._updates(choices, queue):
                out, pending = [], {}  # a backlog of updates goes out as one chunk per choice
                for index, update in batch:
                    if index in unechoed:
                        out.append(echo(unechoed.pop(index)))
                    texts, entries = pending.setdefault(index, ([], []))
                    if update.text:
                        texts.append(update.text)
                    if logprobs:  # a chat's content has no end token
                        entries += update.logprobs[:len(update.token_ids)] if chat else update.logprobs
                    finish = self._finish_reason(update.finish_reason)
                    if finish is not None:
                        texts, entries = pending.pop(index)
                        text = "".join(texts)
                        if chat and (text or entries):
                            out.append(event([piece(index, text, None, entries=entries)]))
                        out.append(event([piece(index, None if chat else text, finish,
                                                entries=() if chat else entries)]))
                out += [event([piece(index, "".join(texts), None, entries=entries)])
                        for index, (texts, entries) in pending.items() if texts or entries]
                yield "".join(out)
        except APIError as e:
            body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
            yield f"data: {json.dumps(body)}\n\n"
            return
        if include_usage:
            completion_tokens = sum(len(c.state.token_ids) for c in choices)
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, created=self.created, max_model_len=self.context)])

    def health(self) -> Health:
        decoding, waiting = self.engine.load()
        return Health(status="ok", model=self.name, decoding=decoding, waiting=waiting)


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
    (413, "Body too large"), (429, "Overloaded"))}
_SSE_EVENT = {"type": "object", "required": ["data"], "description": "One event: `data` holds a JSON chunk, the "
               "last one `[DONE]`.", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_STREAM_OR_JSON = {"description": "A JSON body, or server-sent events with `\"stream\": true`",
                   "content": {"text/event-stream": {"schema": _SSE_EVENT}}}


def create_app(server: Server, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               warmup_prompt_len: int = 64):
    """The ASGI app: FastAPI routes wrapped in the access log, API-key and body-size checks. The engine thread
    starts with the app's lifespan, after compiling the shapes of prompts up to `warmup_prompt_len` tokens (0:
    none), and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        if warmup_prompt_len:
            start = time.perf_counter()
            log.info("compiling the prefill and decode steps for prompts of up to %d tokens", warmup_prompt_len)
            await asyncio.to_thread(server.engine.warmup, warmup_prompt_len)
            log.info("compiled in %.1f s", time.perf_counter() - start)
        server.runner.start()
        log.info("serving %s (context %d tokens, %d cache rows)", server.name, server.context,
                 server.engine.max_batch)
        yield
        server.runner.stop()

    app = FastAPI(title="gpt_jax", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions.")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error_response(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error_response(400, "The body of your request is not valid JSON.", None, "invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
        return _error_response(400, message, param, first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(e.status_code, str(e.detail), None, code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        log.exception("unhandled error")
        return _error_response(500, "The server had an error while processing your request.", None, None,
                               "server_error")

    @app.get("/health", response_model=Health)
    async def health():
        return server.health()

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models():
        return server.models()

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str):
        if model_id != server.name:
            raise APIError(404, f"The model '{model_id}' does not exist.", "model", "model_not_found")
        return server.models().data[0]

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, 200: _STREAM_OR_JSON})
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_ERRORS, 200: _STREAM_OR_JSON})
    async def chat_completions(body: ChatCompletionRequest):
        return await server.chat_completions(body)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():  # validation errors are 400 here, not FastAPI's 422
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if operation.get("requestBody"):
                        error = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                        operation["responses"].setdefault(
                            "400", {"description": "Invalid request", "content": {"application/json": error}})
            components = schema["components"]["schemas"]
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _narrow_schema(components, server)
            if api_key:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return AccessLog(ApiKeyCheck(BodyLimit(app, max_body_bytes), api_key))


def _narrow_schema(components: dict, server: Server) -> None:
    """Puts what only the loaded model knows into the schema: its id, its context and its vocabulary."""
    vocab = server.prompt_vocab
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = components[name]["properties"]
        properties["model"] = {**properties["model"], "enum": [server.name]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                for option in properties[field]["anyOf"]:
                    if option.get("type") == "integer":
                        option["maximum"] = server.context - 1

    def cap_token_ids(node):
        if isinstance(node, dict):
            if node.get("type") == "integer" and node.get("minimum") == 0:
                node["maximum"] = vocab - 1
            for value in node.values():
                cap_token_ids(value)
        elif isinstance(node, list):
            for value in node:
                cap_token_ids(value)

    cap_token_ids(components["CompletionRequest"]["properties"]["prompt"])


# ----------------------------------------------------------------------------------------------------------------
# ASGI middleware


async def _send_error(send, status: int, message: str, code: str | None, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Reads request bodies up to `limit` bytes and answers 413 beyond it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = f"The request body is larger than {self.limit} bytes."
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, 400, "Invalid Content-Length header.", "invalid_header")
            if int(declared) > self.limit:
                return await _send_error(send, 413, too_large, "body_too_large")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _send_error(send, 413, too_large, "body_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyCheck:
    """With a key set, `/v1/` paths need `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "Incorrect API key provided." if header else "Missing API key (Authorization: Bearer)."
                return await _send_error(send, 401, message, "invalid_api_key",
                                         [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request on the `gpt_jax.access` logger: client, method, path, status, milliseconds (until the
    last byte, so streams count whole)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            path = urllib.parse.quote(scope["path"], safe="/:@!$&'()*+,;=-._~")  # no control characters in logs
            access_log.info('%s:%s "%s %s" %d %.1fms', client[0], client[1], scope["method"], path, status,
                            1000 * (time.perf_counter() - start))


# ----------------------------------------------------------------------------------------------------------------
# Running


def log_config(level: str = "info") -> dict:
    """uvicorn's logging config plus the gpt_jax loggers (access log included), all to stderr."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["gpt_jax"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["handlers"]["gpt_jax"] = {"class": "logging.StreamHandler", "formatter": "gpt_jax",
                                     "stream": "ext://sys.stderr"}
    config["loggers"]["gpt_jax"] = {"handlers": ["gpt_jax"], "level": level.upper(), "propagate": False}
    return config


def spawn(source: str, workdir: str, *flags: str) -> tuple[subprocess.Popen, str, str]:
    """Starts `python -m gpt_jax.main --mode=serve --config.init_from=SOURCE` (with `flags`) on a free port of
    127.0.0.1, its output in workdir/server.log; returns (process, URL, log path) at once: `wait_until_up` waits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gpt_jax.main", "--mode=serve", f"--workdir={workdir}",
                                 f"--config.init_from={os.path.abspath(source)}", f"--port={port}", *flags],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log_path


def wait_until_up(proc: subprocess.Popen, url: str, log_path: str, timeout: float = 600) -> None:
    """Returns once the spawned server's /health answers; UserError with its last log line if it exits first, or
    after `timeout` seconds (then it is killed)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                last = ([line.strip() for line in f if line.strip()] or [""])[-1]
            raise UserError(f"the server exited with {proc.returncode}: {last}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise UserError(f"the server did not start in {timeout / 60:g} minutes")


def main(source: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
         max_batch: int = 8, max_len: int | None = None, name: str | None = None, log_level: str = "info",
         weights: tuple[str, str] | None = None) -> None:
    """Loads the model at `source` (a gpt_jax workdir, an HF directory or a GGUF file; its weights stored as
    `weights` = (param_dtype, quantize) when given) and serves it until SIGINT/SIGTERM, then lets requests in
    flight finish (up to 30 s) before exiting."""
    import uvicorn

    from gpt_jax import workdir

    if not source:
        raise UserError("nothing to serve: --workdir has no config.json and --config.init_from is empty")
    if max_batch < 1:
        raise UserError(f"max_batch={max_batch} must be at least 1")
    logging.config.dictConfig(log_config(log_level))  # uvicorn.run sets it again; this shows the loading
    start = time.perf_counter()
    log.info("loading %s", source)
    loaded = workdir.load(source, weights)
    server = Server(loaded, max_batch=max_batch, max_len=max_len, name=name)
    log.info("loaded in %.1f s", time.perf_counter() - start)
    app = create_app(server, api_key=api_key)
    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish requests in flight) and afterwards raises the signal
    # again for the handler it found; a no-op one lets the process exit 0 after a graceful shutdown
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
                access_log=False, timeout_graceful_shutdown=30)
    log.info("shut down")

