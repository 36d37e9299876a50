"""Trains an encoder-decoder on source/target pairs, translates with it, and scores translations.

    python tools/train_seq2seq.py train --workdir=DIR [--config.KEY=VALUE ...]
    python tools/train_seq2seq.py translate --workdir=DIR --input=FILE [--output=FILE] [--temperature=T]
        [--top_k=K] [--top_p=P] [--seed=S] [--max_new_tokens=N] [--batch_size=N]
    python tools/train_seq2seq.py evaluate --workdir=DIR --source=FILE --reference=FILE [--limit=N]
    python tools/train_seq2seq.py config        (prints the default config as JSON)

`train` takes the keys of `gpt_jax.encdec_train.seq2seq_config()` as --config.KEY=VALUE (nested keys with dots),
e.g. --config.data.train_source=train.en --config.data.train_target=train.de --config.model.encoder_from=HF_DIR.
It resumes from the latest checkpoint in DIR and, with validation pairs, ends with greedy BLEU/chrF (eval.json).
`translate` writes one translation per input line (stdout without --output); `evaluate` prints one JSON object
with `bleu`, `chrf`. Bad input: one `error: ...` line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_jax.errors import ConfigError, UserError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(description="Train, run and score an encoder-decoder (sequence-to-sequence) model.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a model in --workdir")
    train.add_argument("--workdir", required=True)
    for name, helptext in (("translate", "translate the lines of --input"),
                           ("evaluate", "translate --source and score against --reference")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--workdir", required=True)
        p.add_argument("--max_new_tokens", type=int, default=0, help="0 = the run's decode.max_new_tokens")
        p.add_argument("--batch_size", type=int, default=0, help="0 = the run's decode.batch_size")
        if name == "translate":
            p.add_argument("--input", required=True)
            p.add_argument("--output", default="")
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            p.add_argument("--top_k", type=int, default=0)
            p.add_argument("--top_p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--source", required=True)
            p.add_argument("--reference", required=True)
            p.add_argument("--limit", type=int, default=0, help="score only the first N lines (0 = all)")
    sub.add_parser("config", help="print the default config as JSON")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def _cast(value: str, default, key: str):
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--config.{key}={value!r} is not a boolean")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"--config.{key}={value!r} is not {'an integer' if kind is int else 'a number'}") \
                    from None
    return value


def apply_overrides(config, overrides: list[str]):
    """Applies --config.KEY=VALUE arguments (values cast to the default's type); ConfigError for unknown keys."""
    for arg in overrides:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ConfigError(f"unrecognized argument {arg!r} (expected --config.KEY=VALUE)")
        key, value = arg[len("--config."):].split("=", 1)
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if part not in node or not hasattr(node[part], "keys"):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if parts[-1] not in node or hasattr(node[parts[-1]], "keys"):
            raise ConfigError(f"unknown config key {key!r}")
        node[parts[-1]] = _cast(value, node[parts[-1]], key)
    return config


def _read_lines(path: str, flag: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except OSError as e:
        raise UserError(f"cannot read {flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _run_config(loaded):
    from gpt_jax import encdec_train

    config = encdec_train.seq2seq_config()
    run = loaded.run or {}
    for key in ("max_source_len",):
        if key in run:
            config[key] = run[key]
    if "decode" in run:
        config.decode.update(run["decode"])
    return config


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    from gpt_jax import encdec_train

    if args.command == "config":
        print(encdec_train.seq2seq_config().to_json(indent=2))
        return
    if args.command == "train":
        config = apply_overrides(encdec_train.seq2seq_config(), overrides)
        result = encdec_train.train_and_evaluate(config, args.workdir)
        print(json.dumps(result))
        return
    loaded = encdec_train.load_workdir(args.workdir)
    config = _run_config(loaded)
    if args.max_new_tokens:
        config.decode.max_new_tokens = args.max_new_tokens
    if args.batch_size:
        config.decode.batch_size = args.batch_size
    if args.command == "translate":
        sources = _read_lines(args.input, "--input")
        hyps = encdec_train.translate_texts(
            loaded.model, loaded.vocab, sources, max_source_len=config.max_source_len,
            max_new_tokens=config.decode.max_new_tokens, batch_size=config.decode.batch_size,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        text = "".join(h.replace("\n", " ") + "\n" for h in hyps)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return
    sources, references = _read_lines(args.source, "--source"), _read_lines(args.reference, "--reference")
    if len(sources) != len(references):
        raise UserError(f"--source has {len(sources)} lines but --reference has {len(references)}")
    limit = args.limit or None
    result = encdec_train.evaluate_translation(loaded.model, loaded.vocab, sources[:limit], references[:limit],
                                               config)
    print(json.dumps({"step": loaded.step, **result}))


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        run(args, overrides)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
