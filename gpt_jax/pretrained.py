"""Loading a trained model for evaluation, sampling and serving: from a gpt_jax workdir (its config.json,
tokenizer/ and the latest checkpoint's parameters; a LoRA run's adapters merged into its base), an HF model
directory or a .gguf file (converted in memory)."""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.errors import UserError
from gpt_jax.model import ModelConfig, Transformer


@dataclasses.dataclass
class LoadedModel:
    model: Transformer
    model_cfg: ModelConfig
    tokenizer: object
    config: object  # the run config the model was trained with
    step: int | None  # the checkpoint's step, None for a freshly converted model
    name: str


def load_workdir(workdir: str, step: int | None = None) -> LoadedModel:
    """The model in a gpt_jax workdir at its latest checkpoint (or `step`). A LoRA run's workdir (lora.rank > 0)
    holds adapters only: its model is the `init_from` base with the adapters merged in (`lora.load_merged`)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{workdir} has no config.json: not a gpt_jax workdir")
    config = config_lib.from_json_file(config_path)
    if config.lora.rank:
        from gpt_jax import lora

        return lora.load_merged(workdir, step)
    model_cfg = ModelConfig.from_config(config)
    tokenizer = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
    if not checkpoint_lib.has_checkpoint(workdir):
        raise UserError(f"{workdir} has no checkpoint to load (checkpoints/ is empty or missing)")
    model, step = checkpoint_lib.restore_model(
        workdir, nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), step)
    return LoadedModel(model, model_cfg, tokenizer, config, step, os.path.basename(os.path.abspath(workdir)))


def is_workdir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and \
        os.path.isdir(os.path.join(path, "tokenizer"))


def load(source: str) -> LoadedModel:
    """A model from `source`: a gpt_jax workdir, an HF model directory (config.json + *.safetensors + tokenizer
    files) or a .gguf file. Imported models have step None and the run config `convert.run_config` gives."""
    if is_workdir(source):
        return load_workdir(source)
    from gpt_jax import convert

    if convert.is_gguf(source) or convert.is_hf_dir(source) or \
            (os.path.isfile(source) and source.lower().endswith(convert.PICKLE_SUFFIXES)):
        converted = convert.load_source(source)
        model, model_cfg, config = convert.build_model(converted)
        name = os.path.basename(os.path.normpath(source))
        return LoadedModel(model, model_cfg, converted.tokenizer, config, None, name)
    if not os.path.exists(source):
        raise UserError(f"{source}: no such file or directory")
    raise UserError(f"cannot load a model from {source!r}: expected a gpt_jax workdir, an HF model directory or a "
                    ".gguf file")

