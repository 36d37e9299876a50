"""The optimizer, built in one place: linear warmup then cosine decay, global-norm clipping, AdamW with weight
decay on matrices only (biases, norm scales and other vectors are not decayed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps` (step s uses (s+1)/(warmup+1) of it), then cosine decay
    to `min_learning_rate` at `train_steps` (nanoGPT's schedule)."""
    peak, floor = config.learning_rate, config.min_learning_rate
    warmup, total = config.warmup_steps, config.train_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup + 1)
        progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (peak - floor)
        return jnp.where(step < warmup, warm, cosine)

    return schedule


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
