"""The transformer: GPT-2 style or Llama style by config, in Flax NNX.

GPT-2: learned positions, pre-LayerNorm, GELU MLP, biases, tied embeddings.
Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head < n_head), no biases.

Parameters carry logical axis names in their `sharding_axes` metadata; `sharding.py` maps them to mesh axes.
Dense layers multiply 2-D `[tokens, features]` inputs (XLA:CPU runs their weight-gradient matmuls much faster
than 3-D einsums); with dtype=bfloat16 the matmuls, forward and backward, take bf16 inputs and accumulate in
float32, while norms, softmax and the residual stream stay float32. activation_dtype=bfloat16 also stores what
flows between the matmuls (the residual stream, norm outputs, attention and MLP activations) in bf16, halving the
memory traffic of the elementwise work; norms and the loss still compute in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_jax import sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    max_seq_len: int = 128
    pos_embedding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    use_bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    dtype: str = "float32"  # matmul inputs (accumulation stays float32)
    activation_dtype: str = "float32"  # the residual stream and the tensors between matmuls
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_config(cls, config) -> ModelConfig:
        """Builds from a run config (`config.model` plus `seq_len`); zeros take their documented defaults."""
        m = config.model
        if not m.vocab_size:
            raise ValueError("model.vocab_size must be resolved from the tokenizer before building the model")
        return cls(
            vocab_size=m.vocab_size,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_kv_head=m.n_kv_head or m.n_head,
            d_model=m.d_model,
            d_ff=m.d_ff or 4 * m.d_model,
            max_seq_len=m.max_seq_len or config.seq_len,
            pos_embedding=m.pos_embedding,
            rope_theta=m.rope_theta,
            norm=m.norm,
            norm_eps=m.norm_eps,
            mlp=m.mlp,
            use_bias=m.use_bias,
            dropout=m.dropout,
            tie_embeddings=m.tie_embeddings,
            dtype=m.dtype,
            activation_dtype=m.activation_dtype,
            param_dtype=m.param_dtype,
            remat=m.remat,
            scan_layers=m.scan_layers,
        )


def _param(rngs: nnx.Rngs, init, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, _DTYPES[dtype]), sharding_axes=axes)


@jax.custom_vjp
def _matmul_low_precision(x, w):
    """x [m, k] @ w [k, n] with bf16/f16 inputs and float32 accumulation and output. Its backward dots take
    low-precision inputs too (plain autodiff would feed them the float32 cotangent, i.e. float32 dots)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
    return _matmul_low_precision(x, w), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(g.T, x, preferred_element_type=jnp.float32).T.astype(w.dtype)
    return dx, dw


_matmul_low_precision.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, w, dtype):
    """x [m, k] @ w [k, n] → float32 [m, n], with inputs cast to the compute dtype."""
    if dtype == jnp.float32:
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    return _matmul_low_precision(x.astype(dtype), w.astype(dtype))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), with x flattened to [tokens, in_features] for the matmul; out in the
    activation dtype."""

    def __init__(self, in_features, out_features, axes, *, cfg: ModelConfig, rngs: nnx.Rngs, std=0.02):
        self.kernel = _param(rngs, nnx.initializers.normal(std), (in_features, out_features),
                             cfg.param_dtype, axes)
        self.bias = (_param(rngs, nnx.initializers.zeros, (out_features,), cfg.param_dtype, axes[1:])
                     if cfg.use_bias else None)
        self.dtype = _DTYPES[cfg.dtype]
        self.out_dtype = _DTYPES[cfg.activation_dtype]

    def __call__(self, x):
        lead = x.shape[:-1]
        y = matmul(x.reshape(-1, x.shape[-1]), self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.out_dtype).reshape(*lead, -1)


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32; out in the activation dtype."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.out_dtype = _DTYPES[cfg.activation_dtype]
        self.scale = _param(rngs, nnx.initializers.ones, (cfg.d_model,), cfg.param_dtype, ("norm",))
        self.bias = (_param(rngs, nnx.initializers.zeros, (cfg.d_model,), cfg.param_dtype, ("norm",))
                     if cfg.norm == "layernorm" else None)

    def __call__(self, x):
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.out_dtype)


def rope(x, positions, theta: float):
    """Rotary position embedding on x [batch, seq, heads, head_dim] at positions [batch, seq].

    Pairs dimension i with i + head_dim/2 (the HF Llama layout)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


