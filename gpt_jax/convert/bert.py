"""Hugging Face BERT, RoBERTa and GPT-2 checkpoints into gpt_jax encoder-decoders (`model.EncoderDecoder`).

    load_stack(dir, role)                 one HF model directory as an encoder or a decoder stack
    load_encoder_decoder(dir)             an HF `EncoderDecoderModel` directory (config.json with encoder/decoder)
    warm_start(encoder_dir, decoder_dir)  Rothe et al.'s warm start: BERT/RoBERTa encoder, BERT/RoBERTa/GPT-2 or a
                                          fresh decoder; what the checkpoints lack (cross-attention, heads) is new
    build_model(converted, seed)          the EncoderDecoder holding the imported parameters, fresh ones elsewhere

BERT and RoBERTa (`BertModel`, `BertLMHeadModel`, `RobertaModel`, `RobertaForCausalLM`, ...): nn.Linear weights are
[out, in] and are transposed; blocks are post-LayerNorm, the embeddings add token-type and position embeddings and
a LayerNorm; RoBERTa's positions start at pad_token_id + 1. As a decoder the masked-LM head (dense, GELU, LayerNorm,
tied output plus a bias) becomes the output head. GPT-2 uses the decoder-only importer's table, plus the
cross-attention an HF encoder-decoder holds. The tensor names are in `mapping`'s tables.
Tokenizers: `tokenizer.json`, or BERT's `vocab.txt` (WordPiece), or byte-level BPE `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.convert import hf, mapping
from gpt_jax.convert.common import ConversionError, overlay
from gpt_jax.model import EncDecConfig, EncoderDecoder, ModelConfig, Transformer

BERT_TYPES = ("bert", "roberta")
DECODER_TYPES = (*BERT_TYPES, "gpt2")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_SPECIAL_DEFAULTS = {"bert": ("[CLS]", "[SEP]", "[PAD]"), "roberta": ("<s>", "</s>", "<pad>")}


@dataclasses.dataclass
class StackImport:
    """One imported stack: its config, the parameters the checkpoint holds (gpt_jax layout, numpy float32), its
    tokenizer and special tokens (BERT: [CLS], [SEP], [PAD]; GPT-2: <|endoftext|> for all three)."""

    cfg: ModelConfig
    params: dict
    tokenizer: tokenizer_lib.HFTokenizer | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    source: str


@dataclasses.dataclass
class ConvertedEncDec:
    """An imported (or warm-started) encoder-decoder. `params` holds what the sources hold; `build_model` fills the
    rest (cross-attention, heads, bridge) freshly. Sources are wrapped as [source_bos] text [source_eos]."""

    cfg: EncDecConfig
    params: dict
    source_tokenizer: tokenizer_lib.HFTokenizer | None
    target_tokenizer: tokenizer_lib.HFTokenizer | None
    source_bos_id: int | None
    source_eos_id: int | None
    source: str


# ----------------------------------------------------------------------------------------------------------------
# Configs


def stack_config(c: dict, path: str, *, role: str, max_seq_len: int = 0) -> ModelConfig:
    """The ModelConfig of an HF config dict (BERT, RoBERTa or GPT-2) used as `role` = encoder | decoder."""
    model_type = c.get("model_type")
    if model_type == "gpt2":
        if role == "encoder":
            raise ConversionError(f"{path}: GPT-2 is a causal model and cannot be the encoder (use BERT or RoBERTa)")
        m = hf._gpt2_config(c, path)
        m["n_kv_head"] = m["n_head"]
        return ModelConfig(vocab_size=hf._require(c, "vocab_size", path), layout="pre", activation="gelu_tanh", **m)
    if model_type not in BERT_TYPES:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported as the {role} (supported: "
                              f"{', '.join(BERT_TYPES if role == 'encoder' else DECODER_TYPES)})")
    act = c.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ConversionError(f"{path}: hidden_act={act!r} is not supported (gelu, gelu_new, relu)")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{path}: position_embedding_type={c['position_embedding_type']!r} is not supported "
                              "(only absolute)")
    d_model, n_head = hf._require(c, "hidden_size", path), hf._require(c, "num_attention_heads", path)
    if d_model % n_head:
        raise ConversionError(f"{path}: num_attention_heads={n_head} does not divide hidden_size={d_model}")
    pad = c.get("pad_token_id")
    offset = (1 if pad is None else int(pad)) + 1 if model_type == "roberta" else 0
    positions = hf._require(c, "max_position_embeddings", path) - offset
    return ModelConfig(
        vocab_size=hf._require(c, "vocab_size", path), n_layer=hf._require(c, "num_hidden_layers", path),
        n_head=n_head, n_kv_head=n_head, d_model=d_model, d_ff=hf._require(c, "intermediate_size", path),
        max_seq_len=min(positions, max_seq_len) if max_seq_len else positions, pos_embedding="learned",
        norm="layernorm", norm_eps=float(c.get("layer_norm_eps", 1e-12)), mlp="gelu", use_bias=True, dropout=0.0,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), layout="post", activation=_ACTIVATIONS[act],
        type_vocab_size=int(c.get("type_vocab_size", 2)), position_offset=offset, embed_norm=True,
        head="mlm" if role == "decoder" else "linear")


# ----------------------------------------------------------------------------------------------------------------
# Parameters


# an HF EncoderDecoderModel's projection from the encoder's width to the decoder's (there when they differ)
_BRIDGE = mapping.Table(mapping.optional([mapping.Row("bridge", "enc_to_dec_proj", "linear")]))


def stack_params(tensors: dict, directory: str, c: dict, cfg: ModelConfig, *, role: str, base: str = "") -> dict:
    """The parameters a checkpoint holds for one stack, in the gpt_jax layout (a partial tree); its tensors are named
    `base` + the HF name."""
    model_type = c["model_type"]
    if model_type == "gpt2":
        table = mapping.gpt2_table(tied=cfg.tie_embeddings, cross=True)
    else:
        table = mapping.bert_table(model_type, type_embed=bool(cfg.type_vocab_size), decoder=role == "decoder")
    params = mapping.read(table, tensors, cfg.n_layer, directory, base=base)
    params["pos_embed"] = params["pos_embed"][:cfg.max_seq_len + cfg.position_offset]  # a shorter max_seq_len
    if role == "decoder" and model_type in mapping.MLM_OUTPUTS:  # gpt_jax ties it to the word embeddings
        output = base + mapping.MLM_OUTPUTS[model_type]
        if output in tensors and not np.array_equal(np.asarray(tensors[output], np.float32), params["embed"]):
            raise ConversionError(f"{directory}: {output} differs from the word embeddings; untied BERT output "
                                  "embeddings are not supported")
    return params


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def _special(directory: str, name: str, default: str) -> str:
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, file)
        if os.path.isfile(path):
            value = hf._read_json(path).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return default


def load_tokenizer(directory: str, c: dict) -> tuple[tokenizer_lib.HFTokenizer, int | None, int | None, int]:
    """(tokenizer, bos id, eos id, pad id) of an HF directory; BERT: [CLS], [SEP], [PAD]; GPT-2: its end token
    for all three. The tokenizer encodes without special tokens, padding or truncation."""
    model_type = c.get("model_type")
    if model_type == "gpt2":
        tok = hf.load_hf_tokenizer(directory, c)
        end = tok.eos_id if tok.eos_id is not None else tok.bos_id
        tok.tokenizer.no_padding()
        tok.tokenizer.no_truncation()
        return tok, end, end, end if end is not None else 0
    vocab_txt = os.path.join(directory, "vocab.txt")
    if os.path.isfile(os.path.join(directory, "tokenizer.json")) or not os.path.isfile(vocab_txt):
        tok = hf.load_hf_tokenizer(directory, c).tokenizer
    else:
        tok = _wordpiece(directory, vocab_txt)
    tok.no_padding()  # some tokenizer.json files pad every text to a fixed length
    tok.no_truncation()
    names = [_special(directory, key, default) for key, default in
             zip(("cls_token", "sep_token", "pad_token"), _SPECIAL_DEFAULTS[model_type], strict=True)]
    ids = [tok.token_to_id(name) for name in names]
    if ids[0] is None or ids[1] is None:
        raise ConversionError(f"{directory}: the tokenizer has no {names[0]} / {names[1]} token")
    tok.add_special_tokens([n for n, i in zip(names, ids, strict=True) if i is not None])
    pad = ids[2] if ids[2] is not None else int(c.get("pad_token_id") or 0)
    return tokenizer_lib.HFTokenizer(tok, eos_id=ids[1], bos_id=ids[0], add_bos=True), ids[0], ids[1], pad


def _wordpiece(directory: str, vocab_txt: str):
    """BERT's WordPiece tokenizer from vocab.txt and tokenizer_config.json's casing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    config_path = os.path.join(directory, "tokenizer_config.json")
    tok_config = hf._read_json(config_path) if os.path.isfile(config_path) else {}
    with open(vocab_txt, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=_special(directory, "unk_token", "[UNK]")))
    lower = bool(tok_config.get("do_lower_case", True))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lower, strip_accents=tok_config.get("strip_accents"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def _model_config(directory: str) -> tuple[dict, str]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no config.json (not an HF model directory)")
    return hf._read_json(path), path


def load_stack(directory: str, role: str, *, max_seq_len: int = 0, with_tokenizer: bool = True) -> StackImport:
    """One HF model directory (BERT, RoBERTa; GPT-2 as a decoder only) as the `role` stack."""
    c, path = _model_config(directory)
    cfg = stack_config(c, path, role=role, max_seq_len=max_seq_len)
    params = stack_params(hf._weights(directory), directory, c, cfg, role=role)
    tok, bos, eos, pad = load_tokenizer(directory, c) if with_tokenizer else (None, None, None, 0)
    return StackImport(cfg, params, tok, bos, eos, pad, directory)


def load_encoder_decoder(directory: str) -> ConvertedEncDec:
    """An HF `EncoderDecoderModel` directory: config.json with `encoder` and `decoder` configs, tensors named
    `encoder.*` and `decoder.*`; tokenizer files, when present, serve both sides."""
    c, path = _model_config(directory)
    if c.get("model_type") != "encoder-decoder":
        raise ConversionError(f"{path}: model_type {c.get('model_type')!r} is not encoder-decoder")
    enc_c, dec_c = c["encoder"], c["decoder"]
    enc_cfg = stack_config(enc_c, path + " (encoder)", role="encoder")
    dec_cfg = stack_config(dec_c, path + " (decoder)", role="decoder")
    tensors = hf._weights(directory)
    params = {"encoder": stack_params(tensors, directory, enc_c, enc_cfg, role="encoder", base="encoder."),
              "decoder": stack_params(tensors, directory, dec_c, dec_cfg, role="decoder", base="decoder.")}
    params.update(mapping.read(_BRIDGE, tensors, 0, directory))
    has_tokenizer = any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "vocab.txt",
                                                                           "vocab.json"))
    tok, bos, eos, pad = load_tokenizer(directory, dec_c) if has_tokenizer else (None, None, None, 0)
    start = c.get("decoder_start_token_id", dec_c.get("decoder_start_token_id"))
    start = start if start is not None else (bos if bos is not None else dec_c.get("bos_token_id"))
    for candidate in (c.get("eos_token_id"), dec_c.get("eos_token_id"), dec_c.get("sep_token_id")):
        eos = candidate if eos is None else eos
    if start is None or eos is None:
        raise ConversionError(f"{path}: decoder_start_token_id or the decoder's end token is not set")
    pad_id = c.get("pad_token_id")
    cfg = EncDecConfig(enc_cfg, dec_cfg, decoder_start_id=int(start), eos_id=int(eos),
                       pad_id=int(pad_id if pad_id is not None else pad))
    return ConvertedEncDec(cfg, params, tok, tok, bos, eos, directory)


