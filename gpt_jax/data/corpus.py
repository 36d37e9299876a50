"""Corpus preparation as an Apache Beam pipeline: read → clean → deduplicate → split → tokenizer → tokenize → shards
and manifest (`tools/prepare_data.py` is its command line).

Documents:
- text files: a whole file is one document (`doc_split="file"`), or each blank-line-separated paragraph
  (`"paragraph"`), or each line (`"line"`, e.g. Penn Treebank's one sentence per line);
- JSONL: each line is one JSON object, the document is its `text_field` (a "/"-separated path for nested fields);
- TFDS: each example of `NAME:SPLIT` (prepared in the local TFDS data directory), the document is `text_field`.
A document's id is (source index, position in the source), from the sorted input list, so ids, and every choice
made by id, are the same whatever the runner, worker count or bundle order.

Cleaning (`clean.clean_text`): line breaks, NFC, control characters, whitespace, optional Project Gutenberg
header/footer; documents shorter than `min_chars` are removed as `too_short`; bytes that are not UTF-8, JSON that
does not parse and objects without the text field are counted (`not_utf8`, `bad_json`, `no_text_field`), never
fatal.

Deduplication keeps the document with the smallest id of each group:
- exact: the same case-folded, whitespace-collapsed text (a 128-bit BLAKE2b hash of it);
- near: MinHash over word shingles, LSH bands for candidates, each candidate pair kept when the signatures agree
  in at least `near_threshold` of positions; groups are the connected components (union-find) of those pairs,
  among the documents that are not exact duplicates.

Split: a document is validation when a keyed hash of its text falls below `val_fraction` (or when it comes from
`val_inputs`), and the kept document with the smallest hash always is, so a split never comes out empty. A corpus
of so few documents that fewer than one would be expected in validation (one book, five books) is split inside
each document instead: its last `val_fraction` of lines (at a line start) is validation. The tokenizer
(SentencePiece BPE/unigram with byte fallback, or characters) is trained on the training documents whose keyed
hash falls below `tokenizer_sample_chars` / (characters of training text): about that many characters, whatever
the corpus size. Shards: document → shard by a hash of its id, documents in id order inside a shard; a shard is
written through a temporary file and a rename, so the same inputs give byte-identical shards and manifest on any
number of workers.

How it runs, and what each step holds (memory does not grow with the corpus except where said):
1. Read (one work item per input file, or per 20,000 TFDS examples): streams the file's documents (one 4 MiB
   chunk and one document at a time; `doc_split=file` and `--strip_gutenberg` hold one file), cleans each,
   and writes to a work directory beside the output (`.prepare_work/`, removed at the end) the cleaned text and,
   per document, its id, two keyed hashes and lengths (48 bytes), its exact-dedup hash with its id (24 bytes), its
   MinHash signature (4 bytes × num_perm) and its LSH band hashes with its id (16 bytes × bands), the hash files
   in bucket order. Only a summary per file goes through Beam. Work files: about the cleaned text's size plus
   ~1.7 KB per document at the default 256 permutations.
2. Exact groups (one task per hash bucket; one bucket per ~2 GB of input): 24 bytes per document of its bucket,
   while it runs. Emits the ids of the exact duplicates.
3. LSH groups (one task per band and bucket): 16 bytes per document of its bucket; emits candidate pairs
   (16 bytes each). Verification (grouped by pair) reads the two signatures from the work files (memory-mapped);
   the union-find holds the verified pairs (16 bytes each).
4. The removal decisions (id and reason of every removed document: 9 bytes each) and the split's totals (a few
   numbers) are side inputs of the later steps: these, and the candidate pairs, grow with the number of
   duplicates; nothing else in the driver grows with the corpus.
5. Tokenizer: the sample (at most about `tokenizer_sample_chars` characters) goes through Beam to one trainer.
6. Tokenize: each file's kept documents are read back from the work directory a batch at a time, tokenized and
   written as TFRecords to one fragment file per (file, split, shard), in id order.
7. Shards: each shard is its fragments concatenated in file order (streamed, 1 MiB at a time).
In the DirectRunner every PCollection lives in the driver's memory, so keeping per-document data out of them
(steps 1, 6) is what bounds it; on Dataflow the work directory must be on a filesystem every worker sees.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import clean, minhash, shards
from gpt_jax.data import text as text_lib
from gpt_jax.errors import DataError

REASONS = ("not_utf8", "bad_json", "no_text_field", "too_short", "exact_duplicate", "near_duplicate")
DEDUP_KINDS = ("exact", "near")
FORMATS = ("text", "jsonl")
TOKENIZERS = ("sentencepiece", "char")
MODEL_TYPES = ("bpe", "unigram")
CHAR_EOS = "\x03"  # END OF TEXT: the character tokenizer's document separator (cleaning removes it from text)
SHARD_TARGET_BYTES = 1 << 26  # automatic shard count: about 64 MB of text (~16M tokens) per shard
WORK_DIR = ".prepare_work"  # inside --output_dir while the pipeline runs
TFDS_RANGE = 20_000  # TFDS examples per work item
_SOURCE_BITS = 40  # document id = source index << 40 | position in the source
_TAIL_ID = 1 << 62  # added to a document's id for its validation tail
_CHUNK_BYTES = 1 << 22  # read and write files this much at a time
_BATCH_DOCS = 2048  # documents cleaned, hashed or tokenized together
_EXACT, _NEAR = 0, 1  # reason codes of the decisions
_TRAIN, _VAL, _TAIL = 0, 1, 2  # split codes: whole to train, whole to validation, head to train and tail to val
_META = np.dtype([("id", "<i8"), ("split_u", "<f8"), ("sample_u", "<f8"), ("chars", "<i8"), ("nbytes", "<i8")])
_EXACT_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("id", "<i8")])
_BAND_RECORD = np.dtype([("key", "<u8"), ("id", "<i8")])


@dataclasses.dataclass
class CorpusOptions:
    """What `prepare` does; the fields mirror the flags of `tools/prepare_data.py`."""

    output_dir: str
    inputs: list[str] = dataclasses.field(default_factory=list)  # comma-separated globs, as given
    val_inputs: list[str] = dataclasses.field(default_factory=list)  # files that are all validation
    format: str = "text"
    text_field: str = "text"
    tfds: str = ""  # NAME:SPLIT
    tfds_data_dir: str = ""
    doc_split: str = "file"
    strip_gutenberg: bool = False
    min_chars: int = 32
    dedup: tuple[str, ...] = DEDUP_KINDS
    near_threshold: float = 0.75
    num_perm: int = 256
    shingle_size: int = 5
    val_fraction: float = 0.05
    tokenizer: str = "sentencepiece"
    vocab_size: int = 32768
    model_type: str = "bpe"
    tokenizer_sample_chars: int = 20_000_000
    num_shards: int = 0  # training shards; 0 = about one per 64 MB of text, rounded up to a power of two
    val_shards: int = 0
    seed: int = 0

    def check(self) -> None:
        """Raises DataError naming the first flag whose value cannot work."""
        choices = {"format": FORMATS, "doc_split": clean.DOC_SPLITS, "tokenizer": TOKENIZERS,
                   "model_type": MODEL_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DataError(f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for kind in self.dedup:
            if kind not in DEDUP_KINDS:
                raise DataError(f"--dedup: {kind!r} is not one of {', '.join(DEDUP_KINDS)} (or none)")
        if not self.inputs and not self.tfds:
            raise DataError("--input or --tfds is required")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 < self.near_threshold <= 1.0:
            raise DataError(f"--near_threshold={self.near_threshold} must be in (0, 1]")
        for name, low in (("num_perm", 1), ("shingle_size", 1), ("min_chars", 0), ("num_shards", 0),
                          ("val_shards", 0), ("vocab_size", 1), ("tokenizer_sample_chars", 1)):
            if getattr(self, name) < low:
                raise DataError(f"--{name}={getattr(self, name)} must be at least {low}")
        if self.tfds and ":" not in self.tfds:
            raise DataError(f"--tfds={self.tfds!r} must be NAME:SPLIT (e.g. imdb_reviews:train)")


# ----------------------------------------------------------------------------------------------------------------
# Reading (pure functions, one source at a time)


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_bytes(path: str) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _chunks(path: str):
    """The bytes of a file (decompressed when .gz), _CHUNK_BYTES at a time."""
    try:
        with _open(path) as f:
            while chunk := f.read(_CHUNK_BYTES):
                yield chunk
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _decoded(path: str):
    decoder = codecs.getincrementaldecoder("utf-8")()
    for chunk in _chunks(path):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def _is_utf8(path: str) -> bool:
    try:
        for _ in _decoded(path):
            pass
    except UnicodeDecodeError:
        return False
    return True


def read_text_file(raw: bytes, doc_split: str, gutenberg: bool):
    """Documents of a text file: yields (text, None), or (None, reason) for a piece that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for piece in clean.split_document_bytes(raw, doc_split):
            try:
                yield piece.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, "not_utf8"
        return
    text = clean.normalize_line_breaks(text)
    if gutenberg:
        text = clean.strip_gutenberg(text)
    for doc in clean.split_documents(text, doc_split):
        yield doc, None


