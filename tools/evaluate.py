"""Evaluate like a researcher: perplexity, BLEU / chrF, translation and GSM8K through batched decoding, tables.

    python tools/evaluate.py perplexity --model=DIR_OR_PATH --text=FILE [--window=N] [--stride=N]
    python tools/evaluate.py perplexity --model=DIR [--data=PREPARED_DIR] [--split=val]
    python tools/evaluate.py bleu --hyp=FILE --ref=FILE[,FILE...]
    python tools/evaluate.py translate --model=DIR --src=FILE [--ref=FILE] [--output=HYP_FILE]
    python tools/evaluate.py gsm8k --model=DIR --data=FILE.jsonl [--limit=N] [--output=PREDICTIONS.jsonl]
    python tools/evaluate.py table A.json B.json ...

Each command but `table` prints one JSON object on stdout (and writes it to --json_out when given); `table`
prints a markdown table of JSON result files. Bad input: one `error: ...` line on stderr, exit code 2.

Perplexity windows follow HF's recipe: a window of --window tokens (default: the model's context + 1) starts
every --stride tokens (default: half the context) and scores only the tokens the previous window did not.
`ppl` is per token, `bpb` is bits per UTF-8 byte of the scored tokens, `word_ppl` is exp(total NLL / whitespace
words of the text): the last two compare models with different tokenizers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpt_jax.errors import UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _read_lines(path: str, flag: str) -> list[str]:
    """Lines of a UTF-8 file, read as sacrebleu's command line reads them (split on \\n, trailing space cut)."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            return [line.rstrip() for line in f]
    except OSError as e:
        raise UserError(f"cannot read {flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _read_text(path: str, flag: str) -> str:
    from gpt_jax.data import text as text_lib

    try:
        return text_lib.read_text(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def _read_jsonl(path: str, flag: str) -> list[dict]:
    records = []
    for number, line in enumerate(_read_lines(path, flag), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{flag} {path} line {number} is not JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{flag} {path} line {number} is not a JSON object")
        records.append(record)
    if not records:
        raise UserError(f"{flag} {path} holds no record")
    return records


def _load(source: str):
    from gpt_jax import pretrained

    if not os.path.exists(source):
        raise UserError(f"--model {source} does not exist")
    return pretrained.load(source)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name}={value} must be positive")


def cmd_perplexity(args) -> dict:
    from gpt_jax import evaluate

    _positive("window", args.window)
    _positive("stride", args.stride)
    if args.text and args.data:
        raise UserError("give --text or --data, not both")
    text = _read_text(args.text, "--text") if args.text else None
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
    prefix = _read_text(args.prefix_file, "--prefix_file") if args.prefix_file else ""
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

    examples = _read_jsonl(args.data, "--data")[:args.limit or None]
    for number, ex in enumerate(examples, 1):
        if not isinstance(ex.get("question"), str) or not isinstance(ex.get("answer"), str):
            raise UserError(f"--data {args.data} record {number} needs string fields question and answer")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tools/evaluate.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("perplexity", help="token / byte / word perplexity of a text or a data split")
    p.add_argument("--model", required=True, help="gpt_jax workdir, HF model directory or .gguf file")
    p.add_argument("--text", help="UTF-8 text file, scored as one document")
    p.add_argument("--data", help="data prepared by tools/prepare_data.py (default: the model's own data)")
    p.add_argument("--split", default="val", help="train or val, with --data or the model's data")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context + 1)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half the context)")
    p.add_argument("--batch_size", type=int, default=0, help="windows per forward pass (0: automatic)")
    p.add_argument("--json_out", help="also write the result to this file")

    p = commands.add_parser("bleu", help="corpus BLEU and chrF (sacrebleu defaults) of a hypothesis file")
    p.add_argument("--hyp", required=True, help="hypotheses, one per line")
    p.add_argument("--ref", required=True, help="references, one per line; comma-separated for several sets")
    p.add_argument("--json_out", help="also write the result to this file")

    for name, help_text in (("translate", "translate a source file by greedy decoding, BLEU / chrF against --ref"),
                            ("gsm8k", "GSM8K-style exact match (the number after ####) by greedy decoding")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="gpt_jax workdir, HF model directory or .gguf file")
        if name == "translate":
            p.add_argument("--src", required=True, help="source sentences, one per line")
            p.add_argument("--ref", help="reference translations, one per line")
            p.add_argument("--output", help="write the translations here, one per line")
            p.add_argument("--template", help="prompt template with {source}")
        else:
            p.add_argument("--data", required=True, help="JSONL with fields question and answer")
            p.add_argument("--output", help="write question, prediction and answer per line (JSONL)")
            p.add_argument("--template", help="prompt template with {question}")
        p.add_argument("--prefix_file", help="text put before every prompt, e.g. few-shot examples")
        p.add_argument("--max_new_tokens", type=int, default=64 if name == "translate" else 256)
        p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
        p.add_argument("--limit", type=int, default=0, help="only the first N examples (0: all)")
        p.add_argument("--json_out", help="also write the result to this file")

    p = commands.add_parser("table", help="markdown table of JSON result files (one row each)")
    p.add_argument("files", nargs="+", help="eval.json or tools/evaluate.py outputs")
    p.add_argument("--columns", help="comma-separated columns (default: every key)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"perplexity": cmd_perplexity, "bleu": cmd_bleu, "translate": cmd_translate, "gsm8k": cmd_gsm8k,
                "table": cmd_table}
    try:
        for name in ("batch_size", "max_new_tokens", "limit"):
            value = getattr(args, name, None)
            if value is not None and value < 0:
                raise UserError(f"--{name}={value} must not be negative")
        result = handlers[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, str):
        sys.stdout.write(result)
        return 0
    line = json.dumps(result)
    if getattr(args, "json_out", None):
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
