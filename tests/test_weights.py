"""Weight formats for sampling, evaluation and serving: bfloat16 weights and weight-only int8 against float32."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt_jax import config as config_lib
from gpt_jax import cpu_kernel, decode, ops, workdir
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_KERNEL = "the CPU kernel is not built here: no AVX-512 (x86-64-v4) or no C++ compiler"


def _loaded(style: str) -> workdir.LoadedModel:
    """A small random model (gpt2: tied head, biases; llama: RoPE, GQA, SwiGLU, an untied head)."""
    common = dict(vocab_size=61, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=256)
    cfg = ModelConfig(**common) if style == "gpt2" else ModelConfig(
        **common, n_kv_head=2, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
        tie_embeddings=False)
    config = config_lib.base_config()
    return workdir.LoadedModel(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, None, config, None, style)


def _use(kernel: str, monkeypatch) -> None:
    """`cpu_kernel`: the default, skipped where the kernel cannot be built; `xla`: the kernel turned away, the form
    CPUs without AVX-512 get."""
    if kernel == "cpu_kernel" and not cpu_kernel.buildable():
        pytest.skip(NO_KERNEL)
    if kernel == "xla":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
        # a cache of its own for the decode programs: those traced with the kernel before would be reused, and the
        # tests after this one get the kernel's again
        monkeypatch.setattr(decode, "_compiled", functools.lru_cache(maxsize=8)(decode._compiled.__wrapped__))


def _logits(loaded, tokens) -> np.ndarray:
    graphdef, state = nnx.split(loaded.model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens))


def test_int8_kernel_is_the_float_weight_within_half_a_step_per_channel():
    w = jax.random.normal(jax.random.key(0), (48, 40)) * jnp.linspace(0.01, 3.0, 40)  # channels of every scale
    w = w.at[:, 7].set(0.0)  # an all-zero channel
    for transposed in (False, True):  # a kernel [in, out], or a table [out, in] as the tied head reads it
        q = ops.pack(w.T if transposed else w, jnp.float32, int8=True, transposed=transposed)
        assert q.values.shape == (40, 48) and q.values.dtype == jnp.int8 and q.scale.shape == (40,)
        back = q.values.astype(jnp.float32) * q.scale[:, None]
        assert jnp.all(jnp.abs(back - w.T) <= q.scale[:, None] / 2 + 1e-7)
        assert jnp.max(jnp.abs(q.values)) == 127
    x = jax.random.normal(jax.random.key(1), (5, 48))
    exact = x @ back.T
    np.testing.assert_allclose(ops.matmul(x, q, "float32"), exact, rtol=1e-5, atol=1e-5)
    # bf16 inputs (x rounded to 8 bits of mantissa): within 2% of the largest output
    np.testing.assert_allclose(ops.matmul(x, q, "bfloat16"), exact, atol=0.02 * float(jnp.abs(exact).max()))


@pytest.mark.parametrize("kernel", ["cpu_kernel", "xla"])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_packed_kernels_give_the_same_product_for_one_row_many_rows_and_row_by_row(dtype, kernel, monkeypatch):
    """A packed kernel's product takes a form by its number of rows: 1-8 rows (the decode step's streams) the CPU
    kernel where this CPU has AVX-512, else (`xla`) one row an XLA loop, and 2-8 rows for bf16 one dot_general of the
    rows in bf16 and for int8 the one-row loop per row; more rows one bf16 dot_general. Every way gives the same
    numbers."""
    _use(kernel, monkeypatch)
    w = jax.random.normal(jax.random.key(0), (48, 40))
    p = ops.pack(w, jnp.bfloat16, int8=dtype == "int8")
    exact = p.values.astype(jnp.float32) * (1 if p.scale is None else p.scale[:, None])  # [40, 48]
    x = jax.random.normal(jax.random.key(1), (8, 48)).astype(jnp.bfloat16).astype(jnp.float32)
    one = jax.jit(lambda r: ops.matmul(r[None], p, "float32")[0])
    many = jax.jit(lambda x: ops.matmul(x, p, "float32"))
    rows = np.stack([one(r) for r in x])
    for got in (many(x), rows):
        np.testing.assert_allclose(got, x @ exact.T, rtol=1e-5, atol=1e-4)
    text = many.lower(x).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    if kernel == "cpu_kernel":
        assert cpu_kernel.available() and not dots and "GptJaxProduct" in text
    elif dtype == "int8":
        assert len(dots) == 8 and "GptJaxProduct" not in text, dots
    else:
        assert len(dots) == 1 and "tensor<8x48xbf16>" in dots[0], dots
    # more rows (a prompt, an evaluation batch): one dot_general in bf16 for either (int8 values are exact in bf16)
    x16 = jnp.concatenate([x, -x])
    np.testing.assert_allclose(many(x16), x16 @ exact.T, rtol=1e-5, atol=1e-4)
    dots = [line for line in many.lower(x16).as_text().splitlines() if "dot_general" in line]
    assert len(dots) == 1 and "tensor<16x48xbf16>" in dots[0], dots


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_the_cpu_kernel_multiplies_every_row_count_and_shape_exactly(dtype):
    """The CPU kernel against float64 numpy: 1-8 rows, k not a multiple of its 16 lanes (a masked tail), channels
    split over threads into chunks that do not divide them, one weight or three in one call (their channels
    chunked together), each stored type, int8 with its scale per output channel. The product of float32 x and the
    stored weights is exact up to float32 summation."""
    assert cpu_kernel.available()
    rng = np.random.default_rng(0)
    for k, ns in ((50, (37,)), (576, (203,)), (16, (1,)), (70, (5, 90, 33))):
        weights, scales, exact = [], [], []
        for n in ns:
            w = rng.standard_normal((n, k)).astype(np.float32)
            w = np.clip(np.round(w * 40), -127, 127).astype(np.int8) if dtype == "int8" else w
            weights.append(jnp.asarray(w).astype(dtype))
            scales.append(jnp.asarray(rng.uniform(0.5, 2.0, n).astype(np.float32)))
            scale = np.asarray(scales[-1], np.float64)[:, None] if dtype == "int8" else 1.0
            exact.append(np.asarray(weights[-1].astype(jnp.float32), np.float64) * scale)
        call = jax.jit(lambda x, ws, ss: cpu_kernel.products(x, ws, ss if dtype == "int8" else None))
        for m in range(1, cpu_kernel.MAX_ROWS + 1):
            x = rng.standard_normal((m, k)).astype(np.float32)
            got = call(jnp.asarray(x), weights, scales)
            assert len(got) == len(ns)
            for y, e in zip(got, exact, strict=True):
                assert y.shape == (m, e.shape[0]) and y.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ e.T, rtol=1e-5, atol=1e-4 * k)


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_the_cpu_kernel_takes_rows_of_a_packed_table(dtype):
    """Embedding rows by the kernel (`ops.take_rows` of a `PackedKernel`): the stored rows as float32, int8 ones
    times their scale, for ids of any shape and rows not a multiple of its 16 lanes."""
    assert cpu_kernel.available()
    table = jax.random.normal(jax.random.key(0), (37, 50))
    packed = ops.pack(table, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, int8=dtype == "int8",
                      transposed=True)
    exact = np.asarray(packed.values.astype(jnp.float32)) * (1 if packed.scale is None else
                                                             np.asarray(packed.scale)[:, None])
    ids = jnp.asarray([[0, 36, 5], [5, 1, 17]])
    take = jax.jit(ops.take_rows)
    assert "GptJaxRows" in take.lower(packed, ids).as_text()
    got = take(packed, ids)
    assert got.shape == (2, 3, 50) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), exact[np.asarray(ids)], rtol=1e-6, atol=0)


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
def test_the_cpu_kernels_argmax_is_jnp_argmax():
    """The greedy token by the kernel: the first of equal largest values, -inf rows, lengths not a multiple of its
    16 lanes, one row or several."""
    assert cpu_kernel.available()
    rng = np.random.default_rng(0)
    argmax = jax.jit(ops.argmax)
    assert "GptJaxArgmax" in argmax.lower(jnp.zeros((2, 40))).as_text()
    for rows, n in ((1, 49152), (3, 37), (8, 1), (2, 16)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        x[0, n // 2:] = x[0].max() + 1.0  # ties: the first wins
        if rows > 1:
            x[1] = -np.inf
        np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
def test_a_library_built_beforehand_serves_where_no_compiler_is(tmp_path):
    """GPT_JAX_CPU_KERNEL_LIBRARY (the server image's library, built in a stage with g++) registers the kernel in a
    process with no compiler and an empty kernel cache; without it, or naming no file, XLA computes."""
    prebuilt = str(tmp_path / "cpu_kernel.so")
    with open(cpu_kernel._build(), "rb") as f, open(prebuilt, "wb") as out:
        out.write(f.read())
    check = "from gpt_jax import cpu_kernel; print(cpu_kernel.available())"
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "GPT_JAX_CACHE": str(tmp_path / "cache")}
    for library, expected in ((prebuilt, "True"), (None, "False"), (str(tmp_path / "missing.so"), "False")):
        run = subprocess.run([sys.executable, "-c", check], env={**env, "GPT_JAX_CPU_KERNEL_LIBRARY": library or ""},
                             capture_output=True, text=True, timeout=120)
        assert run.stdout.strip() == expected, (library, run.stdout, run.stderr[-2000:])
    assert "missing.so: no such file" in run.stderr and not os.path.exists(tmp_path / "cache" / "kernels")


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
@pytest.mark.parametrize("weights", [("bfloat16", "none"), ("float32", "int8"), ("float32", "none")])
def test_a_decode_step_multiplies_a_layers_products_of_one_input_in_one_kernel_call(weights):
    """Packed weights on the CPU kernel: query, key and value are one call, gate and up another, so a Llama layer
    makes 4 calls and the step one more for the head; one float32 row stays with XLA's loop, 2-8 rows do not."""
    loaded = workdir.with_weights(_loaded("llama"), *weights)
    engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=4)
    ints, floats = np.zeros((4, 6), np.int32), np.zeros((4, 2), np.float32)
    for rows in (1, 4):
        args = (engine.params, engine._cache, engine._last, ints, floats, np.int32(1))
        text = engine._step.lower(*args, rows=rows).as_text()
        calls = text.count("GptJaxProduct")
        assert calls == (0 if rows == 1 and weights == ("float32", "none") else 2 * 4 + 1), (rows, calls)


