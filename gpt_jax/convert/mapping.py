"""One table per model family between gpt_jax parameters and a checkpoint's tensor names, read HF → gpt_jax by the
importers (`read`) and gpt_jax → HF by the exporter (`write`).

A row pairs a gpt_jax module with a checkpoint module (`{i}`: the block number); its kind says how their tensors
relate. PyTorch's nn.Linear stores weights [out, in], gpt_jax kernels are [in, out]; GPT-2's Conv1D is [in, out]
already. A row with several gpt_jax modules has one fused tensor, theirs side by side on the output axis (GPT-2's
c_attn = q|k|v): split on import, concatenated on export. Optional rows are imported when the checkpoint holds them
(cross-attention, a masked-LM head) and otherwise left to fresh initialization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from gpt_jax.convert.common import ConversionError

# kind → (gpt_jax suffix, checkpoint suffix, transposed) of each tensor in the module
_KINDS = {
    "tensor": [("", "", False)],
    "tensor_t": [("", "", True)],  # an untied output embedding: [d_model, vocab] in gpt_jax
    "linear": [(".kernel", ".weight", True), (".bias", ".bias", False)],
    "conv1d": [(".kernel", ".weight", False), (".bias", ".bias", False)],
    "layernorm": [(".scale", ".weight", False), (".bias", ".bias", False)],
    "rmsnorm": [(".scale", ".weight", False)],
}
_DENSE = ("linear", "conv1d")


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str | tuple[str, ...]  # gpt_jax module path, keys joined by dots; several: fused in one tensor
    theirs: str  # the checkpoint's module (or, for the tensor kinds, tensor) name
    kind: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Table:
    rows: list[Row]
    bias: bool = True  # the dense layers (linear, conv1d) have biases
    body: str = ""  # HF's base-model prefix (`transformer.`), which checkpoints of the bare model (GPT2Model) lack


def optional(rows: list[Row]) -> list[Row]:
    return [dataclasses.replace(row, optional=True) for row in rows]


def tensors_of(table: Table, n_layer: int) -> Iterator[tuple[tuple[str, ...], str, bool, bool]]:
    """Each tensor of the table: (gpt_jax parameter paths, checkpoint name, transposed, optional), per block."""
    for row in table.rows:
        ours = (row.ours,) if isinstance(row.ours, str) else row.ours
        for i in range(n_layer) if "{i}" in row.theirs else [0]:
            for our_suffix, their_suffix, transpose in _KINDS[row.kind]:
                if their_suffix == ".bias" and row.kind in _DENSE and not table.bias:
                    continue
                yield (tuple(o.format(i=i) + our_suffix for o in ours), row.theirs.format(i=i) + their_suffix,
                       transpose, row.optional)


def read(table: Table, tensors: Mapping, n_layer: int, source: str, *, base: str = "",
         load: Callable[[str, object], np.ndarray] | None = None) -> dict:
    """The gpt_jax parameters (a nested dict of float32 arrays, blocks under integer keys) that `tensors` (checkpoint
    name → stored tensor) holds. `base` goes in front of every name (an HF encoder-decoder's `decoder.`); `load(name,
    stored)` turns a stored tensor into an array. ConversionError names a tensor the checkpoint lacks."""
    bare = table.body and not any(name.startswith(base + table.body) for name in tensors)
    params: dict = {}
    for ours, theirs, transpose, is_optional in tensors_of(table, n_layer):
        name = base + (theirs.removeprefix(table.body) if bare else theirs)
        if name not in tensors:
            if is_optional:
                continue
            raise ConversionError(f"{source}: tensor {name} is missing")
        x = np.asarray(load(name, tensors[name]) if load else tensors[name], np.float32)
        for path, part in zip(ours, np.split(x.T if transpose else x, len(ours), axis=-1), strict=True):
            *parents, leaf = _keys(path)
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = np.ascontiguousarray(part)
    return params


def write(table: Table, params: dict, n_layer: int) -> dict[str, np.ndarray]:
    """The checkpoint tensors (name → float32 array) of gpt_jax `params`: the reverse of `read`."""
    tensors = {}
    for ours, theirs, transpose, _ in tensors_of(table, n_layer):
        x = np.concatenate([np.asarray(_lookup(params, path), np.float32) for path in ours], axis=-1)
        tensors[theirs] = x.T if transpose else x
    return tensors


def _keys(path: str) -> list:
    return [int(key) if key.isdigit() else key for key in path.split(".")]


def _lookup(params: dict, path: str):
    for key in _keys(path):
        params = params[key]
    return params


# ----------------------------------------------------------------------------------------------------------------
# The tables


def gpt2_table(*, tied: bool, cross: bool = False) -> Table:
    """GPT2LMHeadModel. `cross`: the cross-attention of a GPT-2 decoder in an HF EncoderDecoderModel (q_attn, and
    c_attn = k|v), taken when the checkpoint holds it."""
    b, h = "blocks.{i}.", "transformer.h.{i}."
    rows = [
        Row("embed", "transformer.wte.weight", "tensor"),
        Row("pos_embed", "transformer.wpe.weight", "tensor"),
        Row(b + "attn_norm", h + "ln_1", "layernorm"),
        Row((b + "attn.query", b + "attn.key", b + "attn.value"), h + "attn.c_attn", "conv1d"),
        Row(b + "attn.out", h + "attn.c_proj", "conv1d"),
        Row(b + "mlp_norm", h + "ln_2", "layernorm"),
        Row(b + "mlp.up", h + "mlp.c_fc", "conv1d"),
        Row(b + "mlp.down", h + "mlp.c_proj", "conv1d"),
        Row("final_norm", "transformer.ln_f", "layernorm"),
    ]
    if cross:
        rows += optional([
            Row(b + "cross_norm", h + "ln_cross_attn", "layernorm"),
            Row(b + "cross_attn.query", h + "crossattention.q_attn", "conv1d"),
            Row((b + "cross_attn.key", b + "cross_attn.value"), h + "crossattention.c_attn", "conv1d"),
            Row(b + "cross_attn.out", h + "crossattention.c_proj", "conv1d"),
        ])
    if not tied:
        rows.append(Row("lm_head", "lm_head.weight", "tensor_t"))
    return Table(rows, body="transformer.")


_LLAMA = [
    # gpt_jax module           LlamaForCausalLM, MistralForCausalLM         llama.cpp (GGUF)       kind
    ("embed",                 "model.embed_tokens.weight",                 "token_embd.weight",   "tensor"),
    ("blocks.{i}.attn_norm",  "model.layers.{i}.input_layernorm",          "blk.{i}.attn_norm",   "rmsnorm"),
    ("blocks.{i}.attn.query", "model.layers.{i}.self_attn.q_proj",         "blk.{i}.attn_q",      "linear"),
    ("blocks.{i}.attn.key",   "model.layers.{i}.self_attn.k_proj",         "blk.{i}.attn_k",      "linear"),
    ("blocks.{i}.attn.value", "model.layers.{i}.self_attn.v_proj",         "blk.{i}.attn_v",      "linear"),
    ("blocks.{i}.attn.out",   "model.layers.{i}.self_attn.o_proj",         "blk.{i}.attn_output", "linear"),
    ("blocks.{i}.mlp_norm",   "model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm",    "rmsnorm"),
    ("blocks.{i}.mlp.gate",   "model.layers.{i}.mlp.gate_proj",            "blk.{i}.ffn_gate",    "linear"),
    ("blocks.{i}.mlp.up",     "model.layers.{i}.mlp.up_proj",              "blk.{i}.ffn_up",      "linear"),
    ("blocks.{i}.mlp.down",   "model.layers.{i}.mlp.down_proj",            "blk.{i}.ffn_down",    "linear"),
    ("final_norm",            "model.norm",                                "output_norm",         "rmsnorm"),
    ("lm_head",               "lm_head.weight",                            "output.weight",       "tensor_t"),
]


def llama_table(*, tied: bool, bias: bool, gguf: bool = False) -> Table:
    """LlamaForCausalLM, or with gguf=True llama.cpp's names for the same tensors (GGUF's reversed shapes make its
    weights [out, in] too)."""
    rows = [Row(ours, gguf_name if gguf else hf_name, kind) for ours, hf_name, gguf_name, kind in _LLAMA
            if not (tied and ours == "lm_head")]
    return Table(rows, bias=bias, body="" if gguf else "model.")


# the masked-LM head's dense layer, norm and output bias; its output weight (MLM_OUTPUTS) is the word embeddings
MLM_HEADS = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
             "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")}
MLM_OUTPUTS = {"bert": "cls.predictions.decoder.weight", "roberta": "lm_head.decoder.weight"}


def bert_table(model_type: str, *, type_embed: bool, decoder: bool) -> Table:
    """BertModel / RobertaModel (model_type bert | roberta), named as in BertLMHeadModel / RobertaForCausalLM. As a
    decoder, cross-attention and the masked-LM head are taken when the checkpoint holds them."""
    e, b, layer = model_type + ".embeddings.", "blocks.{i}.", model_type + ".encoder.layer.{i}."

    def attention(ours: str, theirs: str, norm: str) -> list[Row]:
        rows = [Row(f"{b}{ours}.{name}", f"{layer}{theirs}.self.{name}", "linear")
                for name in ("query", "key", "value")]
        return rows + [Row(f"{b}{ours}.out", f"{layer}{theirs}.output.dense", "linear"),
                       Row(b + norm, f"{layer}{theirs}.output.LayerNorm", "layernorm")]

    rows = [
        Row("embed", e + "word_embeddings.weight", "tensor"),
        Row("pos_embed", e + "position_embeddings.weight", "tensor"),
        Row("embed_norm", e + "LayerNorm", "layernorm"),
        *attention("attn", "attention", "attn_norm"),
        Row(b + "mlp.up", layer + "intermediate.dense", "linear"),
        Row(b + "mlp.down", layer + "output.dense", "linear"),
        Row(b + "mlp_norm", layer + "output.LayerNorm", "layernorm"),
    ]
    if type_embed:
        rows.append(Row("type_embed", e + "token_type_embeddings.weight", "tensor"))
    if decoder:
        dense, norm, bias = MLM_HEADS[model_type]
        rows += optional([*attention("cross_attn", "crossattention", "cross_norm"),
                          Row("head_dense", dense, "linear"), Row("head_norm", norm, "layernorm"),
                          Row("head_bias", bias, "tensor")])
    return Table(rows, body=model_type + ".")
