"""MinHash signatures, LSH parameters and near-duplicate detection quality on synthetic pairs."""

import numpy as np

from gpt_jax.data import minhash


def test_signature_is_deterministic_and_estimates_jaccard():
    rng = np.random.default_rng(1)
    text, near, jaccard = minhash.synthetic_pair(rng, 0.8, num_words=2000)
    assert abs(jaccard - 0.8) < 0.01
    a, b = minhash.MinHasher(seed=3), minhash.MinHasher(seed=3)
    np.testing.assert_array_equal(a.signature(text), b.signature(text))
    assert a.signature(text).dtype == np.uint32 and a.signature(text).shape == (256,)
    # 256 permutations: standard error sqrt(0.8 * 0.2 / 256) = 0.025
    assert abs(minhash.estimated_jaccard(a.signature(text), a.signature(near)) - jaccard) < 0.075
    assert minhash.estimated_jaccard(a.signature(text), a.signature("something else entirely here ok")) < 0.05


def test_word_hashes_depend_on_words_only():
    h = minhash.word_hashes("ab cd ab é")
    assert len(h) == 4 and h[0] == h[2] and len(set(h.tolist())) == 3
    assert len(minhash.word_hashes("")) == 0 and len(minhash.shingle_hashes(minhash.word_hashes("a b"), 5)) == 1


def test_lsh_params_catch_pairs_at_the_threshold():
    for threshold, num_perm in [(0.75, 256), (0.5, 128), (0.9, 64)]:
        bands, rows = minhash.lsh_params(threshold, num_perm)
        assert bands * rows <= num_perm
        assert minhash.candidate_probability(threshold, bands, rows) >= 0.99
        assert minhash.candidate_probability(threshold, num_perm // (rows + 1), rows + 1) < 0.99


def test_candidate_pairs_of_a_large_bucket_stay_linear():
    assert set(minhash.candidate_pairs([3, 1, 2])) == {(1, 2), (1, 3), (2, 3)}
    pairs = list(minhash.candidate_pairs(range(1000)))
    assert len(pairs) < 2000 and all(a < b for a, b in pairs)


def test_detection_precision_recall_at_the_default_threshold():
    """Pairs at Jaccard 0.9, 0.8, 0.7, 0.5 with the pipeline's defaults (threshold 0.75, 256 permutations):
    pairs at or above the threshold are duplicates, the others are not."""
    table = minhash.detection_table(pairs_per_level=60, seed=7)
    found = {row["level"]: row["found"] for row in table["levels"]}
    for row in table["levels"]:
        assert abs(row["jaccard"] - row["level"]) < 0.01
    assert found[0.9] >= 0.98 and found[0.8] >= 0.9
    assert found[0.7] <= 0.1 and found[0.5] == 0.0
    assert table["precision"] >= 0.95 and table["recall"] >= 0.95


def test_batched_signatures_equal_one_at_a_time():
    """signatures() of a batch (shingles never straddle two texts; texts shorter than a shingle, empty ones) gives
    each text's own signature; equal bands get equal band hashes."""
    rng = np.random.default_rng(4)
    texts = [" ".join(f"w{x}" for x in rng.integers(0, 30, int(rng.integers(0, 30)))) for _ in range(200)]
    texts += ["", "a", "a b c d", "a b c d e", "\u00e9 x y z q r"]
    hasher = minhash.MinHasher(num_perm=64, seed=2)
    batch = hasher.signatures(texts)
    assert batch.shape == (len(texts), 64) and batch.dtype == np.uint32
    for text, sig in zip(texts, batch, strict=True):
        shingles = minhash.shingle_hashes(minhash.word_hashes(text), 5)
        expected = ((shingles[:, None] * hasher._mul + hasher._add) >> np.uint64(32)).min(axis=0) if len(shingles) \
            else np.full(64, 0xFFFFFFFF)
        np.testing.assert_array_equal(sig, expected.astype(np.uint32))
    bands = minhash.band_hashes(batch, 8, 8)
    assert bands.shape == (len(texts), 8) and bands.dtype == np.uint64
    same = batch.copy()
    same[1, 8:16] = batch[0, 8:16]
    hashed = minhash.band_hashes(same, 8, 8)
    assert hashed[0, 1] == hashed[1, 1] and hashed[0, 0] != hashed[1, 0]
    assert hashed[0, 1] != minhash.band_hashes(same[:, 8:], 7, 8)[0, 0]  # the band's index is part of its hash
