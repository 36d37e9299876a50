"""Tokenizers behind one interface: character-level, SentencePiece, and `tokenizers`-library ("hf") ones.

A tokenizer is saved as a directory holding `tokenizer.json` ({"kind": ...} plus what that kind needs) and, for
SentencePiece, the `.model` file; for "hf", the `tokenizers` file `hf_tokenizer.json`. `load_tokenizer(dir)` gives
back the same tokenizer. `apply_chat_template` renders chats with a tokenizer's chat template (SFT data, serving).
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
from collections.abc import Iterable
from typing import Protocol

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
    def train(cls, text: str) -> CharTokenizer:
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
    def train(cls, texts: Iterable[str], vocab_size: int, directory: str,
              model_type: str = "bpe") -> SentencePieceTokenizer:
        """Trains on `texts` (documents or lines) and writes the model into `directory`. One thread and a model
        written through a writer (not a path, which the trainer would record in the model): the same texts give
        the same bytes in any directory. A `vocab_size` the texts cannot support gives the largest they do, with a
        warning on stderr."""
        import sentencepiece as spm

        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, character_coverage=0.9995, pad_id=-1, unk_id=0, bos_id=-1, eos_id=1,
                split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                add_dummy_prefix=False, normalization_rule_name="identity", max_sentence_length=1 << 16,
                num_threads=1, minloglevel=2, hard_vocab_limit=False)
        except RuntimeError as e:
            raise DataError(f"vocab_size={vocab_size}: SentencePiece cannot train it on this text "
                            f"({str(e).splitlines()[-1].split('] ')[-1].strip()})") from None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, cls.MODEL_FILE)
        with open(path, "wb") as f:
            f.write(writer.getvalue())
        tok = cls(path)
        tok.save(directory)
        if tok.vocab_size < vocab_size:
            print(f"warning: vocab_size={vocab_size} is more than this text supports: the SentencePiece model has "
                  f"{tok.vocab_size} pieces", file=sys.stderr, flush=True)
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte value → the printable character that spells it in vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class HFTokenizer:
    """A tokenizer of the `tokenizers` library, as HF model directories and GGUF files carry them.

    `encode` adds no special tokens (no BOS): callers that want one prepend `bos_id` where `add_bos` says the model
    expects it. `chat_template` keeps the model's Jinja chat template (or None)."""

    FILE = "hf_tokenizer.json"

    def __init__(self, tokenizer, eos_id: int | None = None, bos_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            tokenizer = _Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on bad files
            raise DataError(f"{path}: cannot read the tokenizer: {str(e).splitlines()[0]}") from None
        tokenizer.no_padding()  # a tokenizer.json may pad or cut every encoding to a fixed length; ids here are
        tokenizer.no_truncation()  # the text's own
        return cls(tokenizer, **kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        spec = json.loads(self.tokenizer.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            if token is None or i in special:
                continue
            if byte_level and all(c in char_to_byte for c in token):
                lengths[i] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, self.FILE))
        with open(os.path.join(directory, TOKENIZER_JSON), "w") as f:
            json.dump({"kind": "hf", "file": self.FILE, "eos_id": self.eos_id, "bos_id": self.bos_id,
                       "add_bos": self.add_bos, "chat_template": self.chat_template}, f, indent=1)


BPE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of a trained byte-level BPE


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on `texts`, with <pad>, <s>, </s> as ids 0, 1, 2 (bos <s>, eos </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, eos_id=tok.token_to_id(BPE_SPECIALS[2]), bos_id=tok.token_to_id(BPE_SPECIALS[1]))


def train(kind: str, texts: list[str], vocab_size: int, directory: str) -> Tokenizer:
    """A tokenizer of `kind` (char | sentencepiece | bpe) trained on `texts` and saved in `directory`."""
    if kind == "char":
        tok = CharTokenizer.train("".join(texts))
    elif kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size, directory)
    else:
        tok = train_bpe(texts, vocab_size)
    tok.save(directory)
    return tok


@functools.lru_cache(maxsize=8)
def _jinja_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DataError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers compiles them
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
    """`messages` ([{"role", "content"}]) rendered with the tokenizer's Jinja `chat_template` (as HF and GGUF
    tokenizers carry them; `bos_token`, `eos_token` are its BOS and EOS text), or None when it has none.
    DataError "chat template: ..." when the template fails on them."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    try:
        import jinja2
    except ImportError:
        raise DataError("rendering this chat template needs jinja2 (pip install jinja2)") from None
    ids = {name: getattr(tokenizer, f"{name}_id", None) for name in ("bos", "eos")}
    special = {f"{name}_token": "" if i is None else tokenizer.decode([i]) for name, i in ids.items()}
    try:
        return _jinja_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template: {e}") from None


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
    if kind == "hf":
        return HFTokenizer.from_file(os.path.join(directory, spec.get("file", HFTokenizer.FILE)),
                                     eos_id=spec.get("eos_id"), bos_id=spec.get("bos_id"),
                                     chat_template=spec.get("chat_template"), add_bos=bool(spec.get("add_bos")))
    raise DataError(f"{path}: unknown tokenizer kind {kind!r}")
