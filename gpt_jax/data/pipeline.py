"""The tf.data input pipeline over an in-memory token array, resumable from a batch index.

Each epoch cuts the tokens into windows of `seq_len + 1` at a per-epoch random offset and visits them in a
per-epoch random order; both are pure functions of (seed, epoch), so batch b is the same whatever happened before
it and a restored run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools

import numpy as np

from gpt_jax.errors import DataError


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int, window: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(window))
    return offset, rng.permutation(num_windows).astype(np.int64)


class TokenBatches:
    """Iterator of {"tokens": int32 [local_batch, seq_len + 1]} batches; `state()` is its position.

    With several processes each takes its own rows of every global batch (process_index-th slice), so hosts read
    disjoint windows that together make the global batch."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2):
        import tensorflow as tf

        window = seq_len + 1
        num_windows = (len(tokens) - window) // window  # one window spare for the epoch's offset
        if num_windows < batch_size:
            raise DataError(
                f"the training split has {len(tokens)} tokens; batch_size={batch_size} × (seq_len+1)={window} "
                f"needs at least {(batch_size + 1) * window}")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
        local = batch_size // process_count
        self.batches_per_epoch = num_windows // batch_size
        self._next = start_batch
        tokens_t = tf.constant(tokens.astype(np.int32))
        lo = process_index * local

        def starts(b):
            epoch, i = divmod(int(b), self.batches_per_epoch)
            offset, order = _epoch_order(seed, epoch, num_windows, window)
            rows = order[i * batch_size + lo: i * batch_size + lo + local]
            return offset + rows * window

        def make(b):
            s = tf.numpy_function(starts, [b], tf.int64, stateful=False)
            s.set_shape([local])
            return tf.gather(tokens_t, s[:, None] + tf.range(window, dtype=tf.int64)[None, :])

        ds = tf.data.Dataset.range(start_batch, np.iinfo(np.int64).max)
        ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(prefetch)
        self._iter = ds.as_numpy_iterator()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        self._next += 1
        return {"tokens": batch}

    def state(self) -> dict:
        return {"batch_index": self._next}


def eval_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Every non-overlapping window of seq_len + 1 tokens (targets of consecutive windows tile the split):
    [num_windows, seq_len + 1]."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"the validation split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx]
