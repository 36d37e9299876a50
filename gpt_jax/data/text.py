"""Text files: paths and globs, UTF-8 files read whole, by line or as JSONL records (one parser for the strict
readers and the corpus pipeline's counting one), and the corpus of `data.text_files` (tinyshakespeare when empty)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from gpt_jax.errors import DataError

BUNDLED_CORPUS = os.path.join(os.path.dirname(__file__), "tinyshakespeare.txt")


def expand_paths(spec: str, key: str) -> list[str]:
    """Comma-separated paths or globs → existing files, in the given order (each glob sorted, a file named twice
    kept once); DataError naming `key` (the config key or flag) for a part that names no file or a directory."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            raise DataError(f"{key}: no file matches {part!r}")
        for path in matches:
            if os.path.isdir(path):
                raise DataError(f"{key}: {path} is a directory (use a glob such as {path.rstrip('/')}/*.txt)")
            if not os.path.isfile(path):
                raise DataError(f"{key}: no such file {path!r}")
            paths.append(path)
    if not paths:
        raise DataError(f"{key} names no file")
    return list(dict.fromkeys(paths))


def _read_utf8(path: str, name: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_text(path: str, key: str = "") -> str:
    """The text of a UTF-8 file; DataError naming `key` (when given) and the file when it cannot be read, is not
    UTF-8, is not text (NUL bytes) or is empty."""
    name = f"{key} {path}" if key else path
    text = _read_utf8(path, name)
    if "\x00" in text:
        raise DataError(f"{name} is not text (it contains NUL bytes)")
    if not text.strip():
        raise DataError(f"{name} is empty")
    return text


def read_lines(path: str, key: str) -> list[str]:
    """The lines of a UTF-8 text file, cut at "\\n" only, without their line ends; DataError naming `key` and the
    file when it cannot be read or is not UTF-8."""
    lines = _read_utf8(path, f"{key} {path}").split("\n")
    if not lines[-1]:
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def parse_jsonl(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file: the parsed JSON, or the ValueError that says
    why the line is not JSON (UnicodeDecodeError for bytes that are not UTF-8, else json.JSONDecodeError)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except ValueError as e:
            value = e
        yield number, value


def jsonl_records(path: str, key: str, fields: tuple[str, ...] = (),
                  where: str = "{path}:{line}") -> Iterator[tuple[str, dict]]:
    """(location, record) for each JSON object of a JSONL file (blank lines skipped), the location being `where`
    with the file's `key`, `path` and `line` filled in; DataError "LOCATION: ..." for a line that is not a JSON
    object with string `fields`."""
    for number, record in parse_jsonl(read_lines(path, key)):
        at = where.format(key=key, path=path, line=number)
        if isinstance(record, ValueError):
            raise DataError(f"{at}: not valid JSON ({record.msg})")
        if not isinstance(record, dict):
            raise DataError(f"{at}: a record must be a JSON object")
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"{at}: a record needs string field(s) {', '.join(map(repr, missing))}")
        yield at, record


def read_jsonl(path: str, key: str, fields: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line, each with string `fields`; DataError naming the
    file and line otherwise."""
    return [record for _, record in jsonl_records(path, key, fields)]


def load_corpus(text_files: str) -> tuple[str, list[str]]:
    """The concatenated text of `text_files` (or the bundled corpus when empty) and the paths read."""
    paths = expand_paths(text_files, "data.text_files") if text_files.strip() else [BUNDLED_CORPUS]
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
