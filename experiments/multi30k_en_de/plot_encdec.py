"""Loss curves of the encoder-decoder rows (encdec_results/*.json, written by run_encdec.sh) in one PNG: each row's
training loss (faint: every logged step; solid: the mean of the last 10 logged steps, since length-sorted batches
make single steps swing) and its validation loss where the run evaluated during training (dashed, dots).

    python experiments/multi30k_en_de/plot_encdec.py [--output=experiments/multi30k_en_de/encdec_loss.png]
"""

from __future__ import annotations

import glob
import json
import os

from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
_OUTPUT = flags.DEFINE_string("output", os.path.join(HERE, "encdec_loss.png"), "the PNG to write")
ROWS = {"scratch": "from scratch (3+3, d 256)", "minilm_enc": "MiniLM-L6 encoder + fresh decoder",
        "minilm2minilm": "MiniLM-L6 encoder + MiniLM-L6 decoder"}


def main(argv: list[str]) -> int:
    """Plots every row's training loss; prints the PNG's path."""
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    cli.require("eval", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path in sorted(glob.glob(os.path.join(HERE, "encdec_results", "*.json"))):
        row = os.path.basename(path)[:-len(".json")]
        with open(path) as f:
            result = json.load(f)
        steps, losses = zip(*result["train_losses"], strict=True)
        recent = [losses[max(0, i - 9):i + 1] for i in range(len(losses))]
        window = [sum(r) / len(r) for r in recent]
        line, = ax.plot(steps, window, label=f"{ROWS.get(row, row)}: BLEU {result['bleu']:.1f} (train)")
        ax.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.7)
        if result.get("val_losses"):
            val_steps, val_losses = zip(*result["val_losses"], strict=True)
            ax.plot(val_steps, val_losses, "o--", color=line.get_color(), markersize=3, label="  validation")
    ax.set_xlabel("step (32 pairs each)")
    ax.set_ylabel("loss per target token (training: label-smoothed)")
    ax.set_title("Multi30k en→de, encoder-decoder rows on 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(_OUTPUT.value, dpi=100)
    print(_OUTPUT.value)
    return 0


if __name__ == "__main__":
    cli.run(main)
