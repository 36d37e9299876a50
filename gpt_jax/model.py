"""The transformer in Flax NNX: a decoder-only GPT, GPT-2 or Llama style by config, and the encoder-decoder made
of the same blocks (`model.kind = encoder_decoder`).

- GPT-2: learned positions, pre-LayerNorm, tanh GELU, biases, tied embeddings.
- Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head < n_head), no biases.
- BERT / RoBERTa stacks (encoder-decoder warm starts): post-LayerNorm blocks `norm(x + f(x))`, token-type
  embeddings, a norm on the embeddings, exact GELU, RoBERTa's position offset, the masked-LM output head.

Parameters carry logical axis names (`sharding_axes`) that `gpt_jax.axes` maps to mesh axes. Dense layers multiply
[tokens, features] matrices; the kernels (matmul, attention per backend) are in `gpt_jax.ops`. With
dtype=bfloat16 matmuls take bf16 inputs and accumulate in float32; activation_dtype=bfloat16 also stores what flows
between matmuls in bf16, while norms, softmax and the logits stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_jax import ops
from gpt_jax.axes import constrain


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
    activation: str = "gelu_tanh"  # the gelu MLP's: gelu_tanh (GPT-2) | gelu (exact, BERT) | relu
    use_bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    layout: str = "pre"  # pre: x + f(norm(x)) and a final norm (GPT-2) | post: norm(x + f(x)) (BERT)
    type_vocab_size: int = 0  # token-type embeddings (BERT); type 0 is added to every token
    position_offset: int = 0  # learned positions start at this row (RoBERTa: pad_token_id + 1)
    embed_norm: bool = False  # a norm on the embeddings (BERT)
    head: str = "linear"  # output: linear (tied or lm_head) | mlm (dense, activation, norm, tied output + bias)
    dtype: str = "float32"  # matmul inputs (accumulation stays float32); never "auto" here (from_dict resolves it)
    activation_dtype: str = "float32"  # the residual stream and the tensors between matmuls
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    scan_layers: bool = False
    attention_block: int = 64  # CPU: causal attention by query blocks of this many positions (0 = full square)

    @property
    def decoder(self) -> ModelConfig:
        """The stack that generates: this one (an EncDecConfig's is its decoder), so either kind has `.decoder`."""
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_dict(cls, values, seq_len: int = 0) -> ModelConfig:
        """From a config's `model` subtree (or an encoder-decoder's stack): its keys that are fields here, with
        0 meaning the documented default (n_kv_head = n_head, d_ff = 4 d_model, max_seq_len = seq_len) and "auto"
        dtypes this process's devices' pick (`ops.auto_dtypes`)."""
        fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        if "auto" in (fields.get("dtype"), fields.get("activation_dtype")):
            fields.update({k: v for k, v in ops.auto_dtypes().items() if fields.get(k) == "auto"})
        if not fields.get("vocab_size"):
            raise ValueError("model.vocab_size must be resolved from the tokenizer before building the model")
        return cls(**{**fields, "n_kv_head": fields.get("n_kv_head") or fields.get("n_head", cls.n_head),
                      "d_ff": fields.get("d_ff") or 4 * fields.get("d_model", cls.d_model),
                      "max_seq_len": fields.get("max_seq_len") or seq_len})

    @classmethod
    def from_config(cls, config) -> ModelConfig:
        """The decoder-only model of a run config (`config.model`, `config.seq_len`)."""
        return cls.from_dict(config.model, config.seq_len)


_DTYPES = ops.DTYPES
_ACTIVATIONS = {"gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "gelu": functools.partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}


def _param(rngs: nnx.Rngs, init, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, _DTYPES[dtype]), sharding_axes=axes)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), with x flattened to [tokens, in_features] for the matmul; out in the
    activation dtype."""

    def __init__(self, in_features, out_features, axes, *, cfg: ModelConfig, rngs: nnx.Rngs, std=0.02):
        self.kernel = _param(rngs, nnx.initializers.normal(std), (in_features, out_features),
                             cfg.param_dtype, axes)
        self.bias = (_param(rngs, nnx.initializers.zeros, (out_features,), cfg.param_dtype, axes[1:])
                     if cfg.use_bias else None)
        self.dtype = cfg.dtype
        self.out_dtype = _DTYPES[cfg.activation_dtype]

    def __call__(self, x):
        return Dense.together([self], x)[0]

    @staticmethod
    def together(denses: list[Dense], x) -> list:
        """[d(x) for d in denses] (of one compute dtype), their products computed in one pass where that is faster
        (packed weights: `ops.matmuls`)."""
        ys = ops.matmuls(x.reshape(-1, x.shape[-1]), [d.kernel[...] for d in denses], denses[0].dtype)
        outs = []
        for d, y in zip(denses, ys, strict=True):
            if d.bias is not None:
                y = y + d.bias[...].astype(jnp.float32)
            outs.append(y.astype(d.out_dtype).reshape(*x.shape[:-1], -1))
        return outs


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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.query = Dense(d, cfg.n_head * hd, ("embed", "heads"), cfg=cfg, rngs=rngs)
        self.key = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.value = Dense(d, cfg.n_kv_head * hd, ("embed", "kv_heads"), cfg=cfg, rngs=rngs)
        self.out = Dense(cfg.n_head * hd, d, ("heads", "embed"), cfg=cfg, rngs=rngs, std=out_std)

    def memory_kv(self, memory) -> dict:
        """Keys and values of memory [batch, src, d_model] (no RoPE): [batch, src, n_kv_head, head_dim] each, for
        cross-attention, computed once per source."""
        batch, src, _ = memory.shape
        shape = (batch, src, self.cfg.n_kv_head, self.cfg.head_dim)
        k, v = Dense.together([self.key, self.value], memory)
        return {"k": k.reshape(shape), "v": v.reshape(shape)}

    def __call__(self, x, positions, *, causal=True, key_valid=None, cache=None, cache_index=None, kv=None):
        """x [batch, seq, d_model] → (out [batch, seq, d_model], new cache or None).

        Self-attention, causal or over the keys where key_valid [batch, seq] is True; with `kv` (see `memory_kv`)
        cross-attention over the source positions where key_valid [batch, src] is True. With a cache (see
        init_cache) the new keys and values go to slot `cache_index` and attention covers the causal slots where
        key_valid [batch, slots] is True (see _attend_over_cache)."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        causal, new_cache = causal and kv is None, None
        if kv is None:
            q, k, v = Dense.together([self.query, self.key, self.value], x)
            q = q.reshape(batch, seq, cfg.n_head, cfg.head_dim)
            k, v = (y.reshape(batch, seq, cfg.n_kv_head, cfg.head_dim) for y in (k, v))
            if cfg.pos_embedding == "rope":
                q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
            if cache is not None:
                y, new_cache = self._attend_over_cache(q, k, v, cache, cache_index, key_valid)
                return self.out(y.reshape(batch, seq, cfg.n_head * cfg.head_dim)), new_cache
        else:
            q = self.query(x).reshape(batch, seq, cfg.n_head, cfg.head_dim)
            k, v = kv["k"], kv["v"]
        mask = None if causal or key_valid is None else key_valid[:, None, None, :]  # [batch, 1, 1, keys]
        y = ops.attention(q, k, v, cfg.dtype, causal=causal, mask=mask, out_dtype=_DTYPES[cfg.activation_dtype],
                          query_block=cfg.attention_block)
        return self.out(y.reshape(batch, seq, cfg.n_head * cfg.head_dim)), new_cache

    def _attend_over_cache(self, q, k, v, cache, cache_index, key_valid):
        """Writes the new keys and values k, v [batch, seq, kv_heads, head_dim] into the cache (see init_cache) and
        attends over its slots up to each query's own (with key_valid [batch, slots], only where it is True: not the
        padding after a shorter prompt). A scalar cache_index puts the batch's positions at slots cache_index..
        (cache rows = batch); a vector [batch] puts row b's one new position at slot cache_index[b] of cache row b,
        and then the cache may hold more rows than the batch (the rest are left as they are). Either way the write
        touches only the new positions."""
        cfg = self.cfg
        batch, seq = q.shape[:2]
        dtype = _DTYPES[cfg.dtype]
        k = ops.as_bits(k.transpose(0, 2, 3, 1).astype(dtype))  # [batch, kv_heads, head_dim, seq]
        v = ops.as_bits(v.transpose(0, 2, 1, 3).astype(dtype))  # [batch, kv_heads, seq, head_dim]
        slots = jnp.arange(cache["k"].shape[CACHE_SLOTS["k"]])
        if jnp.ndim(cache_index) == 0:
            new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k, (0, 0, 0, cache_index)),
                         "v": jax.lax.dynamic_update_slice(cache["v"], v, (0, 0, cache_index, 0))}
            mask = slots[None, None, :] <= cache_index + jnp.arange(seq)[None, :, None]  # [1, seq, slots]
        else:
            assert seq == 1, "a cache index per row writes one position per row"
            rows = jnp.arange(batch)
            new_cache = {"k": cache["k"].at[rows, :, :, cache_index].set(k[..., 0]),
                         "v": cache["v"].at[rows, :, cache_index, :].set(v[:, :, 0])}
            if key_valid is None:  # the decode step
                return ops.attention_of_new_positions(q, new_cache, cache_index, dtype,
                                                      _DTYPES[cfg.activation_dtype]), new_cache
            mask = slots[None, None, :] <= cache_index[:, None, None]  # [batch, 1, slots]
        keys, values = (ops.from_bits(new_cache[name][:batch], dtype) for name in ("k", "v"))
        if key_valid is not None:
            mask = mask & key_valid[:, None, :]
        y = ops.attention_over_cache(q, keys, values, mask, out_dtype=_DTYPES[cfg.activation_dtype])
        return y, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = "swiglu" if cfg.mlp == "swiglu" else cfg.activation
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        if cfg.mlp == "swiglu":
            self.gate = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg=cfg, rngs=rngs)
        self.up = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg=cfg, rngs=rngs)
        self.down = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg=cfg, rngs=rngs, std=out_std)

    def __call__(self, x):
        if self.activation == "swiglu":
            gate, up = Dense.together([self.gate, self.up], x)
            return self.down(jax.nn.silu(gate) * up)
        return self.down(_ACTIVATIONS[self.activation](self.up(x)))


