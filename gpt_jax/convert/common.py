"""What every import produces (`Converted`), and turning it into a model, a run config or a gpt_jax workdir."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.model import ModelConfig, Transformer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ConversionError(UserError):
    """A source file that cannot be converted; the message names the file."""


def refuse_pickle(path: str) -> None:
    """Raises ConversionError for a pickle-based checkpoint: unpickling can run arbitrary code."""
    raise ConversionError(
        f"{path}: pickle-based checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused because loading them can "
        "execute arbitrary code; convert the model to safetensors first")


@dataclasses.dataclass
class Converted:
    """An imported model: `config.model` keys, parameters in the gpt_jax layout (numpy, float32), tokenizer."""

    model: dict  # config.model keys: n_layer, n_head, ..., max_seq_len
    params: dict  # the pure dict of `nnx.state(model, nnx.Param)`: embed, blocks[i]..., final_norm, lm_head
    tokenizer: object  # a gpt_jax tokenizer (tokenizer.HFTokenizer)
    source: str


def run_config(converted: Converted):
    """The full run config (`config.base_config()`) with the model keys of the source filled in."""
    config = config_lib.base_config()
    for key, value in converted.model.items():
        if key not in config.model:
            raise KeyError(f"converter produced an unknown model key {key!r}")
        config.model[key] = value
    config.seq_len = min(config.seq_len, converted.model["max_seq_len"])
    config_lib.validate(config)
    return config


def build_model(converted: Converted) -> tuple[Transformer, ModelConfig, object]:
    """(model holding the converted parameters, its ModelConfig, the run config)."""
    config = run_config(converted)
    model_cfg = ModelConfig.from_config(config)
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    params, missing = overlay(nnx.to_pure_dict(state), converted.params, converted.source)
    if missing:
        raise ConversionError(f"{converted.source}: parameter {missing[0]} is missing")
    device = jax.local_devices()[0]
    params = jax.tree.map(lambda x: jax.device_put(x, device), params)
    return nnx.merge(graphdef, params), model_cfg, config


def overlay(fresh: dict, imported: dict, source: str, path: str = "") -> tuple[dict, list[str]]:
    """`fresh` with the leaves of `imported` put in (shapes must match; every imported key must exist). Returns
    (merged tree, paths left fresh)."""
    merged, left = {}, []
    for key in imported:
        if key not in fresh:
            raise ConversionError(f"{source}: parameter {path}{key} has no place in the model")
    for key, value in fresh.items():
        name = f"{path}{key}"
        if key not in imported:
            left.append(name)
            merged[key] = value
        elif isinstance(value, dict):
            if not isinstance(imported[key], dict):
                raise ConversionError(f"{source}: parameter {name} is a tensor, the model expects a group")
            merged[key], sub = overlay(value, imported[key], source, name + ".")
            left += sub
        else:
            got = np.shape(imported[key])
            if got != tuple(value.shape):
                raise ConversionError(f"{source}: parameter {name} has shape {got}, the model expects "
                                      f"{tuple(value.shape)}")
            merged[key] = np.asarray(imported[key], np.float32)
    return merged, left


def write_workdir(converted: Converted, output_dir: str) -> str:
    """Writes a gpt_jax workdir: config.json, tokenizer/ and a step-0 checkpoint. Returns the directory."""
    from gpt_jax import workdir

    model, model_cfg, config = build_model(converted)  # validates shapes before anything is written
    loaded = workdir.LoadedModel(model, model_cfg, converted.tokenizer, config, 0, os.path.basename(output_dir))
    return workdir.write_model(output_dir, loaded, {"converted_from": os.path.abspath(converted.source)})
