"""lm-evaluation-harness: the in-process adapter (`gpt_jax.harness.GptJaxLM`) against scoring and decoding with the
model directly; lm-eval's `local-completions` client against the server (`/v1/completions` with logprobs and echo)
giving the same per-document numbers; both against lm-eval's own `hf` backend on the model exported to an HF
directory; `tools/evaluate.py harness`; and harness metrics logged during training.

The model is a small random GPT-2 made in transformers (test_convert's recipe: 2 layers, a 320-token byte-level BPE,
64 positions), imported as a gpt_jax workdir and exported back to HF as tools/convert.py --to=hf does. The tasks are
small local YAMLs over JSONL files written here: a last-word loglikelihood task, a multiple-choice task, a
generate_until task and a rolling-loglikelihood (perplexity) task. (The server's logprobs/echo shape on the tiny
character model is tested in test_serve.py.)"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt_jax import convert, harness, serve, steps  # noqa: E402
from gpt_jax import decode as decode_lib  # noqa: E402
from gpt_jax import workdir as workdir_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")
TOL = 1e-4  # against transformers (float32 on another library's kernels)
SAME = 2e-5  # the same model through gpt_jax's two paths (different batch shapes)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Paris is the capital of France",
    "Berlin is the capital of Germany",
    "In 1997, 42 engineers wrote lines of code",
    "Isn't it odd? The lazy dog jumps over the fox",
    "The capital of Germany is Berlin",
    "The capital of France is Paris",
    "42 engineers wrote 3.14159 lines of code",
]
CHOICES = [  # lm-eval puts a space between the question and a choice
    ("Paris is the capital of", ["France", "Germany", "code", "dog"], 0),
    ("Berlin is the capital of", ["France", "Germany", "fox", "Paris"], 1),
    ("The quick brown", ["dog", "fox", "lines", "capital"], 1),
    ("The lazy", ["dog", "engineers", "France", "odd"], 0),
    ("42 engineers wrote", ["code", "lines", "Paris", "the"], 1),
    ("In 1997, 42", ["dog", "lines", "engineers", "capital"], 2),
]
TASKS = ["tiny_lastword", "tiny_choice", "tiny_complete", "tiny_rolling"]


def _write_tasks(directory) -> str:
    """Four task YAMLs and their JSONL data under `directory`; returns it (for --include_path)."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    data = {
        "lastword": [{"text": s} for s in SENTENCES],
        "choice": [{"question": q, "choices": c, "label": label} for q, c, label in CHOICES],
        "complete": [{"prompt": " ".join(s.split()[:3]), "answer": " " + " ".join(s.split()[3:5])}
                     for s in SENTENCES],
        "rolling": [{"text": ". ".join(SENTENCES[i:i + 2]) + "."} for i in range(0, len(SENTENCES), 2)],
    }
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    configs = {
        "lastword": {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                     "doc_to_target": "{{' ' + text.split(' ')[-1]}}",
                     "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                     {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "complete": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                     "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False,
                                           "temperature": 0.0},
                     "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
        "rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                    {"metric": "bits_per_byte"}]},
    }
    for name, records in data.items():
        path = os.path.join(directory, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        config = {"task": f"tiny_{name}", **common, **configs[name],
                  "dataset_kwargs": {"data_files": {"test": path}, "cache_dir": os.path.join(directory, "cache")}}
        with open(os.path.join(directory, f"tiny_{name}.yaml"), "w") as f:
            json.dump(config, f, indent=1)  # JSON is YAML
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bpe):
    """A random HF GPT-2 imported as a gpt_jax workdir, that workdir exported to HF (what tools/convert.py --to=hf
    does), and the tasks."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter off its initial value, logits far from uniform
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    source = str(root / "hf_source")
    model.save_pretrained(source, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_bpe, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>").save_pretrained(source)
    workdir = str(root / "workdir")
    convert.convert_model(source, workdir, "gpt_jax")
    exported = str(root / "hf")
    convert.convert_model(workdir, exported, "hf")
    return {"workdir": workdir, "hf": exported, "tasks": _write_tasks(root / "tasks"), "root": root}


def _samples(results: dict) -> dict[str, list]:
    """Per task, each document's requests in document order: [(arguments, response)], a response being
    (loglikelihood, is_greedy), a rolling loglikelihood or a generated text."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [[(tuple(a) if isinstance(a, list) else a, tuple(r[0]) if isinstance(r[0], list) else r[0])
                      for a, r in zip(s["arguments"], s["resps"], strict=True)]
                     for s in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def _run(model, model_args: dict, include_path: str, tasks=TASKS, batch_size: int = 4) -> dict:
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=batch_size,
                              task_manager=harness.task_manager(tasks, include_path), bootstrap_iters=0,
                              log_samples=True, torch_random_seed=None)
    return {"metrics": harness.task_metrics(results), "samples": _samples(results)}


