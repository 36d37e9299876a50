"""The train state, its shardings, and the pure steps over it, each jitted once with explicit shardings: the loss of
either model kind, the train step (gradient accumulation, the non-finite guard, a frozen LoRA base) and the
evaluation step."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt_jax import lora as lora_lib
from gpt_jax import model as model_lib
from gpt_jax import optim, sharding

LOSS_CHUNK = 2048  # tokens per chunk of the output layer and loss (the `loss_chunk` config key)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Cross-entropy per position of logits [..., vocab] (float32) against integer labels, the target distribution
    smoothed towards uniform by `label_smoothing`."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def chunked_cross_entropy(logits_fn, hidden, labels, label_smoothing: float = 0.0, chunk: int = LOSS_CHUNK):
    """cross_entropy(logits_fn(hidden), labels) for hidden [tokens, d_model] and labels [tokens], `chunk` tokens at
    a time: the [tokens, vocab] float32 logits are never held whole, in the forward or (each chunk's logits are
    recomputed there) the backward pass. chunk 0, or at least the token count, computes them at once."""
    n = labels.shape[0]
    if not chunk or chunk >= n:
        return cross_entropy(logits_fn(hidden), labels, label_smoothing)
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, hidden.shape[-1])
    labels = jnp.pad(labels, (0, pad)).reshape(-1, chunk)
    one_chunk = jax.checkpoint(lambda h, y: cross_entropy(logits_fn(h), y, label_smoothing))
    return jax.lax.map(lambda xs: one_chunk(*xs), (hidden, labels)).reshape(-1)[:n]


def token_losses(graphdef, params, batch: dict, *, label_smoothing: float = 0.0, dropout_key=None,
                 chunk: int = LOSS_CHUNK):
    """(losses [batch, seq] in float32, labels [batch, seq]) of a batch: {"tokens": [batch, seq+1]} (next-token
    prediction) for a decoder-only model; {"source", "source_valid", "target_in", "target_out"} for an
    encoder-decoder. Dropout is on when a `dropout_key` is given; the loss goes `chunk` tokens at a time."""
    model = nnx.merge(graphdef, params)
    train = dict(deterministic=dropout_key is None,
                 rngs=None if dropout_key is None else nnx.Rngs(dropout=dropout_key), return_hidden=True)
    if isinstance(model, model_lib.EncoderDecoder):
        hidden = model(batch["source"], batch["target_in"], batch["source_valid"], **train)
        labels, head = batch["target_out"], model.decoder
    else:
        hidden = model(batch["tokens"][:, :-1], **train)
        labels, head = batch["tokens"][:, 1:], model
    losses = chunked_cross_entropy(head.logits, hidden.reshape(labels.size, -1), labels.reshape(-1),
                                   label_smoothing, chunk)
    return losses.reshape(labels.shape), labels


@dataclasses.dataclass
class TrainSetup:
    """Everything the loop and the evaluation need about the model on the mesh."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    state: dict  # {"params", "opt_state", "rng", "step", "health"}, placed on the mesh
    shardings: dict  # of the state
    param_shardings: dict  # of the model's parameters
    base: dict | None  # LoRA: the frozen pretrained parameters (state["params"] holds the adapters)
    lora: lora_lib.LoraSpec | None
    base_shardings: dict | None = None  # of `base`

    def model_params(self, params, base=None):
        """The model's parameters from the trained ones: LoRA adapters attached to the base, or themselves."""
        return params if self.lora is None else lora_lib.attach(unstack_blocks(base), params, self.lora.scale)

    def parameter_counts(self) -> tuple[int, int]:
        """(trained, frozen): LoRA trains its adapters, the pretrained base frozen; otherwise nothing is frozen."""
        trained = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        return trained, 0 if self.base is None else sum(x.size for x in jax.tree.leaves(self.base))

    @property
    def frozen(self) -> tuple:
        return () if self.base is None else (self.base,)

    @property
    def frozen_shardings(self) -> tuple:
        return () if self.base is None else (self.base_shardings,)


def _is_layer_list(key, node) -> bool:
    return key == "blocks" and isinstance(node, dict) and bool(node) and all(isinstance(i, int) for i in node)