def warm_start(encoder_dir: str, decoder_dir: str | None = None, *, decoder_cfg: ModelConfig | None = None,
               target_tokenizer: tokenizer_lib.HFTokenizer | None = None, target_ids: tuple[int, int, int] = (),
               max_seq_len: int = 0) -> ConvertedEncDec:
    """An encoder-decoder warm-started from pretrained checkpoints (Rothe et al., 2020): the encoder from a BERT or
    RoBERTa directory; the decoder from a BERT, RoBERTa or GPT-2 directory (its cross-attention new), or fresh from
    `decoder_cfg` with `target_tokenizer` and target_ids = (start, eos, pad)."""
    enc = load_stack(encoder_dir, "encoder", max_seq_len=max_seq_len)
    params: dict = {"encoder": enc.params}
    if decoder_dir is not None:
        dec = load_stack(decoder_dir, "decoder", max_seq_len=max_seq_len)
        dec_cfg, params["decoder"], target_tokenizer = dec.cfg, dec.params, dec.tokenizer
        start, eos, pad = dec.bos_id, dec.eos_id, dec.pad_id
    elif decoder_cfg is not None and target_tokenizer is not None and len(target_ids) == 3:
        dec_cfg, (start, eos, pad) = decoder_cfg, target_ids
    else:
        raise ConversionError("warm_start needs a decoder directory, or decoder_cfg with target_tokenizer and "
                              "target_ids")
    cfg = EncDecConfig(enc.cfg, dec_cfg, decoder_start_id=int(start), eos_id=int(eos), pad_id=int(pad))
    return ConvertedEncDec(cfg, params, enc.tokenizer, target_tokenizer, enc.bos_id, enc.eos_id,
                           encoder_dir if decoder_dir is None else f"{encoder_dir} + {decoder_dir}")


def build_model(converted: ConvertedEncDec, seed: int = 0) -> tuple[EncoderDecoder, list[str]]:
    """(EncoderDecoder with the converted parameters, the parameter paths initialized fresh)."""
    from flax import nnx

    model = EncoderDecoder(converted.cfg, rngs=nnx.Rngs(seed))
    return model, _put(model, converted.params, converted.source)


def build_encoder(imported: StackImport, seed: int = 0) -> Transformer:
    """A standalone encoder (a bidirectional `Transformer` without output head) holding an imported encoder stack
    (e.g. for sentence embeddings or checks); call it with return_hidden=True."""
    from flax import nnx

    encoder = Transformer(imported.cfg, causal=False, output_head=False, rngs=nnx.Rngs(seed))
    _put(encoder, imported.params, imported.source)
    return encoder


def _put(module, params: dict, source: str) -> list[str]:
    """Puts the imported `params` into the freshly initialized `module`; returns the paths left fresh."""
    import jax
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    merged, fresh = overlay(nnx.to_pure_dict(state), params, source)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, merged))
    nnx.update(module, state)
    return fresh
