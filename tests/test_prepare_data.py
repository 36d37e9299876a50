"""tools/prepare_data.py and the Beam pipeline behind it (DirectRunner, real Beam, tiny data made here)."""

import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import clean, corpus, shards
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    """tools/prepare_data.py in a process of its own, importing gpt_jax from this checkout."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), *args],
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)


_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_POOL = ["".join(np.random.default_rng(i).choice(_LETTERS, 3 + i % 6)) for i in range(5000)]


def _document(rng, num_words=300) -> str:
    words = [_POOL[i] for i in rng.integers(0, len(_POOL), num_words)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, num_words, 12)]
    return "\n".join(lines) + "\n"


def _fixture(directory, num_docs=10, seed=0) -> list[str]:
    """num_docs distinct documents plus an exact copy, a near copy (2 of 300 words changed), a latin-1 file and a
    too-short file; returns the distinct documents' texts."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    docs = [_document(rng) for _ in range(num_docs)]
    docs[0] = "Caf\u0065\u0301 \u00a0and\ttabs \x07bell   \r\n" + docs[0]  # decomposed é, NBSP, control char, CRLF
    for i, text in enumerate(docs):
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    with open(os.path.join(directory, "x_exact.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(docs[3])
    near = docs[5].split(" ")
    near[7], near[150] = "changed", "words"
    with open(os.path.join(directory, "x_near.txt"), "w", encoding="utf-8") as f:
        f.write(" ".join(near))
    with open(os.path.join(directory, "x_latin1.txt"), "wb") as f:
        f.write("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. ".encode("latin-1") * 5)
    with open(os.path.join(directory, "x_short.txt"), "w") as f:
        f.write("too short\n")
    return docs


def _kept_texts(directory) -> list[str]:
    manifest = shards.read_manifest(directory)
    tok = tokenizer_lib.load_tokenizer(os.path.join(directory, "tokenizer"))
    texts = []
    for info in manifest["shards"]:
        values, lengths = shards.read_documents([os.path.join(directory, info["path"])])
        texts += [tok.decode(d) for d in np.split(values, np.cumsum(lengths)[:-1]) if len(d)]
    return texts


def test_clean_text():
    assert clean.clean_text("Cafe\u0301\u00a0x\x00y\x1b \r\nline  \r\r\n\n\n\nend\u2028") == "Caf\u00e9 xy\nline\n\nend"
    assert clean.clean_text("  \ttabs\tstay\n") == "tabs\tstay"
    book = ("Title\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody text.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense")
    assert clean.clean_text(book, gutenberg=True) == "Body text."
    assert clean.clean_text(book) == book
    assert clean.split_documents("a\n\n \nb\nc\n\n", "paragraph") == ["a", "b\nc"]
    assert clean.split_documents("a\n\nb\n", "line") == ["a", "b"]
    assert clean.split_document_bytes(b"ok\n\n\xe9\xff\n", "paragraph") == [b"ok", b"\xe9\xff\n"]
    assert clean.normalize_for_dedup(" A  b\nC ") == "a b c"


def test_streamed_reading_gives_the_whole_file_documents(tmp_path):
    """Files are read in chunks: the documents (and line-break normalization) come out as from the whole text,
    wherever the chunks are cut, for UTF-8 text, undecodable bytes and gzip."""
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", " ", "\t", "\n", "\r", "\r\n", "\u2028", "\x0b", "\u00e9", "  \n", "\n\n"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet, int(rng.integers(0, 40))))
        cuts = np.sort(rng.integers(0, len(text) + 1, int(rng.integers(0, 5)))).tolist()
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        normalized = clean.normalize_line_breaks(text)
        assert "".join(clean.iter_normalize_line_breaks(chunks)) == normalized
        for mode in clean.DOC_SPLITS:
            chunks = [normalized[a:b] for a, b in zip([0, *cuts], [*cuts, len(normalized)], strict=True)]
            assert list(clean.iter_split_documents(chunks, mode)) == clean.split_documents(normalized, mode)
            raw = text.encode()
            raw_chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            assert list(clean.iter_split_document_bytes(raw_chunks, mode)) == clean.split_document_bytes(raw, mode)
    text = "para one\r\n\r\nt\u00e9xt two\n \n\nthree" * 3000
    for name, data in (("a.txt", text.encode()), ("b.txt", text.encode() + b"\n\n\xff\xfe bad"),
                       ("c.txt.gz", gzip.compress(text.encode()))):
        (tmp_path / name).write_bytes(data)
        whole = list(corpus.read_text_file(gzip.decompress(data) if name.endswith(".gz") else data, "paragraph", False))
        for size in (7, 4096):
            corpus._CHUNK_BYTES = size
            assert list(corpus.text_file_documents(str(tmp_path / name), "paragraph", False)) == whole, (name, size)
    corpus._CHUNK_BYTES = 1 << 22


def test_every_removal_reason_is_counted_and_documents_are_conserved(tmp_path):
    """A corpus with all six removal reasons: read = kept + removed for each reason, and every kept document is
    in exactly one shard (train or validation), also with the dedup groups cut into several buckets."""
    rng = np.random.default_rng(3)
    texts = [_document(rng, 80) for _ in range(40)]
    near = texts[7].split(" ")
    near[11] = "changed"
    rows = [json.dumps({"text": t}) for t in texts]
    rows += [json.dumps({"text": texts[4]}), json.dumps({"text": texts[9]}),  # exact duplicates
             json.dumps({"text": " ".join(near)}),  # a near duplicate
             json.dumps({"text": "tiny"}), json.dumps({"body": texts[1]}), '{"text": ', "[1, 2"]
    (tmp_path / "a.jsonl").write_text("\n".join(rows[::2]) + "\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(rows[1::2]) + "\n").encode() +
                                                        b'{"text": "\xff\xfe no"}\n'))
    outputs = []
    for buckets in (0, 3):
        out = tmp_path / f"out{buckets}"
        opts = corpus.CorpusOptions(output_dir=str(out), inputs=[str(tmp_path / "*.jsonl*")], format="jsonl",
                                    tokenizer="char", val_fraction=0.2, num_shards=2)
        manifest = corpus.prepare(opts, buckets=buckets)
        assert manifest["removed"] == {"not_utf8": 1, "bad_json": 2, "no_text_field": 1, "too_short": 1,
                                       "exact_duplicate": 2, "near_duplicate": 1}
        assert manifest["documents_read"] == len(rows) + 1
        assert manifest["documents_read"] == manifest["documents_kept"] + sum(manifest["removed"].values())
        assert manifest["documents"]["train"] + manifest["documents"]["val"] == manifest["documents_kept"] == 40
        assert 0 < manifest["documents"]["val"] < 20
        kept = [t for i, t in enumerate(texts) if i != 7] + [" ".join(near)]  # the copy has the smaller id
        assert sorted(_kept_texts(out)) == sorted(clean.clean_text(t) for t in kept)
        assert not os.path.exists(out / corpus.WORK_DIR)
        outputs.append({p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
    assert outputs[0] == outputs[1]


def test_validation_files_are_all_validation(tmp_path):
    rng = np.random.default_rng(5)
    texts = [_document(rng, 50) for _ in range(8)]
    for i, text in enumerate(texts):
        (tmp_path / ("val" if i >= 6 else "train") / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / ("val" if i >= 6 else "train") / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    manifest = corpus.prepare(corpus.CorpusOptions(
        output_dir=str(out), inputs=[str(tmp_path / "train" / "*.txt")], val_inputs=[str(tmp_path / "val" / "*.txt")],
        tokenizer="char", val_fraction=0.5))
    assert manifest["documents"] == {"train": 6, "val": 2} and manifest["documents_kept"] == 8
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    tok = tokenizer_lib.load_tokenizer(str(out / "tokenizer"))
    values, lengths = shards.read_documents([str(out / val["path"])])
    decoded = [tok.decode(d) for d in np.split(values, np.cumsum(lengths)[:-1])]
    assert decoded == [clean.clean_text(t) for t in texts[6:]]


def test_progress_lines_on_stderr(tmp_path, capsys):
    _fixture(tmp_path / "in", num_docs=6)  # and 4 files that are removed
    opts = corpus.CorpusOptions(output_dir=str(tmp_path / "out"), inputs=[str(tmp_path / "in" / "*.txt")],
                                tokenizer="char", val_fraction=0.0)
    corpus.prepare(opts, progress=0.2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare_data")]
    assert lines and "read 10/10 inputs, 10 documents" in lines[-1], lines
    assert "written 10/10 inputs, 6 documents kept, 6 records" in lines[-1] and "MB/s" in lines[-1]


def test_every_core_by_default():
    assert corpus.direct_runner_flags([], workers=2) == ["--direct_running_mode=multi_processing",
                                                         "--direct_num_workers=2"]
    assert corpus.direct_runner_flags([], workers=1) == []
    assert corpus.direct_runner_flags(["--direct_num_workers=1"]) == []
    assert corpus.direct_runner_flags(["--direct_num_workers=3"]) == ["--direct_running_mode=multi_processing"]
    assert corpus.direct_runner_flags(["--direct_running_mode=in_memory"]) == []
    assert corpus.direct_runner_flags(["--runner=DataflowRunner"]) == []


def test_removed_documents_are_counted_and_kept_text_is_unchanged(tmp_path):
    docs = _fixture(tmp_path / "in")
    opts = corpus.CorpusOptions(output_dir=str(tmp_path / "out"), inputs=[str(tmp_path / "in" / "*.txt")],
                                tokenizer="char", num_shards=2, val_fraction=0.0)
    manifest = corpus.prepare(opts)
    assert manifest["removed"] == {"not_utf8": 1, "bad_json": 0, "no_text_field": 0, "too_short": 1,
                                   "exact_duplicate": 1, "near_duplicate": 1}
    assert manifest["documents_read"] == 14 and manifest["documents_kept"] == 10
    assert sorted(_kept_texts(tmp_path / "out")) == sorted(clean.clean_text(d) for d in docs)
    assert clean.clean_text(docs[0]).startswith("Caf\u00e9  and\ttabs bell\n")
    assert manifest["tokens"]["train"] == sum(len(clean.clean_text(d)) for d in docs)
    assert [s["path"] for s in manifest["shards"]] == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord", "val-00000-of-00001.tfrecord"]
    for info in manifest["shards"]:
        import hashlib

        with open(tmp_path / "out" / info["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == info["sha256"]


def test_jsonl_paragraphs_gutenberg_and_validation_split(tmp_path):
    rng = np.random.default_rng(1)
    texts = [_document(rng, 60) for _ in range(30)]
    lines = [json.dumps({"meta": {"body": t}}) for t in texts]
    lines += ['{"meta": {"other": 1}}', "{not json", json.dumps({"meta": {"body": texts[2]}})]
    (tmp_path / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"meta": {"body": "\xff"}}\n')
    book = "Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n" + "\n\n".join(texts[:3]) + \
           "\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense\n"
    (tmp_path / "book.txt").write_text(book)
    out = tmp_path / "out"
    manifest = corpus.prepare(corpus.CorpusOptions(
        output_dir=str(out), inputs=[str(tmp_path / "a.jsonl")], format="jsonl", text_field="meta/body",
        tokenizer="char", val_fraction=0.3, dedup=("exact",)))
    assert manifest["removed"]["bad_json"] == 1 and manifest["removed"]["no_text_field"] == 1
    assert manifest["removed"]["not_utf8"] == 1 and manifest["removed"]["exact_duplicate"] == 1
    assert manifest["documents_kept"] == 30 and manifest["near_dedup"] == {}
    assert 0 < manifest["documents"]["val"] < 20 and manifest["documents"]["train"] + manifest["documents"]["val"] == 30
    manifest = corpus.prepare(corpus.CorpusOptions(
        output_dir=str(out), inputs=[str(tmp_path / "book.txt")], doc_split="paragraph", strip_gutenberg=True,
        tokenizer="char", val_fraction=0.0), overwrite=True)
    assert manifest["documents_read"] == 3
    assert sorted(_kept_texts(out)) == sorted(clean.clean_text(t) for t in texts[:3])


@pytest.mark.slow
def test_same_output_bytes_with_one_and_two_workers(tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    _fixture(tmp_path / "in", num_docs=24)
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the multi_processing workers import gpt_jax from this checkout
    scratch = tmp_path / "tempdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    outputs = []
    for name, flags in (("one", ["--direct_num_workers=1"]),
                        ("two", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
        opts = corpus.CorpusOptions(output_dir=str(tmp_path / name), inputs=[str(tmp_path / "in" / "*.txt")],
                                    vocab_size=300, num_shards=3, val_fraction=0.2)
        corpus.prepare(opts, PipelineOptions(flags))
        files = {}
        for base, _, names in os.walk(tmp_path / name):
            for n in names:
                with open(os.path.join(base, n), "rb") as f:
                    files[os.path.relpath(os.path.join(base, n), tmp_path / name)] = f.read()
        outputs.append(files)
    assert sorted(outputs[0]) == sorted(outputs[1])
    assert {"manifest.json", "tokenizer/sentencepiece.model", "val-00000-of-00001.tfrecord"} <= set(outputs[0])
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name
    manifest = json.loads(outputs[0]["manifest.json"])
    assert manifest["tokenizer"]["kind"] == "sentencepiece" and manifest["documents"]["val"] > 0
    # the FnApiRunner runs them, as in every test here; the DirectRunner's first try of the Prism runner (downloaded
    # from GitHub where the network allows) would leave a directory in the temporary directory on every run
    assert os.listdir(scratch) == []
    assert corpus._local_runner(PipelineOptions(["--runner=DataflowRunner"])) is None


@pytest.mark.slow
def test_tfds_dataset_prepared_locally(tmp_path):
    pytest.importorskip("importlib_resources")  # tensorflow_datasets needs it to build a dataset
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(2)
    texts = [_document(rng, 40) for _ in range(12)]
    rows = [t.encode() for t in texts] + [texts[0].encode(), b"\xff\xfe not utf-8 at all, but long enough"]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_corpus", version="1.0.0", data_dir=str(tmp_path / "tfds"),
        features=tfds.features.FeaturesDict({"body": tfds.features.Text()}),
        split_datasets={"train": tf.data.Dataset.from_tensor_slices({"body": rows})})
    opts = corpus.CorpusOptions(output_dir=str(tmp_path / "out"), tfds="tiny_corpus:train", text_field="body",
                                tfds_data_dir=str(tmp_path / "tfds"), tokenizer="char", val_fraction=0.0)
    manifest = corpus.prepare(opts)
    assert manifest["documents_read"] == 14 and manifest["documents_kept"] == 12
    assert manifest["removed"]["exact_duplicate"] == 1 and manifest["removed"]["not_utf8"] == 1
    assert sorted(_kept_texts(tmp_path / "out")) == sorted(clean.clean_text(t) for t in texts)
    for bad, message in (("tiny_corpus:test", "no split 'test'"), ("no_such_dataset_x:train", "not found")):
        opts.tfds = bad
        with pytest.raises(UserError, match=message):
            corpus.prepare(opts, overwrite=True)


def test_command_line_errors(tmp_path):
    help_run = _run_tool("--help")
    assert help_run.returncode == 0 and "--vocab_size" in help_run.stdout, help_run.stderr
    cases = [
        (["--input=" + str(tmp_path / "none*.txt")], "--input: no file matches"),
        (["--input=x", "--direct_running_mode=multi_threading"], "multi_threading loses documents"),
        (["--input=x", "--not_a_flag=1"], "unknown flag --not_a_flag"),
        (["--input=x", "--tokenizer=words"], "--tokenizer='words' is not one of"),
        (["--input=x", "--val_fraction=1.5"], "--val_fraction=1.5"),
        (["--input=x", "--min_chars=many"], "--min_chars=many"),
        (["--input=" + str(tmp_path)], "is a directory"),
    ]
    for args, expected in cases:
        result = _run_tool(f"--output_dir={tmp_path / 'out'}", *args)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.slow
def test_cli_prepares_data_that_trains(tmp_path):
    """The command line end to end, then a few training steps on its shards with resume from a checkpoint."""
    _fixture(tmp_path / "in", num_docs=16)
    out = tmp_path / "data"
    result = _run_tool(f"--input={tmp_path / 'in' / '*.txt'}", f"--output_dir={out}", "--vocab_size=300",
                       "--val_fraction=0.25")
    assert result.returncode == 0, result.stderr
    assert "documents kept" in result.stdout and "near_duplicate" in result.stdout

    from gpt_jax import config as config_lib
    from gpt_jax import train

    config = config_lib.base_config()
    config.update_from_flattened_dict({"data.path": str(out), "train_steps": 4, "batch_size": 4, "seq_len": 32,
                                       "eval_every": 0, "eval_steps": 1, "log_every": 2, "checkpoint_every": 2,
                                       "model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
                                       "sample.max_new_tokens": 0})
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir)
    assert np.isfinite(first["val_loss"])
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [line["step"] for line in lines if "train_loss" in line] == [2, 4]
    assert tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer")).vocab_size == 300


@pytest.mark.slow
@pytest.mark.parametrize("num_files", [1, 5])
def test_a_few_files_with_default_flags_get_a_validation_split_that_trains(tmp_path, num_files):
    """One book or five (a file per document, the default): too few documents for a whole one to be held out at
    --val_fraction=0.05, so each gives the tail of its lines to validation; the default --vocab_size=32768 is more
    than this text supports and is clamped with a warning. A short run trains and evaluates on the result."""
    text = text_lib.load_corpus("")[0][:150_000]
    os.makedirs(tmp_path / "in")
    for i in range(num_files):
        (tmp_path / "in" / f"book{i}.txt").write_text(text[i * len(text) // num_files:(i + 1) * len(text) // num_files])
    out = tmp_path / "data"
    result = _run_tool(f"--input={tmp_path / 'in' / '*.txt'}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = shards.read_manifest(str(out))
    assert manifest["documents"]["val"] == num_files and manifest["documents"]["train"] == num_files
    assert 0.03 < manifest["bytes"]["val"] / sum(manifest["bytes"].values()) < 0.07
    assert manifest["tokenizer"]["vocab_size"] < 32768 and "warning: --vocab_size=32768" in result.stdout

    from gpt_jax import config as config_lib
    from gpt_jax import train

    config = config_lib.base_config()
    config.update_from_flattened_dict({"data.path": str(out), "train_steps": 2, "batch_size": 4, "seq_len": 32,
                                       "eval_every": 0, "log_every": 1, "model.n_layer": 1, "model.d_model": 32,
                                       "model.n_head": 2, "sample.max_new_tokens": 0})
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(result["val_loss"]) and result["val_tokens"] > 1000