def text_file_documents(path: str, doc_split: str, gutenberg: bool):
    """`read_text_file` of the file at `path`, streamed: one chunk and one document in memory at a time (a whole
    file for `doc_split="file"` or `gutenberg`, whose markers are searched in the whole text)."""
    if doc_split == "file" or gutenberg:
        yield from read_text_file(_read_bytes(path), doc_split, gutenberg)
    elif _is_utf8(path):  # decoded as a whole, as read_text_file decides
        for doc in clean.iter_split_documents(clean.iter_normalize_line_breaks(_decoded(path)), doc_split):
            yield doc, None
    else:
        for piece in clean.iter_split_document_bytes(_chunks(path), doc_split):
            try:
                yield piece.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, "not_utf8"


def _field(obj, path: str):
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def jsonl_documents(lines, text_field: str):
    """Documents of a JSONL file (bytes, or an iterable of its lines), one per non-blank line: yields (text, None)
    or (None, reason)."""
    for _, value in text_lib.parse_jsonl(lines.split(b"\n") if isinstance(lines, bytes) else lines):
        if isinstance(value, ValueError):
            yield None, "not_utf8" if isinstance(value, UnicodeDecodeError) else "bad_json"
        elif isinstance(document := _field(value, text_field), str):
            yield document, None
        else:
            yield None, "no_text_field"


def _jsonl_lines(path: str):
    try:
        with _open(path) as f:
            yield from f
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def tfds_num_examples(name_split: str, data_dir: str, text_field: str) -> int:
    """Checks that the TFDS dataset is prepared locally and has the text field; returns the split's size."""
    import tensorflow_datasets as tfds

    name, split = name_split.rsplit(":", 1)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        info = builder.info
    except Exception as e:  # tfds raises many types for unknown or unreadable datasets
        raise DataError(f"--tfds={name_split}: {str(e).strip().splitlines()[0]}") from None
    if not info.splits:
        raise DataError(f"--tfds={name_split}: {name} is not prepared in {builder.data_dir} (this tool reads "
                        f"prepared datasets only; prepare it with tfds, or set --tfds_data_dir)")
    if split not in info.splits:
        raise DataError(f"--tfds={name_split}: no split {split!r} (has {', '.join(sorted(info.splits))})")
    if _field(dict(info.features), text_field) is None:
        raise DataError(f"--tfds={name_split}: no feature {text_field!r} (has {', '.join(sorted(info.features))}); "
                        f"set --text_field")
    return int(info.splits[split].num_examples)


