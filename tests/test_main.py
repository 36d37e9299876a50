"""The command line: bad input exits 2 with one `error:` line naming the culprit; sample mode prints only the
continuation."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gpt_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_unknown_config_key(tmp_path):
    r = run_main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.n_layers=3")
    assert_user_error(r, "n_layers")


def test_n_head_not_dividing_d_model(tmp_path):
    r = run_main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.n_head=5")
    assert_user_error(r, "n_head=5", "d_model=128")


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.txt"
    r = run_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.data.text_files={missing}")
    assert_user_error(r, str(missing))


def test_empty_data_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = run_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.data.text_files={empty}")
    assert_user_error(r, str(empty), "empty")


def test_non_utf8_data_file(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 100)
    r = run_main("--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.data.text_files={latin1}")
    assert_user_error(r, str(latin1), "UTF-8")


def test_missing_config_file(tmp_path):
    r = run_main("--config=configs/does_not_exist.py", f"--workdir={tmp_path}")
    assert_user_error(r, "does_not_exist.py")


@pytest.mark.slow
def test_train_then_sample_and_eval(tmp_path):
    """A short run on a custom text file; `--mode=sample` prints exactly the continuation on stdout and
    `--mode=eval` writes eval.json."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    workdir = tmp_path / "w"
    common = [f"--workdir={workdir}"]
    r = run_main("--config=configs/tiny.py", *common, f"--config.data.text_files={corpus}",
                 "--config.train_steps=60", "--config.eval_every=30", "--config.checkpoint_every=30",
                 "--config.sample.max_new_tokens=20", "--config.sample.prompt=the")
    assert r.returncode == 0, r.stderr
    assert "--- sample\nthe" in r.stdout
    # the two samples and the evaluation only read the workdir: they run as three processes at once
    sample = ["--mode=sample", *common, "--prompt=the quick", "--max_new_tokens=9", "--temperature=0"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        r, r2, r_eval = pool.map(lambda args: run_main(*args), [sample, sample, ["--mode=eval", *common]])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 9 and not r.stdout.startswith("the quick")
    assert r2.stdout == r.stdout  # greedy is deterministic
    r = r_eval
    assert r.returncode == 0, r.stderr
    import json

    with open(workdir / "eval.json") as f:
        result = json.load(f)
    assert result["step"] == 60 and result["val_loss"] < 3.0
