"""Data for training and evaluation: `load_data(config, workdir)` gives a source with a tokenizer, resumable
training batches and validation windows, from plain text (`data.text_files`), prepared shards (`data.path`) or
chat records for supervised fine-tuning (`data.sft_file`, see sft.py)."""

from __future__ import annotations

import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import pipeline, text
from gpt_jax.errors import ConfigError


class TextSource:
    """Plain text tokenized at start; the tokenizer is trained on the training split unless the workdir has one."""

    def __init__(self, config, tokenizer_dir: str):
        corpus, self.paths = text.load_corpus(config.data.text_files)
        train_text, val_text = text.split_text(corpus, config.data.val_fraction)
        if os.path.exists(os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON)):
            self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        elif config.data.tokenizer == "char":
            self.tokenizer = tokenizer_lib.CharTokenizer.train(corpus)
            self.tokenizer.save(tokenizer_dir)
        else:
            self.tokenizer = tokenizer_lib.SentencePieceTokenizer.train(
                train_text.splitlines(keepends=True), config.data.vocab_size, tokenizer_dir)
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
    """The configured data source. `tokenizer_dir` is where a new tokenizer is saved (WORKDIR/tokenizer)."""
    if config.data.path and config.data.text_files:
        raise ConfigError("set data.path or data.text_files, not both")
    if config.data.sft_file:
        from gpt_jax.data import sft

        return sft.SFTSource(config, tokenizer_dir)
    if config.data.path:
        from gpt_jax.data import shards

        return shards.ShardSource(config.data.path, tokenizer_dir)
    return TextSource(config, tokenizer_dir)