@pytest.mark.parametrize("kernel", ["cpu_kernel", "xla"])
def test_a_call_loops_over_several_steps_only_where_its_products_read_the_weights_as_stored(kernel, monkeypatch):
    """decode.steps_per_call: float32 weights, or the CPU kernel's products, take STEPS_PER_CALL steps per call (a
    loop in the step program); bf16 and int8 weights that XLA multiplies take one, without the loop (with it they
    decoded ~10x slower: XLA likely copies every weight to float32 per call)."""
    _use(kernel, monkeypatch)
    for weights in (("float32", "none"), ("bfloat16", "none"), ("float32", "int8")):
        loaded = workdir.with_weights(_loaded("llama"), *weights)
        engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=2)
        looped = weights == ("float32", "none") or kernel == "cpu_kernel"
        assert decode.steps_per_call(engine.params, 1) == (decode.STEPS_PER_CALL if looped else 1), weights
        _, tokens, _, _ = jax.eval_shape(lambda *a: engine._step(*a, rows=1), engine.params, engine._cache,
                                         engine._last, engine._ints, engine._floats, np.int32(1))
        assert tokens.shape == (decode.STEPS_PER_CALL if looped else 1, 1), weights  # the loop's tokens, or one's
        engine.submit(decode.Request([1, 2, 3], 9, decode.SamplingParams(0.0)))
        engine.run_until_done()
        assert engine.steps == 8, weights  # decodes either way: 8 steps after the prefill's token


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_int8_and_bf16_logits_stay_close_to_float32(style):
    """The stated tolerances, as fractions of the float32 logits' standard deviation: int8 (with float32 or bf16
    elsewhere) differs by at most 5% and by 1% on average, bf16 by at most 2.5% and 0.5% on average (measured:
    3.0–3.4% / 0.6–0.7% and 1.1–1.4% / 0.2%). The weights are what the format says."""
    loaded = _loaded(style)
    tokens = jax.random.randint(jax.random.key(2), (2, 48), 0, 61)
    ref = _logits(loaded, tokens)
    for weights, (most, mean) in ((("bfloat16", "none"), (0.025, 0.005)), (("float32", "int8"), (0.05, 0.01)),
                                  (("bfloat16", "int8"), (0.05, 0.01))):
        other = workdir.with_weights(loaded, *weights)
        leaves = jax.tree.leaves(nnx.state(other.model, nnx.Param), is_leaf=lambda x: isinstance(x, ops.PackedKernel))
        packed = [x for x in leaves if isinstance(x, ops.PackedKernel)]
        # 2 layers × (attention q, k, v, o + 2 or 3 MLP matrices) + the embedding (+ the llama head)
        assert len(packed) == (2 * 6 + 1 if style == "gpt2" else 2 * 7 + 2)
        assert {x.values.dtype for x in packed} == {jnp.dtype("int8" if weights[1] == "int8" else weights[0])}
        floats = {x.dtype for x in leaves if not isinstance(x, ops.PackedKernel)}
        assert floats == {jnp.dtype(weights[0])}, floats
        out = _logits(other, tokens)
        diff = np.abs(out - ref) / ref.std()
        assert diff.max() < most and diff.mean() < mean, (weights, diff.max(), diff.mean())


