"""Hugging Face model directories (config.json + *.safetensors + tokenizer files) in and out of gpt_jax.

GPT-2 (`GPT2LMHeadModel`) and the Llama family (`LlamaForCausalLM`, and Mistral without a sliding window); the
tensor names are in `mapping`'s tables. Llama's RoPE uses the rotate-half layout, as gpt_jax does, so q_proj /
k_proj need no permutation.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import mapping
from gpt_jax.convert.common import PICKLE_SUFFIXES, ConversionError, Converted, refuse_pickle
from gpt_jax.convert.safetensors_io import read_safetensors, write_safetensors
from gpt_jax.model import ModelConfig

LLAMA_TYPES = ("llama", "mistral")

# ----------------------------------------------------------------------------------------------------------------
# Import


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and \
        not os.path.isdir(os.path.join(path, "tokenizer"))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None


def _weights(directory: str) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        pickles = sorted(p for p in os.listdir(directory) if p.endswith(PICKLE_SUFFIXES))
        if pickles:
            refuse_pickle(os.path.join(directory, pickles[0]))
        raise ConversionError(f"{directory}: no *.safetensors weights found")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(read_safetensors(path))
    return tensors


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def load_hf_tokenizer(directory: str, config: dict) -> tokenizer_lib.HFTokenizer:
    """The tokenizer in an HF model directory: tokenizer.json, or vocab.json + merges.txt (byte-level BPE), with
    any padding or truncation that tokenizer.json switches on switched off."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    tok_config = _read_json(tok_config_path) if os.path.isfile(tok_config_path) else {}
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    vocab_json, merges_txt = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.isfile(tokenizer_json):
        tok = tokenizer_lib.HFTokenizer.from_file(tokenizer_json).tokenizer
    elif os.path.isfile(vocab_json) and os.path.isfile(merges_txt):
        try:
            tok = Tokenizer(models.BPE.from_file(vocab_json, merges_txt))
        except Exception as e:
            raise ConversionError(f"{vocab_json}: cannot build the BPE tokenizer: {e}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space")))
        tok.decoder = decoders.ByteLevel()
    else:
        raise ConversionError(f"{directory}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    tok.no_padding()  # (HFTokenizer.from_file does this too; a vocab.json + merges.txt tokenizer has neither)
    tok.no_truncation()
    for info in tok_config.get("added_tokens_decoder", {}).values():
        if tok.token_to_id(info["content"]) is not None:
            tok.add_special_tokens([AddedToken(info["content"], special=info.get("special", True),
                                               normalized=info.get("normalized", False))])

    def token_id(name: str) -> int | None:
        token = tok_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            tok.add_special_tokens([token])
            return tok.token_to_id(token)
        value = _first(config.get(f"{name}_id"))
        return int(value) if isinstance(value, int) else None

    chat_template = tok_config.get("chat_template")
    template_file = os.path.join(directory, "chat_template.jinja")
    if chat_template is None and os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()
    eos_id, bos_id = token_id("eos_token"), token_id("bos_token")
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # no flag: does the tokenizer's post-processor put BOS in front?
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and len(with_special) > len(tok.encode("a", add_special_tokens=False).ids) \
            and with_special[0] == bos_id
    return tokenizer_lib.HFTokenizer(tok, eos_id=eos_id, bos_id=bos_id,
                                     chat_template=chat_template if isinstance(chat_template, str) else None,
                                     add_bos=bool(add_bos))


def load_hf(directory: str) -> Converted:
    """Imports an HF GPT-2 or Llama-family model directory."""
    config_path = os.path.join(directory, "config.json")
    config = _read_json(config_path)
    model_type = config.get("model_type")
    if model_type == "gpt2":
        model = _gpt2_config(config, config_path)
        table = mapping.gpt2_table(tied=model["tie_embeddings"])
    elif model_type in LLAMA_TYPES:
        model = _llama_config(config, config_path)
        table = mapping.llama_table(tied=model["tie_embeddings"], bias=model["use_bias"])
    else:
        raise ConversionError(f"{config_path}: model_type {model_type!r} is not supported "
                              f"(supported: gpt2, {', '.join(LLAMA_TYPES)})")
    params = mapping.read(table, _weights(directory), model["n_layer"], directory)
    model["vocab_size"] = int(params["embed"].shape[0])
    return Converted(model, params, load_hf_tokenizer(directory, config), directory)


def _require(config: dict, key: str, path: str):
    if config.get(key) is None:
        raise ConversionError(f"{path}: {key} is missing")
    return config[key]


def _gpt2_config(c: dict, path: str) -> dict:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"{path}: activation_function={act!r} is not supported (gpt_jax uses the tanh GELU, "
                              "gelu_new)")
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights") is False:
        raise ConversionError(f"{path}: non-standard attention scaling (scale_attn_by_inverse_layer_idx / "
                              "scale_attn_weights) is not supported")
    d_model = _require(c, "n_embd", path)
    return {
        "n_layer": _require(c, "n_layer", path), "n_head": _require(c, "n_head", path), "n_kv_head": 0,
        "d_model": d_model, "d_ff": c.get("n_inner") or 4 * d_model, "pos_embedding": "learned", "norm": "layernorm",
        "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)), "mlp": "gelu", "use_bias": True,
        "tie_embeddings": bool(c.get("tie_word_embeddings", True)), "dropout": 0.0,
        "max_seq_len": _require(c, "n_positions", path),
    }


