"""Shard format and the training reader: record bytes, exact resume through an Orbax checkpoint, disjoint hosts."""

import os

import numpy as np
import pytest

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import pipeline, shards

EOS = 0


def make_data_dir(directory, num_shards: int, docs_per_shard: int = 9, seed: int = 0):
    """Shards of documents whose tokens are all distinct (1, 2, 3, ...), so every token says where it came from."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    infos, next_token, docs = [], 1, []
    for split, count in (("train", num_shards), ("val", 1)):
        for index in range(count):
            shard_docs = []
            for _ in range(docs_per_shard):
                length = int(rng.integers(1, 40))
                shard_docs.append(np.arange(next_token, next_token + length))
                next_token += length
            docs.extend(shard_docs if split == "train" else [])
            infos.append(shards.write_shard(str(directory), split, index, count, shard_docs))
    tokenizer_lib.CharTokenizer("\x03abc").save(os.path.join(directory, shards.TOKENIZER_DIR))
    shards.write_manifest(str(directory), {"shards": infos, "tokenizer": {"kind": "char", "eos_id": EOS}})
    return docs, next_token


def test_example_bytes_match_tensorflow_and_read_back(tmp_path):
    import tensorflow as tf

    for tokens in (np.array([0, 1, 127, 128, 16383, 16384, 2**31 - 1, 2**40]), np.array([], np.int64)):
        example = tf.train.Example(features=tf.train.Features(feature={
            "tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens.tolist()))}))
        assert shards.encode_example(tokens) == example.SerializeToString()
    docs = [np.array([5, 6, 7]), np.array([], np.int64), np.array([300000])]
    info = shards.write_shard(str(tmp_path), "train", 0, 1, docs)
    assert info["documents"] == 3 and info["tokens"] == 4
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / info["path"]))]  # CRCs checked by TF
    assert records == [shards.encode_example(d) for d in docs]
    values, lengths = shards.read_documents([str(tmp_path / info["path"])])
    np.testing.assert_array_equal(values, [5, 6, 7, 300000])
    np.testing.assert_array_equal(lengths, [3, 0, 1])


def test_val_windows_join_documents_with_eos(tmp_path):
    make_data_dir(tmp_path / "data", num_shards=2)
    source = shards.ShardSource(str(tmp_path / "data"), str(tmp_path / "work" / "tokenizer"))
    val = next(s for s in source.manifest["shards"] if s["split"] == "val")
    tokens, lengths = shards.read_documents([str(tmp_path / "data" / val["path"])])
    stream = np.concatenate([np.append(d, EOS) for d in np.split(tokens, np.cumsum(lengths)[:-1])])
    np.testing.assert_array_equal(source.val_windows(8), pipeline.eval_windows(stream, 8))
    assert os.path.isfile(tmp_path / "work" / "tokenizer" / "tokenizer.json")  # the workdir has its own copy


def test_resume_from_checkpoint_gives_the_uninterrupted_batches(tmp_path):
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    make_data_dir(tmp_path / "data", num_shards=5)
    source = shards.ShardSource(str(tmp_path / "data"), str(tmp_path / "tok"), cycle_length=2)
    uninterrupted = source.train_batches(4, 16, seed=3)
    expected = [next(uninterrupted)["tokens"] for _ in range(40)]  # several epochs and shard groups
    assert expected[0].shape == (4, 17) and expected[0].dtype == np.int32

    run = source.train_batches(4, 16, seed=3)
    for _ in range(13):
        next(run)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(13, {"w": jnp.zeros(2)}, {"m": jnp.zeros(2)}, {"step": 13, "data": run.state()})
    ckpt.close()
    restored = Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    _, _, meta = restored.restore(13, {"w": jnp.zeros(2)})
    resumed = shards.ShardSource(str(tmp_path / "data"), str(tmp_path / "tok"), cycle_length=2).train_batches(
        4, 16, seed=3, state=meta["data"])
    for i in range(13, 40):
        np.testing.assert_array_equal(next(resumed)["tokens"], expected[i])


def test_batches_are_packed_documents_with_eos(tmp_path):
    docs, _ = make_data_dir(tmp_path / "data", num_shards=3)
    source = shards.ShardSource(str(tmp_path / "data"), str(tmp_path / "tok"))
    batch = next(source.train_batches(2, 32, seed=0))["tokens"]
    starts = {int(d[0]): d for d in docs}
    for row in batch:  # every run of non-EOS tokens is a whole document or a piece cut at a window edge
        pieces = np.split(row, np.flatnonzero(row == EOS))
        for piece in pieces[1:-1]:
            piece = piece[1:]
            assert int(piece[0]) in starts and np.array_equal(starts[int(piece[0])], piece)
    assert len(set(np.concatenate(batch).tolist()) - {EOS}) == np.count_nonzero(batch)  # nothing repeats


@pytest.mark.parametrize("num_shards", [4, 3])  # 4: each process reads its own shards; 3: both read all
def test_two_processes_read_disjoint_windows_that_cover_the_data(tmp_path, num_shards):
    docs, next_token = make_data_dir(tmp_path / "data", num_shards=num_shards)
    source = shards.ShardSource(str(tmp_path / "data"), str(tmp_path / "tok"), cycle_length=1)
    seen = []
    for process in (0, 1):
        batches = source.train_batches(2, 8, seed=5, process_index=process, process_count=2)
        assert batches.num_streams == (2 if num_shards == 4 else 1)
        epoch_windows = batches.epoch_windows(0) // (1 if num_shards == 4 else 2)  # local batch: one window
        tokens = np.concatenate([next(batches)["tokens"][0] for _ in range(epoch_windows)])
        seen.append(set(tokens.tolist()) - {EOS})
    assert not seen[0] & seen[1]
    all_tokens = set(range(1, int(docs[-1][-1]) + 1))
    missing = all_tokens - seen[0] - seen[1]
    assert not (seen[0] | seen[1]) - all_tokens
    # only the tail of each group (one shard per group here) that does not fill a window is left out
    assert len(missing) <= num_shards * 8


def test_batched_records_and_concatenated_shards(tmp_path):
    """tfrecords() gives tfrecord(encode_example(d)) for each document; a shard concatenated from fragment files
    has the bytes and manifest entry of the same documents written in one go."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 2 ** int(rng.integers(1, 63)), int(rng.integers(0, 30))) for _ in range(100)]
    docs += [np.array([], np.int64), [0, 127, 128, 16383, 16384], [2**40]]
    assert shards.tfrecords(docs) == [shards.tfrecord(shards.encode_example(np.asarray(d, np.int64))) for d in docs]
    whole = shards.write_shard(str(tmp_path), "train", 1, 2, docs)
    fragments = []
    for i, part in enumerate((docs[:40], docs[40:41], [], docs[41:])):
        fragments.append(str(tmp_path / f"fragment{i}"))
        with open(fragments[-1], "wb") as f:
            f.write(b"".join(shards.tfrecords(part)))
    expected = (tmp_path / whole["path"]).read_bytes()
    joined = shards.concatenate_shard(str(tmp_path), "train", 1, 2, fragments, whole["documents"], whole["tokens"])
    assert joined == whole and (tmp_path / whole["path"]).read_bytes() == expected
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
