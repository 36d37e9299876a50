"""The optimizer, built in one place: linear warmup then cosine decay, global-norm clipping, AdamW with weight
decay on matrices only (biases, norm scales and other vectors are not decayed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (the same state and arithmetic) that takes the norm as `global_norm=` when the caller
    has it: the train step computes it once for the clip, the non-finite guard and the logged grad_norm, which were
    a pass over the gradients each."""

    def update(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        return jax.tree.map(lambda u: jnp.where(norm < max_norm, u, (u / norm.astype(u.dtype)) * max_norm),
                            updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformationExtraArgs:
    """The optax chain for a run; its update takes the gradients' global norm as `global_norm=` (see
    clip_by_global_norm)."""
    chain = []
    if config.grad_clip > 0:
        chain.append(clip_by_global_norm(config.grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*chain)