CPU_QUERY_BLOCK = 64


def _causal_attention_by_query_blocks(q, k, v, block: int):
    """Causal attention computed one block of `block` queries at a time, each against the keys up to its last
    query only: the score, softmax and value products skip the upper triangle, 5/8 of the full square's work
    at 4 blocks (T=256, block 64). Same result as full causal attention."""
    seq = q.shape[1]
    outs = []
    for start in range(0, seq, block):
        stop = min(start + block, seq)
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]  # [queries, keys]
        outs.append(jax.nn.dot_product_attention(q[:, start:stop], k[:, :stop], v[:, :stop],
                                                 mask=causal[None, None], implementation="xla"))
    return jnp.concatenate(outs, axis=1)


def attention(q, k, v, dtype: str, *, is_causal=False, mask=None, out_dtype=jnp.float32):
    """Softmax attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs in bf16/f16):
    q [batch, seq, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] (GQA when kv_heads < heads).

    On CPU, causal self-attention without a cache over more than CPU_QUERY_BLOCK positions (training and
    evaluation) goes by query blocks (`_causal_attention_by_query_blocks`): 1.11x the tokens/s of a 6-layer d384
    model's train step at seq 256 (`tools/bench.py train --ablate_query_blocks`, BENCHMARKS.md)."""
    compute = _DTYPES[dtype]
    backend = jax.default_backend()
    if backend == "cpu":
        compute = jnp.float32  # XLA:CPU runs bf16 attention slower than float32 (measured)
        if is_causal and mask is None and q.shape[1] == k.shape[1] and q.shape[1] > CPU_QUERY_BLOCK:
            q, k, v = (x.astype(compute) for x in (q, k, v))
            return _causal_attention_by_query_blocks(q, k, v, CPU_QUERY_BLOCK).astype(out_dtype)
    implementation = "cudnn" if backend == "gpu" and compute != jnp.float32 and mask is None else None
    y = jax.nn.dot_product_attention(q.astype(compute), k.astype(compute), v.astype(compute), is_causal=is_causal,
                                     mask=mask, implementation=implementation)
    return y.astype(out_dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.query = Dense(d, cfg.n_head * hd, ("embed", "heads"), cfg=cfg, rngs=rngs)
        self.key = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.value = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.out = Dense(cfg.n_head * hd, d, ("heads", "embed"), cfg=cfg, rngs=rngs, std=out_std)

    def project(self, x, positions):
        """x [batch, seq, d_model] → q [batch, seq, n_head, head_dim], k and v [batch, seq, n_kv_head, head_dim],
        with RoPE applied to q and k when the model uses it."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q = self.query(x).reshape(batch, seq, cfg.n_head, cfg.head_dim)
        k = self.key(x).reshape(batch, seq, cfg.n_kv_head, cfg.head_dim)
        v = self.value(x).reshape(batch, seq, cfg.n_kv_head, cfg.head_dim)
        if cfg.pos_embedding == "rope":
            q = rope(q, positions, cfg.rope_theta)
            k = rope(k, positions, cfg.rope_theta)
        return q, k, v

    def __call__(self, x, positions, cache=None, cache_index=None, key_valid=None):
        """x [batch, seq, d_model]. With a cache ({"k", "v"}: [batch, max_len, n_kv_head, head_dim]) the new keys
        and values are written at slot `cache_index` and attention covers the valid, causal cache slots."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q, k, v = self.project(x, positions)
        if cache is None:
            y = attention(q, k, v, cfg.dtype, is_causal=True, out_dtype=_DTYPES[cfg.activation_dtype])
            new_cache = None
        else:
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            slots = jnp.arange(k_all.shape[1])
            causal = slots[None, :] <= cache_index + jnp.arange(seq)[:, None]  # [seq, max_len]
            mask = causal[None, None] & key_valid[:, None, None, :]  # [batch, 1, seq, max_len]
            y = attention(q, k_all, v_all, cfg.dtype, mask=mask, out_dtype=_DTYPES[cfg.activation_dtype])
            new_cache = {"k": k_all, "v": v_all}
        return self.out(y.reshape(batch, seq, cfg.n_head * cfg.head_dim)), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        if cfg.mlp == "swiglu":
            self.gate = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg=cfg, rngs=rngs)
        self.up = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg=cfg, rngs=rngs)
        self.down = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg=cfg, rngs=rngs, std=out_std)

    def __call__(self, x):
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x), approximate=True)
        return self.down(h)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def _drop(self, x, deterministic, rngs):
        if self.dropout is None:
            return x
        return self.dropout(x, deterministic=deterministic, rngs=rngs)

    def __call__(self, x, positions, cache=None, cache_index=None, key_valid=None, *, deterministic=True,
                 rngs=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, cache, cache_index, key_valid)
        x = x + self._drop(h, deterministic, rngs)
        x = x + self._drop(self.mlp(self.mlp_norm(x)), deterministic, rngs)
        x = sharding.constrain(x, ("activation_batch", "activation_seq", "activation_embed"))
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), cfg.param_dtype,
                            ("vocab", "embed"))
        if cfg.pos_embedding == "learned":
            self.pos_embed = _param(rngs, nnx.initializers.normal(0.01), (cfg.max_seq_len, cfg.d_model),
                                    cfg.param_dtype, ("position", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.final_norm = Norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, nnx.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                                  cfg.param_dtype, ("embed", "vocab"))
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def __call__(self, token_ids, positions=None, *, cache=None, cache_index=None, key_valid=None,
                 deterministic=True, rngs=None, return_hidden=False):
        """token_ids [batch, seq] → (logits [batch, seq, vocab] in float32, new cache or None).

        positions [batch, seq] default to 0..seq-1. `cache` is a list with one {"k", "v"} per layer (see
        `init_cache`); `key_valid` [batch, max_len] marks the cache slots that hold real tokens."""
        cfg = self.cfg
        batch, seq = token_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        act = _DTYPES[cfg.activation_dtype]
        x = jnp.take(self.embed[...], token_ids, axis=0).astype(act)  # [batch, seq, d_model]
        if cfg.pos_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(act)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        if cache is None and (cfg.scan_layers or cfg.remat != "none"):
            x = self._blocks_functional(x, positions, deterministic, rngs)
            new_cache = None
        else:
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, layer_cache = block(x, positions, None if cache is None else cache[i], cache_index, key_valid,
                                       deterministic=deterministic, rngs=rngs)
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        if return_hidden:
            return x
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = matmul(x.reshape(batch * seq, -1), head, _DTYPES[cfg.dtype])
        return logits.reshape(batch, seq, -1), (None if cache is None else new_cache)

    def _blocks_functional(self, x, positions, deterministic, rngs):
        """The blocks as a pure function of their parameters, for rematerialization and `lax.scan` over layers.

        Parameters keep their per-layer layout (checkpoints and converters see one format); with scan_layers they
        are stacked inside the step, so XLA compiles one block body instead of n_layer copies."""
        cfg = self.cfg
        graphdef, first_state = nnx.split(self.blocks[0])
        states = [first_state] + [nnx.split(b)[1] for b in self.blocks[1:]]
        use_dropout = rngs is not None and not deterministic and cfg.dropout > 0
        keys = jax.random.split(rngs.dropout(), cfg.n_layer) if use_dropout else jnp.zeros((cfg.n_layer,))

        def body(h, layer_state, key):
            block = nnx.merge(graphdef, layer_state)
            layer_rngs = nnx.Rngs(dropout=key) if use_dropout else None
            return block(h, positions, deterministic=deterministic, rngs=layer_rngs)[0]

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
        if not cfg.scan_layers:
            for layer_state, key in zip(states, keys, strict=True):
                x = body(x, layer_state, key)
            return x
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        x, _ = jax.lax.scan(lambda h, xs: (body(h, *xs), None), x, (stacked, keys))
        return x


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> list[dict]:
    """An empty KV cache: per layer {"k", "v"} of [batch, max_len, n_kv_head, head_dim]."""
    dtype = dtype or _DTYPES[cfg.dtype]
    shape = (batch, max_len, cfg.n_kv_head, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention's 12 · layers · d_model · seq_len (PaLM's
    accounting, counting the full causal square)."""
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.d_model * seq_len
