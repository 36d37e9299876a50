"""The training loop: a pure train step jitted once with explicit shardings, periodic evaluation, Orbax
checkpoints with automatic resume, and progress lines, metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import optim, sharding
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, count_params, flops_per_token

# ----------------------------------------------------------------------------------------------------------------
# Model state


def abstract_model(model_cfg: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))


def _nested(pairs) -> dict:
    out: dict = {}
    for path, value in pairs:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def param_shardings(model_cfg: ModelConfig, mesh) -> tuple[nnx.GraphDef, dict]:
    """The model's graphdef and a pure dict of NamedShardings for its parameters, from their logical axes."""
    model = abstract_model(model_cfg)
    graphdef, state = nnx.split(model, nnx.Param)
    pairs = []
    for path, var in nnx.to_flat_state(state):
        spec = sharding.logical_to_spec(var.sharding_axes, var.get_value().shape, mesh)
        pairs.append((path, jax.sharding.NamedSharding(mesh, spec)))
    return graphdef, _nested(pairs)


def init_params(model_cfg: ModelConfig, seed: int, shardings: dict) -> dict:
    """Freshly initialized parameters (pure dict), created directly in their shardings."""

    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


# ----------------------------------------------------------------------------------------------------------------
# Steps


def token_losses(graphdef, params, tokens, *, deterministic=True, dropout_key=None):
    """Next-token cross-entropy per position: tokens [batch, seq+1] → losses [batch, seq] (float32)."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits, _ = model(tokens[:, :-1], deterministic=deterministic, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum_steps: int, use_dropout: bool):
    """train_step(state, batch) → (state, metrics). state = {"params", "opt_state", "rng", "step"}; the batch is
    {"tokens": [batch, seq+1]} with an optional "loss_mask" [batch, seq] (1 where a target counts)."""

    def loss_fn(params, micro, key):
        losses = token_losses(graphdef, params, micro["tokens"], deterministic=not use_dropout,
                              dropout_key=key if use_dropout else None)
        mask = micro.get("loss_mask")
        mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
        return jnp.sum(losses * mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        micro_batches = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        def accumulate(carry, inputs):
            grads_sum, loss_sum, count_sum = carry
            index, micro = inputs
            (loss, count), grads = grad_fn(params, micro, jax.random.fold_in(key, index))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count_sum + count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        if grad_accum_steps == 1:
            (loss_sum, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), key)
        else:
            (grads, loss_sum, count), _ = jax.lax.scan(
                accumulate, (zeros, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro_batches))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {"params": params, "opt_state": opt_state, "rng": state["rng"], "step": state["step"] + 1}
        metrics = {"train_loss": loss_sum / count, "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, byte_lengths: np.ndarray):
    """eval_step(params, tokens [batch, seq+1], weights [batch]) → sums of (nll, targets, target bytes)."""
    byte_lengths = jnp.asarray(byte_lengths, jnp.float32)

    def eval_step(params, tokens, weights):
        losses = token_losses(graphdef, params, tokens)
        w = weights[:, None].astype(jnp.float32)
        return {"nll": jnp.sum(losses * w), "tokens": jnp.sum(jnp.ones_like(losses) * w),
                "bytes": jnp.sum(byte_lengths[tokens[:, 1:]] * w)}

    return eval_step


def evaluate_windows(eval_step, params, windows: np.ndarray, batch_size: int, input_sharding=None) -> dict:
    """Mean loss, perplexity and bits per byte over `windows` [n, seq+1], in fixed-size batches (the last padded
    with zero weight, so nothing recompiles)."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        tokens = jnp.asarray(chunk) if input_sharding is None else jax.device_put(chunk, input_sharding)
        sums = eval_step(params, tokens, jnp.asarray(weights))
        for k in totals:
            totals[k] += float(sums[k])
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
            "val_bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0), "val_tokens": int(totals["tokens"])}


# ----------------------------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, from process 0 only."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):  # drop lines a killed run wrote after its last checkpoint
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        try:
            import tensorflow as tf

            self.tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: (float(v) if not isinstance(v, int) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            import tensorflow as tf

            with self.tb.as_default():
                for k, v in values.items():
                    tf.summary.scalar(k, float(v), step=int(step))
            self.tb.flush()


def device_peak_flops(config) -> float:
    """Peak FLOP/s of one device for MFU: the config's `peak_flops`, a table for known accelerators, or on CPU a
    float32 matmul rate measured now."""
    if config.peak_flops:
        return float(config.peak_flops)
    kind = jax.devices()[0].device_kind.lower()
    table = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
             "h100": 989e12, "h200": 989e12, "a100": 312e12}
    for name, flops in table.items():
        if name in kind:
            return flops
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# The loop


