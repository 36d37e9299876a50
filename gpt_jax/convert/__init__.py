"""Model import and export: HF GPT-2 / Llama directories and Llama GGUF files into gpt_jax, gpt_jax workdirs out to
HF directories that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    load_source(path)               → Converted (config.model keys, parameters, tokenizer)
    build_model(converted)          → (Transformer, ModelConfig, run config)
    write_workdir(converted, dir)   a gpt_jax workdir: config.json, tokenizer/, checkpoints/ at step 0
    export_hf(cfg, params, tok, dir)
    convert_model(input, output)    what tools/convert.py does
"""

from __future__ import annotations

import os

from flax import nnx

from gpt_jax.convert.common import (
    PICKLE_SUFFIXES,
    ConversionError,
    Converted,
    build_model,
    refuse_pickle,
    run_config,
    write_workdir,
)
from gpt_jax.convert.hf import export_hf, is_hf_dir, model_family

__all__ = ["PICKLE_SUFFIXES", "ConversionError", "Converted", "build_model", "convert_model", "export_hf", "is_gguf",
           "is_hf_dir", "load_source", "model_family", "refuse_pickle", "run_config", "write_workdir"]


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def load_source(path: str) -> Converted:
    """Imports an HF model directory or a .gguf file; ConversionError (a UserError) naming the file otherwise."""
    if os.path.isfile(path) and path.lower().endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
    if is_gguf(path):
        from gpt_jax.convert.gguf_import import load_gguf

        return load_gguf(path)
    if is_hf_dir(path):
        from gpt_jax.convert.hf import load_hf

        return load_hf(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    raise ConversionError(f"{path}: not an HF model directory (config.json + *.safetensors) or a .gguf file")


def convert_model(input_path: str, output_dir: str, to: str | None = None) -> str:
    """Converts `input_path` into `output_dir`; returns a short description of what was written.

    to="gpt_jax" imports an HF directory or a .gguf file as a gpt_jax workdir, or writes a LoRA run's workdir merged
    into its base as a workdir that stands alone; to="hf" exports a gpt_jax workdir (or an import) to an HF
    directory. The default: hf for a gpt_jax workdir without LoRA adapters, gpt_jax otherwise."""
    from gpt_jax import workdir
    from gpt_jax.model import ModelConfig

    is_workdir = workdir.is_workdir(input_path)
    lora = is_workdir and workdir.read_config(input_path).lora.rank > 0
    to = to or ("hf" if is_workdir and not lora else "gpt_jax")
    if to == "gpt_jax" and lora:
        workdir.write_model(output_dir, workdir.load(input_path), {"merged_from": os.path.abspath(input_path)})
        return f"gpt_jax workdir {output_dir} (the LoRA run {input_path} merged into its base)"
    if to == "gpt_jax":
        if is_workdir:
            raise ConversionError(f"{input_path} is already a gpt_jax workdir (use --to=hf to export it)")
        write_workdir(load_source(input_path), output_dir)
        return f"gpt_jax workdir {output_dir} (from {input_path})"
    loaded = workdir.load(input_path)
    if not isinstance(loaded.model_cfg, ModelConfig):
        raise ConversionError(f"{input_path}: exporting an encoder-decoder to HF is not supported")
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    export_hf(loaded.model_cfg, params, loaded.tokenizer, output_dir)
    return f"HF model directory {output_dir} ({model_family(loaded.model_cfg)}, from {input_path})"
