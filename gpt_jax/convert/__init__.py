"""Model import and export: HF GPT-2 / Llama directories and Llama GGUF files into gpt_jax, gpt_jax workdirs out to
HF directories that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    load_source(path)               → Converted (config.model keys, parameters, tokenizer)
    build_model(converted)          → (Transformer, ModelConfig, run config)
    write_workdir(converted, dir)   a gpt_jax workdir: config.json, tokenizer/, checkpoints/ at step 0
    export_hf(cfg, params, tok, dir)
"""

from __future__ import annotations

import os

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

__all__ = ["PICKLE_SUFFIXES", "ConversionError", "Converted", "build_model", "export_hf", "is_gguf", "is_hf_dir",
           "load_source", "model_family", "refuse_pickle", "run_config", "write_workdir"]


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