def _llama_config(c: dict, path: str) -> dict:
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{path}: hidden_act={c['hidden_act']!r} is not supported (gpt_jax's SwiGLU uses silu)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConversionError(f"{path}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{path}: partial_rotary_factor={c['partial_rotary_factor']} is not supported")
    if c.get("sliding_window"):
        raise ConversionError(f"{path}: sliding-window attention (sliding_window={c['sliding_window']}) is not "
                              "supported")
    attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConversionError(f"{path}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                              "(gpt_jax has biases on every dense layer or on none)")
    d_model, n_head = _require(c, "hidden_size", path), _require(c, "num_attention_heads", path)
    head_dim = c.get("head_dim") or d_model // n_head
    if head_dim * n_head != d_model:
        raise ConversionError(f"{path}: head_dim={head_dim} × num_attention_heads={n_head} != hidden_size={d_model} "
                              "(gpt_jax derives head_dim from d_model)")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    return {
        "n_layer": _require(c, "num_hidden_layers", path), "n_head": n_head,
        "n_kv_head": c.get("num_key_value_heads") or n_head, "d_model": d_model,
        "d_ff": _require(c, "intermediate_size", path), "pos_embedding": "rope", "rope_theta": float(theta),
        "norm": "rmsnorm", "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "mlp": "swiglu", "use_bias": attn_bias,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)), "dropout": 0.0,
        "max_seq_len": int(c.get("max_position_embeddings") or 2048),
    }


# ----------------------------------------------------------------------------------------------------------------
# Export


def model_family(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the HF architecture a gpt_jax model maps onto; ConversionError for other combinations."""
    shape = (cfg.pos_embedding, cfg.norm, cfg.mlp)
    if shape == ("learned", "layernorm", "gelu"):
        if not cfg.use_bias:
            raise ConversionError("a GPT-2-shaped model without biases has no HF equivalent (GPT2LMHeadModel has "
                                  "biases)")
        if cfg.n_kv_head != cfg.n_head:
            raise ConversionError(f"a GPT-2-shaped model with grouped-query attention (n_kv_head={cfg.n_kv_head}, "
                                  f"n_head={cfg.n_head}) has no HF equivalent")
        return "gpt2"
    if shape == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise ConversionError(
        f"no HF architecture for pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp}: export supports "
        "learned/layernorm/gelu (GPT2LMHeadModel) and rope/rmsnorm/swiglu (LlamaForCausalLM)")


def export_hf(model_cfg: ModelConfig, params: dict, tokenizer, output_dir: str) -> str:
    """Writes config.json, model.safetensors and tokenizer files of an HF model equal to the gpt_jax one.

    `params` is the model's pure parameter dict (arrays of any kind). Returns output_dir."""
    family = model_family(model_cfg)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ConversionError(f"{output_dir}: output directory exists and is not empty")
    eos, bos = getattr(tokenizer, "eos_id", None), getattr(tokenizer, "bos_id", None)
    if family == "gpt2":
        config, table = _gpt2_hf_config(model_cfg), mapping.gpt2_table(tied=model_cfg.tie_embeddings)
    else:
        config = _llama_hf_config(model_cfg)
        table = mapping.llama_table(tied=model_cfg.tie_embeddings, bias=model_cfg.use_bias)
    tensors = mapping.write(table, params, model_cfg.n_layer)
    config.update({"bos_token_id": bos, "eos_token_id": eos, "dtype": "float32",
                   "tie_word_embeddings": model_cfg.tie_embeddings})
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(output_dir, "model.safetensors"), tensors)
    export_tokenizer(tokenizer, output_dir, model_cfg.max_seq_len)
    return output_dir


def _gpt2_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
    }


def _llama_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": 0.0,
    }


def export_tokenizer(tokenizer, output_dir: str, max_len: int) -> None:
    """tokenizer.json (the `tokenizers` format) and tokenizer_config.json, for transformers' AutoTokenizer."""
    if isinstance(tokenizer, tokenizer_lib.HFTokenizer):
        tok = tokenizer.tokenizer
    elif isinstance(tokenizer, tokenizer_lib.CharTokenizer):
        tok = _char_tokenizers(tokenizer)
    elif isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
        import shutil
        import warnings

        shutil.copyfile(tokenizer.model_path, os.path.join(output_dir, "tokenizer.model"))
        warnings.warn(f"{output_dir}: the SentencePiece model is copied as tokenizer.model without a tokenizer.json; "
                      "load it with the sentencepiece library (transformers' Llama/T5 tokenizer classes assume other "
                      "normalization settings)", stacklevel=2)
        return
    else:
        raise ConversionError(f"exporting a {type(tokenizer).__name__} to HF is not supported")
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    names = {}
    for key, token_id in (("eos_token", getattr(tokenizer, "eos_id", None)),
                          ("bos_token", getattr(tokenizer, "bos_id", None))):
        if token_id is not None:
            names[key] = tok.id_to_token(token_id)
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                  "add_bos_token": bool(getattr(tokenizer, "add_bos", False)), **names}
    if getattr(tokenizer, "chat_template", None):
        tok_config["chat_template"] = tokenizer.chat_template
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2)


def _char_tokenizers(tokenizer):
    """A `tokenizers` tokenizer equal to a CharTokenizer: one token per character, joined without separators."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok
