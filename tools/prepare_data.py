"""Prepare a training corpus: read, clean, deduplicate, split, train a tokenizer, tokenize, write TFRecord shards.

    python tools/prepare_data.py --input='books/*.txt' --output_dir=data/books [--doc_split=paragraph]
        [--format=text|jsonl] [--text_field=text] [--tfds=NAME:SPLIT] [--tokenizer=sentencepiece|char]
        [--vocab_size=N] [--val_fraction=F] [--dedup=exact,near] [Beam pipeline options, e.g. --runner=DirectRunner]

Writes DIR/tokenizer/, DIR/train-*.tfrecord, DIR/val-*.tfrecord and DIR/manifest.json, and prints a summary; while
it runs, a progress line on stderr every --progress seconds. Train on it with `python -m gpt_jax.main --config=...
--config.data.path=DIR`. Flags this tool does not know are Apache Beam pipeline options: by default the
DirectRunner with one worker process per core (--direct_running_mode=multi_processing --direct_num_workers=CORES;
--direct_num_workers=1 runs in this process). Exit codes: 0 success, 2 a bad flag or input (one `error: ...` line
on stderr), 1 anything else.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from absl import flags

from gpt_jax import cli
from gpt_jax.errors import DataError, UserError

try:
    cli.require("data", "apache_beam")
except UserError as e:
    cli.fail(str(e))
logging.getLogger().setLevel(logging.ERROR)  # Beam logs optional-dependency warnings on import
logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # and worker errors, which main reports

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions  # noqa: E402

from gpt_jax.data import corpus  # noqa: E402

# Each flag is named as its corpus.CorpusOptions field and takes its default from there (--input, --val_input and
# --dedup are strings for that class's lists).
_D = corpus.CorpusOptions(output_dir="")
flags.DEFINE_string("input", "", "comma-separated files or globs (.gz is read compressed)")
flags.DEFINE_string("val_input", "", "files whose documents are all validation (then --val_fraction is not used)")
flags.DEFINE_string("output_dir", None, "where shards, tokenizer/ and manifest.json go")
flags.DEFINE_bool("overwrite", False, "replace an earlier run's output in --output_dir")
flags.DEFINE_string("format", _D.format, "text | jsonl")
flags.DEFINE_string("text_field", _D.text_field, "JSONL/TFDS field holding the text (a/b for nested)")
flags.DEFINE_string("tfds", _D.tfds, "NAME:SPLIT of a TFDS dataset prepared locally")
flags.DEFINE_string("tfds_data_dir", _D.tfds_data_dir, "TFDS data directory (default: TFDS's own)")
flags.DEFINE_string("doc_split", _D.doc_split,
                    "text files: one document per file, per blank-line-separated paragraph, or per line")
flags.DEFINE_bool("strip_gutenberg", _D.strip_gutenberg, "remove Project Gutenberg headers and footers")
flags.DEFINE_integer("min_chars", _D.min_chars, "drop documents shorter than this")
flags.DEFINE_string("dedup", ",".join(_D.dedup), "exact, near, both (exact,near) or none")
flags.DEFINE_float("near_threshold", _D.near_threshold,
                   "near duplicates: estimated Jaccard similarity of word shingles at or above this")
flags.DEFINE_integer("num_perm", _D.num_perm, "MinHash permutations")
flags.DEFINE_integer("shingle_size", _D.shingle_size, "words per shingle")
flags.DEFINE_float("val_fraction", _D.val_fraction, "fraction of documents (by hash) for validation")
flags.DEFINE_string("tokenizer", _D.tokenizer, "sentencepiece | char")
flags.DEFINE_integer("vocab_size", _D.vocab_size, "SentencePiece vocabulary size")
flags.DEFINE_string("model_type", _D.model_type, "SentencePiece model: bpe | unigram")
flags.DEFINE_integer("tokenizer_sample_chars", _D.tokenizer_sample_chars,
                     "about how many characters of training text the tokenizer is trained on")
flags.DEFINE_integer("num_shards", _D.num_shards,
                     "training shards (0: one per ~64 MB of text, about 16M tokens; a power of 2)")
flags.DEFINE_integer("val_shards", _D.val_shards, "validation shards (0: automatic)")
flags.DEFINE_integer("seed", _D.seed, "salts the split, the tokenizer sample and MinHash")
flags.DEFINE_float("progress", 5.0, "seconds between progress lines on stderr (0: none)")
flags.mark_flag_as_required("output_dir")


def parse_flags(argv: list[str]) -> list[str]:
    """This tool's flags, parsed as every tool's are (`--help` exits 0, a bad value is one error line); the
    arguments left over are Apache Beam pipeline options."""
    if any(arg in cli._HELP for arg in argv[1:]):
        cli.parse_flags(argv)  # prints the usage and exits
    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as e:
        cli.fail(str(e).splitlines()[0])


def corpus_options() -> corpus.CorpusOptions:
    """The parsed flags as CorpusOptions."""
    f = flags.FLAGS
    values = {field.name: f[field.name].value for field in dataclasses.fields(corpus.CorpusOptions) if field.name in f}
    values.update(inputs=[f.input] if f.input else [], val_inputs=[f.val_input] if f.val_input else [],
                  dedup=tuple(k.strip() for k in f.dedup.split(",") if k.strip() and k.strip() != "none"))
    return corpus.CorpusOptions(**values)


def beam_options(args: list[str]):
    """Beam PipelineOptions from the flags this tool does not know; refuses unknown flags and the DirectRunner's
    multi_threading mode (it loses documents)."""
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
                        "multi_processing (the default) or in_memory")
    defaults = [] if any(a.startswith("--runner") for a in args) else ["--runner=DirectRunner"]
    defaults += corpus.direct_runner_flags(args)  # every core, unless the flags say otherwise
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        # multi_processing workers log at INFO, and warn of options they ignore; their errors reach this process
        defaults.append("--default_sdk_harness_log_level=ERROR")
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
    asked = manifest["options"]["vocab_size"]
    if tok["kind"] == "sentencepiece" and tok["vocab_size"] < asked:
        lines.append(f"warning: --vocab_size={asked} is more than this corpus supports; the tokenizer has "
                     f"{tok['vocab_size']:,} pieces")
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
    if isinstance(exc, UserError):
        return str(exc).split(" [while running")[0].strip()
    text = str(exc)
    for marker in ("DataError: ", "UserError: ", "ConfigError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].split("\n")[0].split(" [while running")[0].strip()
    return None


def main(argv: list[str]) -> None:
    """Prepares the corpus the flags describe (argv[1:]: Beam pipeline options) and prints a summary."""
    opts = corpus_options()
    start = time.perf_counter()
    try:
        manifest = corpus.prepare(opts, beam_options(argv[1:]), overwrite=flags.FLAGS.overwrite,
                                  progress=flags.FLAGS.progress)
    except Exception as e:  # a user error raised in a Beam worker comes back wrapped
        message = _user_message(e)
        if message is None:
            raise
        raise UserError(message) from None
    print(summary(manifest, time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
