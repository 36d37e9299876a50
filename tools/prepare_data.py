"""Prepare a training corpus: read, clean, deduplicate, split, train a tokenizer, tokenize, write TFRecord shards.

    python tools/prepare_data.py --input='books/*.txt' --output_dir=data/books [--doc_split=paragraph]
        [--format=text|jsonl] [--text_field=text] [--tfds=NAME:SPLIT] [--tokenizer=sentencepiece|char]
        [--vocab_size=N] [--val_fraction=F] [--dedup=exact,near] [Beam pipeline options, e.g. --runner=DirectRunner]

Writes DIR/tokenizer/, DIR/train-*.tfrecord, DIR/val-*.tfrecord and DIR/manifest.json, and prints a summary. Train
on it with `python -m gpt_jax.main --config=... --config.data.path=DIR`. Flags this tool does not know are Apache
Beam pipeline options (DirectRunner by default; e.g. --direct_num_workers=2 --direct_running_mode=multi_processing).
Exit codes: 0 success, 2 a bad flag or input (one `error: ...` line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        _fail(message)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def make_parser() -> argparse.ArgumentParser:
    from gpt_jax.data import corpus

    d = corpus.CorpusOptions(output_dir="")
    p = _Parser(description=__doc__.split("\n\n")[0], epilog="Other --flags are passed to Apache Beam.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default="", help="comma-separated files or globs (.gz is read compressed)")
    p.add_argument("--val_input", default="", help="files whose documents are all validation (then "
                   "--val_fraction is not used)")
    p.add_argument("--output_dir", required=True, help="where shards, tokenizer/ and manifest.json go")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's output in --output_dir")
    p.add_argument("--format", default=d.format, help="text | jsonl")
    p.add_argument("--text_field", default=d.text_field, help="JSONL/TFDS field holding the text (a/b for nested)")
    p.add_argument("--tfds", default="", help="NAME:SPLIT of a TFDS dataset prepared locally")
    p.add_argument("--tfds_data_dir", default="", help="TFDS data directory (default: TFDS's own)")
    p.add_argument("--doc_split", default=d.doc_split,
                   help="text files: one document per file, per blank-line-separated paragraph, or per line")
    p.add_argument("--strip_gutenberg", action="store_true", help="remove Project Gutenberg headers and footers")
    p.add_argument("--min_chars", type=int, default=d.min_chars, help="drop documents shorter than this")
    p.add_argument("--dedup", default=",".join(d.dedup), help="exact, near, both (exact,near) or none")
    p.add_argument("--near_threshold", type=float, default=d.near_threshold,
                   help="near duplicates: estimated Jaccard similarity of word shingles at or above this")
    p.add_argument("--num_perm", type=int, default=d.num_perm, help="MinHash permutations")
    p.add_argument("--shingle_size", type=int, default=d.shingle_size, help="words per shingle")
    p.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="fraction of documents (by hash) for validation")
    p.add_argument("--tokenizer", default=d.tokenizer, help="sentencepiece | char")
    p.add_argument("--vocab_size", type=int, default=d.vocab_size, help="SentencePiece vocabulary size")
    p.add_argument("--model_type", default=d.model_type, help="SentencePiece model: bpe | unigram")
    p.add_argument("--tokenizer_sample_chars", type=int, default=d.tokenizer_sample_chars,
                   help="about how many characters of training text the tokenizer is trained on")
    p.add_argument("--num_shards", type=int, default=0, help="training shards (0: one per ~16M tokens, power of 2)")
    p.add_argument("--val_shards", type=int, default=0, help="validation shards (0: automatic)")
    p.add_argument("--seed", type=int, default=0, help="salts the split, the tokenizer sample and MinHash")
    return p


def beam_options(args: list[str]):
    """Beam PipelineOptions from the flags this tool does not know; refuses unknown flags and the DirectRunner's
    multi_threading mode (it loses documents)."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from gpt_jax.errors import DataError

    known = set(PipelineOptions([]).get_all_options(drop_default=False))
    for arg in args:
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            raise DataError(f"unexpected argument {arg!r}")
        if name[2:] not in known:
            raise DataError(f"unknown flag {name} (neither this tool's nor an Apache Beam pipeline option)")
    options = PipelineOptions(args)
    if options.view_as(DirectOptions).direct_running_mode == "multi_threading":
        raise DataError("--direct_running_mode=multi_threading loses documents (a DirectRunner race); use "
                        "in_memory (the default) or multi_processing")
    defaults = [] if any(a.startswith("--runner") for a in args) else ["--runner=DirectRunner"]
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        defaults.append("--default_sdk_harness_log_level=WARNING")  # multi_processing workers log at INFO
    return PipelineOptions([*defaults, *args])