def _tfds_documents(opts: CorpusOptions, begin: int, end: int):
    import tensorflow_datasets as tfds

    name, split = opts.tfds.rsplit(":", 1)
    builder = tfds.builder(name, data_dir=opts.tfds_data_dir or None)
    for example in tfds.as_numpy(builder.as_dataset(split=f"{split}[{begin}:{end}]", shuffle_files=False)):
        value = _field(example, opts.text_field)
        if isinstance(value, bytes):
            try:
                yield value.decode("utf-8"), None
            except UnicodeDecodeError:
                yield None, "not_utf8"
        elif isinstance(value, str):
            yield value, None
        else:
            yield None, "no_text_field"


# ----------------------------------------------------------------------------------------------------------------
# The plan: work items and where their files go


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work item: a file (`path`), or TFDS examples [begin, end) (`path` empty), of source `source`."""

    index: int
    source: int
    path: str = ""
    is_val: bool = False
    begin: int = 0
    end: int = 0
    size: int = 0  # bytes on disk (files), for progress

    @property
    def first_id(self) -> int:
        return _doc_id(self.source, self.begin)


@dataclasses.dataclass
class _Plan:
    """Everything the steps share (pickled into each of them)."""

    opts: CorpusOptions
    units: list[Unit]
    work: str
    buckets: int  # hash buckets of the exact and LSH groups: work items of bounded size
    bands: int = 0
    rows: int = 0
    val_fraction: float = 0.0  # the hash split's fraction: 0 when validation files are given

    @property
    def hasher(self) -> minhash.MinHasher:
        return minhash.MinHasher(self.opts.num_perm, self.opts.shingle_size, self.opts.seed)

    def key(self, name: str) -> bytes:
        return name.encode() + self.opts.seed.to_bytes(8, "little")

    def path(self, unit: int, ext: str) -> str:
        return os.path.join(self.work, f"u{unit:06d}.{ext}")

    def load(self, unit: int, ext: str, dtype) -> np.ndarray:
        path = self.path(unit, ext)
        return np.fromfile(path, dtype) if os.path.exists(path) else np.zeros(0, dtype)


def _doc_id(source: int, index: int) -> int:
    return source << _SOURCE_BITS | index


def _keyed_unit(text: str | bytes, key: bytes) -> float:
    """A number in [0, 1) from a keyed hash of the text: the same document always gets the same one."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little") / 2**64


