"""The optimizer, built in one place: linear warmup then cosine decay, global-norm clipping, AdamW with weight
decay on matrices only (biases, norm scales and other vectors are not decayed)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps` (step s uses (s+1)/(warmup+1) of it), then cosine decay
    to `min_learning_rate` at `train_steps` (nanoGPT's schedule)."""
    peak, floor, warmup = config.learning_rate, config.min_learning_rate, config.warmup_steps
    if not warmup:
        return optax.cosine_decay_schedule(peak, max(config.train_steps, 1), floor / peak if peak else 0.0)
    return optax.warmup_cosine_decay_schedule(peak / (warmup + 1), peak, warmup, max(config.train_steps, warmup + 1),
                                              floor)


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config, trainable_mask=None) -> optax.GradientTransformation:
    """The optax chain for a run. `trainable_mask` (a pytree of bools like the parameters) freezes the False
    leaves: they get no update and no optimizer state."""
    chain = []
    if config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay, mask=decay_mask))
    tx = optax.chain(*chain)
    if trainable_mask is not None:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx
