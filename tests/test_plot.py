"""tools/plot.py: PNG curves from a run's metrics.jsonl, and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from test_tools import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "tools", "plot.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PLOT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


def _write_metrics(workdir, partial_last_line: bool = True) -> None:
    workdir.mkdir(exist_ok=True)
    lines = []
    for step in range(10, 301, 10):
        lines.append({"step": step, "train_loss": 4 * math.exp(-step / 80) + 1.5, "lr": 1e-3 * min(1, step / 50),
                      "tokens_per_sec": 20000.0 + step, "mfu": 0.12, "grad_norm": 2 / math.sqrt(step)})
        if step % 100 == 0:
            lines.append({"step": step, "val_loss": 4 * math.exp(-step / 80) + 1.6, "val_ppl": 9.0, "val_bpb": 2.1})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (workdir / "metrics.jsonl").write_text(text + ('{"step": 310, "train_lo' if partial_last_line else ""))


def test_plots_every_logged_curve(tmp_path):
    import matplotlib.image

    workdir = tmp_path / "run"
    _write_metrics(workdir)
    proc = _run(str(workdir))
    assert proc.returncode == 0, proc.stderr
    names = ["loss", "val_ppl", "val_bpb", "lr", "tokens_per_sec", "mfu", "grad_norm"]
    assert proc.stdout.split() == [str(workdir / "plots" / f"{n}.png") for n in names]
    assert "line 34 is not JSON" in proc.stderr  # the cut-off last line of a killed run is skipped
    image = matplotlib.image.imread(str(workdir / "plots" / "loss.png"))
    assert image.shape[1] > 600 and image[..., :3].std() > 0.05  # a drawn figure, not a blank canvas
    out = tmp_path / "elsewhere"
    proc = _run(str(workdir), f"--output_dir={out}")
    assert proc.returncode == 0 and sorted(os.listdir(out)) == sorted(f"{n}.png" for n in names)


def test_plots_a_run_with_training_lines_only(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 3.0 / s}) + "\n"
                                                   for s in range(1, 5)))
    proc = _run(str(workdir))
    assert proc.returncode == 0 and proc.stdout.split() == [str(workdir / "plots" / "loss.png")]


@pytest.mark.parametrize("setup,needle", [
    (lambda w: None, "is not a directory"),
    (lambda w: w.mkdir(), "has no metrics.jsonl"),
    (lambda w: (w.mkdir(), (w / "metrics.jsonl").write_text("junk\n{}\n")), "holds no metrics"),
    (lambda w: (w.mkdir(), (w / "metrics.jsonl").write_bytes(b"\xff\xfe")), "not UTF-8"),
])
def test_rejects_bad_input(tmp_path, setup, needle):
    workdir = tmp_path / "run"
    setup(workdir)
    proc = run_in_process(PLOT, str(workdir))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
