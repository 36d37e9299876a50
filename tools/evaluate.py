"""Evaluate like a researcher: perplexity, BLEU / chrF, translation and GSM8K through batched decoding, tables.

    python tools/evaluate.py perplexity --model=DIR_OR_PATH --text=FILE [--window=N] [--stride=N]
    python tools/evaluate.py perplexity --model=DIR [--data=PREPARED_DIR] [--split=val]
    python tools/evaluate.py bleu --hyp=FILE --ref=FILE[,FILE...]
    python tools/evaluate.py translate --model=DIR --src=FILE [--ref=FILE] [--output=HYP_FILE]
    python tools/evaluate.py gsm8k --model=DIR --data=FILE.jsonl [--limit=N] [--output=PREDICTIONS.jsonl]
    python tools/evaluate.py harness --model=PATH --tasks=T1,T2 [--include_path=DIR] [--limit=N] [--num_fewshot=K]
        [--batch_size=B] [--output_path=DIR]
    python tools/evaluate.py table A.json B.json ...

Each command but `table` prints one JSON object on stdout (and writes it to --json_out when given); `table`
prints a markdown table of JSON result files. Bad input: one `error: ...` line on stderr, exit code 2.

Perplexity windows follow HF's recipe: a window of --window tokens (default: the model's context + 1) starts
every --stride tokens (default: half the context) and scores only the tokens the previous window did not.
`ppl` is per token, `bpb` is bits per UTF-8 byte of the scored tokens, `word_ppl` is exp(total NLL / whitespace
words of the text) and `word_ppl_eos` exp(total NLL / (words + line ends)), Penn Treebank's convention, where an
`<eos>` ends every line: the last three compare models with different tokenizers.

`harness` runs EleutherAI's lm-evaluation-harness in this process (`pip install -e '.[harness]'`) on the model
(gpt_jax.harness) and prints {task: {metric: value}}; --output_path keeps lm-eval's whole output (results and
every sample). Offline, a task's data can be local files: a task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}` in --include_path, run with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import flags

from gpt_jax import cli
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError

flags.DEFINE_string("model", None, "perplexity, translate, gsm8k: gpt_jax workdir, HF model directory or .gguf file")
flags.DEFINE_string("text", None, "perplexity: UTF-8 text file, scored as one document")
flags.DEFINE_string("data", None, "perplexity: data prepared by tools/prepare_data.py (default: the model's own "
                    "data); gsm8k: JSONL with fields question and answer")
flags.DEFINE_string("split", "val", "perplexity: train or val, with --data or the model's data")
flags.DEFINE_integer("window", None, "perplexity: tokens per window (default: the model's context + 1)")
flags.DEFINE_integer("stride", None, "perplexity: tokens between window starts (default: half the context)")
flags.DEFINE_integer("batch_size", None, "perplexity: windows per forward pass (default 0: automatic); translate, "
                     "gsm8k: prompts decoded together (default 8); harness: sequences per forward pass and prompts "
                     "decoded together (default 8)")
flags.DEFINE_string("hyp", None, "bleu: hypotheses, one per line")
flags.DEFINE_string("ref", None, "bleu: references, one per line, comma-separated for several sets; translate: "
                    "reference translations, one per line")
flags.DEFINE_string("src", None, "translate: source sentences, one per line")
flags.DEFINE_string("output", None, "translate: write the translations here, one per line; gsm8k: write question, "
                    "prediction and answer per line (JSONL)")
flags.DEFINE_string("template", None, "translate: prompt template with {source}; gsm8k: with {question}")
flags.DEFINE_string("prefix_file", None, "translate, gsm8k: text put before every prompt, e.g. few-shot examples")
flags.DEFINE_integer("max_new_tokens", None, "translate (default 64), gsm8k (default 256): tokens to generate")
flags.DEFINE_integer("limit", 0, "translate, gsm8k, harness: only the first N examples (of each task; 0: all)")
flags.DEFINE_string("tasks", None, "harness: comma-separated lm-eval task (or group) names")
flags.DEFINE_string("include_path", None, "harness: a directory of task YAMLs beside lm-eval's own")
flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples per prompt (default: each task's own)")
flags.DEFINE_string("output_path", None, "harness: write lm-eval's results and samples under this directory")
flags.DEFINE_integer("bootstrap_iters", 1000, "harness: bootstrap resamples for standard errors (0: none)")
flags.DEFINE_string("json_out", None, "every command but table: also write the result to this file")
flags.DEFINE_string("columns", None, "table: comma-separated columns (default: every key)")


def _read_lines(path: str, flag: str) -> list[str]:
    """Lines of a UTF-8 file, read as sacrebleu's command line reads them (split on \\n, trailing space cut)."""
    return [line.rstrip() for line in text_lib.read_lines(path, flag)]


def _load(source: str):
    from gpt_jax import workdir

    if not os.path.exists(source):
        raise UserError(f"--model {source} does not exist")
    if not workdir.is_workdir(source):  # HF directories and GGUF files carry `tokenizers` tokenizers
        cli.require("convert", "tokenizers")
    return workdir.load(source)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name}={value} must be positive")


def cmd_perplexity(args) -> dict:
    from gpt_jax import evaluate

    _positive("window", args.window)
    _positive("stride", args.stride)
    if args.text and args.data:
        raise UserError("give --text or --data, not both")
    text = text_lib.read_text(args.text, "--text") if args.text else None
    loaded = _load(args.model)
    if text is not None:
        result = evaluate.text_perplexity(loaded, text, args.window, args.stride, args.batch_size)
        return {**result, "text": args.text}
    if args.data and not os.path.isdir(args.data):
        raise UserError(f"--data {args.data} is not a directory")
    return evaluate.split_perplexity(loaded, args.split, args.data or "", args.window, args.stride,
                                     args.batch_size)


