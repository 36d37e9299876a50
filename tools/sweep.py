"""Hyper-parameter sweeps: a grid or random search over config overrides, one training run per trial.

    python tools/sweep.py --config=configs/tiny.py --sweep_dir=DIR --grid=learning_rate=1e-3,3e-3,1e-2 \\
        [--grid=batch_size=8,16] [--config.KEY=VALUE ...]
    python tools/sweep.py --config=configs/tiny.py --sweep_dir=DIR --random=8 \\
        --range=learning_rate=1e-4:1e-2:log [--range=warmup_steps=10:100] [--grid=batch_size=8,16] [--seed=0]

Grid search runs every combination of the --grid values. Random search draws --random trials: each --range key
uniformly from LO:HI (log-uniformly with `:log`; integers when both ends are integers), each --grid key from its
list. Trials run one after another as `python -m gpt_jax.main --config=... --workdir=DIR/trial_NNN` with the
shared --config.KEY=VALUE overrides, then the trial's own (and `--config.sample.max_new_tokens=0` unless given).
Each trial logs to DIR/trial_NNN/train.log; a failed trial is recorded, not fatal. Re-running the same command
resumes: finished trials return at once, interrupted ones continue from their checkpoints.

DIR/results.csv and DIR/results.md rank the trials by final validation loss (the last `val_loss` in each
workdir's metrics.jsonl); failed trials come last. DIR/loss.png plots every trial's training and validation loss
(when matplotlib is installed).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "config file of every trial, e.g. configs/tiny.py")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "directory for the trials' workdirs and the results")
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: values of a config key; with --random, a list to "
                                  "draw from")
_RANDOM = flags.DEFINE_integer("random", 0, "random search with this many trials (0: grid search)")
_RANGE = flags.DEFINE_multi_string("range", [], "KEY=LO:HI[:log]: a range to draw a key from in random search")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random search")
_TIMEOUT = flags.DEFINE_float("timeout", None, "seconds per trial before it is stopped")


class SweepError(UserError):
    """Bad sweep arguments; the message names the flag."""


def parse_list(spec: str, flag: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` → (KEY, [V1, V2, ...])."""
    key, sep, values = spec.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise SweepError(f"{flag}={spec!r}: expected KEY=VALUE1,VALUE2,...")
    return key.strip(), items


def parse_range(spec: str) -> tuple[str, float, float, bool, bool]:
    """`KEY=LO:HI[:log]` → (KEY, lo, hi, log scale, integers)."""
    key, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise SweepError(f"--range={spec!r}: expected KEY=LO:HI or KEY=LO:HI:log")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise SweepError(f"--range={spec!r}: LO and HI must be numbers") from None
    log = len(parts) == 3
    if hi < lo or (log and lo <= 0):
        raise SweepError(f"--range={spec!r}: needs LO <= HI" + (" and LO > 0 for :log" if log else ""))
    integers = all(p.strip().lstrip("+-").isdigit() for p in parts[:2])
    return key.strip(), lo, hi, log, integers


def grid_trials(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (the first key varies slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grid))]


def random_trials(n: int, ranges: list[tuple], choices: list[tuple[str, list[str]]],
                  seed: int = 0) -> list[dict[str, str]]:
    """`n` trials drawn with a seeded generator: ranges uniformly (or log-uniformly), choices from their lists."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        trial: dict[str, str] = {}
        for key, lo, hi, log, integers in ranges:
            if integers:
                value = round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if log else rng.randint(int(lo),
                                                                                                        int(hi))
                trial[key] = str(int(value))
            else:
                value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi)
                trial[key] = f"{value:.3g}"
        for key, values in choices:
            trial[key] = rng.choice(values)
        trials.append(trial)
    return trials


def trial_command(config: str, workdir: str, shared: list[str], overrides: dict[str, str]) -> list[str]:
    """The training command of one trial; the trial's overrides come last, so they win."""
    cmd = [sys.executable, "-m", "gpt_jax.main", f"--config={config}", f"--workdir={workdir}"]
    if not any(a.startswith("--config.sample.max_new_tokens=") for a in shared) and \
            "sample.max_new_tokens" not in overrides:
        cmd.append("--config.sample.max_new_tokens=0")
    return cmd + list(shared) + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_subprocess(cmd: list[str], log_path: str, timeout: float | None) -> int:
    """Runs `cmd` (in this directory, so relative paths in overrides work) with stdout and stderr into
    `log_path`; returns its exit code."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"sweep: timed out after {timeout}s\n")
            return 124


def read_result(workdir: str) -> dict:
    """The last validation loss (and its step), the best one and the last training loss in metrics.jsonl."""
    result: dict = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return result
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in record:
                result["final_val_loss"] = record["val_loss"]
                result["val_step"] = record.get("step")
                result["best_val_loss"] = min(record["val_loss"], result.get("best_val_loss", math.inf))
            if "train_loss" in record:
                result["final_train_loss"] = record["train_loss"]
    return result


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or [""])[-1][:200]


def run_sweep(config: str, sweep_dir: str, trials: list[dict[str, str]], shared: list[str],
              timeout: float | None = None,
              runner: Callable[[list[str], str, float | None], int] = run_subprocess,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Runs the trials in order and writes results.csv / results.md; returns the ranked rows."""
    os.makedirs(sweep_dir, exist_ok=True)
    rows = []
    for index, overrides in enumerate(trials):
        name = f"trial_{index:03d}"
        workdir = os.path.join(sweep_dir, name)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "trial.json"), "w") as f:
            json.dump({"overrides": overrides, "shared": shared, "config": config}, f, indent=1)
        described = " ".join(f"{k}={v}" for k, v in overrides.items())
        log(f"[{index + 1}/{len(trials)}] {name}: {described}")
        log_path = os.path.join(workdir, "train.log")
        start = time.perf_counter()
        try:
            rc = runner(trial_command(config, workdir, shared, overrides), log_path, timeout)
        except OSError as e:
            rc, error = -1, str(e)
        else:
            error = "" if rc == 0 else _last_error(log_path)
        seconds = time.perf_counter() - start
        row = {"trial": name, **overrides, **read_result(workdir),
               "status": "ok" if rc == 0 else f"failed (exit {rc})", "seconds": round(seconds), "error": error}
        rows.append(row)
        log(f"    {row['status']}, final val_loss {row.get('final_val_loss', 'n/a')}, {seconds:.0f}s"
            + (f": {error}" if error else ""))
        write_results(sweep_dir, rows, list(dict.fromkeys(k for t in trials for k in t)))
    return rank(rows)


