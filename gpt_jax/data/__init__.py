"""Data for training and evaluation: `load_data(config, tokenizer_dir)` gives a source with a tokenizer, resumable
training batches and validation batches, from plain text (`data.text_files`), prepared shards (`data.path`), chat
records for supervised fine-tuning (`data.sft_file`, sft.py) or, for an encoder-decoder, source/target pairs
(pairs.py).

Every source has `tokenizer`, `train_batches(batch_size, seq_len, seed, state, process_index, process_count)` (an
iterator of batch dicts with a `state()` to resume from) and `val_batches(batch_size, seq_len, limit, seed)` (a
list of batch dicts whose "loss_mask" is 1 where a target counts, 0 on padding)."""

from __future__ import annotations

import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import pipeline, text
from gpt_jax.errors import ConfigError


class WindowSource:
    """What the decoder-only sources share: validation as windows [n, seq_len + 1] (`val_windows`), each target
    counted (or as `val_loss_masks` says)."""

    def val_batches(self, batch_size: int, seq_len: int, limit: int = 0, seed: int = 0) -> list[dict]:
        """Every validation window (or a seeded random subset of `limit`) in batches of batch_size rows, the last
        padded with rows whose loss mask is 0, so every batch has one shape."""
        windows = self.val_windows(seq_len)
        masks = (self.val_loss_masks(seq_len) if hasattr(self, "val_loss_masks")
                 else np.ones((len(windows), seq_len), np.float32))
        if limit and limit < len(windows):
            index = np.sort(np.random.default_rng(seed).choice(len(windows), limit, replace=False))
            windows, masks = windows[index], masks[index]
        batches = []
        for start in range(0, len(windows), batch_size):
            tokens = np.zeros((batch_size, windows.shape[1]), np.int32)
            mask = np.zeros((batch_size, seq_len), np.float32)
            chunk = windows[start:start + batch_size]
            tokens[:len(chunk)], mask[:len(chunk)] = chunk, masks[start:start + batch_size]
            batches.append({"tokens": tokens, "loss_mask": mask})
        return batches


class TextSource(WindowSource):
    """Plain text tokenized at start; the tokenizer is trained on the training split unless the workdir has one."""

    def __init__(self, config, tokenizer_dir: str):
        corpus, self.paths = text.load_corpus(config.data.text_files)
        train_text, val_text = text.split_text(corpus, config.data.val_fraction)
        if os.path.exists(os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON)):
            self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        else:  # characters from the whole text (nanoGPT's), subwords from the training split
            texts = [corpus] if config.data.tokenizer == "char" else train_text.splitlines(keepends=True)
            self.tokenizer = tokenizer_lib.train(config.data.tokenizer, texts, config.data.vocab_size, tokenizer_dir)
        self.train_tokens = text.encode_array(self.tokenizer, train_text)
        self.val_tokens = text.encode_array(self.tokenizer, val_text)

    def train_batches(self, batch_size: int, seq_len: int, seed: int, state: dict | None = None,
                      process_index: int = 0, process_count: int = 1):
        start = (state or {}).get("batch_index", 0)
        return pipeline.TokenBatches(self.train_tokens, batch_size, seq_len, seed, start, process_index,
                                     process_count)

    def val_windows(self, seq_len: int) -> np.ndarray:
        return pipeline.eval_windows(self.val_tokens, seq_len)


def load_data(config, tokenizer_dir: str):
    """The configured data source. `tokenizer_dir` is where a new tokenizer is saved (WORKDIR/tokenizer; an
    encoder-decoder's sides in its source/ and target/)."""
    if config.model.kind == "encoder_decoder":
        from gpt_jax.data import pairs

        return pairs.PairSource(config, tokenizer_dir)
    if config.data.path and config.data.text_files:
        raise ConfigError("set data.path or data.text_files, not both")
    if config.data.sft_file:
        from gpt_jax.data import sft

        return sft.SFTSource(config, tokenizer_dir)
    if config.data.path:
        from gpt_jax.data import shards

        return shards.ShardSource(config.data.path, tokenizer_dir)
    return TextSource(config, tokenizer_dir)