def _member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` are in the sorted array `sorted_ids`: bool [len(ids)]."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Step 1: read, clean, hash, and write the work files


def _unit_documents(unit: Unit, opts: CorpusOptions):
    if not unit.path:
        return _tfds_documents(opts, unit.begin, unit.end)
    if opts.format == "jsonl":
        return jsonl_documents(_jsonl_lines(unit.path), opts.text_field)
    return text_file_documents(unit.path, opts.doc_split, opts.strip_gutenberg)


class _WorkFiles:
    """The work files of one unit, appended a batch of cleaned documents at a time."""

    def __init__(self, plan: _Plan, unit: int):
        self.plan, self.unit = plan, unit
        opts = plan.opts
        self.exact = "exact" in opts.dedup
        self.hasher = plan.hasher if "near" in opts.dedup else None
        names = ["text", "meta", "ids"] + ["exact", "exact.count"] * self.exact
        names += ["sig", "band", "band.count"] * bool(self.hasher)
        self.files = {name: open(plan.path(unit, name), "wb") for name in names}
        self.split_key, self.sample_key = plan.key("split"), plan.key("sample")
        self.batches: list[int] = []
        self.docs = self.nbytes = 0

    def add(self, ids: list[int], texts: list[str]) -> None:
        if not texts:
            return
        data = [t.encode("utf-8") for t in texts]
        self.files["text"].write(b"\x00".join(data) + b"\x00")  # cleaning removed every NUL from the text
        meta = np.zeros(len(texts), _META)
        meta["id"] = ids
        meta["chars"] = [len(t) for t in texts]
        meta["nbytes"] = [len(d) for d in data]
        meta["split_u"] = [_keyed_unit(d, self.split_key) for d in data]
        meta["sample_u"] = [_keyed_unit(d, self.sample_key) for d in data]
        self.files["meta"].write(meta.tobytes())
        self.files["ids"].write(meta["id"].tobytes())
        if self.exact or self.hasher:
            normalized = [clean.normalize_for_dedup(t) for t in texts]
        if self.exact:
            digests = b"".join(hashlib.blake2b(n.encode("utf-8"), digest_size=16).digest() for n in normalized)
            record = np.zeros(len(texts), _EXACT_RECORD)
            pair = np.frombuffer(digests, "<u8").reshape(-1, 2)
            record["hi"], record["lo"], record["id"] = pair[:, 0], pair[:, 1], meta["id"]
            self._write_bucketed("exact", record[None], record["hi"][None])
        if self.hasher:
            signatures = self.hasher.signatures(normalized)
            self.files["sig"].write(signatures.tobytes())
            record = np.zeros((self.plan.bands, len(texts)), _BAND_RECORD)  # [bands, batch]
            record["key"] = minhash.band_hashes(signatures, self.plan.bands, self.plan.rows).T
            record["id"] = meta["id"][None, :]
            self._write_bucketed("band", record, record["key"])
        self.batches.append(len(texts))
        self.docs += len(texts)
        self.nbytes += int(meta["nbytes"].sum())

    def _write_bucketed(self, name: str, records: np.ndarray, hashes: np.ndarray) -> None:
        """Appends records [rows, batch] with each row's records in bucket order (hash % buckets), and the count
        per (row, bucket) to NAME.count, so that a bucket's task reads its records only."""
        buckets = self.plan.buckets
        bucket = (hashes % np.uint64(buckets)).astype(np.int64)
        order = np.argsort(bucket, axis=1, kind="stable")
        self.files[name].write(np.take_along_axis(records, order, axis=1).tobytes())
        rows = np.arange(len(records))[:, None] * buckets
        counts = np.bincount((bucket + rows).ravel(), minlength=len(records) * buckets).astype(np.uint32)
        self.files[f"{name}.count"].write(counts.tobytes())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class _ReadUnit(beam.DoFn):
    """Step 1 for one unit: emits its summary (counts, and the batch sizes of its band file)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def process(self, index: int):
        plan, unit = self.plan, self.plan.units[index]
        opts = plan.opts
        gutenberg = opts.strip_gutenberg and (opts.format == "jsonl" or not unit.path)
        min_chars = max(opts.min_chars, 1)
        work = _WorkFiles(plan, index)
        removed: collections.Counter = collections.Counter()
        ids: list[int] = []
        texts: list[str] = []
        read = 0
        for position, (text, reason) in enumerate(_unit_documents(unit, opts)):
            read += 1
            if reason:
                removed[reason] += 1
                continue
            text = clean.clean_text(text, gutenberg=gutenberg)
            if len(text) < min_chars:
                removed["too_short"] += 1
                continue
            ids.append(unit.first_id + position)
            texts.append(text)
            if len(texts) == _BATCH_DOCS:
                work.add(ids, texts)
                ids, texts = [], []
        work.add(ids, texts)
        work.close()
        summary = {"unit": index, "read": read, "removed": dict(removed), "docs": work.docs,
                   "batches": work.batches, "bytes": work.nbytes, "size": unit.size or work.nbytes}
        _write_json(plan.path(index, "read.json"), summary)
        yield summary


def _iter_texts(plan: _Plan, unit: int):
    """The cleaned texts of a unit's work file, in order, as UTF-8 bytes."""
    path = plan.path(unit, "text")
    if not os.path.exists(path):
        return
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            texts = (carry + chunk).split(b"\x00")  # every text ends with a NUL
            carry = texts.pop()
            yield from texts


# ----------------------------------------------------------------------------------------------------------------
# Steps 2-4: exact and near-duplicate groups, then the decisions


def _bucket_records(plan: _Plan, summary: dict, name: str, dtype, rows: int, row: int, bucket: int) -> np.ndarray:
    """The records of `bucket` in row `row` of a unit's bucketed work file (see `_WorkFiles._write_bucketed`)."""
    unit = summary["unit"]
    counts = plan.load(unit, f"{name}.count", np.uint32).reshape(-1, rows, plan.buckets).astype(np.int64)
    records = np.memmap(plan.path(unit, name), dtype, mode="r")
    before = counts[:, row, :bucket].sum(axis=1)
    starts = np.cumsum([0, *summary["batches"][:-1]]) * rows + row * np.array(summary["batches"]) + before
    return np.concatenate([np.array(records[a:a + n]) for a, n in zip(starts.tolist(), counts[:, row, bucket].tolist(),
                                                                     strict=True)] or [np.zeros(0, dtype)])


def _exact_task(bucket: int, plan: _Plan, read: list) -> np.ndarray:
    """The ids of the exact duplicates among the documents whose hash falls in `bucket` (sorted)."""
    parts = [_bucket_records(plan, s, "exact", _EXACT_RECORD, 1, 0, bucket) for s in read if s["docs"]]
    records = np.concatenate(parts) if parts else np.zeros(0, _EXACT_RECORD)
    records = records[np.lexsort((records["id"], records["lo"], records["hi"]))]
    repeat = (records["hi"][1:] == records["hi"][:-1]) & (records["lo"][1:] == records["lo"][:-1])
    return np.sort(records["id"][1:][repeat])  # all but the first (smallest id) of each run of one hash


def _lsh_task(task: tuple[int, int], plan: _Plan, read: list, exact: list) -> np.ndarray:
    """Candidate pairs [n, 2] (a < b) of documents that agree on band `task[0]`, among those whose band hash falls
    in bucket `task[1]` and that are not exact duplicates."""
    band, bucket = task
    exact_ids = np.sort(np.concatenate(exact)) if exact else np.zeros(0, np.int64)
    parts = [_bucket_records(plan, s, "band", _BAND_RECORD, plan.bands, band, bucket) for s in read if s["docs"]]
    records = np.concatenate(parts) if parts else np.zeros(0, _BAND_RECORD)
    records = records[~_member(exact_ids, records["id"])]
    records = records[np.lexsort((records["id"], records["key"]))]
    keys, ids = records["key"], records["id"]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    sizes = np.diff(np.append(starts, len(keys)))
    pairs = [pair for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True)
             for pair in minhash.candidate_pairs(ids[start:start + size].tolist())]
    return np.array(pairs, np.int64).reshape(-1, 2)


def _pair_buckets(pairs: np.ndarray, buckets: int):
    """(bucket, pairs) so that every copy of a pair (it can come from several bands) meets in one group."""
    bucket = (pairs[:, 0] * 0x9E3779B1 + pairs[:, 1]) % buckets
    for b in np.unique(bucket).tolist():
        yield b, pairs[bucket == b]


class _Signatures:
    """Signature rows by document id, from the units' work files (memory-mapped)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.first_ids = np.array([u.first_id for u in plan.units], np.int64)
        self.units: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.plan.opts.num_perm), np.uint32)
        unit_of = np.searchsorted(self.first_ids, ids, side="right") - 1
        for unit in np.unique(unit_of).tolist():
            if unit not in self.units:
                sigs = np.memmap(self.plan.path(unit, "sig"), np.uint32, mode="r").reshape(-1, self.plan.opts.num_perm)
                self.units[unit] = (self.plan.load(unit, "ids", np.int64), sigs)
            unit_ids, sigs = self.units[unit]
            take = unit_of == unit
            out[take] = sigs[np.searchsorted(unit_ids, ids[take])]
        return out


def _verify(item, plan: _Plan) -> dict:
    """A group of candidate pairs: the distinct ones, and those whose signatures agree in at least the threshold's
    fraction of positions (the near-duplicate edges)."""
    pairs = np.unique(np.concatenate(list(item[1])), axis=0)
    signatures = _Signatures(plan)
    agree = np.zeros(len(pairs), np.int64)
    for lo in range(0, len(pairs), 4096):
        a = signatures.rows(pairs[lo:lo + 4096, 0])
        b = signatures.rows(pairs[lo:lo + 4096, 1])
        agree[lo:lo + 4096] = (a == b).sum(axis=1)
    near = agree / plan.opts.num_perm >= plan.opts.near_threshold - 1e-9
    return {"candidates": len(pairs), "edges": pairs[near]}


def _near_removals(item) -> np.ndarray:
    """Connected components of the near-duplicate pairs (union-find, the smaller root wins): every member but the
    component's smallest id is removed. Returns their ids, sorted."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent[x]
        return root

    for edges in item[1]:
        for a, b in edges.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return np.array(sorted(x for x in parent if find(x) != x), np.int64)


def _decide(_, exact: list, near: list) -> dict:
    """Every removed document: ids (sorted) and reasons (_EXACT or _NEAR)."""
    exact_ids = np.concatenate(exact) if exact else np.zeros(0, np.int64)
    near_ids = np.concatenate(near) if near else np.zeros(0, np.int64)
    ids = np.concatenate([exact_ids, near_ids]).astype(np.int64)
    reasons = np.concatenate([np.full(len(exact_ids), _EXACT, np.uint8), np.full(len(near_ids), _NEAR, np.uint8)])
    order = np.argsort(ids, kind="stable")
    return {"ids": ids[order], "reasons": reasons[order],
            "removed": {"exact_duplicate": len(exact_ids), "near_duplicate": len(near_ids)}}


# ----------------------------------------------------------------------------------------------------------------
# The split and its totals


def _kept_meta(plan: _Plan, unit: int, decisions: dict) -> np.ndarray:
    meta = plan.load(unit, "meta", _META)
    return meta[~_member(decisions["ids"], meta["id"])]


def _unit_stats(index: int, plan: _Plan, decisions: dict) -> dict:
    """What the split needs to know of one unit's kept documents."""
    meta = _kept_meta(plan, index, decisions)
    u = meta["split_u"]
    low = u < plan.val_fraction
    lowest = float(u.min()) if len(u) else 2.0
    at_lowest = (u == lowest) & ~low
    return {"unit": index, "is_val": plan.units[index].is_val, "kept": len(meta), "chars": int(meta["chars"].sum()),
            "bytes": int(meta["nbytes"].sum()), "low_chars": int(meta["chars"][low].sum()),
            "low_bytes": int(meta["nbytes"][low].sum()), "lowest": lowest,
            "lowest_chars": int(meta["chars"][at_lowest].sum()), "lowest_bytes": int(meta["nbytes"][at_lowest].sum())}


def auto_shards(nbytes: int) -> int:
    """About one shard per SHARD_TARGET_BYTES of text, rounded up to a power of two (so it divides host counts)."""
    return 1 << max(0, math.ceil(math.log2(max(nbytes, 1) / SHARD_TARGET_BYTES)))


def _totals(_, plan: _Plan, stats: list, read: list, decisions: dict) -> dict:
    """The corpus-wide numbers every later step needs: how documents split, shard counts, the tokenizer's sample
    rate, and the removal counts."""
    opts, vf = plan.opts, plan.val_fraction
    kept = sum(s["kept"] for s in stats)
    mode = "none" if not vf else "tail" if kept * vf < 1 else "hash"
    hashed = [s for s in stats if not s["is_val"]]
    lowest = min((s["lowest"] for s in hashed), default=2.0)
    total = {k: sum(s[k] for s in hashed) for k in ("chars", "bytes")}
    val_units = {k: sum(s[k] for s in stats if s["is_val"]) for k in ("chars", "bytes")}
    if mode == "hash":
        val = {k: sum(s[f"low_{k}"] + (s[f"lowest_{k}"] if s["lowest"] == lowest else 0) for s in hashed)
               for k in ("chars", "bytes")}
    elif mode == "tail":  # about: the cut is at a line start
        val = {"chars": 0, "bytes": int(total["bytes"] * vf)}
    else:
        val = {"chars": 0, "bytes": 0}
    train_bytes = total["bytes"] - val["bytes"]
    removed = collections.Counter(decisions["removed"])
    for summary in read:
        removed.update(summary["removed"])
    return {"kept": kept, "mode": mode, "lowest": lowest,
            "shards": {"train": opts.num_shards or auto_shards(train_bytes),
                       "val": opts.val_shards or auto_shards(val["bytes"] + val_units["bytes"])},
            "sample_rate": opts.tokenizer_sample_chars / max(total["chars"] - val["chars"], 1),
            "documents_read": sum(s["read"] for s in read),
            "removed": {reason: int(removed.get(reason, 0)) for reason in REASONS}}


def _split_codes(plan: _Plan, totals: dict, unit: Unit, meta: np.ndarray) -> np.ndarray:
    if unit.is_val:
        return np.full(len(meta), _VAL, np.uint8)
    if totals["mode"] == "tail":
        return np.full(len(meta), _TAIL, np.uint8)
    if totals["mode"] == "none":
        return np.full(len(meta), _TRAIN, np.uint8)
    u = meta["split_u"]
    return np.where((u < plan.val_fraction) | (u == totals["lowest"]), _VAL, _TRAIN).astype(np.uint8)


def _tail_cut(text: str, val_fraction: float) -> int:
    """Where a document's validation tail starts (a line start, else after a space), or 0: nothing to cut."""
    cut = text.find("\n", int(len(text) * (1.0 - val_fraction))) + 1 or text.rfind(" ") + 1
    return cut if 0 < cut < len(text) else 0


def _kept_documents(plan: _Plan, index: int, decisions: dict, totals: dict):
    """(meta row, split code, text) of each kept document of a unit, in id order."""
    meta = plan.load(index, "meta", _META)
    removed = _member(decisions["ids"], meta["id"])
    codes = _split_codes(plan, totals, plan.units[index], meta)
    for row, data in enumerate(_iter_texts(plan, index)):
        if not removed[row]:
            yield meta[row], int(codes[row]), data


def _pieces(doc_id: int, code: int, text: str, val_fraction: float):
    """(split, id, text) of what a document contributes: itself, or its head and its tail."""
    if code == _TAIL:
        cut = _tail_cut(text, val_fraction)
        if cut:
            return [("train", doc_id, text[:cut]), ("val", doc_id + _TAIL_ID, text[cut:])]
        return [("train", doc_id, text)]
    return [("val" if code == _VAL else "train", doc_id, text)]


# ----------------------------------------------------------------------------------------------------------------
# Step 5: the tokenizer


def _sample_unit(index: int, plan: _Plan, decisions: dict, totals: dict):
    """A unit's part of the tokenizer's sample: (hash, id, text) of the training text of each kept document whose
    keyed hash is below the sample rate; for the character tokenizer, the characters of all its kept text."""
    if plan.opts.tokenizer == "char":
        chars: set = set()
        for _, _, data in _kept_documents(plan, index, decisions, totals):
            chars.update(data.decode("utf-8"))
        yield "".join(sorted(chars))
        return
    for meta, code, data in _kept_documents(plan, index, decisions, totals):
        if code != _VAL and meta["sample_u"] < totals["sample_rate"]:
            text = data.decode("utf-8")
            if code == _TAIL:
                text = _pieces(0, code, text, plan.val_fraction)[0][2]
            yield float(meta["sample_u"]), int(meta["id"]), text


def _train_tokenizer(sample: list, opts: CorpusOptions) -> dict:
    directory = os.path.join(opts.output_dir, shards.TOKENIZER_DIR)
    if opts.tokenizer == "char":
        chars = "".join(sorted(set("".join(sample))))
        if not chars:
            raise DataError("no document was kept, so there is nothing to build a tokenizer from")
        tok = tokenizer_lib.CharTokenizer(CHAR_EOS + chars)
        tok.save(directory)
        return {"kind": "char", "vocab_size": tok.vocab_size, "eos_id": 0}
    if not sample:
        raise DataError("no training document was kept, so there is nothing to train the tokenizer on")
    lines = [line for _, _, text in sorted(sample) for line in text.splitlines(keepends=True)]
    tok = tokenizer_lib.SentencePieceTokenizer.train(lines, opts.vocab_size, directory, opts.model_type)
    return {"kind": "sentencepiece", "model_type": opts.model_type, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id}


# ----------------------------------------------------------------------------------------------------------------
# Steps 6-7: tokenize into fragments, concatenate them into shards


def _shard_of(doc_id: int, count: int) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.to_bytes(8, "little"), digest_size=8).digest(), "little") % count


def _fragment_path(plan: _Plan, unit: int, split: str, shard: int) -> str:
    return os.path.join(plan.work, f"f-{split}-{shard:05d}-u{unit:06d}.tfrecord")


class _WriteUnit(beam.DoFn):
    """Step 6 for one unit: tokenizes its kept documents and appends their records to its fragment files."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def setup(self):
        self._tokenizer = None

    def _encode(self, texts: list[str]) -> list:
        if self._tokenizer is None:  # loaded once per worker, from the path the training step wrote
            self._tokenizer = tokenizer_lib.load_tokenizer(os.path.join(self.plan.opts.output_dir,
                                                                        shards.TOKENIZER_DIR))
        sp = getattr(self._tokenizer, "sp", None)
        return sp.encode(texts) if sp is not None else [self._tokenizer.encode(t) for t in texts]

    def process(self, index: int, decisions: dict, totals: dict, tokenizer: dict):
        plan = self.plan
        files: dict = {}
        counts: dict = collections.defaultdict(lambda: [0, 0])  # (split, shard) -> [documents, tokens]
        nbytes = {split: 0 for split in shards.SPLITS}
        kept = 0

        def flush(pieces):
            tokens = self._encode([text for _, _, text in pieces])
            for (split, doc_id, text), ids, record in zip(pieces, tokens, shards.tfrecords(tokens), strict=True):
                shard = _shard_of(doc_id, totals["shards"][split])
                if (split, shard) not in files:
                    files[split, shard] = open(_fragment_path(plan, index, split, shard), "wb")
                files[split, shard].write(record)
                counts[split, shard][0] += 1
                counts[split, shard][1] += len(ids)
                nbytes[split] += len(text.encode("utf-8"))

        pieces = []
        for meta, code, data in _kept_documents(plan, index, decisions, totals):
            kept += 1
            pieces += _pieces(int(meta["id"]), code, data.decode("utf-8"), plan.val_fraction)
            if len(pieces) >= _BATCH_DOCS:
                flush(pieces)
                pieces = []
        if pieces:
            flush(pieces)
        for f in files.values():
            f.close()
        fragments = sorted([split, shard, docs, tokens] for (split, shard), (docs, tokens) in counts.items())
        summary = {"unit": index, "kept": kept, "bytes": nbytes, "fragments": fragments}
        _write_json(plan.path(index, "write.json"), summary)
        yield summary


def _shard_tasks(_, totals: dict):
    for split in shards.SPLITS:
        count = totals["shards"][split]
        for index in range(count):
            yield split, index, count


def _concatenate(task, plan: _Plan, written: list) -> dict:
    split, index, count = task
    parts = sorted((w["unit"], docs, tokens) for w in written for s, i, docs, tokens in w["fragments"]
                   if s == split and i == index)
    return shards.concatenate_shard(plan.opts.output_dir, split, index, count,
                                    [_fragment_path(plan, unit, split, index) for unit, _, _ in parts],
                                    sum(p[1] for p in parts), sum(p[2] for p in parts))


def _write_manifest(_, plan: _Plan, infos: list, written: list, totals: dict, tokenizer: dict,
                    verified: list) -> dict:
    opts = plan.opts
    infos = sorted(infos, key=lambda i: i["path"])
    removed = totals["removed"]
    near = {}
    if "near" in opts.dedup:
        near = {"threshold": opts.near_threshold, "num_perm": opts.num_perm, "bands": plan.bands, "rows": plan.rows,
                "shingle_size": opts.shingle_size, "candidate_pairs": sum(c for c, _ in verified),
                "near_pairs": sum(e for _, e in verified)}
    manifest = {
        "format": "gpt_jax.shards/1",
        "documents_read": totals["documents_read"],
        "documents_kept": totals["documents_read"] - sum(removed.values()),
        "removed": removed,
        "documents": {s: sum(i["documents"] for i in infos if i["split"] == s) for s in shards.SPLITS},
        "tokens": {s: sum(i["tokens"] for i in infos if i["split"] == s) for s in shards.SPLITS},
        "bytes": {s: sum(w["bytes"][s] for w in written) for s in shards.SPLITS},
        "shards": infos,
        "tokenizer": {**tokenizer, "path": shards.TOKENIZER_DIR},
        "record": {"type": "tf.train.Example", "feature": shards.FEATURE, "dtype": "int64",
                   "eos": "not stored: the reader puts eos_id after every document"},
        "near_dedup": near,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "output_dir"},
    }
    shards.write_manifest(opts.output_dir, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# The pipeline


class _Spread(beam.PTransform):
    """Work items (hashable, in a fixed order) spread over the workers: a GroupByKey on the item itself, so the
    DirectRunner deals them out round-robin, and each is one element of the next step."""

    def expand(self, pcoll):
        return (pcoll | "Key" >> beam.Map(lambda item: (item, None)) | "Group" >> beam.GroupByKey()
                | "Item" >> beam.Map(lambda kv: kv[0]))


def _tasks(p, name: str, items: list):
    return p | f"{name}Items" >> beam.Create(items, reshuffle=False) | f"Spread{name}" >> _Spread()


def build(p: beam.Pipeline, plan: _Plan):
    """Adds the preparation steps to pipeline `p`; the last one writes manifest.json."""
    opts = plan.opts
    units = _tasks(p, "Units", list(range(len(plan.units))))
    read = pvalue.AsList(units | "Read" >> beam.ParDo(_ReadUnit(plan)))
    exact, near, verified = [], [], []
    if "exact" in opts.dedup:
        exact = [_tasks(p, "Exact", list(range(plan.buckets))) | "ExactDuplicates" >> beam.Map(_exact_task, plan, read)]
    if "near" in opts.dedup:
        lsh_items = [(band, bucket) for band in range(plan.bands) for bucket in range(plan.buckets)]
        exact_side = pvalue.AsList(exact[0]) if exact else []
        checked = (_tasks(p, "Lsh", lsh_items) | "Candidates" >> beam.Map(_lsh_task, plan, read, exact_side)
                   | "PairBuckets" >> beam.FlatMap(_pair_buckets, 4 * plan.buckets)
                   | "GroupPairs" >> beam.GroupByKey() | "Verify" >> beam.Map(_verify, plan))
        near = [checked | "OneGroup" >> beam.Map(lambda v: (0, v["edges"])) | "AllEdges" >> beam.GroupByKey()
                | "UnionFind" >> beam.Map(_near_removals)]
        verified = [checked | "PairCounts" >> beam.Map(lambda v: (v["candidates"], len(v["edges"])))]
    no_arrays = p | "NoArrays" >> beam.Create([], reshuffle=False)
    decisions = pvalue.AsSingleton(
        p | "DecideOnce" >> beam.Create([None], reshuffle=False)
        | "Decide" >> beam.Map(_decide, pvalue.AsList(exact[0] if exact else no_arrays),
                               pvalue.AsList(near[0] if near else no_arrays)))
    stats = units | "KeptStats" >> beam.Map(_unit_stats, plan, decisions)
    totals = pvalue.AsSingleton(
        p | "TotalsOnce" >> beam.Create([None], reshuffle=False)
        | "Totals" >> beam.Map(_totals, plan, pvalue.AsList(stats), read, decisions))
    tokenizer = (units | "Sample" >> beam.FlatMap(_sample_unit, plan, decisions, totals)
                 | "SampleList" >> beam.combiners.ToList() | "TrainTokenizer" >> beam.Map(_train_tokenizer, opts))
    written = pvalue.AsList(units | "Tokenize" >> beam.ParDo(_WriteUnit(plan), decisions, totals,
                                                             pvalue.AsSingleton(tokenizer)))
    infos = (p | "ShardsOnce" >> beam.Create([None], reshuffle=False)
             | "ShardTasks" >> beam.FlatMap(_shard_tasks, totals) | "SpreadShards" >> _Spread()
             | "Concatenate" >> beam.Map(_concatenate, plan, written))
    counts = pvalue.AsList(verified[0] if verified else no_arrays)
    return (p | "Once" >> beam.Create([None], reshuffle=False)
            | "WriteManifest" >> beam.Map(_write_manifest, plan, pvalue.AsList(infos), written, totals,
                                          pvalue.AsSingleton(tokenizer), counts))


# ----------------------------------------------------------------------------------------------------------------
# Running


def check_output_dir(directory: str, overwrite: bool) -> None:
    """Refuses a non-empty output directory unless `overwrite`, which removes what an earlier run wrote."""
    if os.path.isfile(directory):
        raise DataError(f"--output_dir={directory} is a file")
    if os.path.isdir(directory) and os.listdir(directory):
        if not overwrite:
            raise DataError(f"--output_dir={directory} is not empty (pass --overwrite to replace its contents)")
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name in (shards.TOKENIZER_DIR, WORK_DIR) and os.path.isdir(path):
                shutil.rmtree(path)
            elif name == shards.MANIFEST or name.endswith(".tfrecord") or ".tmp-" in name:
                os.remove(path)
    os.makedirs(directory, exist_ok=True)


def direct_runner_flags(args: list[str], workers: int = 0) -> list[str]:
    """Beam flags for running `args` on this machine: the DirectRunner with one process per core (`workers`, else
    the cores this process may use) unless `args` choose a runner, a mode or a worker count."""
    names = {a.split("=", 1)[0] for a in args}
    if "--runner" in names and not any(a in ("--runner=DirectRunner", "--runner=direct") for a in args):
        return []
    if "--direct_running_mode" in names:
        return []
    if "--direct_num_workers" in names:
        count = int(next(a for a in args if a.startswith("--direct_num_workers=")).split("=", 1)[1])
        return ["--direct_running_mode=multi_processing"] if count > 1 else []
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers <= 1:
        return []
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


class _Progress(threading.Thread):
    """Prints a line on stderr every `interval` seconds while the pipeline runs: inputs read (documents, MB, MB/s)
    and inputs written (documents kept and written), from the summaries the steps leave in the work directory."""

    def __init__(self, plan: _Plan, interval: float, stream=None):
        super().__init__(daemon=True)
        self.plan, self.interval, self.stream = plan, interval, stream or sys.stderr
        self.stop = threading.Event()
        self.start_time = time.perf_counter()
        self.seen: dict[str, dict] = {}
        self.total_size = sum(u.size for u in plan.units)

    def _summaries(self, kind: str) -> list[dict]:
        try:
            names = [n for n in os.listdir(self.plan.work) if n.endswith(f".{kind}.json")]
        except OSError:
            return []
        for name in names:
            if name not in self.seen:
                try:
                    with open(os.path.join(self.plan.work, name)) as f:
                        self.seen[name] = json.load(f)
                except (OSError, ValueError):
                    continue
        return [v for k, v in self.seen.items() if k.endswith(f".{kind}.json")]

    def line(self) -> str:
        seconds = time.perf_counter() - self.start_time
        read, written = self._summaries("read"), self._summaries("write")
        n = len(self.plan.units)
        mb = sum(s["size"] for s in read) / 1e6
        size = f" of {self.total_size / 1e6:,.1f}" if self.total_size else ""
        text = (f"prepare_data {seconds:6.0f}s: read {len(read)}/{n} inputs, {sum(s['read'] for s in read):,} "
                f"documents, {mb:,.1f}{size} MB, {mb / max(seconds, 1e-9):.2f} MB/s")
        if written:
            docs = sum(d for w in written for _, _, d, _ in w["fragments"])
            text += (f"; written {len(written)}/{n} inputs, {sum(w['kept'] for w in written):,} documents kept, "
                     f"{docs:,} records")
        return text

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)

    def finish(self) -> None:
        """Stops the thread and prints the last line (everything read and written)."""
        self.stop.set()
        self.join()
        print(self.line(), file=self.stream, flush=True)


def make_plan(opts: CorpusOptions, files: list[str], val_files: list[str], tfds_size: int = 0,
              buckets: int = 0) -> _Plan:
    """The work items of a run and how the groups are cut (`buckets`: 0 = one per ~2 GB of input)."""
    paths = [(path, False) for path in files] + [(path, True) for path in val_files]
    units = [Unit(i, i, path, is_val, size=os.path.getsize(path)) for i, (path, is_val) in enumerate(paths)]
    source = len(units)
    for begin in range(0, tfds_size, TFDS_RANGE):
        units.append(Unit(len(units), source, "", False, begin, min(begin + TFDS_RANGE, tfds_size)))
    total = sum(u.size for u in units) + tfds_size * 2000
    bands, rows = minhash.lsh_params(opts.near_threshold, opts.num_perm) if "near" in opts.dedup else (0, 0)
    return _Plan(opts, units, os.path.abspath(os.path.join(opts.output_dir, WORK_DIR)),
                 buckets or max(1, math.ceil(total / 2e9)), bands, rows, 0.0 if val_files else opts.val_fraction)


def _local_runner(pipeline_options):
    """The runner for `pipeline_options` that name no runner or the DirectRunner: Beam's FnApiRunner, made as the
    DirectRunner makes it, without the DirectRunner's first try of Beam's Prism runner. That try downloads Prism
    from GitHub: where the network allows it the pipeline would run on a runner that no test here runs, and where
    it does not, each try leaves a directory in /tmp. Other runners: None (the options' own)."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    name = pipeline_options.view_as(StandardOptions).runner
    if name is not None and str(name).lower() not in ("directrunner", "direct"):
        return None
    encoded = JobServiceHandle.encode_pipeline_options(pipeline_options.get_all_options())
    info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def prepare(opts: CorpusOptions, pipeline_options=None, overwrite: bool = False, progress: float = 0.0,
            buckets: int = 0) -> dict:
    """Runs the pipeline (Beam `pipeline_options`, in this process by default) and returns the manifest;
    `progress` > 0 prints a progress line on stderr every that many seconds, and a last one at the end; `buckets`:
    how many hash buckets the dedup groups are cut into (0: one per ~2 GB of input; the output does not depend
    on it)."""
    opts.check()
    files = text_lib.expand_paths(",".join(opts.inputs), "--input") if opts.inputs else []
    val_files = text_lib.expand_paths(",".join(opts.val_inputs), "--val_input") if opts.val_inputs else []
    tfds_size = tfds_num_examples(opts.tfds, opts.tfds_data_dir, opts.text_field) if opts.tfds else 0
    check_output_dir(opts.output_dir, overwrite)
    plan = make_plan(opts, files, val_files, tfds_size, buckets)
    os.makedirs(plan.work, exist_ok=True)
    reporter = _Progress(plan, progress) if progress > 0 else None
    try:
        if reporter:
            reporter.start()
        pipeline_options = pipeline_options or PipelineOptions([])
        with beam.Pipeline(runner=_local_runner(pipeline_options), options=pipeline_options) as p:
            build(p, plan)
        if reporter:
            reporter.finish()
    finally:
        if reporter:
            reporter.stop.set()
        shutil.rmtree(plan.work, ignore_errors=True)
    return shards.read_manifest(opts.output_dir)
