"""Plain-text corpora: read, check, split, tokenize; the bundled tinyshakespeare is the default."""

from __future__ import annotations

import glob
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
