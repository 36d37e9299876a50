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
    """A short run on a custom text file prints no library noise; `--mode=sample` prints exactly the continuation on
    stdout and `--mode=eval` writes eval.json."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    workdir = tmp_path / "w"
    common = [f"--workdir={workdir}"]
    r = run_main("--config=configs/tiny.py", *common, f"--config.data.text_files={corpus}",
                 "--config.train_steps=60", "--config.eval_every=30", "--config.checkpoint_every=30",
                 "--config.sample.max_new_tokens=20", "--config.sample.prompt=the")
    assert r.returncode == 0, r.stderr
    assert "--- sample\nthe" in r.stdout
    # what a run prints is its own: no lines from the libraries it loads (TensorFlow's oneDNN notice, absl's)
    assert not [line for line in r.stderr.splitlines() if "oneDNN" in line or "absl::" in line], r.stderr
    # the samples and the evaluation only read the workdir: they run as three processes at once
    sample = ["--mode=sample", *common, "--max_new_tokens=9", "--temperature=0"]
    (tmp_path / "prompts.txt").write_text("the quick\nthe lazy\n")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        r, r2, r_eval = pool.map(lambda args: run_main(*args), [
            [*sample, "--prompt=the quick"], [*sample, f"--prompt_file={tmp_path / 'prompts.txt'}", "--num_samples=2"],
            ["--mode=eval", *common]])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 9 and not r.stdout.startswith("the quick")
    # several prompts or samples: each continuation under its header, the prompts not repeated; greedy repeats itself
    blocks = r2.stdout.split("--- prompt ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["0 sample 0", "0 sample 1", "1 sample 0", "1 sample 1"]
    assert blocks[0] == blocks[1].replace("sample 1", "sample 0") == f"0 sample 0\n{r.stdout}\n"
    r = r_eval
    assert r.returncode == 0, r.stderr
    import json

    with open(workdir / "eval.json") as f:
        result = json.load(f)
    assert result["step"] == 60 and result["val_loss"] < 3.0


def _parallel_corpus(directory) -> list[str]:
    """A generated translation task (the target is the source's words reversed), as aligned train/val files; the
    config flags that point at them."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["red", "blue", "dog", "cat", "runs", "sits", "big", "small"]
    sources = [" ".join(rng.choice(words, rng.integers(2, 5))) for _ in range(200)]
    targets = [" ".join(reversed(s.split())) for s in sources]
    for split, rows in (("train", slice(0, 180)), ("val", slice(180, 200))):
        (directory / f"{split}.en").write_text("\n".join(sources[rows]) + "\n")
        (directory / f"{split}.de").write_text("\n".join(targets[rows]) + "\n")
    return [f"--config.data.{split}_{side}={directory / f'{split}.{lang}'}"
            for split in ("train", "val") for side, lang in (("source", "en"), ("target", "de"))]


def _post_json(url: str, body: dict) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_encoder_decoder_trains_resumes_evaluates_samples_and_serves(tmp_path):
    """configs/multi30k_encdec.py, shrunk, on a generated parallel corpus through `python -m gpt_jax.main`: 20 steps,
    and a run killed after its step-10 checkpoint that resumes with the same losses bit for bit; then --mode=eval
    (greedy and beam search BLEU and chrF in eval.json), --mode=sample (the translation) and --mode=serve (a
    completion with text)."""
    import json
    import signal
    import socket
    import time
    import urllib.request

    shrink = ["--config.batch_size=16", "--config.seq_len=16", "--config.data.length_buckets=16",
              "--config.data.vocab_size=300", "--config.learning_rate=1e-2", "--config.warmup_steps=2",
              "--config.train_steps=20", "--config.log_every=1", "--config.eval_every=10",
              "--config.checkpoint_every=10", "--config.eval.max_new_tokens=16", "--config.sample.max_new_tokens=16",
              *[f"--config.model.{side}.{key}={value}" for side in ("encoder", "decoder")
                for key, value in (("n_layer", 1), ("d_model", 64), ("d_ff", 128))]]
    common = ["--config=configs/multi30k_encdec.py", *_parallel_corpus(tmp_path), *shrink]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = pool.map(lambda args: run_main(*args[0], env=args[1]),
                        [((*common, f"--workdir={full}"), None),
                         ((*common, f"--workdir={killed}"), {"GPT_JAX_SIGKILL_AFTER_STEP": "10"})])
        r_full, r_killed = list(runs)
    assert r_full.returncode == 0, r_full.stderr
    assert "--- sample\nA man is riding a bike.\n" in r_full.stdout
    assert r_killed.returncode == -signal.SIGKILL, r_killed.stderr
    r = run_main(*common, f"--workdir={killed}")
    assert r.returncode == 0 and "at step 10" in r.stderr, r.stderr

    def losses(workdir):
        with open(workdir / "metrics.jsonl") as f:
            return {m["step"]: m["train_loss"] for m in map(json.loads, f) if "train_loss" in m}

    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 21)) and all(a[s] == b[s] for s in range(11, 21)), (a, b)
    assert a[20] < a[1] - 1.0

    sample = ["--mode=sample", f"--workdir={full}", "--prompt=red dog sits", "--temperature=0"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        r_eval, r_sample = pool.map(lambda args: run_main(*args), [
            ["--mode=eval", f"--workdir={full}", "--config.eval.beam_size=3"], sample])
    assert r_eval.returncode == 0, r_eval.stderr
    result = json.loads((full / "eval.json").read_text())
    assert {"val_loss", "bleu", "chrf"} <= set(result) and result["sentences"] == 20 and result["chrf"] > 0
    assert result["beam_size"] == 3 and result["beam_chrf"] > 0  # beam search scored beside greedy
    assert len((full / "val_hypotheses_beam.txt").read_text().splitlines()) == 20
    assert r_sample.returncode == 0 and r_sample.stdout.strip(), r_sample.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gpt_jax.main", "--mode=serve", f"--workdir={full}",
                               f"--port={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-3000:]
                time.sleep(0.5)
        reply = _post_json(f"http://127.0.0.1:{port}/v1/completions",
                           {"model": "full", "prompt": "red dog sits", "temperature": 0})
        assert reply["choices"][0]["text"] == r_sample.stdout  # the same greedy translation
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert server.returncode == 0