def summary(manifest: dict, seconds: float) -> str:
    """The manifest as a small table."""
    rows = [("documents read", manifest["documents_read"])]
    rows += [(f"  removed: {reason}", n) for reason, n in manifest["removed"].items() if n]
    rows.append(("documents kept", manifest["documents_kept"]))
    lines = [f"{name:<32}{value:>14,}" for name, value in rows]
    lines.append("")
    lines.append(f"{'split':<8}{'documents':>12}{'tokens':>14}{'bytes':>14}{'shards':>8}")
    for split in ("train", "val"):
        n_shards = sum(1 for s in manifest["shards"] if s["split"] == split)
        lines.append(f"{split:<8}{manifest['documents'][split]:>12,}{manifest['tokens'][split]:>14,}"
                     f"{manifest['bytes'][split]:>14,}{n_shards:>8}")
    tok = manifest["tokenizer"]
    lines.append("")
    lines.append(f"tokenizer: {tok['kind']}{' ' + tok.get('model_type', '') if tok['kind'] != 'char' else ''}, "
                 f"vocabulary {tok['vocab_size']:,}, eos_id {tok['eos_id']}")
    near = manifest.get("near_dedup") or {}
    if near:
        lines.append(f"near dedup: threshold {near['threshold']}, {near['num_perm']} permutations = {near['bands']} "
                     f"bands x {near['rows']} rows, {near['candidate_pairs']:,} candidate pairs, "
                     f"{near['near_pairs']:,} above the threshold")
    total_tokens = sum(manifest["tokens"].values())
    lines.append(f"time {seconds:.1f}s: {total_tokens / max(seconds, 1e-9):,.0f} tokens/s, "
                 f"{sum(manifest['bytes'].values()) / 1e6 / max(seconds, 1e-9):.2f} MB/s")
    return "\n".join(lines)


def _user_message(exc: BaseException) -> str | None:
    """The message of a gpt_jax user error raised inside the pipeline (Beam re-raises it, wrapped), else None."""
    from gpt_jax.errors import UserError

    if isinstance(exc, UserError):
        return str(exc).split(" [while running")[0].strip()
    text = str(exc)
    for marker in ("DataError: ", "UserError: ", "ConfigError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].split("\n")[0].split(" [while running")[0].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # Beam logs optional-dependency warnings on import
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # and worker errors, which we report below
    from gpt_jax.data import corpus
    from gpt_jax.errors import UserError

    args, rest = make_parser().parse_known_args(argv)
    dedup = tuple(k.strip() for k in args.dedup.split(",") if k.strip() and k.strip() != "none")
    opts = corpus.CorpusOptions(
        output_dir=args.output_dir, inputs=[args.input] if args.input else [],
        val_inputs=[args.val_input] if args.val_input else [], format=args.format, text_field=args.text_field,
        tfds=args.tfds, tfds_data_dir=args.tfds_data_dir, doc_split=args.doc_split,
        strip_gutenberg=args.strip_gutenberg, min_chars=args.min_chars, dedup=dedup,
        near_threshold=args.near_threshold, num_perm=args.num_perm, shingle_size=args.shingle_size,
        val_fraction=args.val_fraction, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        model_type=args.model_type, tokenizer_sample_chars=args.tokenizer_sample_chars, num_shards=args.num_shards,
        val_shards=args.val_shards, seed=args.seed)
    # Beam's multi_processing workers are fresh interpreters: let them import gpt_jax from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    try:
        options = beam_options(rest)
        manifest = corpus.prepare(opts, options, overwrite=args.overwrite)
    except UserError as e:
        _fail(_user_message(e))
    except Exception as e:  # a user error raised in a Beam worker comes back wrapped
        message = _user_message(e)
        if message is None:
            raise
        _fail(message)
    print(summary(manifest, time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