class Block(nnx.Module):
    """Self-attention, cross-attention (in an encoder-decoder's decoder), MLP: each a residual, normed before the
    sublayer (`layout=pre`) or after the sum (`post`)."""

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        self.pre = cfg.layout == "pre"
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.cross_norm = Norm(cfg, rngs=rngs) if cross else None
        self.cross_attn = Attention(cfg, rngs=rngs) if cross else None
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def _residual(self, x, h, norm, deterministic, rngs):
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return x + h if self.pre else norm(x + h)

    def __call__(self, x, positions, *, causal=True, key_valid=None, cache=None, cache_index=None, cross_kv=None,
                 memory_valid=None, deterministic=True, rngs=None):
        """x [batch, seq, d_model] → (x, new cache or None); `cross_kv` and `memory_valid` feed cross-attention."""
        h, new_cache = self.attn(self.attn_norm(x) if self.pre else x, positions, causal=causal,
                                 key_valid=key_valid, cache=cache, cache_index=cache_index)
        x = self._residual(x, h, self.attn_norm, deterministic, rngs)
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.cross_norm(x) if self.pre else x, positions, kv=cross_kv,
                                   key_valid=memory_valid)
            x = self._residual(x, h, self.cross_norm, deterministic, rngs)
        x = self._residual(x, self.mlp(self.mlp_norm(x) if self.pre else x), self.mlp_norm, deterministic, rngs)
        x = constrain(x, ("activation_batch", "activation_seq", "activation_embed"))
        return x, new_cache


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


