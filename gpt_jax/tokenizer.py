"""Tokenizers behind one interface: character-level and SentencePiece.

A tokenizer is saved as a directory holding `tokenizer.json` ({"kind": ...} plus what that kind needs) and, for
SentencePiece, the `.model` file. `load_tokenizer(dir)` gives back the same tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Protocol

import numpy as np

from gpt_jax.errors import DataError

TOKENIZER_JSON = "tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for, to turn nats per token into bits per byte."""
        ...

    def save(self, directory: str) -> None: ...


class CharTokenizer:
    """One id per distinct character of the training text (nanoGPT's shakespeare_char)."""

    eos_id = None
    bos_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the character vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.chars], np.int32)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_JSON), "w") as f:
            json.dump({"kind": "char", "chars": self.chars}, f)


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) loaded from its `.model` file."""

    MODEL_FILE = "sentencepiece.model"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, directory: str, model_type: str = "bpe"
    ) -> "SentencePieceTokenizer":
        """Trains on `texts` (an iterable of documents) and writes the model into `directory`."""
        import sentencepiece as spm

        os.makedirs(directory, exist_ok=True)
        prefix = os.path.join(directory, cls.MODEL_FILE[: -len(".model")])
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=-1,
            unk_id=0,
            bos_id=-1,
            eos_id=1,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
        tok = cls(prefix + ".model")
        tok.save(directory)
        return tok

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                lengths[i] = 1
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                lengths[i] = 0
            else:
                lengths[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, self.MODEL_FILE)
        if os.path.abspath(target) != os.path.abspath(self.model_path):
            with open(self.model_path, "rb") as src, open(target, "wb") as dst:
                dst.write(src.read())
        with open(os.path.join(directory, TOKENIZER_JSON), "w") as f:
            json.dump({"kind": "sentencepiece", "model_file": self.MODEL_FILE}, f)


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads a tokenizer saved by `save()` (or by `tools/prepare_data.py`) from `directory`."""
    path = os.path.join(directory, TOKENIZER_JSON)
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no tokenizer at {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(os.path.join(directory, spec["model_file"]))
    raise DataError(f"{path}: unknown tokenizer kind {kind!r}")
