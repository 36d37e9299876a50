"""Decoding: the KV-cached engine against uncached greedy decoding, batch invariance, sampling, stops, buckets."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_TEXT
from flax import nnx

from gpt_jax import decode
from gpt_jax.model import ModelConfig, Transformer
from gpt_jax.tokenizer import CharTokenizer

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
GREEDY = decode.SamplingParams(temperature=0.0)


def _model(style: str) -> tuple[Transformer, ModelConfig]:
    """A small random model with peaked logits (parameters scaled up), so greedy choices are far from ties."""
    if style == "gpt2":
        cfg = ModelConfig(vocab_size=len(CHARS), n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
    else:  # Llama-style: RoPE, RMSNorm, SwiGLU, grouped-query attention
        cfg = ModelConfig(vocab_size=len(CHARS), n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                          max_seq_len=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda p: p * 4.0, nnx.state(model, nnx.Param)))
    return model, cfg


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_and_cfg(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return _model("gpt2")


def _prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(CHARS), size=n).tolist() for n in lengths]


@functools.cache
def _forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: the whole sequence through the model for every new token, no cache. Sequences are padded
    at the end to the context length (one compiled shape); causal attention keeps the padding out of the way."""
    graphdef, state = nnx.split(model)
    forward = _forward(graphdef)
    context = model.cfg.max_seq_len
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, context), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = forward(state, padded)
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_cached_equals_uncached_greedy_and_batch_equals_alone(model_and_cfg):
    model, cfg = model_and_cfg
    prompts = _prompts([3, 21, 9, 40])
    generate = lambda rows: [s.token_ids for s in decode.generate(model, cfg, rows, 12, GREEDY)]
    batched = generate(prompts)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == _uncached_greedy(model, prompt, 12)
        assert generate([prompt])[0] == got


def test_requests_joining_mid_flight_match_running_alone(gpt2):
    """Continuous batching: a request admitted while others decode gets the tokens it gets alone."""
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=4)
    prompts = _prompts([5, 30, 12, 7, 18], seed=1)
    alone = []
    for p in prompts:
        state = engine.submit(decode.Request(p, max_tokens=10, sampling=GREEDY))
        engine.run_until_done()
        alone.append(state.token_ids)
    states = []
    for p in prompts:  # one new request per iteration; the fifth waits for a free row
        states.append(engine.submit(decode.Request(p, max_tokens=10, sampling=GREEDY)))
        engine.step()
    engine.run_until_done()
    assert [s.token_ids for s in states] == alone
    assert all(s.finish_reason == "length" for s in states)


def test_sampling_is_seeded_and_independent_of_the_batch(gpt2):
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=4)
    sampling = decode.SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    prompt = _prompts([8], seed=2)[0]

    def run(requests):
        states = [engine.submit(r) for r in requests]
        engine.run_until_done()
        return [s.token_ids for s in states]

    alone = run([decode.Request(prompt, 16, sampling, seed=7)])[0]
    together = run([decode.Request(p, 16, sampling, seed=s) for p, s in ((prompt, 3), (prompt, 7), ([1, 2], 7))])
    assert together[1] == alone  # same seed and stream: same tokens, whatever shares the batch
    assert together[0] != alone  # another seed: other tokens
    other_stream = run([decode.Request(prompt, 16, sampling, seed=7, stream_id=1)])[0]
    assert other_stream != alone
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    greedy = run([decode.Request(prompt, 16, GREEDY)])[0]
    assert run([decode.Request(prompt, 16, decode.SamplingParams(1.0, top_k=1), seed=5)])[0] == greedy
    assert run([decode.Request(prompt, 16, decode.SamplingParams(1.0, top_p=1e-6), seed=5)])[0] == greedy


def test_top_k_top_p_filter():
    probs = jnp.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)

    def kept(top_k, top_p):
        out = decode._filter_top_k_top_p(logits, jnp.array([top_k]), jnp.array([top_p], jnp.float32))
        return np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist()

    assert kept(0, 1.0) == [0, 1, 2, 3]
    assert kept(3, 1.0) == [1, 2, 3]
    assert kept(0, 0.7) == [1, 3]  # 0.5 + 0.3 reaches 0.7
    assert kept(0, 0.5) == [1]
    assert kept(0, 0.0) == [1]  # the most likely token always stays
    assert kept(1, 0.9) == [1]
    assert kept(3, 0.96) == [1, 2, 3]