class Transformer(nnx.Module):
    """Embeddings, blocks and output head: the decoder-only model; with causal=False and no output head an
    encoder, with cross=True the decoder of an encoder-decoder."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, cross: bool = False, output_head: bool = True,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.causal = causal
        self.embed = _param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model), cfg.param_dtype,
                            ("vocab", "embed"))
        if cfg.pos_embedding == "learned":
            self.pos_embed = _param(rngs, nnx.initializers.normal(0.01),
                                    (cfg.max_seq_len + cfg.position_offset, cfg.d_model), cfg.param_dtype,
                                    ("position", "embed"))
        if cfg.type_vocab_size:
            self.type_embed = _param(rngs, nnx.initializers.normal(0.02), (cfg.type_vocab_size, cfg.d_model),
                                     cfg.param_dtype, (None, "embed"))
        self.embed_norm = Norm(cfg, rngs=rngs) if cfg.embed_norm else None
        self.blocks = nnx.List([Block(cfg, cross=cross, rngs=rngs) for _ in range(cfg.n_layer)])
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.layout == "pre" else None
        self.mlm_head = output_head and cfg.head == "mlm"
        if self.mlm_head:
            self.head_dense = Dense(cfg.d_model, cfg.d_model, ("embed", "embed"), cfg=cfg, rngs=rngs)
            self.head_norm = Norm(cfg, rngs=rngs)
            self.head_bias = _param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), cfg.param_dtype, ("vocab",))
        if output_head and not cfg.tie_embeddings:
            self.lm_head = _param(rngs, nnx.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                                  cfg.param_dtype, ("embed", "vocab"))
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def cross_kv(self, memory) -> list[dict]:
        """Per layer, the cross-attention keys and values of memory [batch, src, d_model]."""
        return [block.cross_attn.memory_kv(memory) for block in self.blocks]

    def __call__(self, token_ids, positions=None, *, cache=None, cache_index=None, key_valid=None, memory=None,
                 memory_valid=None, cross_kv=None, deterministic=True, rngs=None, return_hidden=False):
        """token_ids [batch, seq] → (logits [batch, seq, vocab] in float32, new cache or None), or with
        return_hidden the final hidden states [batch, seq, d_model] (with a cache: (hidden states, new cache)).

        positions [batch, seq] default to 0..seq-1. `cache` is a list with one {"k", "v"} per layer (see
        `init_cache`), `key_valid` [batch, keys] marks the keys that hold real tokens (cache slots, or the
        sequence itself when causal=False). A decoder attends to `memory` [batch, src, d_model] (or its `cross_kv`,
        computed once for decoding) where memory_valid [batch, src] is True."""
        cfg = self.cfg
        batch, seq = token_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        act = _DTYPES[cfg.activation_dtype]
        x = ops.take_rows(self.embed[...], token_ids).astype(act)  # [batch, seq, d_model]
        if cfg.pos_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions + cfg.position_offset, axis=0).astype(act)
        if cfg.type_vocab_size:
            x = x + self.type_embed[0].astype(act)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        if memory is not None and cross_kv is None:
            cross_kv = self.cross_kv(memory)
        kwargs = dict(causal=self.causal, key_valid=key_valid, memory_valid=memory_valid)
        if cache is None and (cfg.scan_layers or cfg.remat != "none"):
            x, new_cache = self._blocks_functional(x, positions, cross_kv, kwargs, deterministic, rngs), None
        else:
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, layer_cache = block(x, positions, cache=None if cache is None else cache[i],
                                       cache_index=cache_index, cross_kv=None if cross_kv is None else cross_kv[i],
                                       deterministic=deterministic, rngs=rngs, **kwargs)
                new_cache.append(layer_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if return_hidden:
            return x if cache is None else (x, new_cache)
        logits = self.logits(x.reshape(batch * seq, -1))
        return logits.reshape(batch, seq, -1), (None if cache is None else new_cache)

    def logits(self, hidden):
        """The output head: final hidden states [tokens, d_model] → logits [tokens, vocab] in float32 (the matmul
        in the compute dtype)."""
        if self.mlm_head:
            hidden = self.head_norm(_ACTIVATIONS[self.cfg.activation](self.head_dense(hidden)))
        if self.cfg.tie_embeddings:
            logits = ops.matmul(hidden, self.embed[...], self.cfg.dtype, transposed=True)
        else:
            logits = ops.matmul(hidden, self.lm_head[...], self.cfg.dtype)
        return logits + self.head_bias[...].astype(jnp.float32) if self.mlm_head else logits

    def _blocks_functional(self, x, positions, cross_kv, kwargs, deterministic, rngs):
        """The blocks as a pure function of their parameters, for rematerialization and `lax.scan` over layers.

        Parameters keep their per-layer layout (checkpoints and converters see one format); with scan_layers they
        are stacked inside the step, so XLA compiles one block body instead of n_layer copies."""
        cfg = self.cfg
        graphdef, first_state = nnx.split(self.blocks[0])
        states = [first_state] + [nnx.split(b)[1] for b in self.blocks[1:]]
        use_dropout = rngs is not None and not deterministic and cfg.dropout > 0
        keys = jax.random.split(rngs.dropout(), cfg.n_layer) if use_dropout else jnp.zeros((cfg.n_layer,))
        layer_kv = cross_kv if cross_kv is not None else [None] * cfg.n_layer

        def body(h, layer_state, key, kv):
            block = nnx.merge(graphdef, layer_state)
            layer_rngs = nnx.Rngs(dropout=key) if use_dropout else None
            return block(h, positions, cross_kv=kv, deterministic=deterministic, rngs=layer_rngs, **kwargs)[0]

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
        if not cfg.scan_layers:
            for layer_state, key, kv in zip(states, keys, layer_kv, strict=True):
                x = body(x, layer_state, key, kv)
            return x
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        stacked_kv = None if cross_kv is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *cross_kv)
        x, _ = jax.lax.scan(lambda h, xs: (body(h, *xs), None), x, (stacked, keys, stacked_kv))
        return x


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """An encoder-decoder: its two stacks and the decoder's special tokens."""

    encoder: ModelConfig
    decoder: ModelConfig
    decoder_start_id: int  # the first decoder input (BERT: [CLS], GPT-2: <|endoftext|>, trained BPE: <s>)
    eos_id: int  # the decoder's end token
    pad_id: int = 0

    @classmethod
    def from_config(cls, config) -> EncDecConfig:
        """The encoder-decoder of a run config: its stacks (`model.encoder`, `model.decoder`) with the run-wide
        training choices of `model` (dropout, dtypes, remat, ...) and the resolved special tokens."""
        m = config.model
        shared = {k: m[k] for k in ("dropout", "dtype", "activation_dtype", "param_dtype", "remat", "scan_layers",
                                    "attention_block")}
        encoder = ModelConfig.from_dict({**m.encoder.to_dict(), **shared}, config.data.max_source_len or config.seq_len)
        decoder = ModelConfig.from_dict({**m.decoder.to_dict(), **shared}, config.seq_len)
        return cls(encoder, decoder, m.decoder_start_id, m.eos_id, m.pad_id)


