"""The encoder-decoder transformer (`model.kind = encoder_decoder`), in Flax NNX, beside the decoder-only model.

A bidirectional encoder builds a representation of the source; a causal decoder with cross-attention generates the
target from it. Each stack is configured like the decoder-only model (a `StackConfig` is a `ModelConfig` with a few
more fields) and is built from the same Dense, Norm, Attention and MLP code, so the parameters carry the same logical
axis names and shard, checkpoint and convert the same way. The fields cover the pretrained families we import:

- GPT-2 (and from-scratch stacks): pre-LayerNorm blocks `x + f(norm(x))`, a final norm, tanh GELU, tied embeddings.
- BERT / RoBERTa: post-LayerNorm blocks `norm(x + f(x))`, token-type embeddings, LayerNorm on the embeddings,
  exact (erf) GELU, RoBERTa's position offset, and the masked-LM prediction head (dense, GELU, LayerNorm, tied
  output with a bias).

Cross-attention takes queries from the decoder and keys/values from the encoder output; `Decoder.cross_kv` computes
those keys/values once per source, and decoding reuses them at every step beside the self-attention KV cache. When
encoder and decoder widths differ, a `bridge` projects the encoder output to the decoder's width (HF's
`enc_to_dec_proj`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_jax import sharding
from gpt_jax.model import _DTYPES, MLP, Attention, Dense, ModelConfig, Norm, _param, attention

LAYOUTS = ("pre", "post")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
HEADS = ("linear", "mlm")


@dataclasses.dataclass(frozen=True)
class StackConfig(ModelConfig):
    """One stack (encoder or decoder): the decoder-only model's fields plus what BERT-style stacks need."""

    layout: str = "pre"  # pre: x + f(norm(x)), final norm (GPT-2) | post: norm(x + f(x)), no final norm (BERT)
    activation: str = "gelu_tanh"  # MLP activation when mlp=gelu: gelu_tanh | gelu (exact erf, BERT) | relu
    type_vocab_size: int = 0  # token-type (segment) embeddings; type 0 is added to every token
    position_offset: int = 0  # learned positions start at this row (RoBERTa: pad_token_id + 1)
    embed_norm: bool = False  # a norm on the embeddings (BERT)
    head: str = "linear"  # decoder output: linear (tied or lm_head) | mlm (dense, activation, norm, then linear + bias)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StackConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown stack config keys: {', '.join(unknown)}")
        return cls(**values)

    def validate(self, name: str) -> None:
        """Raises ValueError naming the first field of stack `name` that cannot work."""
        for field, allowed in (("layout", LAYOUTS), ("activation", ACTIVATIONS), ("head", HEADS),
                               ("pos_embedding", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                               ("mlp", ("gelu", "swiglu"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{name}.{field}={getattr(self, field)!r} is not one of {', '.join(allowed)}")
        if self.d_model % self.n_head:
            raise ValueError(f"{name}.n_head={self.n_head} does not divide {name}.d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{name}.n_kv_head={self.n_kv_head} does not divide {name}.n_head={self.n_head}")


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """An encoder-decoder: its two stacks and the decoder's special tokens."""

    encoder: StackConfig
    decoder: StackConfig
    decoder_start_id: int  # the first decoder input (BERT: [CLS], GPT-2: <|endoftext|>)
    eos_id: int  # the decoder's end token (BERT: [SEP])
    pad_id: int = 0
    kind: str = "encoder_decoder"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict(),
                "decoder_start_id": self.decoder_start_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    @classmethod
    def from_dict(cls, values: dict) -> EncDecConfig:
        values = dict(values)
        kind = values.pop("kind", "encoder_decoder")
        if kind != "encoder_decoder":
            raise ValueError(f"model.kind={kind!r}: an EncDecConfig describes kind encoder_decoder")
        cfg = cls(encoder=StackConfig.from_dict(values.pop("encoder")),
                  decoder=StackConfig.from_dict(values.pop("decoder")), **values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.encoder.validate("encoder")
        self.decoder.validate("decoder")


# ----------------------------------------------------------------------------------------------------------------
# Layers


class SelfAttention(Attention):
    """The decoder-only model's attention; with causal=False it attends both ways, over the valid keys only."""

    def __init__(self, cfg: StackConfig, *, causal: bool, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.causal = causal

    def __call__(self, x, positions, cache=None, cache_index=None, key_valid=None):
        """x [batch, seq, d_model]; key_valid [batch, seq] (bidirectional) or [batch, max_len] (with a cache)."""
        if self.causal:
            return super().__call__(x, positions, cache, cache_index, key_valid)
        cfg = self.cfg
        batch, seq, _ = x.shape
        q, k, v = self.project(x, positions)
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [batch, 1, 1, seq]
        y = attention(q, k, v, cfg.dtype, mask=mask)
        return self.out(y.reshape(batch, seq, cfg.n_head * cfg.head_dim)), None


class CrossAttention(Attention):
    """Queries from the decoder, keys and values from the encoder output (the "memory"); the same projections
    (and parameter names) as self-attention."""

    def memory_kv(self, memory) -> dict:
        """memory [batch, src, d_model] → {"k", "v"}: [batch, src, n_kv_head, head_dim], computed once per source."""
        cfg = self.cfg
        batch, src, _ = memory.shape
        return {"k": self.key(memory).reshape(batch, src, cfg.n_kv_head, cfg.head_dim),
                "v": self.value(memory).reshape(batch, src, cfg.n_kv_head, cfg.head_dim)}

    def __call__(self, x, kv: dict, memory_valid=None):
        """x [batch, seq, d_model] attends over kv (see `memory_kv`) where memory_valid [batch, src] is True."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q = self.query(x).reshape(batch, seq, cfg.n_head, cfg.head_dim)
        mask = None if memory_valid is None else memory_valid[:, None, None, :]
        y = attention(q, kv["k"], kv["v"], cfg.dtype, mask=mask)
        return self.out(y.reshape(batch, seq, cfg.n_head * cfg.head_dim))


_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu}


class FeedForward(MLP):
    """The decoder-only model's MLP, with BERT's exact GELU (or ReLU) as a choice of activation."""

    def __init__(self, cfg: StackConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.activation = cfg.activation

    def __call__(self, x):
        if self.kind == "swiglu" or self.activation == "gelu_tanh":
            return super().__call__(x)
        return self.down(_ACTIVATIONS[self.activation](self.up(x)))


class EncDecBlock(nnx.Module):
    """Self-attention (causal or not), optional cross-attention, MLP; pre- or post-norm residuals by config.

    Parameter names follow the decoder-only Block (attn_norm, attn, mlp_norm, mlp) plus cross_norm and cross_attn;
    in the post layout each norm follows its sublayer's residual sum."""

    def __init__(self, cfg: StackConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs):
        self.pre = cfg.layout == "pre"
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = SelfAttention(cfg, causal=causal, rngs=rngs)
        self.cross_norm = Norm(cfg, rngs=rngs) if cross else None
        self.cross_attn = CrossAttention(cfg, rngs=rngs) if cross else None
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def _residual(self, x, h, norm, deterministic, rngs):
        if self.dropout is not None:
            h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return x + h if self.pre else norm(x + h)

    def __call__(self, x, positions, *, key_valid=None, cross_kv=None, memory_valid=None, cache=None,
                 cache_index=None, deterministic=True, rngs=None):
        """x [batch, seq, d_model] → (x, new self-attention cache or None)."""
        h, new_cache = self.attn(self.attn_norm(x) if self.pre else x, positions, cache, cache_index, key_valid)
        x = self._residual(x, h, self.attn_norm, deterministic, rngs)
        if self.cross_attn is not None:
            h = self.cross_attn(self.cross_norm(x) if self.pre else x, cross_kv, memory_valid)
            x = self._residual(x, h, self.cross_norm, deterministic, rngs)
        h = self.mlp(self.mlp_norm(x) if self.pre else x)
        x = self._residual(x, h, self.mlp_norm, deterministic, rngs)
        x = sharding.constrain(x, ("activation_batch", "activation_seq", "activation_embed"))
        return x, new_cache


# ----------------------------------------------------------------------------------------------------------------
# Stacks


class _Stack(nnx.Module):
    """Embeddings (token, position, token type, norm) and blocks, shared by the encoder and the decoder."""

    def __init__(self, cfg: StackConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs):
        self.cfg = cfg
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
        self.blocks = nnx.List([EncDecBlock(cfg, causal=causal, cross=cross, rngs=rngs)
                                for _ in range(cfg.n_layer)])
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.layout == "pre" else None
        self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def _embed(self, token_ids, positions, type_ids, deterministic, rngs):
        cfg = self.cfg
        dtype = _DTYPES[cfg.dtype]
        x = jnp.take(self.embed[...], token_ids, axis=0).astype(dtype)  # [batch, seq, d_model]
        if cfg.pos_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions + cfg.position_offset, axis=0).astype(dtype)
        if cfg.type_vocab_size:
            types = self.type_embed[...]
            x = x + (types[0].astype(dtype) if type_ids is None else jnp.take(types, type_ids, axis=0).astype(dtype))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return x


def _positions(token_ids, positions):
    batch, seq = token_ids.shape
    return jnp.broadcast_to(jnp.arange(seq), (batch, seq)) if positions is None else positions


class Encoder(_Stack):
    """Bidirectional self-attention over the source."""

    def __init__(self, cfg: StackConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, causal=False, cross=False, rngs=rngs)

    def __call__(self, token_ids, valid=None, *, type_ids=None, deterministic=True, rngs=None):
        """token_ids [batch, src] (valid [batch, src] marks real tokens; padding is never attended to) →
        hidden states [batch, src, d_model]."""
        positions = _positions(token_ids, None)
        x = self._embed(token_ids, positions, type_ids, deterministic, rngs)
        for block in self.blocks:
            x, _ = block(x, positions, key_valid=valid, deterministic=deterministic, rngs=rngs)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(_Stack):
    """Causal self-attention (with the decoder-only model's KV cache), cross-attention, and the output head."""

    def __init__(self, cfg: StackConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, causal=True, cross=True, rngs=rngs)
        if cfg.head == "mlm":
            self.head_dense = Dense(cfg.d_model, cfg.d_model, ("embed", "embed"), cfg=cfg, rngs=rngs)
            self.head_norm = Norm(cfg, rngs=rngs)
            self.head_bias = _param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), cfg.param_dtype, ("vocab",))
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, nnx.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                                  cfg.param_dtype, ("embed", "vocab"))

    def cross_kv(self, memory) -> list[dict]:
        """Per layer, the cross-attention keys and values of memory [batch, src, d_model] (see `memory_kv`)."""
        return [block.cross_attn.memory_kv(memory) for block in self.blocks]

    def __call__(self, token_ids, cross_kv: list[dict], memory_valid=None, positions=None, *, type_ids=None,
                 cache=None, cache_index=None, key_valid=None, deterministic=True, rngs=None):
        """token_ids [batch, seq] → (logits [batch, seq, vocab] in float32, new cache or None).

        `cross_kv` comes from `cross_kv(memory)`, memory_valid [batch, src] marks real source tokens. `cache`,
        `cache_index` and `key_valid` are the decoder-only model's (see `gpt_jax.model.init_cache`)."""
        cfg = self.cfg
        batch, seq = token_ids.shape
        positions = _positions(token_ids, positions)
        x = self._embed(token_ids, positions, type_ids, deterministic, rngs)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, positions, key_valid=key_valid, cross_kv=cross_kv[i], memory_valid=memory_valid,
                                   cache=None if cache is None else cache[i], cache_index=cache_index,
                                   deterministic=deterministic, rngs=rngs)
            new_cache.append(layer_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        dtype = _DTYPES[cfg.dtype]
        if cfg.head == "mlm":
            h = self.head_dense(x)
            x = self.head_norm(_ACTIVATIONS.get(cfg.activation, lambda v: jax.nn.gelu(v, approximate=True))(h))
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.dot(x.reshape(batch * seq, -1), head.astype(dtype), preferred_element_type=jnp.float32)
        if cfg.head == "mlm":
            logits = logits + self.head_bias[...].astype(jnp.float32)
        return logits.reshape(batch, seq, -1), (None if cache is None else new_cache)


class EncoderDecoder(nnx.Module):
    """The whole model: encoder, optional bridge (encoder width → decoder width), decoder."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, rngs=rngs)
        self.decoder = Decoder(cfg.decoder, rngs=rngs)
        d_enc, d_dec = cfg.encoder.d_model, cfg.decoder.d_model
        self.bridge = Dense(d_enc, d_dec, ("embed", "embed"), cfg=cfg.decoder, rngs=rngs) if d_enc != d_dec else None

    def encode(self, source_ids, source_valid=None, *, deterministic=True, rngs=None):
        """source_ids [batch, src] → memory [batch, src, decoder d_model]."""
        memory = self.encoder(source_ids, source_valid, deterministic=deterministic, rngs=rngs)
        return memory if self.bridge is None else self.bridge(memory)

    def __call__(self, source_ids, target_ids, source_valid=None, *, deterministic=True, rngs=None):
        """Teacher-forced logits: source_ids [batch, src], target_ids [batch, tgt] (the decoder inputs, starting
        with `decoder_start_id`) → logits [batch, tgt, vocab] in float32."""
        memory = self.encode(source_ids, source_valid, deterministic=deterministic, rngs=rngs)
        logits, _ = self.decoder(target_ids, self.decoder.cross_kv(memory), source_valid,
                                 deterministic=deterministic, rngs=rngs)
        return logits


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