@pytest.fixture(scope="module")
def in_process(setup):
    lm = harness.GptJaxLM(setup["workdir"], batch_size=4)
    return {**_run(lm, None, setup["tasks"]), "lm": lm}


def test_adapter_equals_scoring_and_decoding_with_the_model(setup, in_process):
    """Each document's loglikelihood is the model's own (steps.token_losses over the whole sequence), greedy when
    every continuation token is the argmax; generations are decode.generate's greedy continuations cut at `until`;
    rolling loglikelihoods score every token once from the end-of-text token."""
    lm = in_process["lm"]
    loaded = lm.loaded
    tok = loaded.tokenizer
    graphdef, params = nnx.split(loaded.model, nnx.Param)
    samples = in_process["samples"]

    # every sequence in one batch, padded at the end (causal: the padding changes nothing before it)
    pairs = [args for task in ("tiny_lastword", "tiny_choice") for doc in samples[task] for args, _ in doc]
    texts = [text for doc in samples["tiny_rolling"] for (text,), _ in doc]
    sequences = [tok.encode(c + x) for c, x in pairs] + [[lm.prefix_token_id] + tok.encode(t) for t in texts]
    assert max(map(len, sequences)) <= 65  # one window each
    tokens = np.zeros((len(sequences), 65), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = seq
    forward = jax.jit(lambda p, t: (steps.token_losses(graphdef, p, {"tokens": t})[0],
                                    jnp.argmax(nnx.merge(graphdef, p)(t[:, :-1])[0], axis=-1)))
    losses, argmax = (np.asarray(x) for x in forward(nnx.to_pure_dict(params), tokens))

    expected = []
    for row, (context, _) in enumerate(pairs):
        end, start = len(sequences[row]) - 1, len(tok.encode(context)) - 1  # targets start..end-1
        expected.append((-float(losses[row, start:end].sum()),
                         bool((argmax[row, start:end] == tokens[row, start + 1:end + 1]).all())))
    got = [r for task in ("tiny_lastword", "tiny_choice") for doc in samples[task] for _, r in doc]
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in expected], rtol=1e-6, atol=SAME)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [len(doc) for doc in samples["tiny_choice"]] == [len(c) for _, c, _ in CHOICES]
    rolling = [r for doc in samples["tiny_rolling"] for _, r in doc]
    np.testing.assert_allclose(rolling, [-losses[len(pairs) + i, :len(sequences[len(pairs) + i]) - 1].sum()
                                         for i in range(len(texts))], rtol=1e-6, atol=SAME)

    prompts = [doc[0][0][0] for doc in samples["tiny_complete"]]
    states = decode_lib.generate(loaded.model, loaded.model_cfg, [tok.encode(p) for p in prompts], 6,
                                 eos_id=tok.eos_id, max_batch=4, tokenizer=tok)
    assert [doc[0][1] for doc in samples["tiny_complete"]] == [s.text.split(".")[0] for s in states]
    metrics = in_process["metrics"]
    assert set(metrics) == set(TASKS)
    assert {"acc", "perplexity"} <= set(metrics["tiny_lastword"]) and "acc_norm" in metrics["tiny_choice"]
    assert "word_perplexity" in metrics["tiny_rolling"] and "exact_match" in metrics["tiny_complete"]


@pytest.fixture(scope="module")
def through_server(setup):
    """lm-eval's `local-completions` client against the server on the same workdir (token-id prompts, the HF
    export's tokenizer)."""
    from test_serve import ServerThread

    server = serve.Server(workdir_lib.load(setup["workdir"]), max_batch=8)
    with ServerThread(serve.create_app(server, warmup_prompt_len=0)) as thread:
        args = {"model": server.name, "base_url": thread.url + "/v1/completions", "tokenizer": setup["hf"],
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 64,
                "max_retries": 1}
        return _run("local-completions", args, setup["tasks"], batch_size=8)


@pytest.fixture(scope="module")
def hf_backend(setup):
    """lm-eval's own `hf` backend (transformers on torch) on the exported HF directory."""
    return _run("hf", {"pretrained": setup["hf"], "dtype": "float32", "device": "cpu"}, setup["tasks"])


