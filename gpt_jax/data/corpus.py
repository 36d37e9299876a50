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
  in at least `near_threshold` of positions; groups are the connected components (union-find) of those pairs.
Only ids and signatures travel through the deduplication shuffles; the text is joined back once at the end.

Split: a document is validation when a keyed hash of its text falls below `val_fraction` (or when it comes from
`val_inputs`), and the document with the smallest hash always is, so a split never comes out empty. A corpus of
so few documents that fewer than one would be expected in validation (one book, five books) is split inside each
document instead: its last `val_fraction` of lines (at a line start) is validation. The tokenizer (SentencePiece
BPE/unigram with byte fallback, or characters) is trained on a deterministic hash-selected sample of the training
documents. Shards: document → shard by a hash of its id,
documents sorted by id inside a shard, written through a temporary file and a rename, so the same inputs give
byte-identical shards and manifest on any number of workers.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os

import apache_beam as beam
import numpy as np
from apache_beam import pvalue

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
SHARD_TARGET_TOKENS = 1 << 24  # automatic shard count: about 16M tokens (~50 MB) per shard
_SOURCE_BITS = 40  # document id = source index << 40 | position in the source
_REMOVED = "removed"


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
    num_shards: int = 0  # training shards; 0 = about one per 16M tokens, rounded up to a power of two
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


def _read_bytes(path: str) -> bytes:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


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


def _field(obj, path: str):
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def jsonl_documents(raw: bytes, text_field: str):
    """Documents of a JSONL file, one per non-blank line: yields (text, None) or (None, reason)."""
    for _, value in text_lib.parse_jsonl(raw.split(b"\n")):
        if isinstance(value, ValueError):
            yield None, "not_utf8" if isinstance(value, UnicodeDecodeError) else "bad_json"
        elif isinstance(document := _field(value, text_field), str):
            yield document, None
        else:
            yield None, "no_text_field"


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


# ----------------------------------------------------------------------------------------------------------------
# Beam transforms


def _doc_id(source: int, index: int) -> int:
    return source << _SOURCE_BITS | index


def _keyed_unit(text: str, key: bytes) -> float:
    """A number in [0, 1) from a keyed hash of the text: the same document always gets the same one."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little") / 2**64


class _EmitDocuments(beam.DoFn):
    """Shared by the readers: cleans each document and emits (id, text, is_val), or a removal reason."""

    def __init__(self, opts: CorpusOptions):
        self.opts = opts

    def emit(self, source: int, index: int, text: str | None, reason: str | None, is_val: bool,
             gutenberg: bool = False):
        if reason:
            yield pvalue.TaggedOutput(_REMOVED, reason)
            return
        text = clean.clean_text(text, gutenberg=gutenberg)
        if len(text) < max(self.opts.min_chars, 1):
            yield pvalue.TaggedOutput(_REMOVED, "too_short")
        else:
            yield _doc_id(source, index), text, is_val


class _ReadFile(_EmitDocuments):
    def process(self, item):
        source, path, is_val = item
        raw = _read_bytes(path)
        if self.opts.format == "jsonl":
            docs = jsonl_documents(raw, self.opts.text_field)
        else:
            docs = read_text_file(raw, self.opts.doc_split, self.opts.strip_gutenberg)
        for index, (text, reason) in enumerate(docs):
            yield from self.emit(source, index, text, reason, is_val,
                                 gutenberg=self.opts.strip_gutenberg and self.opts.format == "jsonl")


class _ReadTfds(_EmitDocuments):
    def process(self, item):
        import tensorflow_datasets as tfds

        source, begin, end = item
        name, split = self.opts.tfds.rsplit(":", 1)
        builder = tfds.builder(name, data_dir=self.opts.tfds_data_dir or None)
        ds = builder.as_dataset(split=f"{split}[{begin}:{end}]", shuffle_files=False)
        for offset, example in enumerate(tfds.as_numpy(ds)):
            value = _field(example, self.opts.text_field)
            text, reason = None, None
            if isinstance(value, bytes):
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    reason = "not_utf8"
            elif isinstance(value, str):
                text = value
            else:
                reason = "no_text_field"
            yield from self.emit(source, begin + offset, text, reason, False, gutenberg=self.opts.strip_gutenberg)


def _features(doc, hasher: minhash.MinHasher | None):
    """(id, exact-dedup digest, MinHash signature bytes or b"")."""
    norm = clean.normalize_for_dedup(doc[1])
    digest = hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()
    return doc[0], digest, hasher.signature(norm).tobytes() if hasher else b""


def _keep_smallest(item):
    members = sorted(item[1])
    yield members[0]
    for doc_id, _ in members[1:]:
        yield pvalue.TaggedOutput(_REMOVED, (doc_id, "exact_duplicate"))


def _band_items(item, bands: int, rows: int):
    for key in minhash.band_keys(np.frombuffer(item[1], np.uint32), bands, rows):
        yield key, item[0]


def _candidate_pairs(item):
    yield from minhash.candidate_pairs(item[1])


def _attach_left(item):
    a, grouped = item
    sig = next(iter(grouped["sigs"]))
    for b in grouped["pairs"]:
        yield b, (a, sig)


def _verify_pairs(item, threshold: float):
    b, grouped = item
    sigs = list(grouped["sigs"])
    if not sigs:
        return
    sig_b = np.frombuffer(sigs[0], np.uint32)
    for a, sig_a in sorted(grouped["left"]):
        if minhash.is_near_duplicate(np.frombuffer(sig_a, np.uint32), sig_b, threshold):
            yield a, b


def _near_removals(item):
    """Connected components of the near-duplicate pairs (union-find, the smaller root wins): every member but the
    component's smallest id is removed."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in item[1]:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for x in sorted(parent):
        if find(x) != x:
            yield x, "near_duplicate"