class EncoderDecoder(nnx.Module):
    """A bidirectional encoder over the source and a causal decoder that cross-attends to it; a `bridge`
    projects the encoder output when the widths differ (HF's `enc_to_dec_proj`)."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Transformer(cfg.encoder, causal=False, output_head=False, rngs=rngs)
        self.decoder = Transformer(cfg.decoder, cross=True, rngs=rngs)
        d_enc, d_dec = cfg.encoder.d_model, cfg.decoder.d_model
        self.bridge = Dense(d_enc, d_dec, ("embed", "embed"), cfg=cfg.decoder, rngs=rngs) if d_enc != d_dec else None

    def encode(self, source_ids, source_valid=None, *, deterministic=True, rngs=None):
        """source_ids [batch, src] (source_valid marks real tokens) → memory [batch, src, decoder d_model]."""
        memory = self.encoder(source_ids, key_valid=source_valid, deterministic=deterministic, rngs=rngs,
                              return_hidden=True)
        return memory if self.bridge is None else self.bridge(memory)

    def __call__(self, source_ids, target_ids, source_valid=None, *, deterministic=True, rngs=None,
                 return_hidden=False):
        """Teacher-forced logits [batch, tgt, vocab] (float32) of the decoder inputs target_ids [batch, tgt] (with
        return_hidden the decoder's final hidden states)."""
        memory = self.encode(source_ids, source_valid, deterministic=deterministic, rngs=rngs)
        out = self.decoder(target_ids, memory=memory, memory_valid=source_valid, deterministic=deterministic,
                           rngs=rngs, return_hidden=return_hidden)
        return out if return_hidden else out[0]


def model_config(config) -> ModelConfig | EncDecConfig:
    """The model a run config describes, by `model.kind`."""
    if config.model.kind == "encoder_decoder":
        return EncDecConfig.from_config(config)
    return ModelConfig.from_config(config)


def create(cfg: ModelConfig | EncDecConfig, seed: int = 0) -> Transformer | EncoderDecoder:
    """A freshly initialized model (under `nnx.eval_shape`, its abstract shape)."""
    kind = EncoderDecoder if isinstance(cfg, EncDecConfig) else Transformer
    return kind(cfg, rngs=nnx.Rngs(seed))


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> list[dict]:
    """An empty KV cache: per layer keys "k" [batch, n_kv_head, head_dim, max_len] and values "v" [batch,
    n_kv_head, max_len, head_dim], each head's block laid out as attention's products read it (the scores contract
    head_dim against keys column by column, the output sums value rows), so no step copies them transposed.
    CACHE_SLOTS names each one's slot axis. Values are in the compute dtype; 16-bit ones are stored as their bits
    (`ops.as_bits`), so writing a position into the cache writes just that position."""
    dtype = ops.as_bits(jnp.zeros((), _DTYPES[cfg.dtype])).dtype
    k, v = (batch, cfg.n_kv_head, cfg.head_dim, max_len), (batch, cfg.n_kv_head, max_len, cfg.head_dim)
    return [{"k": jnp.zeros(k, dtype), "v": jnp.zeros(v, dtype)} for _ in range(cfg.n_layer)]


CACHE_SLOTS = {"k": 3, "v": 2}  # the slot (position) axis of each cache array


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