def _assert_same(got: dict, expected: dict, atol: float) -> None:
    """The same responses per document (loglikelihoods within atol, relative 1e-6 for long sums; greedy flags and
    generated texts equal) and the same accuracy metrics."""
    for task in TASKS:
        a = [r for doc in got["samples"][task] for _, r in doc]
        b = [r for doc in expected["samples"][task] for _, r in doc]
        # (the contexts: local-completions adds the end token's text to a generation's `until` in place)
        assert [args[0] for doc in got["samples"][task] for args, _ in doc] == \
            [args[0] for doc in expected["samples"][task] for args, _ in doc]
        if task == "tiny_complete":
            assert a == b
        elif task == "tiny_rolling":
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol)
        else:
            np.testing.assert_allclose([v for v, _ in a], [v for v, _ in b], rtol=1e-6, atol=atol)
            assert [g for _, g in a] == [g for _, g in b]
    for task, metric in (("tiny_lastword", "acc"), ("tiny_choice", "acc"), ("tiny_choice", "acc_norm"),
                         ("tiny_complete", "exact_match")):
        assert got["metrics"][task][metric] == expected["metrics"][task][metric]
    for task, metric in (("tiny_lastword", "perplexity"), ("tiny_rolling", "word_perplexity")):
        assert got["metrics"][task][metric] == pytest.approx(expected["metrics"][task][metric], rel=1e-5)


def test_local_completions_through_the_server_equals_in_process(in_process, through_server):
    _assert_same(through_server, in_process, SAME)


def test_in_process_and_server_equal_lm_evals_hf_backend(in_process, through_server, hf_backend):
    _assert_same(in_process, hf_backend, TOL)
    _assert_same(through_server, hf_backend, TOL)


def test_harness_tool_prints_metrics_and_writes_lm_evals_output(setup, in_process, tmp_path):
    from test_tools import run_in_process

    out = tmp_path / "out"
    proc = run_in_process(EVALUATE, "harness", f"--model={setup['workdir']}", "--tasks=tiny_lastword,tiny_choice",
                          f"--include_path={setup['tasks']}", "--limit=4", "--batch_size=3", f"--output_path={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    samples = in_process["samples"]
    assert result["tiny_lastword"]["acc"] == np.mean([r[1] for doc in samples["tiny_lastword"][:4] for _, r in doc])
    choice_acc = np.mean([np.argmax([r[0] for _, r in doc]) == label
                          for doc, (_, _, label) in zip(samples["tiny_choice"][:4], CHOICES, strict=False)])
    assert result["tiny_choice"]["acc"] == choice_acc and set(result) == {"tiny_lastword", "tiny_choice"}
    written = {os.path.basename(p).split("_20")[0] for _, _, files in os.walk(out) for p in files}
    assert {"results", "samples_tiny_lastword", "samples_tiny_choice"} <= written, written


def test_harness_tool_names_its_extra_when_lm_eval_is_missing():
    from unittest import mock

    from test_tools import run_in_process

    with mock.patch.dict(sys.modules, {"lm_eval": None}):
        proc = run_in_process(EVALUATE, "harness", "--model=nowhere", "--tasks=x")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: this needs lm_eval: pip install -e '.[harness]'"


@pytest.mark.slow
def test_training_logs_harness_metrics_at_each_evaluation(tmp_path):
    """config.eval.harness_tasks: configs/tiny.py's character model logs harness/TASK/METRIC at every evaluation."""
    from gpt_jax import train
    from gpt_jax.config import base_config

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    lines = ["First Citizen: Before we proceed any further, hear me speak", "All: Speak, speak",
             "First Citizen: You are all resolved rather to die than to famish"]
    (tasks / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tasks / "shakespeare_lastword.yaml").write_text(json.dumps({
        "task": "shakespeare_lastword", "dataset_path": "json", "test_split": "test", "output_type": "loglikelihood",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "lines.jsonl")}, "cache_dir": str(tasks / "cache")},
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' ' + text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    config = base_config()
    config.train_steps, config.batch_size, config.seq_len, config.eval_every, config.eval_steps = 4, 4, 32, 2, 1
    config.final_eval_full, config.sample.max_new_tokens = False, 0
    config.model.n_layer, config.model.d_model, config.model.n_head = 1, 32, 2
    config.eval.harness_tasks, config.eval.harness_limit = "shakespeare_lastword", 2
    config.eval.harness_include_path = str(tasks)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["harness/shakespeare_lastword/acc"] <= 1 and r["harness/shakespeare_lastword/perplexity"] > 1
