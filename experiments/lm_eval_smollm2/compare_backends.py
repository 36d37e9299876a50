"""SmolLM2-135M-Instruct (the GGUF file) through three lm-evaluation-harness backends on tasks made here
(make_tasks.made_tasks: 20 facts as a last-word task, a 4-way multiple choice and a rolling perplexity):

1. in process: gpt_jax.harness.GptJaxLM over `workdir.load(GGUF)`;
2. the server: `python -m gpt_jax.main --mode=serve --config.init_from=GGUF` and lm-eval's `local-completions`
   client (token-id prompts; the tokenizer transformers reads from the GGUF file);
3. lm-eval's own `hf` backend: transformers loading the same GGUF file (`gguf_file=`, float32).

Prints a markdown table of each metric per backend and the largest per-document loglikelihood difference between
backends, and writes it all to --output (JSON).

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python experiments/lm_eval_smollm2/compare_backends.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from absl import app, flags

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tasks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_GGUF = flags.DEFINE_string("gguf", os.path.expanduser("~/.cache/gpt_jax/SmolLM2-135M-Instruct.Q4_1.gguf"),
                            "the GGUF file")
_OUTPUT = flags.DEFINE_string("output", os.path.join(HERE, "compare_backends.json"), "where to write the results")
TASKS = ["made_lastword", "made_choice", "made_rolling"]


def _samples(results: dict) -> dict[str, list]:
    """Per task, each document's responses in document order (loglikelihoods, or (loglikelihood, greedy))."""
    return {task: [[r[0] for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def _evaluate(model, model_args, tasks_dir: str, batch_size: int = 8) -> tuple[dict, dict, float]:
    from lm_eval import simple_evaluate

    from gpt_jax import harness

    start = time.perf_counter()
    results = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size,
                              task_manager=harness.task_manager(TASKS, tasks_dir), bootstrap_iters=0,
                              log_samples=True, torch_random_seed=None)
    return harness.task_metrics(results), _samples(results), time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not start")


def _loglikelihoods(samples: dict, task: str) -> list[float]:
    values = []
    for doc in samples[task]:
        for r in doc:
            values.append(float(r[0] if isinstance(r, list | tuple) else r))
    return values


def main(argv):
    del argv
    import transformers

    from gpt_jax import harness
    from gpt_jax import workdir as workdir_lib

    gguf = _GGUF.value
    directory, name = os.path.split(gguf)
    work = tempfile.mkdtemp(prefix="lm_eval_smollm2_")
    tasks_dir = os.path.join(work, "tasks")
    make_tasks.made_tasks(tasks_dir)
    make_tasks._write(tasks_dir, "made_rolling", [{"text": f"{p} {a}."} for p, a, _ in make_tasks.FACTS],
                      make_tasks.ROLLING)
    runs, seconds = {}, {}

    start = time.perf_counter()
    lm = harness.GptJaxLM(workdir_lib.load(gguf), batch_size=8)
    load_s = time.perf_counter() - start
    metrics, samples, seconds["in_process"] = _evaluate(lm, None, tasks_dir)
    runs["in_process"] = (metrics, samples)
    seconds["in_process"] += load_s
    del lm

    tokenizer_dir = os.path.join(work, "tokenizer")
    transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tokenizer_dir)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "gpt_jax.main", "--mode=serve", f"--workdir={work}/serve",
                               f"--config.init_from={gguf}", f"--port={port}"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    try:
        _wait(url, server)
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        args = {"model": model_id, "base_url": url + "/v1/completions", "tokenizer": tokenizer_dir,
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 2048}
        metrics, samples, seconds["server"] = _evaluate("local-completions", args, tasks_dir)  # (client's run)
        runs["server"] = (metrics, samples)
    finally:
        server.terminate()
        server.wait(60)
    seconds["server_total"] = time.perf_counter() - start

    metrics, samples, seconds["hf"] = _evaluate(
        "hf", {"pretrained": directory, "gguf_file": name, "dtype": "float32", "device": "cpu"}, tasks_dir)
    runs["hf"] = (metrics, samples)

    backends = list(runs)
    rows = []
    for task in TASKS:
        for metric in runs["hf"][0][task]:
            if metric == "sample_len":
                continue
            rows.append([task, metric] + [runs[b][0][task].get(metric) for b in backends])
    diffs = {}
    for a, b in (("in_process", "hf"), ("server", "hf"), ("server", "in_process")):
        diffs[f"{a} vs {b}"] = max(abs(x - y) for task in TASKS
                                   for x, y in zip(_loglikelihoods(runs[a][1], task), _loglikelihoods(runs[b][1], task),
                                                   strict=True))
    lines = ["| task | metric | " + " | ".join(backends) + " |", "|---|---|" + "---|" * len(backends)]
    lines += [f"| {t} | {m} | " + " | ".join(f"{v:.6g}" for v in values) + " |" for t, m, *values in rows]
    lines += ["", "largest per-document loglikelihood difference: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()),
              "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    print("\n".join(lines))
    with open(_OUTPUT.value, "w") as f:
        json.dump({"metrics": {b: runs[b][0] for b in backends}, "max_loglikelihood_difference": diffs,
                   "seconds": seconds, "table": lines}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