def _drop_removed(item):
    _, grouped = item
    docs = list(grouped["doc"])
    reasons = sorted(grouped["removed"])
    if not docs:
        return
    if reasons:
        yield pvalue.TaggedOutput(_REMOVED, reasons[0])
    else:
        yield (item[0], *docs[0])


_TAIL_ID = 1 << 62  # added to a document's id for its validation tail


def _assign_split(doc, val_fraction: float, key: bytes, n_docs: int, smallest: float):
    """(split, id, text) of a document: whole by its keyed hash, or, when n_docs × val_fraction < 1, its head for
    training and its tail (from a line start; the last fraction of its text) for validation."""
    doc_id, text, is_val = doc
    if is_val or not val_fraction:
        yield "val" if is_val else "train", doc_id, text
        return
    if n_docs * val_fraction < 1:
        cut = text.find("\n", int(len(text) * (1.0 - val_fraction))) + 1 or text.rfind(" ") + 1
        if 0 < cut < len(text):
            yield "train", doc_id, text[:cut]
            yield "val", doc_id + _TAIL_ID, text[cut:]
        else:  # a one-line document without a space: nothing to cut
            yield "train", doc_id, text
        return
    u = _keyed_unit(text, key)
    yield "val" if u < val_fraction or u == smallest else "train", doc_id, text


def _train_tokenizer(sample: list, opts: CorpusOptions) -> dict:
    directory = os.path.join(opts.output_dir, shards.TOKENIZER_DIR)
    if opts.tokenizer == "char":
        chars = sample[0] if sample else ""
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


class _Tokenize(beam.DoFn):
    def setup(self):
        self._tokenizer = None

    def process(self, doc, info: dict, directory: str):
        if self._tokenizer is None:  # loaded once per worker, from the path the training step wrote
            self._tokenizer = tokenizer_lib.load_tokenizer(directory)
        split, doc_id, text = doc
        yield split, doc_id, np.asarray(self._tokenizer.encode(text), np.int32), len(text.encode("utf-8"))