def rank(rows: list[dict]) -> list[dict]:
    """Successful trials with a validation loss first, lowest final loss first; then the rest in trial order."""
    def key(row):
        ok = row["status"] == "ok" and isinstance(row.get("final_val_loss"), (int, float))
        return (0, row["final_val_loss"]) if ok else (1, 0.0)

    ranked = sorted(rows, key=key)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


def write_results(sweep_dir: str, rows: list[dict], override_keys: list[str]) -> None:
    """results.csv and results.md, ranked."""
    ranked = rank([dict(r) for r in rows])
    columns = ["rank", "trial", *override_keys, "final_val_loss", "best_val_loss", "val_step", "final_train_loss",
               "status", "seconds", "error"]
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ranked)

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    shown = [c for c in columns if c != "error" or any(r.get("error") for r in ranked)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in shown) + " |" for r in ranked]
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_curves(sweep_dir: str, rows: list[dict]) -> str | None:
    """SWEEP_DIR/loss.png: each trial's training loss (lines) and validation loss (dots) against step, labelled
    with its overrides; None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in sorted(rows, key=lambda r: r["trial"]):
        path = os.path.join(sweep_dir, row["trial"], "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip().startswith("{")]
        label = row["trial"] + ": " + " ".join(f"{k}={v}" for k, v in row.items()
                                               if k not in _RESULT_COLUMNS and k != "trial")
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        line = ax.plot([s for s, _ in train], [v for _, v in train], label=label)[0] if train else None
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], "o", color=line.get_color() if line else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: training, dots: validation)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = os.path.join(sweep_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_RESULT_COLUMNS = {"rank", "final_val_loss", "best_val_loss", "val_step", "final_train_loss", "status", "seconds",
                   "error"}


def parse_flags(argv: list[str]) -> list[str]:
    """cli.parse_flags for this tool's flags; the --config.KEY=VALUE arguments, which every trial passes on to
    gpt_jax.main, come back after the positional ones."""
    shared = [a for a in argv[1:] if a.startswith("--config.")]
    return cli.parse_flags([a for a in argv if not a.startswith("--config.")]) + shared


def shared_overrides(args: list[str]) -> list[str]:
    """The positional arguments, which must all be --config.KEY=VALUE overrides."""
    unknown = [a for a in args if not a.startswith("--config.") or "=" not in a]
    if unknown:
        raise SweepError(f"unexpected argument {unknown[0]!r} (overrides shared by every trial are "
                         "--config.KEY=VALUE)")
    return list(args)


def build_trials(grid: list[str], ranges: list[str], num_random: int = 0,
                 seed: int = 0) -> list[dict[str, str]]:
    """The trials of --grid specs (KEY=V1,V2,...) and --range specs (KEY=LO:HI[:log]): every grid combination, or
    `num_random` random draws; SweepError for bad or conflicting specs."""
    grid_lists = [parse_list(spec, "--grid") for spec in grid]
    parsed_ranges = [parse_range(spec) for spec in ranges]
    keys = [k for k, _ in grid_lists] + [r[0] for r in parsed_ranges]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate:
        raise SweepError(f"config key {duplicate!r} is swept twice")
    if num_random < 0:
        raise SweepError(f"--random={num_random} must not be negative")
    if num_random:
        if not keys:
            raise SweepError("--random needs at least one --range or --grid")
        return random_trials(num_random, parsed_ranges, grid_lists, seed)
    if parsed_ranges:
        raise SweepError("--range needs --random=N (grid search takes --grid lists)")
    if not grid_lists:
        raise SweepError("give at least one --grid=KEY=V1,V2,... (or --random=N with --range)")
    return grid_trials(grid_lists)


def main(argv: list[str]) -> int:
    """Runs the sweep the flags describe; prints the ranked results table."""
    shared = shared_overrides(argv[1:])
    for flag in (_CONFIG, _SWEEP_DIR):
        if not flag.value:
            raise SweepError(f"--{flag.name} is required")
    trials = build_trials(_GRID.value, _RANGE.value, _RANDOM.value, _SEED.value)
    if not os.path.isfile(_CONFIG.value):
        raise SweepError(f"--config {_CONFIG.value}: no such file")
    config = os.path.abspath(_CONFIG.value)
    rows = run_sweep(config, os.path.abspath(_SWEEP_DIR.value), trials, shared, _TIMEOUT.value)
    plot_curves(_SWEEP_DIR.value, rows)
    best = rows[0] if rows and rows[0]["status"] == "ok" else None
    with open(os.path.join(_SWEEP_DIR.value, "results.md")) as f:
        print(f.read(), end="")
    if best is None:
        print("error: no trial finished", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
