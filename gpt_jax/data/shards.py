"""Token shards written by `tools/prepare_data.py`, and the training input pipeline that reads them.

Format: `DIR/{train,val}-SSSSS-of-NNNNN.tfrecord` files of `tf.train.Example` records, one per document, with an
int64 list feature "tokens" (no EOS; the reader adds it), and `DIR/manifest.json` listing every shard with its
sha256, document and token counts, and `DIR/tokenizer/`. The writer here encodes records by hand (no TensorFlow:
it runs in Beam workers) and gives the same bytes as `tf.train.Example.SerializeToString()`.

Reading (`ShardSource.train_batches`): every epoch visits the shards in a seeded order. With several processes,
each takes every `process_count`-th shard of that order when the shard count allows it (hosts then read disjoint
files), else all processes read every shard and take their own rows of each global batch. A process reads its
shards `cycle_length` at a time (interleaved), shuffles their documents with a seed, joins them with EOS and cuts
the stream into `seq_len + 1` windows. How many windows each group of shards yields follows from the manifest's
counts alone, so batch b's position is computed, not replayed: a restored run continues with exactly the batches
an uninterrupted run would have seen, after reading only the group it resumes in.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import itertools
import json
import os
import shutil
import struct
import sys

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import WindowSource, pipeline
from gpt_jax.errors import DataError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FEATURE = "tokens"
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varints(values: np.ndarray, sizes: bool = False):
    """Protobuf varints of non-negative integers, concatenated (vectorized, in uint32 when the values allow); with
    `sizes`, also the byte count of each: (bytes, uint8 [n])."""
    v = np.asarray(values, np.uint64)
    if v.size == 0:
        return (b"", np.zeros(0, np.uint8)) if sizes else b""
    top = int(v.max())
    width = max(1, -(-top.bit_length() // 7))  # bytes of the longest varint: 2 for ids below 16384
    dtype = np.uint32 if top < 1 << 32 else np.uint64
    v = v.astype(dtype, copy=False)
    shifts = np.arange(width, dtype=dtype) * dtype(7)
    nbytes = np.ones(len(v), np.uint8)
    for shift in shifts[1:]:
        nbytes += v >= (dtype(1) << shift)
    groups = ((v[:, None] >> shifts[None, :]) & dtype(0x7F)).astype(np.uint8)  # [n, width] 7-bit groups, low first
    col = np.arange(width, dtype=np.uint8)[None, :]
    groups |= (col < (nbytes[:, None] - 1)).astype(np.uint8) << 7  # continuation bit on all but the last byte
    data = groups[col < nbytes[:, None]].tobytes()
    return (data, nbytes) if sizes else data


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(tokens: np.ndarray) -> bytes:
    """A serialized tf.train.Example {"tokens": Int64List(tokens)} (tokens non-negative)."""
    int64_list = _field(1, _varints(tokens)) if len(tokens) else b""
    feature = _field(3, int64_list)
    entry = _field(1, FEATURE.encode()) + _field(2, feature)
    return _field(1, _field(1, entry))


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


_EXAMPLE_KEY = _field(1, FEATURE.encode())
_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]


def _len_varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint(n)


def tfrecords(documents: list) -> list[bytes]:
    """`tfrecord(encode_example(tokens))` of each document (non-negative int token arrays): the varints of all of
    them in one numpy pass, then a few byte joins per document."""
    import google_crc32c

    if not documents:
        return []
    lengths = [len(d) for d in documents]
    tokens = np.fromiter(itertools.chain.from_iterable(documents), np.uint64, count=sum(lengths))
    payload, sizes = _varints(tokens, sizes=True)
    ends = np.cumsum(sizes, dtype=np.int64)[np.maximum(np.cumsum(lengths) - 1, 0)].tolist() if len(tokens) else []
    crc, pack_q, pack_i = google_crc32c.value, struct.Struct("<Q").pack, struct.Struct("<I").pack
    records, start = [], 0

    def masked(data: bytes) -> bytes:
        c = crc(data)
        return pack_i((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    for i, n in enumerate(lengths):
        if n:
            end = ends[i]
            values = payload[start:end]
            int64_list = b"\x0a" + _len_varint(end - start) + values
            start = end
        else:
            int64_list = b""
        feature = b"\x1a" + _len_varint(len(int64_list)) + int64_list
        entry = _EXAMPLE_KEY + b"\x12" + _len_varint(len(feature)) + feature
        features = b"\x0a" + _len_varint(len(entry)) + entry
        data = b"\x0a" + _len_varint(len(features)) + features
        length = pack_q(len(data))
        records.append(b"".join((length, masked(length), data, masked(data))))
    return records


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def write_shard(directory: str, split: str, index: int, count: int, documents) -> dict:
    """Writes documents (an iterable of int token arrays, in order) as one shard, atomically (temporary file, then
    rename); returns its manifest entry {path, sha256, documents, tokens, split}."""
    name = shard_name(split, index, count)
    path = os.path.join(directory, name)
    digest = hashlib.sha256()
    n_docs = n_tokens = 0
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        for tokens in documents:
            record = tfrecord(encode_example(tokens))
            f.write(record)
            digest.update(record)
            n_docs += 1
            n_tokens += len(tokens)
    os.replace(tmp, path)
    return {"path": name, "sha256": digest.hexdigest(), "documents": n_docs, "tokens": n_tokens, "split": split}


def concatenate_shard(directory: str, split: str, index: int, count: int, fragments: list[str], documents: int,
                      tokens: int) -> dict:
    """Writes one shard as the concatenation of fragment files of TFRecords (in the given order), streamed through a
    temporary file and a rename; returns its manifest entry as `write_shard` does (`documents` and `tokens` are the
    fragments' counts, for the entry)."""
    name = shard_name(split, index, count)
    path = os.path.join(directory, name)
    digest = hashlib.sha256()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        for fragment in fragments:
            with open(fragment, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    os.replace(tmp, path)
    return {"path": name, "sha256": digest.hexdigest(), "documents": documents, "tokens": tokens, "split": split}


def write_manifest(directory: str, manifest: dict) -> None:
    """Writes manifest.json with sorted keys (the same bytes for the same content)."""
    tmp = os.path.join(directory, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST))


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_manifest(directory: str) -> dict:
    """The manifest of a prepared data directory; DataError when it is missing or malformed."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"data.path: {directory} has no {MANIFEST} (write it with tools/prepare_data.py)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"data.path: cannot read {path}: {e}") from None
    for key in ("shards", "tokenizer"):
        if key not in manifest:
            raise DataError(f"data.path: {path} has no {key!r} entry")
    return manifest


def read_documents(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents of the given shards, in file and record order: (tokens int32 [total], lengths int64 [docs])."""
    import tensorflow as tf

    values, lengths = [], []
    if paths:
        ds = tf.data.TFRecordDataset(paths).batch(256)
        ds = ds.map(lambda x: tf.io.parse_example(x, {FEATURE: tf.io.RaggedFeature(tf.int64)})[FEATURE],
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
        try:
            for ragged in ds:
                values.append(ragged.flat_values.numpy().astype(np.int32))
                lengths.append(ragged.row_lengths().numpy())
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            raise DataError(f"cannot read shards {', '.join(paths)}: {e.message.splitlines()[0]}") from None
    if not values:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(values), np.concatenate(lengths).astype(np.int64)


def join_documents(tokens: np.ndarray, lengths: np.ndarray, order: np.ndarray, eos_id: int) -> np.ndarray:
    """The documents (`tokens` cut by `lengths`) in the given order, each followed by `eos_id`: int32 [n]."""
    starts = np.cumsum(lengths) - lengths
    lens = lengths[order]
    out_starts = np.cumsum(lens + 1) - (lens + 1)
    out = np.full(int(np.sum(lens + 1)), eos_id, np.int32)
    doc = np.repeat(np.arange(len(order)), lens)  # output document of each token
    within = np.arange(len(doc)) - np.repeat(np.cumsum(lens) - lens, lens)
    out[out_starts[doc] + within] = tokens[starts[order][doc] + within]
    return out


class ShardSource(WindowSource):
    """A prepared data directory (`data.path`): tokenizer, resumable training batches, validation windows."""

    def __init__(self, path: str, tokenizer_dir: str, cycle_length: int = 8):
        self.path = path
        self.manifest = read_manifest(path)
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        self.cycle_length = cycle_length
        self.shards = {split: sorted((s for s in self.manifest["shards"] if s["split"] == split),
                                     key=lambda s: s["path"]) for split in SPLITS}
        _copy_tokenizer(os.path.join(path, TOKENIZER_DIR), tokenizer_dir)
        self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        self.fingerprint = hashlib.sha256(json.dumps(self.manifest["shards"], sort_keys=True).encode()).hexdigest()

    def train_batches(self, batch_size: int, seq_len: int, seed: int, state: dict | None = None,
                      process_index: int = 0, process_count: int = 1) -> ShardBatches:
        """Iterator of {"tokens": int32 [batch_size // process_count, seq_len + 1]}; `state` from its `.state()`
        resumes exactly where that iterator was."""
        start = int((state or {}).get("batch_index", 0))
        if state and state.get("data") not in (None, self.fingerprint[:16]):
            print(f"warning: {self.path} is not the data this run's checkpoint was trained on; resuming at batch "
                  f"{start} of the new data", file=sys.stderr, flush=True)
        return ShardBatches(self, batch_size, seq_len, seed, start, process_index, process_count)

    def val_windows(self, seq_len: int) -> np.ndarray:
        """Every non-overlapping window of the validation documents joined with EOS: int32 [n, seq_len + 1]."""
        tokens, lengths = read_documents([os.path.join(self.path, s["path"]) for s in self.shards["val"]])
        return pipeline.eval_windows(join_documents(tokens, lengths, np.arange(len(lengths)), self.eos_id), seq_len)


def _copy_tokenizer(source: str, target: str) -> None:
    """Copies the data's tokenizer into the run's workdir (so the workdir is self-contained); refuses a workdir
    whose tokenizer is a different one."""
    if not os.path.isfile(os.path.join(source, tokenizer_lib.TOKENIZER_JSON)):
        raise DataError(f"data.path: no tokenizer at {source}")
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if not os.path.isfile(src):
            continue
        if os.path.exists(dst):
            with open(src, "rb") as a, open(dst, "rb") as b:
                if a.read() != b.read():
                    raise DataError(f"the workdir's tokenizer ({dst}) differs from the data's ({src}): use a new "
                                    f"workdir for new data")
        else:
            shutil.copyfile(src, dst)


class ShardBatches:
    """The training batches of a ShardSource for one process; `state()` is its position (see the module doc)."""

    def __init__(self, source: ShardSource, batch_size: int, seq_len: int, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
        self.source = source
        self.window = seq_len + 1
        self.seed = seed
        self.local = batch_size // process_count
        shards = source.shards["train"]
        if not shards:
            raise DataError(f"data.path: {source.path} has no training shards")
        self.sizes = np.array([s["tokens"] + s["documents"] for s in shards], np.int64)  # with one EOS per document
        self.paths = [os.path.join(source.path, s["path"]) for s in shards]
        total = int(self.sizes.sum()) // self.window
        if total < batch_size:
            raise DataError(f"the training split has {int(self.sizes.sum())} tokens (with EOS), fewer than "
                            f"batch_size={batch_size} windows of seq_len+1={self.window}")
        if len(shards) % process_count == 0:  # each process reads its own shards
            self.stream, self.num_streams, self.row_offset, self.stride = process_index, process_count, 0, self.local
        else:  # every process reads every shard and keeps its rows of each global batch
            self.stream, self.num_streams = 0, 1
            self.row_offset, self.stride = process_index * self.local, batch_size
        self._groups: list[tuple[int, int, tuple[int, ...]]] = []  # (epoch, index in epoch, shard indices)
        self._ends: list[int] = []  # cumulative windows at the end of each group
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._next = start_batch

    # The plan: groups of shards, epoch after epoch, with their window counts (from the manifest alone).
    def _extend(self) -> None:
        epoch = self._groups[-1][0] + 1 if self._groups else 0
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))[self.stream::self.num_streams]
        start = epoch_start = self._ends[-1] if self._ends else 0
        for g, lo in enumerate(range(0, len(order), self.source.cycle_length)):
            shard_ids = tuple(int(i) for i in order[lo:lo + self.source.cycle_length])
            start += int(self.sizes[list(shard_ids)].sum()) // self.window
            self._groups.append((epoch, g, shard_ids))
            self._ends.append(start)
        if start == epoch_start:
            raise DataError(f"process {self.stream}'s shards in epoch {epoch} hold less than one window of "
                            f"seq_len+1={self.window} tokens: prepare more data or more, smaller shards")

    def epoch_windows(self, epoch: int) -> int:
        """How many windows this process's stream has in `epoch` (from the manifest's counts)."""
        while not self._groups or self._groups[-1][0] < epoch:
            self._extend()
        ends = [0, *self._ends]
        return sum(ends[i + 1] - ends[i] for i, (e, _, _) in enumerate(self._groups) if e == epoch)

    def _locate(self, index: int) -> int:
        while not self._ends or self._ends[-1] <= index:
            self._extend()
        return bisect.bisect_right(self._ends, index)

    def _load(self, group: int) -> np.ndarray:
        epoch, g, shard_ids = self._groups[group]
        tokens, lengths = read_documents([self.paths[i] for i in shard_ids])
        expected = int(self.sizes[list(shard_ids)].sum())
        if len(tokens) + len(lengths) != expected:
            raise DataError(f"shards {[self.paths[i] for i in shard_ids]} do not match the manifest's counts")
        order = np.random.default_rng([self.seed, epoch, self.stream, g]).permutation(len(lengths))
        stream = join_documents(tokens, lengths, order, self.source.eos_id)
        n = len(stream) // self.window
        return stream[:n * self.window].reshape(n, self.window)

    def _group(self, group: int) -> np.ndarray:
        if group not in self._cache:
            future = self._pending.pop(group, None)
            self._cache[group] = future.result() if future else self._load(group)
            for old in [k for k in self._cache if k < group]:
                del self._cache[old]
        nxt = group + 1  # prefetch the next group in the background
        if nxt not in self._cache and nxt not in self._pending:
            self._locate(self._ends[group])
            self._pending[nxt] = self._pool.submit(self._load, nxt)
        return self._cache[group]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = np.empty((self.local, self.window), np.int32)
        index = self._next * self.stride + self.row_offset
        filled = 0
        while filled < self.local:
            group = self._locate(index)
            begin = self._ends[group - 1] if group else 0
            windows = self._group(group)
            take = min(self.local - filled, self._ends[group] - index)
            out[filled:filled + take] = windows[index - begin:index - begin + take]
            filled += take
            index += take
        self._next += 1
        return {"tokens": out}

    def state(self) -> dict:
        return {"batch_index": self._next, "data": self.source.fingerprint[:16]}
