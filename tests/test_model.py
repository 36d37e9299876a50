"""The transformer: causality, KV cache, GQA, RoPE, parameter count."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt_jax.model import ModelConfig, Transformer, count_params, init_cache, rope

GPT2 = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=64, max_seq_len=32)
LLAMA = dict(GPT2, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, n_kv_head=2,
             tie_embeddings=False)


def _model(**kw):
    return Transformer(ModelConfig(**kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(kw):
    model = _model(**kw)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, kw["vocab_size"])
    t = 9
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % kw["vocab_size"])
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
    assert np.abs(np.asarray(a[:, t + 1:]) - np.asarray(b[:, t + 1:])).max() > 1e-3


@pytest.mark.parametrize("kw", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_decoding_equals_full_forward(kw):
    model = _model(**kw)
    cfg = model.cfg
    batch, seq = 2, 12
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, kw["vocab_size"])
    full, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    cache = init_cache(cfg, batch, 16)
    key_valid = jnp.ones((batch, 16), bool)
    call = nnx.jit(lambda m, t, p, c, i: m(t, p, cache=c, cache_index=i, key_valid=key_valid))  # i is traced
    # prefill 5 tokens at once, then one token at a time
    logits, cache = call(model, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (batch, 5)), cache, 0)
    steps = [logits]
    for i in range(5, seq):
        logits, cache = call(model, tokens[:, i:i + 1], jnp.full((batch, 1), i), cache, i)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
    """With n_kv_head == n_head, grouped-query attention must be exactly multi-head attention: compare with
    attention written out per head in numpy."""
    model = _model(**dict(LLAMA, n_kv_head=4))
    attn = model.blocks[0].attn
    cfg = model.cfg
    x = jax.random.normal(jax.random.key(3), (1, 7, cfg.d_model))
    positions = jnp.arange(7)[None]
    got, _ = attn(x, positions)
    q = np.asarray(rope(attn.query(x).reshape(1, 7, 4, 8), positions, cfg.rope_theta))[0]
    k = np.asarray(rope(attn.key(x).reshape(1, 7, 4, 8), positions, cfg.rope_theta))[0]
    v = np.asarray(attn.value(x).reshape(1, 7, 4, 8))[0]
    heads = []
    for h in range(4):
        scores = q[:, h] @ k[:, h].T / np.sqrt(8)
        scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[:, h])
    expected = np.concatenate(heads, -1) @ np.asarray(attn.out.kernel[...])
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-5)


def test_gqa_shares_each_kv_head_across_its_group():
    """GQA with 2 KV heads equals MHA whose K/V projections repeat each KV head for its 2 query heads."""
    gqa = _model(**LLAMA)
    mha = _model(**dict(LLAMA, n_kv_head=4))
    for b_gqa, b_mha in zip(gqa.blocks, mha.blocks, strict=True):
        for name in ("key", "value"):
            w = b_gqa.attn.__getattribute__(name).kernel[...].reshape(32, 2, 1, 8)
            getattr(b_mha.attn, name).kernel[...] = jnp.broadcast_to(w, (32, 2, 2, 8)).reshape(32, 32)
        for name in ("query", "out"):
            getattr(b_mha.attn, name).kernel[...] = getattr(b_gqa.attn, name).kernel[...]
        for name in ("gate", "up", "down"):
            getattr(b_mha.mlp, name).kernel[...] = getattr(b_gqa.mlp, name).kernel[...]
    mha.embed[...] = gqa.embed[...]
    mha.lm_head[...] = gqa.lm_head[...]
    tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 61)
    np.testing.assert_allclose(np.asarray(gqa(tokens)[0]), np.asarray(mha(tokens)[0]), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(5), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(6), (1, 1, 1, 16))

    def score(pq, pk):
        rq = rope(q, jnp.array([[pq]]), 10000.0)
        rk = rope(k, jnp.array([[pk]]), 10000.0)
        return float(jnp.sum(rq * rk))

    base = score(7, 3)
    for shift in (1, 10, 100, 1000):
        assert score(7 + shift, 3 + shift) == pytest.approx(base, abs=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-3  # and they do depend on the distance


def test_small_config_has_gpt2_small_parameter_count():
    import importlib.util

    spec = importlib.util.spec_from_file_location("small", "configs/small.py")
    small = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small)
    config = small.get_config()
    config.model.vocab_size = 50257
    model = nnx.eval_shape(lambda: Transformer(ModelConfig.from_config(config), rngs=nnx.Rngs(0)))
    assert count_params(model) == 124_439_808


def test_dropout_is_active_only_in_training_mode():
    model = _model(**dict(GPT2, dropout=0.5))
    tokens = jnp.zeros((1, 8), jnp.int32)
    a, _ = model(tokens)
    b, _ = model(tokens)
    c, _ = model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_remat_and_scan_give_the_same_loss_and_gradients():
    import optax

    tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, 61)

    def loss_and_grads(**kw):
        model = _model(**dict(GPT2, dropout=0.1, **kw))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1], deterministic=False, rngs=nnx.Rngs(dropout=3))
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        return jax.jit(jax.value_and_grad(loss))(params)  # jitted: op by op, remat and scan run far slower

    base_loss, base_grads = loss_and_grads(remat="none", scan_layers=False)
    # the functional path (used by remat and scan) draws dropout masks per layer; compare those among themselves
    ref_loss, ref_grads = loss_and_grads(remat="full", scan_layers=False)
    for kw in (dict(remat="dots"), dict(scan_layers=True), dict(scan_layers=True, remat="full")):
        loss, grads = loss_and_grads(**kw)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), kw
        for g0, g1 in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(np.asarray(g0), np.asarray(g1), atol=1e-5)
    assert abs(float(base_loss) - float(ref_loss)) < 0.5  # same model, other dropout masks


def test_scan_and_remat_without_dropout_equal_the_unrolled_model():
    tokens = jax.random.randint(jax.random.key(8), (2, 9), 0, 61)
    forward = nnx.jit(lambda model: model(tokens)[0])
    base = forward(_model(**GPT2))
    for kw in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
        out = forward(_model(**dict(GPT2, **kw)))
        np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=1e-5)


@pytest.mark.parametrize("kw", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_bf16_activations_carry_bf16_between_matmuls_and_stay_close_to_float32(kw):
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, kw["vocab_size"])

    @nnx.jit
    def run(model):  # → (last hidden state, logits, parameter gradients of the next-token loss)
        def loss(m):
            logits = m(tokens[:, :-1])[0]
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean(), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return model(tokens[:, :-1], return_hidden=True), logits, grads

    h32, a, g32 = run(_model(**kw))
    h16, b, g16 = run(_model(**kw, dtype="bfloat16", activation_dtype="bfloat16"))  # same seed: same parameters
    assert h16.dtype == jnp.bfloat16 and h32.dtype == jnp.float32
    assert b.dtype == jnp.float32  # logits (and so the loss) stay float32
    diff = float(jnp.abs(a - b).max())
    assert 0 < diff < 0.05 * float(jnp.abs(a).max()), diff
    for x, y in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
        assert x.dtype == y.dtype == jnp.float32  # parameter gradients keep the parameters' dtype
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=0.05 * float(jnp.abs(x).max()) + 1e-6)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_cpu_attention_by_query_blocks_equals_full_causal_attention(heads, kv_heads):
    """Past `query_block` positions the CPU path attends by query blocks; values and gradients must equal full
    causal attention (a sequence that is not a multiple of the block, and grouped-query attention)."""
    from gpt_jax import ops

    assert jax.default_backend() == "cpu"
    seq = ModelConfig(vocab_size=2).attention_block + 5  # two blocks of the default size, the second ragged
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, seq, heads, 8))
    k = jax.random.normal(keys[1], (2, seq, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, seq, kv_heads, 8))
    weights = jax.random.normal(keys[3], (2, seq, heads, 8))

    def ours(q, k, v):
        out = ops.attention(q, k, v, "float32", causal=True, query_block=seq - 5)
        return jnp.sum(out * weights), out

    def full(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.sum(out * weights), out

    (_, got_out), got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, want_out), want = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for g, w, name in zip(got, want, "qkv", strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def _dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every dot's operands in a compiled HLO module's text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [tuple(types[name] for name in re.findall(r"%([\w.\-]+)", operands))
            for operands in re.findall(r" dot\(([^)]*)\)", hlo)]


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_matmul_gradients_in_either_weight_layout_run_bf16_dots(transposed):
    """`ops.matmul` with a bf16 compute dtype: the gradients with the weight stored [n, k] (`transposed`, the tied
    head) or [k, n] equal float32's within bf16 rounding (float32's equal the plain product's), and the dots of the
    compiled forward and input gradient take bf16 operands. XLA:CPU ran the input gradient's bf16 dot in float32,
    2.4x slower, when the weight came as a transpose; it runs a weight gradient's bf16 dot in float32 whatever the
    layout, so that one is not checked."""
    from gpt_jax import ops

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 48))
    w = jax.random.normal(kw, (48, 80))
    cotangent = jax.random.normal(kg, (64, 80))
    stored = w.T if transposed else w

    def loss(x, w, dtype):
        return jnp.sum(ops.matmul(x, w, dtype, transposed=transposed) * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    (dx, dw), (dx32, dw32) = grad(x, stored, "bfloat16"), grad(x, stored, "float32")
    np.testing.assert_allclose(dx32, cotangent @ w.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw32, (x.T @ cotangent).T if transposed else x.T @ cotangent, rtol=1e-4, atol=1e-4)
    for got, want in ((dx, dx32), (dw, dw32)):
        np.testing.assert_allclose(got, want, atol=0.02 * float(jnp.abs(want).max()))
    forward_and_dx = jax.jit(lambda x, w: (ops.matmul(x, w, "bfloat16", transposed=transposed),
                                           jax.grad(loss)(x, w, "bfloat16")))
    hlo = forward_and_dx.lower(x, stored).compile().as_text()
    operand_types = _dot_operand_types(hlo)
    assert len(operand_types) >= 2 and all(t == ("bf16", "bf16") for t in operand_types), operand_types
