"""Source/target pairs for an encoder-decoder: aligned text files (`data.train_source`, `data.train_target`, one
pair per line) or JSONL (`data.train_jsonl`, {"source": ..., "target": ...} per line), likewise for validation.

Sources are encoded as [bos] source [eos] (cut at `data.max_source_len`, or seq_len); the decoder reads [start] +
target and predicts target + [end] (targets cut at seq_len). The tokenizers are the workdir's (from warm starts)
or byte-level BPE trained on the training pairs (one for both sides with `data.joint_vocab`). Batches are grouped
by length and both sides padded to one of `data.length_buckets`, so a handful of shapes compile; batch b of a run
is a pure function of (seed, b), so a resumed run sees the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import text
from gpt_jax.errors import ConfigError, DataError


def load_pairs(jsonl: str = "", source: str = "", target: str = "", key: str = "data.train") -> \
        tuple[list[str], list[str]]:
    """(sources, targets) from a JSONL file with "source" and "target" fields, or two line-aligned text files."""
    if jsonl:
        records = text.read_jsonl(jsonl, f"{key}_jsonl", ("source", "target"))
        sources, targets = [r["source"] for r in records], [r["target"] for r in records]
    elif source and target:
        sources, targets = text.read_lines(source, f"{key}_source"), text.read_lines(target, f"{key}_target")
        if len(sources) != len(targets):
            raise DataError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: the files must be "
                            "line-aligned")
    else:
        raise ConfigError(f"set {key}_jsonl, or both {key}_source and {key}_target")
    if not sources:
        raise DataError(f"{jsonl or source}: no pairs")
    return sources, targets


def encode_sources(tokenizer, texts: Sequence[str], max_len: int, bos: int, eos: int) -> list[list[int]]:
    """[bos] text [eos] per text (a negative id: none), the text cut so the whole fits in max_len."""
    head, tail = [bos] if bos >= 0 else [], [eos] if eos >= 0 else []
    room = max_len - len(head) - len(tail)
    return [head + tokenizer.encode(t)[:room] + tail for t in texts]


def decode_targets(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(r).strip() for r in rows]


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The first bucket ≥ n; past the last one, n rounded up to a multiple of the last."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def make_batch(sources, targets, ids: dict, buckets: Sequence[int], rows: int | None = None) -> dict:
    """Pads encoded pairs into a batch of `rows` (default: one per pair; filler rows have no valid tokens):
    source, source_valid, target_in, target_out [rows, L] and loss_mask, L the bucket that fits both sides."""
    n, pad = rows or len(sources), ids["pad_id"]
    length = bucket_length(max(max(len(s) for s in sources), max(len(t) for t in targets) + 1), buckets)
    batch = {"source": np.full((n, length), pad, np.int32), "source_valid": np.zeros((n, length), bool),
             "target_in": np.full((n, length), pad, np.int32), "target_out": np.full((n, length), pad, np.int32),
             "loss_mask": np.zeros((n, length), np.float32)}
    batch["source_valid"][:, 0] = True  # a filler row attends to one padding token rather than to none
    for r, (s, t) in enumerate(zip(sources, targets, strict=True)):
        batch["source"][r, :len(s)] = s
        batch["source_valid"][r, :len(s)] = True
        batch["target_in"][r, :len(t) + 1] = [ids["decoder_start_id"], *t]
        batch["target_out"][r, :len(t) + 1] = [*t, ids["eos_id"]]
        batch["loss_mask"][r, :len(t) + 1] = 1.0
    return batch


class PairSource:
    """The pairs of a run, encoded: training batches, validation batches and the validation texts for BLEU.

    `tokenizer` is the target side's (what the model writes), `source_tokenizer` the source side's; `ids` the
    special tokens, from config.model where resolved (>= 0) and from the tokenizers otherwise."""

    def __init__(self, config, tokenizer_dir: str):
        d = self.data_config = config.data
        self.buckets = config_lib.parse_buckets(d.length_buckets)
        self.val_sources, self.val_targets = (load_pairs(d.val_jsonl, d.val_source, d.val_target, "data.val")
                                              if d.val_jsonl or d.val_source else ([], []))
        self._train = None
        self.source_tokenizer, self.tokenizer = self._tokenizers(config, tokenizer_dir)
        m = config.model
        target_pad = self.tokenizer.tokenizer.token_to_id(tokenizer_lib.BPE_SPECIALS[0]) \
            if isinstance(self.tokenizer, tokenizer_lib.HFTokenizer) else None
        resolved = {"decoder_start_id": self.tokenizer.bos_id, "eos_id": self.tokenizer.eos_id,
                    "pad_id": target_pad if target_pad is not None else 0,
                    "source_bos_id": self.source_tokenizer.bos_id, "source_eos_id": self.source_tokenizer.eos_id}
        self.ids = {k: int(m[k]) if m[k] >= 0 else (-1 if v is None else int(v)) for k, v in resolved.items()}
        for key in ("decoder_start_id", "eos_id"):
            if self.ids[key] < 0:
                raise ConfigError(f"model.{key}: the target tokenizer has no such token; set it")
        self.max_source_len = d.max_source_len or config.seq_len
        self.seq_len = config.seq_len

    def train_pairs(self) -> tuple[list[str], list[str]]:
        if self._train is None:
            d = self.data_config
            self._train = load_pairs(d.train_jsonl, d.train_source, d.train_target, "data.train")
        return self._train

    def _tokenizers(self, config, tokenizer_dir: str):
        """(source, target) tokenizers: the workdir's where it has them, else BPE trained on the training pairs."""
        found = {side: os.path.isfile(os.path.join(tokenizer_dir, side, tokenizer_lib.TOKENIZER_JSON))
                 for side in ("source", "target")}
        d = config.data
        if not all(found.values()):
            sources, targets = self.train_pairs()
        if not any(found.values()) and d.joint_vocab:
            joint = tokenizer_lib.train_bpe([*sources, *targets], d.vocab_size)
            found = {side: joint for side in found}
        out = []
        for side in ("source", "target"):
            directory = os.path.join(tokenizer_dir, side)
            if found[side] is True:
                out.append(tokenizer_lib.load_tokenizer(directory))
                continue
            tok = found[side] or tokenizer_lib.train_bpe(sources if side == "source" else targets, d.vocab_size)
            tok.save(directory)
            out.append(tok)
        return tuple(out)

    def encode_sources(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_sources(self.source_tokenizer, texts, self.max_source_len, self.ids["source_bos_id"],
                              self.ids["source_eos_id"])

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t)[:self.seq_len - 1] for t in texts]

    def train_batches(self, batch_size: int, seq_len: int, seed: int, state: dict | None = None,
                      process_index: int = 0, process_count: int = 1) -> PairBatches:
        sources, targets = self.train_pairs()
        encoded = self.encode_sources(sources), self.encode_targets(targets)
        return PairBatches(*encoded, self.ids, self.buckets, batch_size, seed,
                           int((state or {}).get("batch_index", 0)), process_index, process_count)

    def val_batches(self, batch_size: int, seq_len: int, limit: int = 0, seed: int = 0) -> list[dict]:
        """Every validation pair once (or a seeded subset of `limit`), in length-sorted batches of batch_size rows,
        the last padded with filler rows; none without validation pairs."""
        if not self.val_sources:
            return []
        index = np.arange(len(self.val_sources))
        if limit and limit < len(index):
            index = np.sort(np.random.default_rng(seed).choice(len(index), limit, replace=False))
        sources = self.encode_sources([self.val_sources[i] for i in index])
        targets = self.encode_targets([self.val_targets[i] for i in index])
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]) + len(targets[i]))
        return [make_batch([sources[i] for i in chunk], [targets[i] for i in chunk], self.ids, self.buckets,
                           rows=batch_size) for chunk in (order[s:s + batch_size]
                                                          for s in range(0, len(order), batch_size))]


