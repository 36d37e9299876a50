"""tools/sweep.py: trials from grids and ranges, commands, ranking by final validation loss, failures recorded."""

import csv
import json
import os

import pytest
from test_tools import ROOT, load_tool, run_in_process

sweep = load_tool("sweep")
SWEEP = os.path.join(ROOT, "tools", "sweep.py")


def test_grid_and_random_trials():
    assert sweep.build_trials(["learning_rate=1e-3,3e-3", "batch_size=8,16"], []) == [
        {"learning_rate": "1e-3", "batch_size": "8"}, {"learning_rate": "1e-3", "batch_size": "16"},
        {"learning_rate": "3e-3", "batch_size": "8"}, {"learning_rate": "3e-3", "batch_size": "16"}]

    draw = lambda: sweep.build_trials(["model.n_layer=2,4"], ["learning_rate=1e-4:1e-2:log", "warmup_steps=10:20"],
                                      num_random=20, seed=1)
    trials = draw()
    assert len(trials) == 20 and trials == draw()  # seeded: the same trials every time
    assert all(1e-4 <= float(t["learning_rate"]) <= 1e-2 for t in trials)
    assert all(10 <= int(t["warmup_steps"]) <= 20 for t in trials)
    assert {t["model.n_layer"] for t in trials} == {"2", "4"}

    for grid, ranges, num_random, message in [
            (["learning_rate"], [], 0, "KEY=VALUE1"), ([], ["lr=0:1"], 0, "needs --random"),
            ([], ["lr=1:0"], 2, "LO <= HI"), ([], ["lr=0:1:log"], 2, "LO > 0"), ([], [], 0, "at least one --grid"),
            (["a=1,2", "a=3"], [], 0, "swept twice")]:
        with pytest.raises(sweep.SweepError, match=message):
            sweep.build_trials(grid, ranges, num_random)

    assert sweep.shared_overrides(["--config.train_steps=200"]) == ["--config.train_steps=200"]
    with pytest.raises(sweep.SweepError, match="unexpected argument 'extra'"):
        sweep.shared_overrides(["--config.train_steps=200", "extra"])
    cmd = sweep.trial_command("c.py", "w", ["--config.train_steps=5"], {"learning_rate": "0.01"})
    assert cmd[1:] == ["-m", "gpt_jax.main", "--config=c.py", "--workdir=w", "--config.sample.max_new_tokens=0",
                       "--config.train_steps=5", "--config.learning_rate=0.01"]


def test_sweep_ranks_by_final_val_loss_and_records_failures(tmp_path):
    final = {"0.001": 2.5, "0.003": 1.9, "0.01": None}  # the last trial fails

    def fake_runner(cmd, log_path, timeout):
        lr = next(a.split("=")[1] for a in cmd if a.startswith("--config.learning_rate="))
        workdir = next(a.split("=")[1] for a in cmd if a.startswith("--workdir="))
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 10, "train_loss": 3.0}) + "\n")
            f.write(json.dumps({"step": 10, "val_loss": 3.1}) + "\n")
            if final[lr] is not None:
                f.write(json.dumps({"step": 20, "val_loss": final[lr], "val_ppl": 1.0}) + "\n")
        if final[lr] is None:
            with open(log_path, "a") as f:
                f.write("error: training diverged\n")
            return 1
        return 0

    trials = [{"learning_rate": lr} for lr in final]
    rows = sweep.run_sweep("configs/tiny.py", str(tmp_path), trials, [], runner=fake_runner, log=lambda s: None)
    assert [r["trial"] for r in rows] == ["trial_001", "trial_000", "trial_002"]
    assert rows[0]["final_val_loss"] == 1.9 and rows[0]["best_val_loss"] == 1.9 and rows[0]["val_step"] == 20
    assert rows[2]["status"] == "failed (exit 1)" and rows[2]["error"] == "error: training diverged"
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["learning_rate"] for r in table] == ["0.003", "0.001", "0.01"]
    assert [r["rank"] for r in table] == ["1", "2", "3"]
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| rank | trial | learning_rate | final_val_loss")
    assert "| 1 | trial_001 | 0.003 | 1.9000 |" in markdown[2]
    assert json.loads((tmp_path / "trial_002" / "trial.json").read_text())["overrides"] == {"learning_rate": "0.01"}
    plot = sweep.plot_curves(str(tmp_path), rows)
    assert plot == str(tmp_path / "loss.png")
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--sweep_dir=d", "--grid=learning_rate=1,2"], "error: --config is required"),
    (["--config=configs/tiny.py", "--sweep_dir=d", "--grid=learning_rate=1,2", "--config.train_steps"],
     "error: unexpected argument '--config.train_steps'"),
    (["--config=configs/tiny.py", "--sweep_dir=d", "--grid=learning_rate=1,2", "--random=x"], "error: flag --random"),
    (["--config=/no/such.py", "--sweep_dir=d", "--grid=learning_rate=1,2", "--config.train_steps=3"],
     "error: --config /no/such.py: no such file"),
])
def test_bad_command_lines(args, message):
    proc = run_in_process(SWEEP, *args)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
