"""Evaluation: sliding-window perplexity (against an independent per-window computation, training's evaluation,
and transformers on SmolLM2), BLEU / chrF against sacrebleu's command line, GSM8K answer matching, generation
tasks, reports and the tools' error handling."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_tools import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}

TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
"""


# tiny_workdir (configs/tiny.py trained for 20 steps, once per session) is a fixture in conftest.py


@pytest.fixture(scope="session")
def tiny(tiny_workdir):
    from gpt_jax import workdir as workdir_lib

    return workdir_lib.load(tiny_workdir)


def run_tool(*args: str, tool: str = EVALUATE) -> subprocess.CompletedProcess:
    """Runs a tool as a user would, in a fresh process."""
    return subprocess.run([sys.executable, tool, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


def call_tool(*args: str, tool: str = EVALUATE) -> subprocess.CompletedProcess:
    """Runs a tool in this process (no start-up cost); returns what run_tool would."""
    return run_in_process(tool, *args)


# ---------------------------------------------------------------------------------------------------------------
# Sliding windows


def hf_recipe_spans(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's documented perplexity loop, transcribed: per window, its tokens and the first label not masked."""
    spans, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        trg_len = end - prev_end
        # labels[:-trg_len] = -100, and the label shift drops the window's first label
        spans.append((begin, end, max(end - trg_len, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return spans


@pytest.mark.parametrize("num_tokens,window,stride", [
    (10, 4, 2), (10, 4, 4), (11, 4, 3), (3, 8, 4), (100, 17, 5), (64, 65, 64), (129, 65, 64), (7, 2, 1)])
def test_sliding_windows_follow_hf_recipe(num_tokens, window, stride):
    from gpt_jax.evaluate import sliding_windows

    spans = sliding_windows(num_tokens, window, stride)
    assert spans == hf_recipe_spans(num_tokens, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert spans[-1][1] == num_tokens and all(end - begin <= window for begin, end, _ in spans)
    if stride < window:  # overlapping windows score every token that has a predecessor
        assert scored == list(range(1, num_tokens))


@pytest.mark.parametrize("num_tokens,window,stride", [(1, 4, 2), (10, 1, 1), (10, 4, 5), (10, 4, 0)])
def test_sliding_windows_reject_bad_arguments(num_tokens, window, stride):
    from gpt_jax.errors import UserError
    from gpt_jax.evaluate import sliding_windows

    with pytest.raises(UserError):
        sliding_windows(num_tokens, window, stride)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity on a tiny model


def reference_nll(loaded, token_ids: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Per-token NLL the straightforward way: HF's loop, one unpadded window at a time, log-softmax in numpy."""
    import jax
    from flax import nnx

    graphdef, params = nnx.split(loaded.model)
    logits_fn = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])
    nll = np.full(len(token_ids), np.nan)
    for begin, end, first in hf_recipe_spans(len(token_ids), window, stride):
        logits = np.asarray(logits_fn(params, token_ids[None, begin:end - 1])[0], np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        for t in range(first, end):
            nll[t] = -log_probs[t - begin - 1, token_ids[t]]
    return nll


def test_token_nll_matches_straightforward_computation(tiny):
    from gpt_jax import evaluate
    from gpt_jax.data import text as text_lib

    token_ids = text_lib.encode_array(tiny.tokenizer, TEXT * 2)
    for window, stride in ((65, 20), (40, 40)):
        expected = reference_nll(tiny, token_ids, window, stride)
        for batch_size in (0, 3):
            got = evaluate.token_nll(tiny, token_ids, window, stride, batch_size)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_non_overlapping_windows_equal_training_evaluation(tiny):
    """window = seq_len + 1 with stride seq_len scores exactly the windows training's evaluation scores."""
    import jax
    from flax import nnx

    from gpt_jax import evaluate, steps
    from gpt_jax.data import pipeline
    from gpt_jax.data import text as text_lib

    seq_len = tiny.model_cfg.max_seq_len
    tokens = text_lib.encode_array(tiny.tokenizer, TEXT * 3)
    tokens = tokens[:(len(tokens) - 1) // seq_len * seq_len + 1]
    graphdef, params = nnx.split(tiny.model, nnx.Param)
    eval_step = jax.jit(steps.make_eval_step(graphdef, tiny.tokenizer.token_byte_lengths()))
    windows = pipeline.eval_windows(tokens, seq_len)
    batches = [{"tokens": windows[i:i + 4], "loss_mask": np.ones((len(windows[i:i + 4]), seq_len), np.float32)}
               for i in range(0, len(windows), 4)]
    expected = evaluate.evaluate_batches(eval_step, nnx.to_pure_dict(params), batches)
    nll = evaluate.token_nll(tiny, tokens, seq_len + 1, seq_len)
    metrics = evaluate.perplexity_metrics(nll, tokens, tiny.tokenizer.token_byte_lengths(), TEXT * 3)
    assert metrics["tokens"] == expected["val_tokens"]
    assert metrics["loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert metrics["bpb"] == pytest.approx(expected["val_bpb"], rel=1e-5)


def test_perplexity_tool(tiny_workdir, tiny, tmp_path):
    from gpt_jax import evaluate

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    proc = run_tool("perplexity", f"--model={tiny_workdir}", f"--text={text_file}", "--window=33", "--stride=16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["tokens"] == len(TEXT) - 1  # a character model: each character but the first is scored
    assert result["ppl"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))
    assert result["bytes"] == len(TEXT.encode()) - 1
    assert result["bpb"] == pytest.approx(result["nll"] / math.log(2) / result["bytes"])
    assert result["words"] == len(TEXT.split())
    assert result["word_ppl"] == pytest.approx(math.exp(result["nll"] / len(TEXT.split())))
    assert result["line_ends"] == TEXT.count("\n") > 0
    assert result["word_ppl_eos"] == pytest.approx(math.exp(result["nll"] / (len(TEXT.split()) + TEXT.count("\n"))))
    assert (result["window"], result["stride"]) == (33, 16)
    in_process = evaluate.text_perplexity(tiny, TEXT, 33, 16)
    assert in_process["ppl"] == pytest.approx(result["ppl"], rel=1e-6)


def test_split_perplexity_is_the_validation_text_perplexity(tiny):
    from gpt_jax import evaluate
    from gpt_jax.data import text as text_lib

    corpus, _ = text_lib.load_corpus(tiny.config.data.text_files)
    _, val_text = text_lib.split_text(corpus, tiny.config.data.val_fraction)
    window, stride = tiny.model_cfg.max_seq_len + 1, tiny.model_cfg.max_seq_len
    split = evaluate.split_perplexity(tiny, "val", window=window, stride=stride)
    text = evaluate.text_perplexity(tiny, val_text, window, stride)
    assert split["split"] == "val" and split["tokens"] == text["tokens"]
    for key in ("ppl", "bpb", "word_ppl"):
        assert split[key] == pytest.approx(text[key], rel=1e-6)


def test_prepared_split_perplexity(tiny_workdir, tiny, tmp_path):
    """Shards written as tools/prepare_data.py writes them: the split's documents joined with EOS are scored."""
    from gpt_jax import evaluate
    from gpt_jax.data import shards
    from gpt_jax.data import text as text_lib

    data = tmp_path / "prepared"
    data.mkdir()
    shutil.copytree(os.path.join(tiny_workdir, "tokenizer"), data / "tokenizer")
    documents = [text_lib.encode_array(tiny.tokenizer, d) for d in TEXT.split("\n\n")]
    eos_id = tiny.tokenizer.encode("\n")[0]
    entries = [shards.write_shard(str(data), split, 0, 1, documents) for split in ("train", "val")]
    shards.write_manifest(str(data), {"shards": entries, "tokenizer": {"eos_id": eos_id}})
    proc = call_tool("perplexity", f"--model={tiny_workdir}", f"--data={data}", "--window=33",
                     "--stride=16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    joined = "".join(d + "\n" for d in TEXT.split("\n\n"))
    expected = evaluate.text_perplexity(tiny, joined, 33, 16)
    assert result["tokens"] == expected["tokens"] and result["split"] == "val"
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert result["word_ppl"] == pytest.approx(expected["word_ppl"], rel=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--text=/nonexistent/t.txt"], "/nonexistent/t.txt"),
    (["--text={text}", "--stride=0"], "--stride"),
    (["--text={text}", "--window=40", "--stride=41"], "--stride"),
    (["--text={text}", "--window=1000"], "--window"),
    (["--text={empty}"], "empty"),
    (["--split=test"], "--split"),
])
def test_perplexity_tool_rejects_bad_input(tiny_workdir, tmp_path, args, needle):
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "e.txt").write_text(" \n")
    args = [a.format(text=tmp_path / "t.txt", empty=tmp_path / "e.txt") for a in args]
    proc = call_tool("perplexity", f"--model={tiny_workdir}", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr


def test_perplexity_tool_rejects_a_missing_model(tmp_path):
    proc = call_tool("perplexity", f"--model={tmp_path}/none", f"--text={EVALUATE}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--model" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# BLEU and chrF


HYPS = ["The cat sat on a mat.", "A man walks his dog in the park .", "Zwei Männer stehen am Herd.  ",
        "", "hello , world!", "Ein Mädchen klettert in ein Spielhaus.\r"]
REFS = ["The cat sat on the mat.", "A man is walking a dog in the park.", "Zwei Männer stehen am Herd und kochen.",
        "Nothing here.", "Hello, world!", "Ein kleines Mädchen klettert in ein Spielhaus aus Holz."]
REFS2 = ["A cat sat on the mat.", "A man walks a dog in a park.", "Zwei Männer kochen.", "Nothing.",
         "hello world", "Ein Mädchen klettert in ein Holzhaus."]


def _write(path, lines):
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return str(path)


def _sacrebleu_cli(refs: list[str], hyp: str) -> dict:
    cli = shutil.which("sacrebleu", path=os.path.dirname(sys.executable)) or shutil.which("sacrebleu")
    command = [cli] if cli else [sys.executable, "-m", "sacrebleu"]
    proc = subprocess.run([*command, *refs, "-i", hyp, "-m", "bleu", "chrf", "-w", "10", "-f", "json"],
                          capture_output=True, text=True, check=True)
    return {entry["name"]: entry["score"] for entry in json.loads(proc.stdout)}


@pytest.mark.parametrize("refsets", [1, 2])
def test_bleu_tool_equals_sacrebleu_command_line(tmp_path, refsets):
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    refs = [_write(tmp_path / "ref.txt", REFS), _write(tmp_path / "ref2.txt", REFS2)][:refsets]
    args = ("bleu", f"--hyp={hyp}", f"--ref={','.join(refs)}")
    proc = run_tool(*args) if refsets == 1 else call_tool(*args)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)
    theirs = _sacrebleu_cli(refs, hyp)
    assert f"{ours['bleu']:.10f}" == f"{theirs['BLEU']:.10f}"
    assert f"{ours['chrf']:.10f}" == f"{theirs['chrF2']:.10f}"
    assert 0 < ours["bleu"] < 100 and ours["sentences"] == len(HYPS)


def test_bleu_tool_rejects_bad_input(tmp_path):
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    short = _write(tmp_path / "short.txt", REFS[:2])
    proc = call_tool("bleu", f"--hyp={hyp}", f"--ref={short}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "short.txt" in proc.stderr
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    proc = call_tool("bleu", f"--hyp={tmp_path / 'latin1.txt'}", f"--ref={short}")
    assert proc.returncode == 2 and "--hyp" in proc.stderr and "UTF-8" in proc.stderr
    proc = run_tool("bleu", f"--hyp={hyp}")  # a whole process, as a user sees it
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: bleu needs --ref"]


# ---------------------------------------------------------------------------------------------------------------
# GSM8K answers and generation tasks


@pytest.mark.parametrize("text,strict,expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", True, "7"),
    ("#### 1,200", True, "1200"),
    ("#### $5.50.", True, "5.5"),
    ("#### -3", True, "-3"),
    ("The answer is 12.", True, None),
    ("The answer is 12, not 13.", False, "13"),
    ("no number", False, None),
])
def test_extract_answer(text, strict, expected):
    from decimal import Decimal

    from gpt_jax.evaluate import extract_answer

    got = extract_answer(text, strict=strict)
    assert got == (None if expected is None else Decimal(expected))


def test_exact_match():
    from gpt_jax.evaluate import exact_match

    answers = ["2 + 2 = 4\n#### 4", "#### 1,000", "#### 10", "#### 3"]
    predictions = ["so #### 4.0", "#### 1000", "I think 10", "#### 4"]
    result = exact_match(predictions, answers)
    assert result == {"exact_match": 0.5, "exact_match_flexible": 0.75, "examples": 4}


def test_cut_at_stops():
    from gpt_jax.evaluate import cut_at_stops

    assert cut_at_stops("Hallo Welt\nEnglish: x", ["\n"]) == "Hallo Welt"
    assert cut_at_stops("a\n\nQuestion: b", ["\nQuestion:", "\n\n"]) == "a"
    assert cut_at_stops("no stop", ["\n"]) == "no stop"


def test_translate_and_gsm8k_by_decoding(tiny, tiny_workdir, tmp_path):
    from gpt_jax import evaluate

    sources = ["Good morrow, sir.", "What say you?", "I am a man."]
    template = "Speak: {source}\nAnswer:"
    hyps = evaluate.translate(tiny, sources, template, max_new_tokens=6, batch_size=2)
    assert len(hyps) == 3 and all("\n" not in h for h in hyps)
    scores = evaluate.bleu(hyps, [sources])
    assert 0.0 <= scores["bleu"] <= 100.0 and 0.0 <= scores["chrf"] <= 100.0
    metrics, predictions = evaluate.gsm8k(tiny, [{"question": "How many?", "answer": "Three.\n#### 3"}],
                                          max_new_tokens=6)
    assert len(predictions) == 1 and metrics["examples"] == 1 and metrics["exact_match"] in (0.0, 1.0)


def test_translate_tool(tiny_workdir, tmp_path):
    src = _write(tmp_path / "src.txt", ["Good morrow.", "Farewell."])
    ref = _write(tmp_path / "ref.txt", ["Guten Morgen.", "Lebewohl."])
    out = tmp_path / "hyp.txt"
    proc = run_tool("translate", f"--model={tiny_workdir}", f"--src={src}", f"--ref={ref}", f"--output={out}",
                    "--max_new_tokens=4", "--template=Say: {source}\\nThen:")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["sentences"] == 2 and len(out.read_text().splitlines()) == 2
    bleu_proc = call_tool("bleu", f"--hyp={out}", f"--ref={ref}")
    assert json.loads(bleu_proc.stdout)["bleu"] == result["bleu"]
    proc = call_tool("translate", f"--model={tiny_workdir}", f"--src={src}", "--template=no placeholder")
    assert proc.returncode == 2 and "--template" in proc.stderr


def test_gsm8k_tool_rejects_bad_records(tiny_workdir, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    proc = call_tool("gsm8k", f"--model={tiny_workdir}", f"--data={data}")
    assert proc.returncode == 2 and ":2: " in proc.stderr and "'answer'" in proc.stderr
    data.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    proc = call_tool("gsm8k", f"--model={tiny_workdir}", f"--data={data}")
    assert proc.returncode == 2 and ":2: " in proc.stderr and "JSON" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Reports


def test_markdown_table():
    from gpt_jax.evaluate import markdown_table

    table = markdown_table([{"model": "a|b", "ppl": 3.14159}, {"model": "c", "bleu": 20}])
    assert table.splitlines() == ["| model | ppl | bleu |", "|---|---|---|", "| a\\|b | 3.1416 |  |",
                                  "| c |  | 20 |"]


def test_evaluate_workdir_writes_json_and_markdown(tiny_workdir, tiny, tmp_path):
    from gpt_jax import evaluate

    workdir = tmp_path / "run"
    shutil.copytree(tiny_workdir, workdir)
    results = evaluate.evaluate_workdir(tiny.config, str(workdir))
    assert json.loads((workdir / "eval.json").read_text()) == results
    table = (workdir / "eval.md").read_text().splitlines()
    assert table[0].startswith("| model | step | val_loss") and table[2].startswith("| run | 20 |")
    proc = call_tool("table", str(workdir / "eval.json"), "--columns=model,val_ppl")
    assert proc.returncode == 0 and proc.stdout.splitlines()[2] == f"| run | {results['val_ppl']:.4f} |"


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M against transformers

@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_gguf, smollm2_converted, smollm2_reference, tmp_path):
    """Item 1 of "Evaluate like a researcher": the same tokens, window and stride give transformers' perplexity."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from gpt_jax.data import text as text_lib

    gguf = smollm2_gguf
    text = text_lib.read_text(text_lib.BUNDLED_CORPUS)[:3000]  # ~800 tokens
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    window, stride = 128, 64
    proc = run_tool("perplexity", f"--model={gguf}", f"--text={text_file}", f"--window={window}",
                    f"--stride={stride}")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)

    token_ids = text_lib.encode_array(smollm2_converted.tokenizer, text)  # the tokenizer workdir.load gives

    def transformers_perplexity(model):
        ids = torch.tensor(token_ids[None, :], dtype=torch.long)
        # HF's documented recipe (it weighs each window's mean loss by its valid labels - 1, one fewer than it
        # scores after the first window, a small reweighting) ...
        nll_sum, n_tokens, prev_end = 0.0, 0, 0
        # ... and the exact per-token sum over the same windows
        exact_sum, exact_count = 0.0, 0
        for begin in range(0, ids.size(1), stride):
            end = min(begin + window, ids.size(1))
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            out = model(input_ids, labels=target_ids)
            num_loss_tokens = int((target_ids != -100).sum()) - 1
            nll_sum += float(out.loss) * num_loss_tokens
            n_tokens += num_loss_tokens
            log_probs = torch.log_softmax(out.logits[0, :-1].double(), -1)
            labels = target_ids[0, 1:]
            valid = labels != -100
            exact_sum -= float(log_probs[valid].gather(-1, labels[valid][:, None]).sum())
            exact_count += int(valid.sum())
            prev_end = end
            if end == ids.size(1):
                break
        return {"nll_sum": nll_sum, "n_tokens": n_tokens, "exact_sum": exact_sum, "exact_count": exact_count}

    # transformers' numbers (kept on disk once computed, keyed by the file, the tokens and this computation)
    hf = smollm2_reference.answer("sliding-window perplexity", {"token_ids": token_ids.tolist(), "window": window,
                                                                "stride": stride}, transformers_perplexity)
    hf_recipe_ppl = math.exp(float(hf["nll_sum"]) / int(hf["n_tokens"]))
    hf_exact_ppl = math.exp(float(hf["exact_sum"]) / int(hf["exact_count"]))
    exact_count = int(hf["exact_count"])
    print(f"SmolLM2 ppl: gpt_jax {ours['ppl']:.6f}, transformers {hf_exact_ppl:.6f} (recipe {hf_recipe_ppl:.6f}); "
          f"relative difference {ours['ppl'] / hf_exact_ppl - 1:.2e}")
    assert ours["tokens"] == exact_count == len(token_ids) - 1
    assert ours["ppl"] == pytest.approx(hf_exact_ppl, rel=1e-3)
    assert ours["ppl"] == pytest.approx(hf_recipe_ppl, rel=5e-3)