class PairBatches:
    """Length-grouped training batches in an order fixed by (seed, epoch), this process's rows of each; `state()`
    is the position."""

    POOL = 50  # batches per length-sorting pool

    def __init__(self, sources, targets, ids: dict, buckets, batch_size: int, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if len(sources) < batch_size:
            raise DataError(f"{len(sources)} training pairs are fewer than batch_size={batch_size}")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
        self.sources, self.targets, self.ids, self.buckets = sources, targets, ids, tuple(buckets)
        self.batch_size, self.seed = batch_size, seed
        self.local = batch_size // process_count
        self.lo = process_index * self.local
        self.per_epoch = len(sources) // batch_size
        self._next = start_batch
        self._epoch, self._order = -1, []

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        index = rng.permutation(len(self.sources))[:self.per_epoch * self.batch_size]
        lengths = np.array([len(self.sources[i]) + len(self.targets[i]) for i in index])
        pool = self.POOL * self.batch_size
        batches = []
        for start in range(0, len(index), pool):
            chunk = index[start:start + pool][np.argsort(lengths[start:start + pool], kind="stable")]
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, k = divmod(self._next, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        rows = self._order[k]
        batch = make_batch([self.sources[i] for i in rows], [self.targets[i] for i in rows], self.ids, self.buckets)
        self._next += 1
        return {key: value[self.lo:self.lo + self.local] for key, value in batch.items()}

    def state(self) -> dict:
        return {"batch_index": self._next}