def test_stop_sequences_eos_max_tokens_and_streamed_text(gpt2):
    model, cfg = gpt2
    tok = CharTokenizer(CHARS)
    engine = decode.Engine(model, cfg, max_batch=2, tokenizer=tok)
    prompt = tok.encode("to be or not")
    free = engine.submit(decode.Request(prompt, 30, GREEDY))
    engine.run_until_done()
    text = free.text
    assert free.finish_reason == "length" and len(free.token_ids) == 30 and text == tok.decode(free.token_ids)

    stop = text[10:13]
    updates: list[decode.Update] = []
    stopped = engine.submit(decode.Request(prompt, 30, GREEDY, stop=["\x00never", stop], on_update=updates.append))
    engine.run_until_done()
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:text.index(stop)]
    assert "".join(u.text for u in updates) == stopped.text  # streamed pieces add up, none shows the stop text
    assert [u.finish_reason for u in updates][-1] == "stop" and all(u.finish_reason is None for u in updates[:-1])

    eos = free.token_ids[5]
    ended = engine.submit(decode.Request(prompt, 30, GREEDY, stop_token_ids=[eos]))
    engine.run_until_done()
    assert ended.token_ids == free.token_ids[:free.token_ids.index(eos)] and ended.finish_reason == "stop"


def _text_tokenizers(tmp_path, tiny_bpe) -> dict:
    """Tokenizers of every kind the engine decodes with, trained on TINY_TEXT (ü, é and 日本 take several bytes)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gpt_jax.tokenizer import HFTokenizer, SentencePieceTokenizer

    lines = TINY_TEXT.splitlines(keepends=True) * 10
    ours = SentencePieceTokenizer.train(lines, 400, str(tmp_path / "ours"))
    # SentencePiece's defaults (ours turns them off): a space before the text, dropped again by decoding, and <s>,
    # </s> as control tokens, which decode to nothing
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "default"),
                                   vocab_size=400, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer, metaspace.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    metaspace.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                             show_progress=False))
    return {"char": CharTokenizer("".join(sorted(set(TINY_TEXT)))), "byte-level BPE": HFTokenizer(tiny_bpe, eos_id=0),
            "SentencePiece (ours)": ours,
            "SentencePiece (defaults)": SentencePieceTokenizer(str(tmp_path / "default.model")),
            "Metaspace BPE": HFTokenizer(metaspace, eos_id=1)}


def test_streamed_text_decodes_a_few_tokens_per_token_and_equals_decoding_them_all(tmp_path, tiny_bpe):
    """decode.IncrementalText, which the engine keeps per request: after every token its text is what decoding the
    whole list gives (characters split over byte tokens, the dropped space of a first word, control tokens), and the
    tokens it decodes grow linearly with the length (decoding the whole list each time grows quadratically)."""
    rng = np.random.default_rng(0)
    for name, tok in _text_tokenizers(tmp_path, tiny_bpe).items():
        decoded = []
        counting = type("Counting", (), {"decode": lambda self, ids: decoded.append(len(ids)) or tok.decode(ids)})()
        text_ids = tok.encode(TINY_TEXT * 3)
        sequences = [text_ids, rng.integers(0, tok.vocab_size, 300).tolist()]  # the latter: bytes out of order
        if tok.eos_id is not None:  # the end token after every third token (SentencePiece's decodes to nothing)
            ends = [[t, tok.eos_id] if i % 3 == 2 else [t] for i, t in enumerate(text_ids[:300])]
            sequences.append([x for pair in ends for x in pair])
        for ids in sequences:
            decoded.clear()
            incremental = decode.IncrementalText(counting)
            for n in range(1, len(ids) + 1):
                assert incremental.update(ids[:n]) == tok.decode(ids[:n]), (name, n)
            if ids is text_ids:
                assert sum(decoded) <= 8 * len(ids), (name, sum(decoded), len(ids))


def test_steps_are_queued_ahead_but_none_is_computed_for_rows_sure_to_end(gpt2):
    """Steps are queued before the previous ones' tokens are read, STEPS_PER_CALL per call while no request waits;
    rows that end by max_tokens take no step past their last token, and a row that stops on an end token costs at
    most one call (STEPS_PER_CALL steps) in vain."""
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=2)
    prompt = _prompts([6], seed=3)[0]
    before = engine.steps
    free = engine.submit(decode.Request(prompt, 10, GREEDY))
    engine.run_until_done()
    assert len(free.token_ids) == 10 and engine.steps - before == 9  # the first token comes from the prefill
    eos = free.token_ids[4]
    before = engine.steps
    ended = engine.submit(decode.Request(prompt, 10, GREEDY, stop_token_ids=[eos]))
    engine.run_until_done()
    # tokens 1-4 in one call, the next call queued before they are read: its tokens are dropped
    assert ended.token_ids == free.token_ids[:4] and engine.steps - before == 2 * decode.STEPS_PER_CALL
    assert not engine.has_work()


def test_cancel_frees_the_row(gpt2):
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=1)
    first = engine.submit(decode.Request([1, 2, 3], 40, GREEDY))
    second = engine.submit(decode.Request([4, 5], 3, GREEDY))
    engine.step()
    engine.cancel(first)
    engine.run_until_done()
    assert first.finish_reason == "cancelled" and len(first.token_ids) < 40
    assert second.finish_reason == "length" and len(second.token_ids) == 3


def test_context_limits_and_sliding(gpt2):
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=2)
    with pytest.raises(ValueError, match="context holds 64"):
        engine.submit(decode.Request(list(range(65)), 1, GREEDY))
    full = engine.submit(decode.Request([1] * 60, 50, GREEDY))
    engine.run_until_done()
    assert full.finish_reason == "length" and len(full.token_ids) == 5  # 60 + 5 tokens: the cache holds 64
    # generate() slides past the context: the last half is prefilled again
    out = decode.generate(model, cfg, [[1, 2, 3]], 150, GREEDY)[0].token_ids
    assert len(out) == 150


def test_steady_traffic_does_not_recompile(gpt2):
    model, cfg = gpt2
    engine = decode.Engine(model, cfg, max_batch=4)
    engine.warmup(prompt_len=32)

    def traffic():
        for wave in range(3):
            for p in _prompts([3 + wave, 20, 9, 31][: wave + 2], seed=wave):
                engine.submit(decode.Request(p, 12, decode.SamplingParams(0.7, top_k=5), seed=wave))
                engine.step()
            engine.run_until_done()

    traffic()
    jitted = (engine._prefill, engine._write, engine._step, engine._sample, engine._grow)
    sizes = [f._cache_size() for f in jitted]
    traffic()
    assert [f._cache_size() for f in jitted] == sizes


def test_warmup_compiles_what_first_requests_need_and_an_idle_engine_starts_small_again():
    """After `warmup` (the server's default prompt length, 64: its longest prompts grow the cache), one short
    request and then a burst filling every row compile nothing; a long request grows the cache, and a short one
    joining it there compiles no prefill (only the small program that copies a prefill into the rows); once the
    engine is idle it is back at the smallest capacity, so the next short requests again compile nothing."""
    cfg = ModelConfig(vocab_size=len(CHARS), n_layer=1, n_head=4, d_model=16, d_ff=32, max_seq_len=256)
    engine_model = Transformer(cfg, rngs=nnx.Rngs(0))
    engine = decode.Engine(engine_model, cfg, max_batch=4)
    engine.warmup(prompt_len=64)
    jitted = (engine._prefill, engine._write, engine._step, engine._sample, engine._grow)
    sizes = [f._cache_size() for f in jitted]

    def short_requests():
        engine.submit(decode.Request(_prompts([5])[0], 8, GREEDY))
        engine.run_until_done()
        for p in _prompts([3, 9, 12, 7], seed=1):
            engine.submit(decode.Request(p, 8, GREEDY))
        engine.step()
        assert engine.load() == (4, 0) and engine._capacity == decode.CACHE_BUCKET
        engine.run_until_done()

    short_requests()
    assert [f._cache_size() for f in jitted] == sizes
    long = engine.submit(decode.Request(_prompts([40])[0], 50, GREEDY))  # 90 positions: capacity 128
    while engine._capacity == decode.CACHE_BUCKET:
        engine.step()
    prefills = engine._prefill._cache_size()
    joining = engine.submit(decode.Request(_prompts([5], seed=2)[0], 8, GREEDY))
    engine.run_until_done()
    assert engine._prefill._cache_size() == prefills
    assert joining.token_ids == decode.generate(engine_model, cfg, [joining.request.prompt], 8, GREEDY)[0].token_ids
    assert len(long.token_ids) == 50 and engine._capacity == decode.CACHE_BUCKET
    sizes = [f._cache_size() for f in jitted]  # the long request compiled its larger capacities
    short_requests()
    assert [f._cache_size() for f in jitted] == sizes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_writes_only_the_new_positions_of_the_cache(dtype):
    """The compiled decode step (a loop of up to STEPS_PER_CALL steps), for one stream and for every row, neither
    copies a whole cache array (nor copies it transposed: attention reads it in its own layout) nor writes into a
    float32 version of a bfloat16 one (XLA:CPU converts a whole bf16 array to float32 and back to write into it,
    hence the cache keeps bf16 as bits)."""
    cfg = ModelConfig(vocab_size=len(CHARS), n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64,
                      pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, dtype=dtype,
                      param_dtype=dtype)
    engine = decode.Engine(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, max_batch=4)
    ints, floats = np.zeros((4, 6), np.int32), np.zeros((4, 2), np.float32)
    # the whole cache arrays, [rows, kv heads, head_dim, slots] and [rows, kv heads, slots, head_dim], any layout
    whole = {(4, 2, 8, 64), (4, 2, 64, 8)}
    for rows in (1, 4):
        lowered = engine._step.lower(engine.params, engine._cache, engine._last, ints, floats, np.int32(1), rows=rows)
        hlo = lowered.compile().as_text()
        for line in hlo.splitlines():
            m = re.match(r"\s*%\S+ = (\w+)\[([\d,]+)\]\S* ([\w-]+)\(", line)
            if m and tuple(int(n) for n in m.group(2).split(",") if n != "1") in whole:
                kind, op = m.group(1), m.group(3)
                assert op not in ("copy", "transpose"), (rows, line)
                writes = op in ("scatter", "dynamic-update-slice")
                assert dtype == "float32" or kind != "f32" or not writes, (rows, line)
    assert [layer["k"].dtype for layer in engine._cache] == [np.float32 if dtype == "float32" else np.uint16] * 2


def test_logprobs_of_prompts_and_generated_tokens_equal_the_uncached_forward(model_and_cfg):
    """`logprobs` and `score_prompt`: every token's log-probability (the prompt's from the prefill, one forward over
    it; the generated ones' from each step) is the log-softmax of one uncached forward over the whole sequence; the
    alternatives are the best ones in order, a greedy token's value exactly the first; max_tokens=0 only scores;
    an end token that stops a request carries its log-probability too; the batch changes nothing."""
    model, cfg = model_and_cfg
    engine = decode.Engine(model, cfg, max_batch=4)
    prompts = _prompts([3, 21, 9, 40], seed=3)
    graphdef, state = nnx.split(model)

    def reference(tokens: list[int]) -> np.ndarray:
        padded = np.zeros((1, cfg.max_seq_len), np.int32)
        padded[0, :len(tokens)] = tokens
        return np.asarray(jax.nn.log_softmax(_forward(graphdef)(state, padded)[0], axis=-1))

    def run(requests):
        states = [engine.submit(r) for r in requests]
        engine.run_until_done()
        return states

    requests = [decode.Request(p, max_tokens=(0, 6)[i % 2], sampling=GREEDY, logprobs=2, score_prompt=True)
                for i, p in enumerate(prompts)]
    together = run(requests)
    for prompt, request, got in zip(prompts, requests, together, strict=True):
        tokens = prompt + got.token_ids
        expected = reference(tokens)
        assert len(got.token_ids) == request.max_tokens and len(got.logprobs) == request.max_tokens
        assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(prompt)
        entries = got.prompt_logprobs[1:] + got.logprobs
        assert [e.token for e in entries] == tokens[1:]
        np.testing.assert_allclose([e.logprob for e in entries], [expected[j, t] for j, t in enumerate(tokens[1:])],
                                   atol=2e-5)
        for j, e in enumerate(entries):
            assert [t for t, _ in e.top] == np.argsort(-expected[j])[:2].tolist()
            np.testing.assert_allclose([v for _, v in e.top], np.sort(expected[j])[::-1][:2], atol=2e-5)
        assert all(e.logprob == e.top[0][1] for e in got.logprobs)  # greedy: the best, bit for bit
    alone = run([requests[1]])[0]
    # alone, the request decodes in one row (matrix-vector products), so float32 sums round differently
    assert [e.token for e in alone.logprobs] == [e.token for e in together[1].logprobs]
    np.testing.assert_allclose([e.logprob for e in alone.logprobs], [e.logprob for e in together[1].logprobs],
                               atol=1e-5)
    np.testing.assert_allclose([e.logprob for e in alone.prompt_logprobs[1:]],
                               [e.logprob for e in together[1].prompt_logprobs[1:]], atol=1e-6)

    # no logprobs asked: none computed; an end token's log-probability comes with the update that stops
    plain = run([decode.Request(prompts[1], 6, GREEDY)])[0]
    assert plain.token_ids == together[1].token_ids and plain.logprobs == [] and plain.prompt_logprobs is None
    ids = together[1].token_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token that ends the request there
    updates: list[decode.Update] = []
    ended = run([decode.Request(prompts[1], 6, GREEDY, stop_token_ids=[ids[k]], logprobs=0,
                                on_update=updates.append)])[0]
    assert ended.finish_reason == "stop" and ended.token_ids == ids[:k]
    assert [e.token for e in ended.logprobs] == ids[:k + 1] and ended.logprobs[0].top == ()
    assert [e for u in updates for e in u.logprobs] == ended.logprobs
    with pytest.raises(ValueError, match="logprobs"):
        engine.submit(decode.Request(prompts[0], 1, GREEDY, logprobs=6))