def auto_shards(tokens: int) -> int:
    """About one shard per SHARD_TARGET_TOKENS, rounded up to a power of two (so it divides host counts)."""
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1) / SHARD_TARGET_TOKENS)))


def _shard_count(split: str, totals: dict, opts: CorpusOptions) -> int:
    return (opts.num_shards if split == "train" else opts.val_shards) or auto_shards(totals.get(split, 0))


def _shard_key(item, totals: dict, opts: CorpusOptions):
    split, doc_id, tokens, _ = item
    count = _shard_count(split, totals, opts)
    digest = hashlib.blake2b(doc_id.to_bytes(8, "little"), digest_size=8).digest()
    return (split, int.from_bytes(digest, "little") % count, count), (doc_id, tokens)


def _write_shard(item, directory: str) -> dict:
    (split, index, count), docs = item
    return shards.write_shard(directory, split, index, count, (tokens for _, tokens in sorted(docs, key=_first)))


def _first(pair):
    return pair[0]


def _write_manifest(_, opts: CorpusOptions, infos: list, removed: dict, documents_read: int, tokenizer: dict,
                    totals: dict, nbytes: dict, near: dict) -> dict:
    infos = list(infos)
    for split in shards.SPLITS:  # a shard that no document hashed to still exists, empty
        count = _shard_count(split, totals, opts)
        have = {i["path"] for i in infos}
        for index in range(count):
            if shards.shard_name(split, index, count) not in have:
                infos.append(shards.write_shard(opts.output_dir, split, index, count, []))
    infos.sort(key=lambda i: i["path"])
    removed = {reason: int(removed.get(reason, 0)) for reason in REASONS}
    manifest = {
        "format": "gpt_jax.shards/1",
        "documents_read": int(documents_read),
        "documents_kept": int(documents_read) - sum(removed.values()),
        "removed": removed,
        "documents": {s: sum(i["documents"] for i in infos if i["split"] == s) for s in shards.SPLITS},
        "tokens": {s: sum(i["tokens"] for i in infos if i["split"] == s) for s in shards.SPLITS},
        "bytes": {s: int(nbytes.get(s, 0)) for s in shards.SPLITS},
        "shards": infos,
        "tokenizer": {**tokenizer, "path": shards.TOKENIZER_DIR},
        "record": {"type": "tf.train.Example", "feature": shards.FEATURE, "dtype": "int64",
                   "eos": "not stored: the reader puts eos_id after every document"},
        "near_dedup": near,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "output_dir"},
    }
    shards.write_manifest(opts.output_dir, manifest)
    return manifest


def _count(pcoll, label: str):
    return pcoll | f"Count{label}" >> beam.combiners.Count.Globally()


