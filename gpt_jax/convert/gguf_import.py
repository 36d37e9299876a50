"""GGUF files of Llama architecture (llama.cpp's format) into gpt_jax: metadata, dequantized weights, tokenizer.

GGUF lists tensor shapes fastest dimension first, so a weight of shape [in, out] there is [out, in] in numpy, as in
PyTorch; the tensor names are the llama.cpp column of `mapping`'s Llama table. The llama.cpp converter interleaves
the rows of attn_q / attn_k within each head (its RoPE pairs dimensions 2i, 2i+1); gpt_jax pairs i with
i + head_dim/2 (HF's rotate-half), so those rows are put back.
"""

from __future__ import annotations

import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import mapping, quants
from gpt_jax.convert.common import ConversionError, Converted

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names), applied before the byte-level mapping.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one, then GPT-2's pattern
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT], "dbrx": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}


def open_gguf(path: str):
    """A gguf.GGUFReader over `path`, with truncated or corrupt files turned into ConversionError."""
    try:
        import gguf
    except ImportError:
        raise ConversionError(f"{path}: reading GGUF files needs gguf: pip install -e '.[convert]'") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on bad bytes
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"{path}: truncated or corrupt GGUF file ({message})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or np.asarray(t.data).nbytes != t.n_bytes:
            raise ConversionError(f"{path}: truncated GGUF file: tensor {t.name} ends past the end of the file")
    return reader


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _dequantize(t, path: str) -> np.ndarray:
    """A GGUF tensor as float32, in numpy's shape order."""
    type_name = t.tensor_type.name
    if type_name not in quants.DEQUANTIZERS:
        raise ConversionError(f"{path}: tensor {t.name} has type {type_name}; supported: "
                              f"{', '.join(quants.DEQUANTIZERS)}")
    raw = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)
    shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGUF lists the fastest dimension first
    return quants.dequantize(raw, type_name).reshape(shape)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleaving of attn_q / attn_k ([out, in])."""
    d_out, d_in = w.shape
    head_dim = d_out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def load_gguf(path: str) -> Converted:
    """Imports a Llama-architecture GGUF file: the model (dequantized to float32) and its tokenizer."""
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: general.architecture={arch!r} is not supported (only llama)")

    def hp(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ConversionError(f"{path}: metadata llama.{key} is missing")
        return value

    d_model, n_head = int(hp("embedding_length")), int(hp("attention.head_count"))
    n_kv_head = int(hp("attention.head_count_kv", n_head))
    head_dim = d_model // n_head
    if int(hp("rope.dimension_count", head_dim)) != head_dim:
        raise ConversionError(f"{path}: partial rotary embedding (llama.rope.dimension_count="
                              f"{hp('rope.dimension_count')}, head_dim={head_dim}) is not supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "", None):
        raise ConversionError(f"{path}: RoPE scaling {scaling!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    model = {
        "n_layer": int(hp("block_count")), "n_head": n_head, "n_kv_head": n_kv_head, "d_model": d_model,
        "d_ff": int(hp("feed_forward_length")), "pos_embedding": "rope",
        "rope_theta": float(hp("rope.freq_base", 10000.0)), "norm": "rmsnorm",
        "norm_eps": _float32_repr(hp("attention.layer_norm_rms_epsilon", 1e-5)), "mlp": "swiglu", "use_bias": False,
        "tie_embeddings": tied, "dropout": 0.0, "max_seq_len": int(hp("context_length", 2048)),
    }

    def load(name, t):  # dequantized, with attn_q / attn_k rows back in HF's order
        heads = {"attn_q": n_head, "attn_k": n_kv_head}.get(name.split(".")[-2])
        return _dequantize(t, path) if heads is None else _unpermute(_dequantize(t, path), heads)

    table = mapping.llama_table(tied=tied, bias=False, gguf=True)
    params = mapping.read(table, tensors, model["n_layer"], path, load=load)
    model["vocab_size"] = int(params["embed"].shape[0])
    return Converted(model, params, gguf_tokenizer(reader, path), path)


def _float32_repr(value) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-")) if value else 0.0


def gguf_tokenizer(reader, path: str) -> tokenizer_lib.HFTokenizer:
    """The byte-level BPE tokenizer in GGUF metadata (tokenizer.ggml.model = gpt2) as a `tokenizers` tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, gpt2)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    merges = list(_field(reader, "tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise ConversionError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = list(_field(reader, "tokenizer.ggml.token_type") or [])
    if len(types) != len(tokens):
        types = [1] * len(tokens)  # no (usable) token types: every token is a normal one
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    splits = PRE_TOKENIZERS.get(pre)
    if splits is None:
        import warnings

        warnings.warn(f"{path}: unknown pre-tokenizer {pre!r}; using GPT-2's split pattern", stacklevel=2)
        splits = PRE_TOKENIZERS["default"]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are special: matched whole in text; user-defined ones (type 4) are matched whole too
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == 3])
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types, strict=True) if kind == 4]
    if user:
        tok.add_tokens(user)

    def token_id(key):
        value = _field(reader, f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    return tokenizer_lib.HFTokenizer(
        tok, eos_id=token_id("eos_token_id"), bos_id=token_id("bos_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))
