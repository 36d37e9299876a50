"""MinHash signatures over word shingles, and locality-sensitive hashing (LSH) bands, vectorized with numpy.

A document's shingles are its runs of `shingle_size` consecutive words (of `clean.normalize_for_dedup` text),
hashed to 64 bits. Each of `num_perm` multiply-shift hash functions maps the shingle hashes to 32 bits and the
signature keeps the minimum of each, so two signatures agree in a position with probability close to the
Jaccard similarity of the two shingle sets. LSH cuts a signature into `bands` of `rows` values; two documents
that agree on every value of some band become a candidate pair, to be checked against the threshold.

All hashing is seeded and independent of Python's salted `hash()`, so signatures are the same in every process.
"""

from __future__ import annotations

import functools

import numpy as np

_WORD_BASE = np.uint64(0x100000001B3)  # odd multipliers for the polynomial word and shingle hashes
_SHINGLE_BASE = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 4096  # shingles per [num_perm, chunk] block (8 MiB at 256 permutations)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=8)
def _powers(n: int) -> np.ndarray:
    out = np.full(n, _WORD_BASE, np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)  # wraps modulo 2**64, as intended


def word_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the space-separated words of `text` (normalized: single spaces), in order: uint64 [words]."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    in_word = data != 32
    if not in_word.any():
        return np.zeros(0, np.uint64)
    word_start = in_word & ~np.concatenate([[False], in_word[:-1]])
    byte_pos = np.flatnonzero(in_word)
    word_of_byte = np.cumsum(word_start)[byte_pos] - 1
    starts = np.flatnonzero(word_start)
    pos_in_word = byte_pos - starts[word_of_byte]
    powers = _powers(1 << int(pos_in_word.max()).bit_length())
    terms = (data[byte_pos].astype(np.uint64) + np.uint64(1)) * powers[pos_in_word]
    sums = np.add.reduceat(terms, np.flatnonzero(pos_in_word == 0))
    return _mix64(sums)


def shingle_hashes(words: np.ndarray, shingle_size: int) -> np.ndarray:
    """64-bit hashes of every run of `shingle_size` consecutive word hashes (one run of all words when there are
    fewer): uint64 [shingles]."""
    n = len(words)
    if n == 0:
        return np.zeros(0, np.uint64)
    k = min(shingle_size, n)
    acc = np.zeros(n - k + 1, np.uint64)
    for i in range(k):
        acc = acc * _SHINGLE_BASE + words[i:n - k + 1 + i]
    return _mix64(acc)


class MinHasher:
    """Signatures of `num_perm` 32-bit minimums over `shingle_size`-word shingles; `seed` fixes the hash
    functions, so the same text gets the same signature everywhere."""

    def __init__(self, num_perm: int = 256, shingle_size: int = 5, seed: int = 0):
        rng = np.random.default_rng([0x6D696E68, seed])
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self._mul = np.frombuffer(rng.bytes(8 * num_perm), np.uint64) | np.uint64(1)  # odd: a bijection mod 2**64
        self._add = np.frombuffer(rng.bytes(8 * num_perm), np.uint64).copy()

    def signature(self, normalized_text: str) -> np.ndarray:
        """The signature of a `clean.normalize_for_dedup` text: uint32 [num_perm] (all 0xFFFFFFFF when empty)."""
        return self.signatures([normalized_text])[0]

    def signatures(self, normalized_texts: list[str]) -> np.ndarray:
        """`signature` of each text, computed together (one pass of numpy operations for the whole batch rather
        than one per document): uint32 [len(texts), num_perm]."""
        n, k = len(normalized_texts), self.shingle_size
        lowest = np.full((n, self.num_perm), np.iinfo(np.uint64).max, np.uint64)
        # Words of every text in one array: normalized texts have single spaces and none at either end.
        counts = np.array([t.count(" ") + 1 if t else 0 for t in normalized_texts], np.int64)
        words = word_hashes(" ".join(t for t in normalized_texts if t))
        doc_of_word = np.repeat(np.arange(n), counts)
        if len(words) >= k:
            # shingles of k consecutive words; those that straddle two texts are dropped
            acc = np.zeros(len(words) - k + 1, np.uint64)
            for i in range(k):
                acc = acc * _SHINGLE_BASE + words[i:len(words) - k + 1 + i]
            inside = doc_of_word[:len(acc)] == doc_of_word[k - 1:]
            self._fold(lowest, _mix64(acc[inside]), doc_of_word[:len(acc)][inside])
        starts = np.cumsum(counts) - counts
        for d in np.flatnonzero((counts > 0) & (counts < k)):  # fewer words than a shingle: one of all of them
            self._fold(lowest, shingle_hashes(words[starts[d]:starts[d] + counts[d]], k), np.array([d]))
        return (lowest >> np.uint64(32)).astype(np.uint32)

    def _fold(self, lowest: np.ndarray, shingles: np.ndarray, doc_of_shingle: np.ndarray) -> None:
        """lowest[d] = min(lowest[d], min over d's shingles s of s * mul + add), _CHUNK shingles at a time, as
        [num_perm, chunk] blocks (each document's shingles are then contiguous in every row: 3x faster to reduce
        than [chunk, num_perm]). The top 32 bits of the minimum are the minimum of the top 32 bits, so the shift
        waits until the end."""
        for lo in range(0, len(shingles), _CHUNK):
            block = self._mul[:, None] * shingles[None, lo:lo + _CHUNK]  # [num_perm, chunk]
            block += self._add[:, None]
            docs = doc_of_shingle[lo:lo + _CHUNK]
            first = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
            docs = docs[first]
            lowest[docs] = np.minimum(lowest[docs], np.minimum.reduceat(block, first, axis=1).T)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of signature positions that agree: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def shingle_jaccard(text_a: str, text_b: str, shingle_size: int = 5) -> float:
    """The exact Jaccard similarity of two normalized texts' shingle-hash sets (for measuring MinHash)."""
    a = set(shingle_hashes(word_hashes(text_a), shingle_size).tolist())
    b = set(shingle_hashes(word_hashes(text_b), shingle_size).tolist())
    return len(a & b) / max(len(a | b), 1)


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Probability that a pair of the given Jaccard similarity shares at least one LSH band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm: the most rows per band (fewest needless candidates) for which
    a pair exactly at `threshold` still becomes a candidate with probability >= `recall`. Candidates are then
    checked against the threshold, so LSH only has to not miss them."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= recall:
            best = (bands, rows)
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """64-bit hashes of each signature's bands (the band's index and its `rows` values): uint64 [n, bands]. Equal
    bands give equal hashes; different ones collide with probability about 2**-64 (and candidates are checked
    against their signatures anyway)."""
    values = signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    out = np.broadcast_to(_mix64(np.arange(1, bands + 1, dtype=np.uint64)), values.shape[:2]).copy()
    for r in range(rows):
        out = _mix64(out * _SHINGLE_BASE + values[:, :, r])
    return out


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band's index and its values, so equal keys mean equal bands."""
    return [band.to_bytes(2, "little") + signature[band * rows:(band + 1) * rows].tobytes() for band in range(bands)]


