"""The workdir of a run, and the one module that knows its layout:

    config.json     the resolved run config (`model.kind` says which model it describes)
    tokenizer/      the tokenizer; an encoder-decoder's are tokenizer/source/ and tokenizer/target/
    checkpoints/    Orbax checkpoints (checkpoint.py)
    metrics.jsonl, tensorboard/, eval.json, eval.md

Loading a model for evaluation, sampling, serving and export (`load`) takes a workdir, an HF model directory or a
.gguf file; a LoRA run's workdir holds adapters only and loads as its `init_from` base with the adapters merged in.
`write_model` writes a workdir that holds a model and no training state (imports, LoRA merges).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import cpu_kernel, ops
from gpt_jax import lora as lora_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError

CONFIG = "config.json"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def tokenizer_dir(workdir: str, side: str = "") -> str:
    """Where the tokenizer lives: tokenizer/, or for an encoder-decoder side ("source" | "target") tokenizer/SIDE/."""
    return os.path.join(workdir, TOKENIZER, side) if side else os.path.join(workdir, TOKENIZER)


def is_workdir(source: str) -> bool:
    return os.path.isfile(path(source, CONFIG)) and os.path.isdir(tokenizer_dir(source))


def has_checkpoint(workdir: str) -> bool:
    return checkpoint_lib.has_checkpoint(path(workdir, CHECKPOINTS))


def read_config(workdir: str):
    """The run config in workdir/config.json; UserError when there is none."""
    if not os.path.isfile(path(workdir, CONFIG)):
        raise UserError(f"{workdir} has no {CONFIG}: not a gpt_jax workdir")
    return config_lib.from_json_file(path(workdir, CONFIG))


def write_config(workdir: str, config) -> None:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(path(workdir, CONFIG), "w") as f:
            f.write(config_lib.to_json(config))


def load_tokenizers(workdir: str, config) -> tuple:
    """(tokenizer, source tokenizer or None): an encoder-decoder's are its target's and its source's."""
    if config.model.kind == "encoder_decoder":
        return (tokenizer_lib.load_tokenizer(tokenizer_dir(workdir, "target")),
                tokenizer_lib.load_tokenizer(tokenizer_dir(workdir, "source")))
    return tokenizer_lib.load_tokenizer(tokenizer_dir(workdir)), None


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module  # model.Transformer or model.EncoderDecoder
    model_cfg: model_lib.ModelConfig | model_lib.EncDecConfig
    tokenizer: object  # what the model reads and writes (an encoder-decoder: its target side)
    config: object  # the run config the model was trained with
    step: int | None  # the checkpoint's step, None for a freshly converted model
    name: str
    source_tokenizer: object = None  # an encoder-decoder's source side


def load(source: str, weights: tuple[str, str] | None = None) -> LoadedModel:
    """A model from `source`: a gpt_jax workdir, an HF model directory (config.json + *.safetensors + tokenizer
    files) or a .gguf file. Imported models have step None and the run config `convert.run_config` gives.
    `weights` = (param_dtype, quantize) stores the weights in that format, for sampling, evaluation and serving
    (see `with_weights`)."""
    loaded = _load(source)
    return loaded if weights is None else with_weights(loaded, *weights)


def with_weights(loaded: LoadedModel, param_dtype: str, quantize: str = "none") -> LoadedModel:
    """The model with its weights stored in `param_dtype` (float32 | bfloat16; products accumulate in float32),
    and with quantize=int8 every matmul weight and the embedding table int8 with a float32 scale per output
    channel (norms, biases and learned positions keep param_dtype). bfloat16 and int8 matmul weights are stored
    output channel by output channel (`ops.PackedKernel`), the layout in which decoding reads them fastest; so are
    float32 ones where the CPU kernel (`gpt_jax.cpu_kernel`) runs the decode step's products (SmolLM2, the engine:
    a lone stream 1.2-1.4x and 8 streams 1.3-1.4x as fast as with float32 kernels [k, n]). Elsewhere float32 weights
    keep their layout: packed, a lone stream decoded 1.36x faster but 8 streams 0.85x as fast."""
    cfg = loaded.model_cfg
    if loaded.config.model.kind == "encoder_decoder":
        if (param_dtype, quantize) != (loaded.config.model.param_dtype, "none"):
            raise UserError("model.param_dtype and model.quantize choose the weights of a decoder-only model; an "
                            "encoder-decoder samples and serves with those it was trained with")
        return loaded
    packed = param_dtype == "bfloat16" or quantize == "int8" or (
        jax.default_backend() == "cpu" and cpu_kernel.available())
    if not packed and cfg.param_dtype == "float32":
        return loaded
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[param_dtype]
    new_cfg = dataclasses.replace(cfg, param_dtype=param_dtype,
                                  dtype="bfloat16" if param_dtype == "bfloat16" else cfg.dtype)
    pack = jax.jit(functools.partial(ops.pack, dtype=dtype, int8=quantize == "int8"), static_argnames="transposed")

    def convert(path, x):
        name = path[-1].key
        if packed and x.ndim == 2 and name in ("kernel", "embed", "lm_head"):
            return pack(x, transposed=name == "embed")
        return x.astype(dtype)

    params = jax.tree_util.tree_map_with_path(convert, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_lib.create(new_cfg)), nnx.Param)
    return dataclasses.replace(loaded, model=nnx.merge(graphdef, params), model_cfg=new_cfg)


