"""What a run reports: progress lines on stderr, metrics.jsonl and TensorBoard scalars (process 0 only), and
model FLOPs utilization against the device's peak."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from gpt_jax import ops
from gpt_jax import workdir as workdir_lib


def progress(line: str) -> None:
    """A progress line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, from process 0 only."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = workdir_lib.path(workdir, workdir_lib.METRICS)
        self.tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):  # drop lines a killed run wrote after its last checkpoint
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        try:
            import tensorflow as tf

            self.tb = tf.summary.create_file_writer(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))
        except ImportError:
            self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: (float(v) if not isinstance(v, int) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            import tensorflow as tf

            with self.tb.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=int(step))
            self.tb.flush()


def device_peak_flops(config, model_cfg) -> float:
    """Peak FLOP/s of one device for MFU: the config's `peak_flops`, a table for known accelerators, or on CPU the
    rate of a matmul in the model's compute dtype (`model.dtype` as resolved in `model_cfg`) measured now."""
    if config.peak_flops:
        return float(config.peak_flops)
    kind = jax.devices()[0].device_kind.lower()
    table = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
             "h100": 989e12, "h200": 989e12, "a100": 312e12}
    for name, flops in table.items():
        if name in kind:
            return flops
    n = 1024
    a = jnp.ones((n, n), ops.DTYPES[model_cfg.decoder.dtype])
    matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    # The best of at least 5 runs and up to 50 within 0.2 s: inside a training process on a 2-core AMX Xeon, the
    # best of 5 bf16 runs ranged 0.9-1.7 TFLOP/s between identical runs (and their MFU by as much), of 30 1.7-1.8.
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 5 or (spent < 0.2 and runs < 50):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        elapsed = time.perf_counter() - t
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * n**3 / best


def flops_per_token(model_cfg, trained: int, seq_len: int, frozen: int = 0) -> float:
    """Training FLOPs per token: 6 per trained parameter (forward, input and weight gradients), 4 per frozen one
    (LoRA's base: no weight gradient), plus attention's 12 · layers · d_model · seq_len (PaLM's accounting,
    counting the full causal square; an encoder-decoder counts its decoder's)."""
    cfg = model_cfg.decoder
    return 6.0 * trained + 4.0 * frozen + 12.0 * cfg.n_layer * cfg.d_model * seq_len