@pytest.mark.parametrize("kernel", ["cpu_kernel", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_of_new_positions_over_the_cache_is_softmax_attention_over_the_slots_in_use(dtype, kernel,
                                                                                             monkeypatch):
    """The decode step's attention (one new position per row over a cache with more rows than the batch, each row
    up to its own slot) against softmax attention computed in float64 from the cache's values: by the CPU kernel,
    and by XLA as CPUs without AVX-512 compute it. Grouped queries (1, 3, 4 and 9 per key head), head sizes that
    are not a multiple of 16, rows using one slot or all of them. The kernel widens the cache's values exactly (to
    1e-5); XLA multiplies a bf16 cache in bf16, rounding q and the probabilities (to 2e-2 here)."""
    _use(kernel, monkeypatch)
    rng = np.random.default_rng(0)
    for rows, batch, kv_heads, group, head_dim, slots in ((8, 8, 3, 3, 64, 64), (8, 3, 2, 4, 40, 50),
                                                          (2, 1, 1, 9, 16, 17), (4, 4, 2, 1, 8, 33)):
        keys = rng.standard_normal((rows, kv_heads, head_dim, slots)).astype(np.float32)
        values = rng.standard_normal((rows, kv_heads, slots, head_dim)).astype(np.float32)
        cache = {"k": ops.as_bits(jnp.asarray(keys).astype(dtype)), "v": ops.as_bits(jnp.asarray(values).astype(dtype))}
        keys, values = (np.asarray(ops.from_bits(cache[n], dtype).astype(jnp.float32), np.float64) for n in "kv")
        q = 2 * rng.standard_normal((batch, 1, kv_heads * group, head_dim)).astype(np.float32)
        index = np.concatenate([[0, slots - 1], rng.integers(0, slots, batch)])[:batch].astype(np.int32)
        got = jax.jit(lambda q, c, i: ops.attention_of_new_positions(q, c, i, dtype, jnp.float32))(q, cache, index)
        assert ("GptJaxAttend" in jax.jit(lambda q, c, i: ops.attention_of_new_positions(
            q, c, i, dtype, jnp.float32)).lower(q, cache, index).as_text()) == (kernel == "cpu_kernel")
        for b in range(batch):
            for h in range(kv_heads * group):
                used = index[b] + 1
                scores = keys[b, h // group, :, :used].T @ q[b, 0, h] / np.sqrt(head_dim)
                probs = np.exp(scores - scores.max())
                want = probs @ values[b, h // group, :used] / probs.sum()
                tolerance = 2e-2 if (kernel, dtype) == ("xla", "bfloat16") else 1e-5
                np.testing.assert_allclose(np.asarray(got[b, 0, h]), want, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not cpu_kernel.buildable(), reason=NO_KERNEL)
def test_float32_weights_are_packed_where_the_cpu_kernel_runs_and_give_the_same_logits():
    """float32 sampling/serving weights are stored output channel by output channel where the CPU kernel multiplies
    the decode step's rows; the logits are the unpacked model's, and so are 8 rows decoded through the kernel."""
    loaded = _loaded("llama")
    packed = workdir.with_weights(loaded, "float32")
    leaves = jax.tree.leaves(nnx.state(packed.model, nnx.Param), is_leaf=lambda x: isinstance(x, ops.PackedKernel))
    kernels = [x for x in leaves if isinstance(x, ops.PackedKernel)]
    assert len(kernels) == 2 * 7 + 2 and {x.values.dtype for x in kernels} == {jnp.dtype("float32")}
    tokens = jax.random.randint(jax.random.key(2), (8, 48), 0, 61)
    np.testing.assert_allclose(_logits(packed, tokens), _logits(loaded, tokens), rtol=1e-5, atol=1e-5)
    outs = {}
    for name, weights in (("float32 [k, n]", loaded), ("packed", packed)):
        engine = decode.Engine(weights.model, weights.model_cfg, max_batch=8)
        requests = [engine.submit(decode.Request([1 + i, 5, 9], max_tokens=12, sampling=decode.SamplingParams(0.0)))
                    for i in range(8)]
        engine.run_until_done()
        outs[name] = [r.token_ids for r in requests]
    assert outs["packed"] == outs["float32 [k, n]"]


def test_int8_decoding_compiles_a_fixed_set_of_programs_over_a_long_generation():
    """130 tokens after a 16-token prompt cross the cache capacities 64 and 128 into 256: the decode step compiles
    once per capacity (3), whether a call runs one step or several. The engine is idle between generations, so the
    next prompts start at the smallest capacity again: nothing more compiles."""
    loaded = workdir.with_weights(_loaded("llama"), "float32", "int8")
    engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=2)

    def generate():
        states = [engine.submit(decode.Request(list(range(1, 17)), 130, decode.SamplingParams(0.8), seed=s))
                  for s in range(2)]
        engine.run_until_done()
        assert [len(s.token_ids) for s in states] == [130, 130]

    jitted = (engine._prefill, engine._step, engine._sample, engine._grow)  # shared by engines of this model
    before = [f._cache_size() for f in jitted]
    generate()
    first = [f._cache_size() for f in jitted]
    assert first[1] - before[1] == 3, (before, first)  # the step at capacities 64, 128, 256
    for _ in range(2):
        generate()
        assert [f._cache_size() for f in jitted] == first


def test_sampling_with_int8_weights_from_the_command_line_and_bf16_in_process(tiny_workdir):
    """`--mode=sample --config.model.quantize=int8` on a trained workdir, and `sample_workdir` with bf16 weights:
    greedy text comes out, and its first characters are float32's (the trained model's first choices are far
    from ties)."""
    r = subprocess.run([sys.executable, "-m", "gpt_jax.main", "--mode=sample", f"--workdir={tiny_workdir}",
                        "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=24", "--config.model.quantize=int8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    sample = lambda weights: decode.sample_workdir(tiny_workdir, ["ROMEO:"], 24, 0.0, 0, 1.0, weights=weights)[0][0]
    f32, bf16 = sample(None), sample(("bfloat16", "none"))
    assert len(f32) == len(bf16) == len(r.stdout) == 24, (f32, bf16, r.stdout)
    assert bf16[:8] == f32[:8] and r.stdout[:8] == f32[:8], (f32, bf16, r.stdout)


def test_training_refuses_int8():
    from gpt_jax import train

    config = config_lib.base_config()
    config.model.quantize = "int8"
    with pytest.raises(ConfigError, match="model.quantize=int8 is for sampling"):
        train.prepare_run(config, "/nonexistent/never/created")


def test_evaluation_with_int8_and_bf16_weights_stays_within_a_percent(tiny_workdir, tmp_path):
    """`--mode=eval` reads config.model.param_dtype and quantize (here the run config a user's flags make): the
    validation loss of the trained tiny model moves by under 1% with either format."""
    import shutil

    from gpt_jax import evaluate

    losses = {}
    for weights in (("float32", "none"), ("bfloat16", "none"), ("float32", "int8")):
        run = shutil.copytree(tiny_workdir, tmp_path / "_".join(weights))
        config = workdir.read_config(str(run))
        config.model.param_dtype, config.model.quantize = weights
        losses[weights] = evaluate.evaluate_workdir(config, str(run))["val_loss"]
    reference = losses[("float32", "none")]
    assert all(abs(loss / reference - 1) < 0.01 for loss in losses.values()), losses
    assert len(set(losses.values())) == 3, losses  # each format was applied