def _load(source: str) -> LoadedModel:
    if is_workdir(source):
        return load_workdir(source)
    from gpt_jax import convert

    if convert.is_gguf(source) or convert.is_hf_dir(source) or \
            (os.path.isfile(source) and source.lower().endswith(convert.PICKLE_SUFFIXES)):
        converted = convert.load_source(source)
        model, model_cfg, config = convert.build_model(converted)
        return LoadedModel(model, model_cfg, converted.tokenizer, config, None, _name(source))
    if not os.path.exists(source):
        raise UserError(f"{source}: no such file or directory")
    raise UserError(f"cannot load a model from {source!r}: expected a gpt_jax workdir, an HF model directory or a "
                    ".gguf file")


def load_workdir(workdir: str, step: int | None = None) -> LoadedModel:
    """The model in a gpt_jax workdir at its latest checkpoint (or `step`). A LoRA run's workdir (lora.rank > 0)
    loads as its `init_from` base with the adapters merged in, and a config that no longer needs the base."""
    config = read_config(workdir)
    tokenizer, source_tokenizer = load_tokenizers(workdir, config)
    if not has_checkpoint(workdir):
        raise UserError(f"{workdir} has no checkpoint to load ({CHECKPOINTS}/ is empty or missing)")
    model_cfg = model_lib.model_config(config)
    abstract = nnx.eval_shape(lambda: model_lib.create(model_cfg))
    if not config.lora.rank:
        model, step = checkpoint_lib.restore_model(path(workdir, CHECKPOINTS), abstract, step)
        return LoadedModel(model, model_cfg, tokenizer, config, step, _name(workdir), source_tokenizer)
    if not os.path.exists(config.init_from):
        raise UserError(f"{workdir} holds LoRA adapters of the base model init_from={config.init_from}, which is "
                        "not there: the base is needed to load them")
    base_params = nnx.to_pure_dict(nnx.state(load(config.init_from).model, nnx.Param))
    graphdef, expected = nnx.split(abstract, nnx.Param)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    if shapes(base_params) != shapes(nnx.to_pure_dict(expected)):
        raise UserError(f"init_from={config.init_from} is not the model {workdir} was trained from (its "
                        "parameter shapes differ)")
    spec = lora_lib.LoraSpec.from_config(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: lora_lib.init_adapters(base_params, spec, 0)))
    ckpt = checkpoint_lib.Checkpointer(path(workdir, CHECKPOINTS), read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        adapters, _, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    merged = jax.jit(lambda b, a: lora_lib.merge_params(b, a, spec.scale))(base_params, adapters)
    config.lora.rank, config.init_from = 0, ""  # the merged parameters stand alone
    return LoadedModel(nnx.merge(graphdef, merged), model_cfg, tokenizer, config, step, _name(workdir))


def write_model(output_dir: str, loaded: LoadedModel, meta: dict) -> str:
    """Writes a workdir holding a loaded model without training state (an import, a LoRA run merged): config.json,
    tokenizer/ and one checkpoint at the model's step (`meta` goes into its record). Refuses an output directory
    that is not new or empty."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserError(f"{output_dir}: output directory exists and is not empty")
    write_config(output_dir, loaded.config)
    if loaded.source_tokenizer is not None:
        loaded.source_tokenizer.save(tokenizer_dir(output_dir, "source"))
        loaded.tokenizer.save(tokenizer_dir(output_dir, "target"))
    else:
        loaded.tokenizer.save(tokenizer_dir(output_dir))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    step = loaded.step or 0
    ckpt = checkpoint_lib.Checkpointer(path(output_dir, CHECKPOINTS), keep=1)
    ckpt.save(step, params, checkpoint_lib.PLACEHOLDER_OPT_STATE, {"step": step, **meta, "opt_state": "placeholder"})
    ckpt.close()
    return output_dir


def _name(source: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(source)))
