"""Plain-text corpora: read, check, split, tokenize; the bundled tinyshakespeare is the default."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from gpt_jax.errors import DataError

BUNDLED_CORPUS = os.path.join(os.path.dirname(__file__), "tinyshakespeare.txt")


def expand_paths(spec: str) -> list[str]:
    """Comma-separated paths or globs → existing files, in the given order (each glob sorted)."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if any(ch in part for ch in "*?["):
            matches = sorted(glob.glob(part))
            if not matches:
                raise DataError(f"data.text_files: no file matches {part!r}")
            paths.extend(matches)
        elif not os.path.isfile(part):
            raise DataError(f"data.text_files: no such file {part!r}")
        else:
            paths.append(part)
    if not paths:
        raise DataError("data.text_files names no file")
    return paths


def read_text(path: str) -> str:
    """Reads a UTF-8 text file; a missing, empty or non-UTF-8 file is a DataError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if "\x00" in text:
        raise DataError(f"{path} is not text (it contains NUL bytes)")
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text


def load_corpus(text_files: str) -> tuple[str, list[str]]:
    """The concatenated text of `text_files` (or the bundled corpus when empty) and the paths read."""
    paths = expand_paths(text_files) if text_files.strip() else [BUNDLED_CORPUS]
    return "\n".join(read_text(p) for p in paths), paths


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First (1 - val_fraction) of the characters for training, the rest for validation (nanoGPT's split)."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def encode_array(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as an int32 array (SentencePiece encodes line by line to bound memory)."""
    if hasattr(tokenizer, "chars"):
        return np.asarray(tokenizer.encode(text), np.int32)
    ids: list[int] = []
    for line in text.splitlines(keepends=True):
        ids.extend(tokenizer.encode(line))
    return np.asarray(ids, np.int32)


def read_lines(path: str, key: str) -> list[str]:
    """The lines of a UTF-8 text file (without line ends); DataError naming `key` and the file otherwise."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            return [line.rstrip("\n").rstrip("\r") for line in f]
    except OSError as e:
        raise DataError(f"{key}={path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{key}={path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_jsonl(path: str, key: str, fields: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line, each with string `fields`; DataError naming the
    file and line otherwise."""
    records = []
    for number, line in enumerate(read_lines(path, key), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a record must be a JSON object")
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"{path}:{number}: a record needs string field(s) {', '.join(map(repr, missing))}")
        records.append(record)
    return records
