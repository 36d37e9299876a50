"""Evaluation of a trained model: validation loss, perplexity and bits per byte over the whole validation split
(`--mode=eval`, written to WORKDIR/eval.json)."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from gpt_jax import data as data_lib
from gpt_jax import pretrained, train


def evaluate_workdir(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint in `workdir` (or `config.init_from` when it has none) on every
    non-overlapping window of the config's validation data; writes and returns eval.json's contents."""
    source = workdir if os.path.isfile(os.path.join(workdir, "config.json")) else config.init_from
    loaded = pretrained.load(source or workdir)
    data = data_lib.load_data(config, os.path.join(workdir, "tokenizer"))
    graphdef, params = nnx.split(loaded.model, nnx.Param)
    params = nnx.to_pure_dict(params)
    eval_step = jax.jit(train.make_eval_step(graphdef, data.tokenizer.token_byte_lengths()))
    seq_len = min(config.seq_len, loaded.model_cfg.max_seq_len)
    results = train.evaluate_windows(eval_step, params, data.val_windows(seq_len), config.batch_size)
    results.update({"step": loaded.step, "seq_len": seq_len, "model": loaded.name})
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