def stack_blocks(tree, leaf=lambda *layers: jnp.stack(layers)):
    """`tree` with each `blocks` entry ({0: layer, 1: layer, ...}) as one layer's tree of `leaf(*its n_layer
    leaves)`: stacked arrays [n_layer, ...] by default.

    A scanned model stacks its layers' parameters inside the step (model.py), a copy of them every step. A frozen
    LoRA base is stacked here once instead, and the step passes the model slices of it (`unstack_blocks`): XLA folds
    the model's stack of those slices back into the stacked input, so no copy is made."""
    if not isinstance(tree, dict):
        return tree
    return {key: jax.tree.map(leaf, *(node[i] for i in range(len(node)))) if _is_layer_list(key, node)
            else stack_blocks(node, leaf) for key, node in tree.items()}


def unstack_blocks(tree):
    """The inverse of `stack_blocks` (a tree with no stacked `blocks` comes back as it is)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, node in tree.items():
        if key == "blocks" and isinstance(node, dict) and not _is_layer_list(key, node):  # stacked
            n_layer = jax.tree.leaves(node)[0].shape[0]
            out[key] = {i: jax.tree.map(lambda x, i=i: x[i], node) for i in range(n_layer)}
        else:
            out[key] = unstack_blocks(node)
    return out


def initial_health(params) -> dict:
    return {"count": jnp.int32(0), "first_step": jnp.int32(0),
            "grads_finite": jax.tree.map(lambda _: jnp.bool_(True), params)}


def setup(config, model_cfg, mesh, pretrained_params=None, abstract: bool = False) -> TrainSetup:
    """The train state of a fresh run on `mesh`: parameters from `pretrained_params` or freshly initialized in
    their shardings, AdamW state sharded like them. With LoRA (lora.rank > 0) the trained parameters are adapters
    and the pretrained ones the frozen base, which has no optimizer state. abstract=True: shapes only."""
    abstract_model = nnx.eval_shape(lambda: model_lib.create(model_cfg))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    p_shardings = sharding.param_shardings(abstract_model, mesh)
    spec = lora_lib.LoraSpec.from_config(config)
    tx = optim.make_optimizer(config)

    def init_params():
        return nnx.to_pure_dict(nnx.state(model_lib.create(model_cfg, config.seed), nnx.Param))

    def make_state(params):
        return {"params": params, "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(config.seed)),
                "step": jnp.int32(0), "health": initial_health(params)}

    if abstract:
        params = jax.eval_shape(init_params)
    elif pretrained_params is not None:
        params = jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x), sh), pretrained_params, p_shardings)
    else:
        params = jax.jit(init_params, out_shardings=p_shardings)()
    base, base_shardings, trained_shardings = None, None, p_shardings
    if spec is not None:
        base, base_shardings = params, p_shardings
        params = lora_lib.init_adapters(base, spec, config.seed)
        trained_shardings = lora_lib.adapter_shardings(params, p_shardings)
        params = jax.device_put(params, trained_shardings)
        if config.model.scan_layers:  # see stack_blocks
            base_shardings = stack_blocks(p_shardings, lambda first, *_: jax.sharding.NamedSharding(
                first.mesh, jax.sharding.PartitionSpec(None, *first.spec)))
            base = jax.eval_shape(stack_blocks, base) if abstract else \
                jax.jit(stack_blocks, out_shardings=base_shardings)(base)
    shardings = sharding.state_shardings(jax.eval_shape(make_state, params), trained_shardings, mesh)
    state = jax.eval_shape(make_state, params) if abstract else \
        jax.jit(make_state, out_shardings=shardings)(params)
    return TrainSetup(graphdef, tx, state, shardings, p_shardings, base, spec, base_shardings)


def make_train_step(run: TrainSetup, grad_accum_steps: int, use_dropout: bool, label_smoothing: float = 0.0,
                    loss_chunk: int = LOSS_CHUNK):
    """train_step(state, batch, *run.frozen) → (state, metrics), to be jitted with the state donated.

    A batch's targets count where its optional "loss_mask" is 1. A step whose loss or gradients are not finite
    leaves parameters and optimizer state unchanged and is recorded in state["health"] (count, first such step and
    which gradients were non-finite), which the loop reads at log steps, so no step waits on the host."""
    inject_nan_at = int(os.environ.get("GPT_JAX_INJECT_NAN_AT_STEP", "0"))  # fault injection for tests

    def loss_fn(params, micro, key, step, base):
        losses, _ = token_losses(run.graphdef, run.model_params(params, base), micro, label_smoothing=label_smoothing,
                                 dropout_key=key if use_dropout else None, chunk=loss_chunk)
        if inject_nan_at:
            losses = losses * jnp.where(step + 1 == inject_nan_at, jnp.nan, 1.0)
        mask = micro["loss_mask"].astype(jnp.float32) if "loss_mask" in micro else jnp.ones_like(losses)
        return jnp.sum(losses * mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, base=None):
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        micro_batches = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, count_sum = carry
            index, micro = inputs
            micro_key = key if grad_accum_steps == 1 else jax.random.fold_in(key, index)
            (loss, count), grads = grad_fn(params, micro, micro_key, step, base)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count_sum + count), None

        if grad_accum_steps == 1:
            (grads, loss_sum, count), _ = accumulate(
                (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0), (0, jax.tree.map(lambda x: x[0], micro_batches)))
        else:
            (grads, loss_sum, count), _ = jax.lax.scan(
                accumulate, (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0),
                (jnp.arange(grad_accum_steps), micro_batches))
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        # One pass over the gradients serves the non-finite guard, the clip and the logged norm: an array's sum of
        # squares is finite exactly when its gradients are finite and not so large that the sum overflows float32.
        squares = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), grads)
        grad_norm = jnp.sqrt(sum(jax.tree.leaves(squares)))
        grads_finite = jax.tree.map(jnp.isfinite, squares)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step keeps the old values by one `lax.cond` on a scalar, not a select per leaf: XLA would
        # copy the reduction behind `finite` into every leaf's select, which grows the program with the square of
        # the number of parameter arrays (a 30-layer LoRA step compiled for minutes). The optimizer runs inside the
        # taken branch, so it updates the donated parameters and moments in place; a cond choosing between updated
        # and old values after the update copied all of them every step.
        def apply_update(grads, opt_state, params):
            updates, opt_state = run.tx.update(grads, opt_state, params, global_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        new_params, new_opt_state = jax.lax.cond(finite, apply_update, lambda _, opt_state, params: (params, opt_state),
                                                 grads, state["opt_state"], params)
        health = state["health"]
        first_bad = (health["count"] == 0) & ~finite
        new_health = {
            "count": health["count"] + (~finite).astype(jnp.int32),
            "first_step": jnp.where(first_bad, step + 1, health["first_step"]),
            "grads_finite": jax.lax.cond(first_bad, lambda: grads_finite, lambda: health["grads_finite"]),
        }
        new_state = {"params": new_params, "opt_state": new_opt_state, "rng": state["rng"], "step": step + 1,
                     "health": new_health}
        return new_state, {"train_loss": loss, "grad_norm": grad_norm}

    return train_step


def nonfinite_report(health) -> str:
    """Which step first went non-finite and which parameters' gradients were non-finite then (or so large that
    their sum of squares overflowed float32)."""
    bad = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
           for path, ok in jax.tree_util.tree_leaves_with_path(health["grads_finite"]) if not bool(ok)]
    where = (", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "") if bad else
             "none (the loss was, or the norm over all of them overflowed)")
    return (f"{int(health['count'])} non-finite step(s) skipped; the first at step {int(health['first_step'])}, "
            f"non-finite gradients in: {where}")


def make_eval_step(graphdef, byte_lengths: np.ndarray, model_params=None, loss_chunk: int = LOSS_CHUNK):
    """eval_step(params, batch, *frozen) → sums of (nll, targets, target bytes) over the targets where
    batch["loss_mask"] is 1; `model_params(params, *frozen)` turns trained parameters into the model's (LoRA)."""
    byte_lengths = jnp.asarray(byte_lengths, jnp.float32)

    def eval_step(params, batch, *frozen):
        params = model_params(params, *frozen) if model_params is not None else params
        losses, labels = token_losses(graphdef, params, batch, chunk=loss_chunk)
        mask = batch["loss_mask"].astype(jnp.float32)
        return {"nll": jnp.sum(losses * mask), "tokens": jnp.sum(mask), "bytes": jnp.sum(byte_lengths[labels] * mask)}

    return eval_step