def build(p: beam.Pipeline, opts: CorpusOptions, files: list[str], val_files: list[str], tfds_size: int = 0):
    """Adds the preparation steps to pipeline `p`; the last one writes manifest.json."""
    items = [(i, path, False) for i, path in enumerate(files)]
    items += [(len(files) + i, path, True) for i, path in enumerate(val_files)]
    read_outputs = []
    if items:
        read_outputs.append(
            p | "Files" >> beam.Create(items) | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadFile(opts)).with_outputs(_REMOVED, main="docs"))
    if opts.tfds:
        part = 20_000
        source = len(items)
        ranges = [(source, lo, min(lo + part, tfds_size)) for lo in range(0, tfds_size, part)]
        read_outputs.append(
            p | "TfdsRanges" >> beam.Create(ranges) | "SpreadRanges" >> beam.Reshuffle()
            | "ReadTfds" >> beam.ParDo(_ReadTfds(opts)).with_outputs(_REMOVED, main="docs"))
    docs = [r.docs for r in read_outputs] | "AllDocs" >> beam.Flatten()
    removed = [r[_REMOVED] for r in read_outputs]
    documents_read = ([_count(docs, "Read"), _count(removed | "ReadRemoved" >> beam.Flatten(), "ReadRemoved")]
                      | "ReadCounts" >> beam.Flatten() | "DocumentsRead" >> beam.CombineGlobally(sum))

    near_info: dict = {}
    removed_ids = []
    near_counts = {}
    if opts.dedup:
        hasher = minhash.MinHasher(opts.num_perm, opts.shingle_size, opts.seed) if "near" in opts.dedup else None
        feats = docs | "Features" >> beam.Map(_features, hasher)
        if "exact" in opts.dedup:
            exact = (feats | "ByDigest" >> beam.Map(lambda f: (f[1], (f[0], f[2])))
                     | "GroupDigest" >> beam.GroupByKey()
                     | "KeepSmallest" >> beam.FlatMap(_keep_smallest).with_outputs(_REMOVED, main="kept"))
            survivors = exact.kept
            removed_ids.append(exact[_REMOVED])
        else:
            survivors = feats | "IdSig" >> beam.Map(lambda f: (f[0], f[2]))
        if "near" in opts.dedup:
            bands, rows = minhash.lsh_params(opts.near_threshold, opts.num_perm)
            near_info = {"threshold": opts.near_threshold, "num_perm": opts.num_perm, "bands": bands, "rows": rows,
                         "shingle_size": opts.shingle_size}
            pairs = (survivors | "Bands" >> beam.FlatMap(_band_items, bands, rows)
                     | "GroupBands" >> beam.GroupByKey() | "Candidates" >> beam.FlatMap(_candidate_pairs)
                     | "DistinctPairs" >> beam.Distinct())
            left = ({"pairs": pairs, "sigs": survivors} | "JoinLeft" >> beam.CoGroupByKey()
                    | "AttachLeft" >> beam.FlatMap(_attach_left))
            edges = ({"left": left, "sigs": survivors} | "JoinRight" >> beam.CoGroupByKey()
                     | "Verify" >> beam.FlatMap(_verify_pairs, opts.near_threshold))
            removed_ids.append(edges | "OneGroup" >> beam.Map(lambda e: (0, e)) | "GroupEdges" >> beam.GroupByKey()
                               | "UnionFind" >> beam.FlatMap(_near_removals))
            near_counts = {"candidate_pairs": pvalue.AsSingleton(_count(pairs, "Pairs")),
                           "near_pairs": pvalue.AsSingleton(_count(edges, "Edges"))}
        kept = ({"doc": docs | "ById" >> beam.Map(lambda d: (d[0], (d[1], d[2]))),
                 "removed": removed_ids | "RemovedIds" >> beam.Flatten()}
                | "JoinRemoved" >> beam.CoGroupByKey()
                | "DropRemoved" >> beam.FlatMap(_drop_removed).with_outputs(_REMOVED, main="kept"))
        removed.append(kept[_REMOVED])
        docs = kept.kept

    split_key = b"split" + opts.seed.to_bytes(8, "little")
    val_fraction = 0.0 if val_files else opts.val_fraction
    n_docs = _count(docs, "Kept")
    smallest = docs | "Units" >> beam.Map(lambda d: _keyed_unit(d[1], split_key)) | "Smallest" >> beam.CombineGlobally(
        lambda units: min(units, default=1.0))
    docs = docs | "Split" >> beam.FlatMap(_assign_split, val_fraction, split_key, pvalue.AsSingleton(n_docs),
                                          pvalue.AsSingleton(smallest))
    train_docs = docs | "TrainOnly" >> beam.Filter(lambda d: d[0] == "train")
    if opts.tokenizer == "char":
        sample = (docs | "Chars" >> beam.Map(lambda d: "".join(sorted(set(d[2]))))
                  | "CharSet" >> beam.CombineGlobally(lambda parts: "".join(sorted(set("".join(parts)))))
                  | "AsList" >> beam.Map(lambda chars: [chars] if chars else []))
    else:
        total = (train_docs | "Chars" >> beam.Map(lambda d: len(d[2])) | "TotalChars" >> beam.CombineGlobally(sum))
        sample_key = b"sample" + opts.seed.to_bytes(8, "little")
        sample = (train_docs
                  | "Sample" >> beam.FlatMap(_sample, opts.tokenizer_sample_chars, sample_key,
                                             pvalue.AsSingleton(total))
                  | "SampleList" >> beam.combiners.ToList())
    tokenizer = sample | "TrainTokenizer" >> beam.Map(_train_tokenizer, opts)
    tokenizer_dir = os.path.join(opts.output_dir, shards.TOKENIZER_DIR)
    tokenized = docs | "Tokenize" >> beam.ParDo(_Tokenize(), pvalue.AsSingleton(tokenizer), tokenizer_dir)
    totals = (tokenized | "SplitTokens" >> beam.Map(lambda t: (t[0], len(t[2])))
              | "SumTokens" >> beam.CombinePerKey(sum))
    nbytes = tokenized | "SplitBytes" >> beam.Map(lambda t: (t[0], t[3])) | "SumBytes" >> beam.CombinePerKey(sum)
    infos = (tokenized | "ShardKey" >> beam.Map(_shard_key, pvalue.AsDict(totals), opts)
             | "GroupShard" >> beam.GroupByKey() | "WriteShard" >> beam.Map(_write_shard, opts.output_dir))
    removed_counts = (removed | "AllRemoved" >> beam.Flatten() | "CountReasons" >> beam.combiners.Count.PerElement())
    near = (p | "NearInfo" >> beam.Create([near_info])
            | "NearCounts" >> beam.Map(lambda info, **counts: {**info, **counts} if info else {}, **near_counts))
    return (p | "Once" >> beam.Create([None])
            | "WriteManifest" >> beam.Map(
                _write_manifest, opts, pvalue.AsList(infos), pvalue.AsDict(removed_counts),
                pvalue.AsSingleton(documents_read), pvalue.AsSingleton(tokenizer), pvalue.AsDict(totals),
                pvalue.AsDict(nbytes), pvalue.AsSingleton(near)))