def cmd_bleu(args) -> dict:
    from gpt_jax import evaluate

    hyps = _read_lines(args.hyp, "--hyp")
    refs = []
    for path in args.ref.split(","):
        lines = _read_lines(path, "--ref")
        if len(lines) != len(hyps):
            raise UserError(f"--hyp {args.hyp} has {len(hyps)} lines but --ref {path} has {len(lines)}")
        refs.append(lines)
    if not hyps:
        raise UserError(f"--hyp {args.hyp} is empty")
    return evaluate.bleu(hyps, refs)


def _template_and_prefix(args, default: str) -> tuple[str, str]:
    template = args.template.replace("\\n", "\n") if args.template else default
    prefix = text_lib.read_text(args.prefix_file, "--prefix_file") if args.prefix_file else ""
    return template, prefix


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def cmd_translate(args) -> dict:
    from gpt_jax import evaluate

    sources = _read_lines(args.src, "--src")[:args.limit or None]
    refs = _read_lines(args.ref, "--ref")[:args.limit or None] if args.ref else None
    if refs is not None and len(refs) != len(sources):
        raise UserError(f"--src {args.src} has {len(sources)} lines but --ref {args.ref} has {len(refs)}")
    template, prefix = _template_and_prefix(args, evaluate.TRANSLATE_TEMPLATE)
    if "{source}" not in template:
        raise UserError("--template must contain {source}")
    loaded = _load(args.model)
    hyps = evaluate.translate(loaded, sources, template, prefix, args.max_new_tokens, args.batch_size)
    if args.output:
        _write_lines(args.output, hyps)
    result = evaluate.bleu(hyps, [refs]) if refs is not None else {"sentences": len(hyps)}
    return {**result, "model": loaded.name}


def cmd_gsm8k(args) -> dict:
    from gpt_jax import evaluate

    examples = text_lib.read_jsonl(args.data, "--data", fields=("question", "answer"))[:args.limit or None]
    if not examples:
        raise UserError(f"--data {args.data} holds no record")
    template, prefix = _template_and_prefix(args, evaluate.GSM8K_TEMPLATE)
    if "{question}" not in template:
        raise UserError("--template must contain {question}")
    loaded = _load(args.model)
    metrics, predictions = evaluate.gsm8k(loaded, examples, template, prefix, args.max_new_tokens, args.batch_size)
    if args.output:
        records = [{"question": ex["question"], "prediction": p, "answer": ex["answer"]}
                   for ex, p in zip(examples, predictions, strict=True)]
        _write_lines(args.output, [json.dumps(r) for r in records])
    return {**metrics, "model": loaded.name}


def cmd_harness(args) -> dict:
    from gpt_jax import harness, workdir

    if not os.path.exists(args.model):
        raise UserError(f"--model {args.model} does not exist")
    if not workdir.is_workdir(args.model):  # HF directories and GGUF files carry `tokenizers` tokenizers
        cli.require("convert", "tokenizers")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task")
    _positive("batch_size", args.batch_size)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the result alone
        # (the tasks are looked up before the model loads, so a wrong name fails fast)
        metrics, _ = harness.evaluate(args.model, tasks, include_path=args.include_path, limit=args.limit or None,
                                      num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                      output_path=args.output_path, bootstrap_iters=args.bootstrap_iters)
    return metrics


def cmd_table(args) -> str:
    from gpt_jax import evaluate

    rows = []
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                row = json.load(f)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a JSON file: {e}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} does not hold a JSON object")
        rows.append({"file": path, **row})
    columns = args.columns.split(",") if args.columns else None
    return evaluate.markdown_table(rows, columns)


# command → (handler, required flags, other flags it takes)
COMMANDS = {
    "perplexity": (cmd_perplexity, ("model",), ("text", "data", "split", "window", "stride", "batch_size",
                                                "json_out")),
    "bleu": (cmd_bleu, ("hyp", "ref"), ("json_out",)),
    "translate": (cmd_translate, ("model", "src"), ("ref", "output", "template", "prefix_file", "max_new_tokens",
                                                    "batch_size", "limit", "json_out")),
    "gsm8k": (cmd_gsm8k, ("model", "data"), ("output", "template", "prefix_file", "max_new_tokens", "batch_size",
                                             "limit", "json_out")),
    "harness": (cmd_harness, ("model", "tasks"), ("include_path", "limit", "num_fewshot", "batch_size",
                                                  "output_path", "bootstrap_iters", "json_out")),
    "table": (cmd_table, (), ("columns",)),
}
_DEFAULTS = {"perplexity": {"batch_size": 0}, "translate": {"batch_size": 8, "max_new_tokens": 64},
             "gsm8k": {"batch_size": 8, "max_new_tokens": 256}, "harness": {"batch_size": 8}}


def main(argv: list[str]) -> int:
    """Runs the command in argv[1] with the flags; prints its result."""
    command, args = cli.subcommand(argv, COMMANDS, __name__, _DEFAULTS, takes_files=("table",))
    for name in ("batch_size", "max_new_tokens", "limit", "num_fewshot", "bootstrap_iters"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name}={value} must not be negative")
    if command == "bleu" or (command == "translate" and args.ref):
        cli.require("eval", "sacrebleu")
    if command == "harness":
        cli.require("harness", "lm_eval")
    result = COMMANDS[command][0](args)
    if isinstance(result, str):
        sys.stdout.write(result)
        return 0
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