def prepare_run(config, workdir: str):
    """Resolves the config against the data (vocabulary size) and the workdir's saved config; returns
    (config, data source)."""
    os.makedirs(workdir, exist_ok=True)
    data = data_lib.load_data(config, os.path.join(workdir, "tokenizer"))
    vocab = data.tokenizer.vocab_size
    if not config.model.vocab_size:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab}")
    config_lib.validate(config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    return config, data


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir/checkpoints`), evaluates every `eval_every` steps
    and at the end; returns the last evaluation's metrics."""
    config, data = prepare_run(config, workdir)
    model_cfg = ModelConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the mesh's data × fsdp = "
                          f"{mesh.shape['data'] * mesh.shape['fsdp']} devices")

    with jax.set_mesh(mesh):
        graphdef, p_shardings = param_shardings(model_cfg, mesh)
        params = init_params(model_cfg, config.seed, p_shardings)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        tx = optim.make_optimizer(config)
        opt_state = jax.jit(tx.init)(params)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = {"params": params, "opt_state": opt_state,
                 "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated),
                 "step": jax.device_put(jnp.int32(0), replicated)}
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = sharding.batch_sharding(mesh)

        ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        start_step, data_state = 0, None
        latest = ckpt.latest_step()
        if latest is not None:
            params, opt_state, meta = ckpt.restore(latest, state["params"], state["opt_state"])
            start_step, data_state = int(meta["step"]), meta["data"]
            state = {"params": params, "opt_state": opt_state,
                     "rng": jax.device_put(np.asarray(meta["rng"], np.uint32), replicated),
                     "step": jax.device_put(jnp.int32(start_step), replicated)}
            _progress(f"resumed from {ckpt.directory} at step {start_step}")
        else:
            _progress(f"model: {n_params:,} parameters; {mesh.size} device(s), mesh {dict(mesh.shape)}")

        train_step = jax.jit(
            make_train_step(graphdef, tx, config.grad_accum_steps, config.model.dropout > 0),
            in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
            donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(graphdef, data.tokenizer.token_byte_lengths()),
                            in_shardings=(p_shardings, batch_sharding, None))

        val_windows = data.val_windows(config.seq_len)
        rng = np.random.default_rng(config.seed)
        n_quick = min(len(val_windows), config.eval_steps * config.batch_size)
        quick_windows = val_windows[np.sort(rng.choice(len(val_windows), n_quick, replace=False))]

        batches = data.train_batches(config.batch_size, config.seq_len, config.seed, data_state,
                                     jax.process_index(), jax.process_count())
        writer = MetricsWriter(workdir, start_step)
        peak = device_peak_flops(config) * jax.device_count()
        flops_tok = flops_per_token(model_cfg, n_params, config.seq_len)
        tokens_per_step = config.batch_size * config.seq_len

        def put_batch(batch):
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

        def save(step):
            ckpt.save(step, state["params"], state["opt_state"],
                      {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(),
                       "data": batches.state()})

        metrics_out: dict = {}
        pending = []  # (step, metrics on device): read at log steps only, so no per-step host sync
        last_log_time, last_log_step = time.perf_counter(), start_step
        train_start = time.perf_counter()
        step = start_step
        for step in range(start_step + 1, config.train_steps + 1):
            state, metrics = train_step(state, put_batch(next(batches)))
            pending.append((step, metrics))
            if step % config.log_every == 0 or step == config.train_steps:
                values = jax.device_get(pending[-1][1])
                now = time.perf_counter()
                steps_done = step - last_log_step
                tokens_per_sec = steps_done * tokens_per_step / max(now - last_log_time, 1e-9)
                mfu = flops_tok * tokens_per_sec / peak
                eta = (config.train_steps - step) * (now - train_start) / max(step - start_step, 1)
                lr = float(optim.learning_rate_schedule(config)(step - 1))
                loss = float(values["train_loss"])
                writer.write(step, {"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
                                    "grad_norm": float(values["grad_norm"])})
                _progress(f"step {step}/{config.train_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                          f"{tokens_per_sec:,.0f} tok/s  mfu {mfu:.1%}  eta {_fmt_time(eta)}")
                last_log_time, last_log_step = time.perf_counter(), step
                pending.clear()
            is_last = step == config.train_steps
            if (config.eval_every and step % config.eval_every == 0) or is_last:
                windows = val_windows if (is_last and config.final_eval_full) else quick_windows
                metrics_out = evaluate_windows(eval_step, state["params"], windows, config.batch_size,
                                               batch_sharding)
                writer.write(step, metrics_out)
                _progress(f"step {step}: val_loss {metrics_out['val_loss']:.4f}  val_ppl "
                          f"{metrics_out['val_ppl']:.2f}  val_bpb {metrics_out['val_bpb']:.4f}"
                          + ("  (whole validation split)" if windows is val_windows else ""))
                last_log_time = time.perf_counter()
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or is_last:
                save(step)
                _fault_injection_hook(ckpt, step)
        if step == start_step and latest is not None:
            _progress(f"the checkpoint at step {start_step} already reached train_steps={config.train_steps}")
        ckpt.close()
        elapsed = time.perf_counter() - train_start
        if step > start_step:
            _progress(f"trained steps {start_step + 1}-{step} in {elapsed:.1f}s "
                      f"({(step - start_step) * tokens_per_step / elapsed:,.0f} tok/s)")
        return metrics_out


def _progress(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _fault_injection_hook(ckpt: checkpoint_lib.Checkpointer, step: int) -> None:
    """For the resume tests: GPT_JAX_SIGKILL_AFTER_STEP=N makes the process SIGKILL itself once the checkpoint of
    step N is on disk, as a preempted or crashed machine would die (no cleanup, no flush)."""
    target = os.environ.get("GPT_JAX_SIGKILL_AFTER_STEP")
    if target and int(target) == step:
        import signal

        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