def candidate_pairs(ids, max_all_pairs: int = 32):
    """The pairs (a < b) to check among documents that share a band: all pairs of a small bucket; in a large one
    (repeated boilerplate) each member with the smallest and with its predecessor, to stay linear."""
    ids = sorted(set(ids))
    if len(ids) <= max_all_pairs:
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                yield a, b
    else:
        for i in range(1, len(ids)):
            yield ids[0], ids[i]
            if i > 1:
                yield ids[i - 1], ids[i]


def is_near_duplicate(sig_a: np.ndarray, sig_b: np.ndarray, threshold: float) -> bool:
    return estimated_jaccard(sig_a, sig_b) >= threshold - 1e-9


def near_duplicate_pairs(signatures: dict, threshold: float, bands: int, rows: int) -> set[tuple]:
    """In memory, what the Beam pipeline computes with shuffles: pairs (a < b) of ids whose signatures share a band
    and agree in at least `threshold` of positions. For measurements and tests on small sets."""
    buckets: dict[bytes, list] = {}
    for doc_id, sig in signatures.items():
        for key in band_keys(sig, bands, rows):
            buckets.setdefault(key, []).append(doc_id)
    pairs = {pair for ids in buckets.values() if len(ids) > 1 for pair in candidate_pairs(ids)}
    return {(a, b) for a, b in pairs if is_near_duplicate(signatures[a], signatures[b], threshold)}


def synthetic_pair(rng: np.random.Generator, similarity: float, num_words: int = 1000,
                   shingle_size: int = 5) -> tuple[str, str, float]:
    """A random document and a copy with words replaced at random positions, as many as bring the shingle
    Jaccard similarity closest to `similarity`: (text, near copy, its exact similarity)."""
    words = [f"w{i}" for i in rng.integers(0, 10**9, num_words)]
    num_shingles = num_words - shingle_size + 1
    hit = np.zeros(num_shingles, bool)  # shingles that contain a replaced word
    positions, best = rng.permutation(num_words), (1.0, 0)
    for count, position in enumerate(positions, start=1):
        hit[max(0, position - shingle_size + 1):position + 1] = True
        shared = num_shingles - int(hit.sum())
        jaccard = shared / (2 * num_shingles - shared)
        if abs(jaccard - similarity) < abs(best[0] - similarity):
            best = (jaccard, count)
        if jaccard < similarity:
            break
    copy = list(words)
    for position in positions[:best[1]]:
        copy[position] = f"x{rng.integers(0, 10**9)}"
    text, near = " ".join(words), " ".join(copy)
    return text, near, shingle_jaccard(text, near, shingle_size)


def detection_table(levels=(0.9, 0.8, 0.7, 0.5), pairs_per_level: int = 100, threshold: float = 0.75,
                    num_perm: int = 256, shingle_size: int = 5, num_words: int = 1000, seed: int = 0) -> dict:
    """Near-duplicate detection on synthetic pairs at the given similarity levels, all in one collection: for
    each level the mean exact similarity and the fraction of pairs found, and overall precision and recall
    (a pair is a true near duplicate when its exact similarity is at least `threshold`)."""
    rng = np.random.default_rng(seed)
    hasher = MinHasher(num_perm, shingle_size, seed)
    bands, rows = lsh_params(threshold, num_perm)
    signatures, truth = {}, {}
    for level in levels:
        for _ in range(pairs_per_level):
            a, b, jaccard = synthetic_pair(rng, level, num_words, shingle_size)
            i = len(signatures)
            signatures[i], signatures[i + 1] = hasher.signature(a), hasher.signature(b)
            truth[(i, i + 1)] = (level, jaccard)
    found = near_duplicate_pairs(signatures, threshold, bands, rows)
    rows_out = []
    for level in levels:
        pairs = [(p, j) for p, (lv, j) in truth.items() if lv == level]
        rows_out.append({"level": level, "jaccard": float(np.mean([j for _, j in pairs])),
                         "found": sum(p in found for p, _ in pairs) / len(pairs)})
    positive = {p for p, (_, j) in truth.items() if j >= threshold}
    tp = len(found & positive)
    return {"threshold": threshold, "num_perm": num_perm, "bands": bands, "rows": rows, "levels": rows_out,
            "precision": tp / max(len(found), 1), "recall": tp / max(len(positive), 1),
            "true_pairs": len(positive), "found_pairs": len(found)}