def _sample(doc, sample_chars: int, key: bytes, total: int):
    """A document of the tokenizer's sample when its keyed hash is below sample_chars / total (about
    `sample_chars` characters in all), as (hash, id, text) so the sample can be put in a fixed order."""
    u = _keyed_unit(doc[2], key)
    if u < sample_chars / max(total, 1):
        yield u, doc[1], doc[2]


# ----------------------------------------------------------------------------------------------------------------
# Running


def check_output_dir(directory: str, overwrite: bool) -> None:
    """Refuses a non-empty output directory unless `overwrite`, which removes what an earlier run wrote."""
    if os.path.isfile(directory):
        raise DataError(f"--output_dir={directory} is a file")
    if os.path.isdir(directory) and os.listdir(directory):
        if not overwrite:
            raise DataError(f"--output_dir={directory} is not empty (pass --overwrite to replace its contents)")
        import shutil

        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name == shards.TOKENIZER_DIR and os.path.isdir(path):
                shutil.rmtree(path)
            elif name == shards.MANIFEST or name.endswith(".tfrecord") or ".tmp-" in name:
                os.remove(path)
    os.makedirs(directory, exist_ok=True)


def prepare(opts: CorpusOptions, pipeline_options=None, overwrite: bool = False) -> dict:
    """Runs the pipeline (Beam `pipeline_options`, DirectRunner by default) and returns the manifest."""
    opts.check()
    files = text_lib.expand_paths(",".join(opts.inputs), "--input") if opts.inputs else []
    val_files = text_lib.expand_paths(",".join(opts.val_inputs), "--val_input") if opts.val_inputs else []
    tfds_size = tfds_num_examples(opts.tfds, opts.tfds_data_dir, opts.text_field) if opts.tfds else 0
    check_output_dir(opts.output_dir, overwrite)
    with beam.Pipeline(options=pipeline_options) as p:
        build(p, opts, files, val_files, tfds_size)
    return shards.read_manifest(opts.output_dir)
