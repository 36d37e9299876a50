"""PNG plots of a run's training and validation curves from WORKDIR/metrics.jsonl.

    python tools/plot.py WORKDIR [--output_dir=DIR]

Writes loss.png (training and validation loss against step) and one PNG per other metric the run logged
(val_ppl, val_bpb, lr, tokens_per_sec, mfu, grad_norm) into DIR (default WORKDIR/plots), and prints their paths.
A line that is not JSON (say, one cut short when a run was killed) is skipped with a warning. Needs matplotlib
(`pip install -e '.[eval]'`). Bad input: one `error: ...` line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where the PNGs go (default WORKDIR/plots)")

# metric → (title, y label, log scale)
PANELS = {
    "val_ppl": ("Validation perplexity", "perplexity", True),
    "val_bpb": ("Validation bits per byte", "bits per byte", False),
    "lr": ("Learning rate", "learning rate", False),
    "tokens_per_sec": ("Throughput", "tokens / s", False),
    "mfu": ("Model FLOPs utilization", "MFU", False),
    "grad_norm": ("Gradient norm", "global norm", True),
}


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """metric name → [(step, value)] sorted by step (a repeated step keeps its last value)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {path} line {number} is not JSON; skipped", file=sys.stderr)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            print(f"warning: {path} line {number} has no integer step; skipped", file=sys.stderr)
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    if not series:
        raise UserError(f"{path} holds no metrics")
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_run(workdir: str, output_dir: str | None = None) -> list[str]:
    """Writes the run's plots; returns their paths."""
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isdir(workdir):
        raise UserError(f"WORKDIR {workdir} is not a directory")
    if not os.path.isfile(metrics_path):
        raise UserError(f"{workdir} has no metrics.jsonl")
    series = read_metrics(metrics_path)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = output_dir or os.path.join(workdir, "plots")
    os.makedirs(output_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(workdir))
    written = []

    def save(fig, filename):
        path = os.path.join(output_dir, filename)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if "train_loss" in series or "val_loss" in series:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label, style in (("train_loss", "training", "-"), ("val_loss", "validation", "o-")):
            if key in series:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, style, label=label, markersize=4)
        ax.set(title=f"Loss — {name}", xlabel="step", ylabel="cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")
    for key, (title, ylabel, log) in PANELS.items():
        if key not in series:
            continue
        steps, values = zip(*series[key], strict=True)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(steps, values, "o-" if len(steps) < 30 else "-", markersize=4)
        if log and min(values) > 0:
            ax.set_yscale("log")
        ax.set(title=f"{title} — {name}", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        save(fig, f"{key}.png")
    return written


def main(argv: list[str]) -> int:
    """Plots the run named by the one positional argument; prints the PNGs' paths."""
    if len(argv) != 2:
        raise UserError("give one WORKDIR (a run's directory, holding metrics.jsonl)" if len(argv) < 2 else
                        f"unexpected argument {argv[2]!r}")
    cli.require("eval", "matplotlib")
    print("\n".join(plot_run(argv[1], _OUTPUT_DIR.value)))
    return 0


if __name__ == "__main__":
    cli.run(main)
