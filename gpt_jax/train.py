"""The training loop: a pure train step jitted once with explicit shardings, periodic evaluation, Orbax
checkpoints with automatic resume, and progress lines, metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import lora as lora_lib
from gpt_jax import optim, sharding
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig, Transformer, flops_per_token

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


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum_steps: int, use_dropout: bool,
                    lora_scale: float | None = None):
    """train_step(state, batch) → (state, metrics); with `lora_scale`, train_step(state, batch, base_params):
    state["params"] holds LoRA adapters, merged into the frozen `base_params` inside the step (lora.py).

    state = {"params", "opt_state", "rng", "step", "health"}; the batch is {"tokens": [batch, seq+1]} with an
    optional "loss_mask" [batch, seq] (1 where a target counts). A step whose loss or gradients are not finite
    leaves parameters and optimizer state unchanged and is recorded in state["health"] (count, first such step and
    which gradients were non-finite), which the loop reads at log steps, so no step waits on the host."""
    inject_nan_at = int(os.environ.get("GPT_JAX_INJECT_NAN_AT_STEP", "0"))  # fault injection for tests

    def loss_fn(params, micro, key, step, base):
        if lora_scale is not None:
            params = lora_lib.merge_params(base, params, lora_scale)
        losses = token_losses(graphdef, params, micro["tokens"], deterministic=not use_dropout,
                              dropout_key=key if use_dropout else None)
        if inject_nan_at:
            losses = losses * jnp.where(step + 1 == inject_nan_at, jnp.nan, 1.0)
        mask = micro.get("loss_mask")
        mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
        return jnp.sum(losses * mask), jnp.sum(mask)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, base=None):
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        micro_batches = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch)

        if grad_accum_steps == 1:
            (loss_sum, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), key, step,
                                               base)
        else:
            def accumulate(carry, inputs):
                grads_sum, loss_sum, count_sum = carry
                index, micro = inputs
                (loss, count), grads = grad_fn(params, micro, jax.random.fold_in(key, index), step, base)
                return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count_sum + count), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                accumulate, (zeros, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro_batches))
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grads_finite = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(jax.tree.leaves(grads_finite)))
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        health = state["health"]
        first_bad = (health["count"] == 0) & ~finite
        new_health = {
            "count": health["count"] + (~finite).astype(jnp.int32),
            "first_step": jnp.where(first_bad, step + 1, health["first_step"]),
            "grads_finite": jax.tree.map(lambda new, old: jnp.where(first_bad, new, old), grads_finite,
                                         health["grads_finite"]),
        }
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt_state, state["opt_state"]),
                     "rng": state["rng"], "step": step + 1, "health": new_health}
        metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return train_step


def initial_health(params) -> dict:
    return {"count": jnp.int32(0), "first_step": jnp.int32(0),
            "grads_finite": jax.tree.map(lambda _: jnp.bool_(True), params)}


def nonfinite_report(health) -> str:
    """Which step first went non-finite and which parameters' gradients were non-finite then."""
    bad = [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
           for path, ok in jax.tree_util.tree_leaves_with_path(health["grads_finite"]) if not bool(ok)]
    where = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "") if bad else "none (the loss)"
    return (f"{int(health['count'])} non-finite step(s) skipped; the first at step {int(health['first_step'])}, "
            f"non-finite gradients in: {where}")


def make_eval_step(graphdef, byte_lengths: np.ndarray):
    """eval_step(params, tokens [batch, seq+1], weights [batch] or [batch, seq]) → sums of (nll, targets, target
    bytes); per-target weights are a loss mask (1 where a target counts)."""
    byte_lengths = jnp.asarray(byte_lengths, jnp.float32)

    def eval_step(params, tokens, weights):
        losses = token_losses(graphdef, params, tokens)
        w = (weights[:, None] if weights.ndim == 1 else weights).astype(jnp.float32)
        return {"nll": jnp.sum(losses * w), "tokens": jnp.sum(jnp.ones_like(losses) * w),
                "bytes": jnp.sum(byte_lengths[tokens[:, 1:]] * w)}

    return eval_step


def evaluate_windows(eval_step, params, windows: np.ndarray, batch_size: int, input_sharding=None,
                     masks: np.ndarray | None = None) -> dict:
    """Mean loss, perplexity and bits per byte over `windows` [n, seq+1] (only the targets where `masks`
    [n, seq] is 1, when given), in fixed-size batches (the last padded with zero weight, so nothing recompiles)."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:len(chunk)] = 1.0
        if masks is not None:
            weights = np.zeros((batch_size, chunk.shape[1] - 1), np.float32)
            weights[:len(chunk)] = masks[start:start + batch_size]
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


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite steps); the message is the diagnostic."""


# config.model keys that are training choices, not architecture: a pretrained source or a resumed run's saved
# config does not override them.
_TRAINING_CHOICES = ("dropout", "dtype", "activation_dtype", "param_dtype", "remat", "scan_layers")


def _apply_source_model(config, source_cfg: ModelConfig) -> None:
    """Takes the architecture from a pretrained source; training choices (dropout, dtypes, remat, scan) stay."""
    with config.ignore_type():
        for field in dataclasses.fields(source_cfg):
            if field.name not in _TRAINING_CHOICES:
                config.model[field.name] = getattr(source_cfg, field.name)
    if config.seq_len > source_cfg.max_seq_len:
        raise ConfigError(f"seq_len={config.seq_len} is longer than init_from's context of {source_cfg.max_seq_len}")


def prepare_run(config, workdir: str):
    """Resolves the config against the pretrained source (`init_from`), the data (vocabulary size) and a run
    already in the workdir; writes config.json. Returns (config, data source, pretrained params or None)."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    saved_path = os.path.join(workdir, "config.json")
    pretrained_params = None
    if config.init_from:
        if checkpoint_lib.has_checkpoint(workdir) and os.path.isfile(saved_path):
            saved = config_lib.from_json_file(saved_path)  # resuming: the architecture is the run's own
            with config.ignore_type():
                for key, value in saved.model.items():
                    if key not in _TRAINING_CHOICES:
                        config.model[key] = value
                for key, value in saved.lora.items():  # the checkpoint's adapters have the run's own shape
                    config.lora[key] = value
        else:
            from gpt_jax import pretrained

            loaded = pretrained.load(config.init_from)
            _apply_source_model(config, loaded.model_cfg)
            loaded.tokenizer.save(tokenizer_dir)
            pretrained_params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
        if config.lora.rank and pretrained_params is None:  # LoRA checkpoints hold adapters; the base is init_from
            from gpt_jax import pretrained

            pretrained_params = nnx.to_pure_dict(nnx.state(pretrained.load(config.init_from).model, nnx.Param))
    data = data_lib.load_data(config, tokenizer_dir)
    vocab = data.tokenizer.vocab_size
    if not config.model.vocab_size:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab}")
    config_lib.validate(config)
    if jax.process_index() == 0:
        with open(saved_path, "w") as f:
            f.write(config_lib.to_json(config))
    return config, data, pretrained_params


class _StopSignal:
    """Turns SIGTERM (preemption, `kill`) into a request to checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self) -> bool:
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_state(config, model_cfg: ModelConfig, mesh, pretrained_params=None):
    """(graphdef, optimizer, state, state shardings, param shardings, frozen base params or None) for a fresh run,
    placed on the mesh. With LoRA (lora.rank > 0) the state's params are the adapters and the pretrained params
    are the frozen base, which has no optimizer state."""
    graphdef, p_shardings = param_shardings(model_cfg, mesh)
    if pretrained_params is not None:
        params = jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x), sh), pretrained_params, p_shardings)
    else:
        params = init_params(model_cfg, config.seed, p_shardings)
    base = None
    lora_spec = lora_lib.LoraSpec.from_config(config)
    if lora_spec is not None:
        base = params
        adapters = lora_lib.init_adapters(base, lora_spec, config.seed)
        params = jax.device_put(adapters, lora_lib.adapter_shardings(adapters, p_shardings))
    tx = optim.make_optimizer(config)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated),
             "step": jax.device_put(jnp.int32(0), replicated),
             "health": jax.device_put(initial_health(params), replicated)}
    return graphdef, tx, state, jax.tree.map(lambda x: x.sharding, state), p_shardings, base


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the latest good checkpoint in `workdir/checkpoints`), evaluates every `eval_every`
    steps and at the end; returns the last evaluation's metrics. SIGTERM checkpoints and returns early."""
    config, data, pretrained_params = prepare_run(config, workdir)
    model_cfg = ModelConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps):
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by grad_accum_steps × the mesh's "
                          f"data × fsdp = {config.grad_accum_steps * mesh.shape['data'] * mesh.shape['fsdp']}")

    with jax.set_mesh(mesh):
        graphdef, tx, state, state_shardings, p_shardings, base_params = build_state(config, model_cfg, mesh,
                                                                                     pretrained_params)
        n_params = sum(x.size for x in jax.tree.leaves(state["params"] if base_params is None else base_params))
        lora_spec = lora_lib.LoraSpec.from_config(config)
        frozen = () if base_params is None else (base_params,)  # a jit input, never donated
        batch_sharding = sharding.batch_sharding(mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        start_step, data_state = 0, None
        restored = ckpt.restore_latest(state["params"], state["opt_state"], warn=_progress)
        if restored is not None:
            start_step, params, opt_state, meta = restored
            data_state = meta.get("data")
            state.update(params=params, opt_state=opt_state if opt_state is not None else jax.jit(tx.init)(params),
                         rng=jax.device_put(np.asarray(meta.get("rng", state["rng"]), np.uint32), replicated),
                         step=jax.device_put(jnp.int32(start_step), replicated))
            _progress(f"resumed from {ckpt.directory} at step {start_step}")
        else:
            _progress(f"model: {n_params:,} parameters; {mesh.size} device(s), mesh {dict(mesh.shape)}"
                      + (f"; initialized from {config.init_from}" if pretrained_params is not None else "")
                      + (f"; LoRA rank {lora_spec.rank} on {','.join(lora_spec.targets)}: "
                         f"{lora_lib.count(state['params']):,} trainable" if lora_spec else ""))

        train_step = jax.jit(
            make_train_step(graphdef, tx, config.grad_accum_steps, config.model.dropout > 0,
                            lora_spec.scale if lora_spec else None),
            in_shardings=(state_shardings, batch_sharding) + ((p_shardings,) if frozen else ()),
            out_shardings=(state_shardings, None), donate_argnums=(0,))
        merge_adapters = jax.jit(lambda base, adapters: lora_lib.merge_params(base, adapters, lora_spec.scale),
                                 out_shardings=p_shardings) if lora_spec else None
        eval_step = jax.jit(make_eval_step(graphdef, data.tokenizer.token_byte_lengths()),
                            in_shardings=(p_shardings, batch_sharding, None))

        val_windows = data.val_windows(config.seq_len)
        val_masks = data.val_loss_masks(config.seq_len) if hasattr(data, "val_loss_masks") else None  # SFT
        rng = np.random.default_rng(config.seed)
        n_quick = min(len(val_windows), config.eval_steps * config.batch_size)
        quick_index = np.sort(rng.choice(len(val_windows), n_quick, replace=False))
        quick_windows = val_windows[quick_index]
        quick_masks = None if val_masks is None else val_masks[quick_index]

        batches = data.train_batches(config.batch_size, config.seq_len, config.seed, data_state,
                                     jax.process_index(), jax.process_count())
        writer = MetricsWriter(workdir, start_step)
        peak = device_peak_flops(config) * jax.device_count()
        flops_tok = flops_per_token(model_cfg, n_params, config.seq_len)
        tokens_per_step = config.batch_size * config.seq_len
        schedule = optim.learning_rate_schedule(config)
        stop = _StopSignal()

        def put_batch(batch):
            return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch)

        def save(step):
            ckpt.save(step, state["params"], state["opt_state"],
                      {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(),
                       "data": batches.state()})

        def evaluate(step, full):
            windows, masks = (val_windows, val_masks) if full else (quick_windows, quick_masks)
            params = merge_adapters(base_params, state["params"]) if lora_spec else state["params"]
            result = evaluate_windows(eval_step, params, windows, config.batch_size, batch_sharding, masks)
            writer.write(step, result)
            _progress(f"step {step}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                      f"val_bpb {result['val_bpb']:.4f}" + ("  (whole validation split)" if full else ""))
            return result

        metrics_out: dict = {}
        last_metrics = None
        nonfinite_seen = 0
        last_log_time, last_log_step = time.perf_counter(), start_step
        train_start = time.perf_counter()
        step = start_step
        try:
            for step in range(start_step + 1, config.train_steps + 1):
                state, last_metrics = train_step(state, put_batch(next(batches)), *frozen)
                is_last = step == config.train_steps
                if step % config.log_every == 0 or is_last:
                    values, health = jax.device_get((last_metrics, state["health"]))
                    now = time.perf_counter()
                    tokens_per_sec = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                    mfu = flops_tok * tokens_per_sec / peak
                    eta = (config.train_steps - step) * (now - train_start) / max(step - start_step, 1)
                    lr = float(schedule(step - 1))
                    loss = float(values["train_loss"])
                    writer.write(step, {"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
                                        "grad_norm": float(values["grad_norm"])})
                    _progress(f"step {step}/{config.train_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                              f"{tokens_per_sec:,.0f} tok/s  mfu {mfu:.1%}  eta {_fmt_time(eta)}")
                    if int(health["count"]) > nonfinite_seen:
                        nonfinite_seen = int(health["count"])
                        _progress("warning: " + nonfinite_report(health))
                        if nonfinite_seen >= config.max_nonfinite_steps:
                            raise TrainingError("halted: " + nonfinite_report(health))
                    last_log_time, last_log_step = time.perf_counter(), step
                if (config.eval_every and step % config.eval_every == 0) or is_last:
                    metrics_out = evaluate(step, full=is_last and config.final_eval_full)
                    last_log_time = time.perf_counter()
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or is_last:
                    save(step)
                    _fault_injection_hook(ckpt, step)
                elif stop.should_stop():
                    save(step)
                    _progress(f"SIGTERM: saved a checkpoint at step {step}; run the same command to resume")
                    break
            if step == start_step and restored is not None:
                _progress(f"the checkpoint at step {start_step} already reached train_steps={config.train_steps}")
        finally:
            stop.restore()
            ckpt.close()
        elapsed = time.perf_counter() - train_start
        if step > start_step:
            _progress(f"trained steps {start_step + 1}-{step} in {elapsed:.1f}s "
                      f"({(step - start_step) * tokens_per_step / elapsed:,.0f} tok/s)")
        return metrics_out


def compile_report(config) -> dict:
    """Compiles the train step of `config` for the current devices without training; returns (and prints) the
    per-device memory of parameters, optimizer state and the compiled step, and FLOPs per step."""
    model_cfg_vocab = config.model.vocab_size or (config.data.vocab_size if config.data.tokenizer == "sentencepiece"
                                                  else 0)
    if not model_cfg_vocab:
        raise ConfigError("--mode=compile needs model.vocab_size (or data.tokenizer=sentencepiece)")
    config.model.vocab_size = model_cfg_vocab
    config_lib.validate(config)
    model_cfg = ModelConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, p_shardings = param_shardings(model_cfg, mesh)
        tx = optim.make_optimizer(config)

        def init_state():
            params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(0)), nnx.Param))
            return {"params": params, "opt_state": tx.init(params), "rng": jax.random.key_data(jax.random.key(0)),
                    "step": jnp.int32(0), "health": initial_health(params)}

        abstract = jax.eval_shape(init_state)
        out_shardings = _state_shardings_like(abstract, p_shardings, mesh)
        batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32,
                                                sharding=sharding.batch_sharding(mesh))}
        state_in = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract,
                                out_shardings)
        step_fn = jax.jit(make_train_step(graphdef, tx, config.grad_accum_steps, config.model.dropout > 0),
                          in_shardings=(out_shardings, sharding.batch_sharding(mesh)),
                          out_shardings=(out_shardings, None), donate_argnums=(0,))
        t = time.perf_counter()
        compiled = step_fn.lower(state_in, batch).compile()
        compile_seconds = time.perf_counter() - t

    def per_device_bytes(tree, shardings_tree):
        total = 0
        for a, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings_tree), strict=True):
            total += int(np.prod(sh.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
        return total

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
    report = {
        "devices": mesh.size, "mesh": dict(mesh.shape), "parameters": n_params,
        "param_bytes_per_device": per_device_bytes(abstract["params"], out_shardings["params"]),
        "opt_state_bytes_per_device": per_device_bytes(abstract["opt_state"], out_shardings["opt_state"]),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(memory, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)),
        "generated_code_bytes": int(getattr(memory, "generated_code_size_in_bytes", 0)),
        "flops_per_step_compiled": float(cost.get("flops", 0.0)) if cost else 0.0,
        "flops_per_step_model": flops_per_token(model_cfg, n_params, config.seq_len) * config.batch_size
        * config.seq_len,
        "compile_seconds": compile_seconds,
    }
    gib = 1024**3
    lines = [f"compiled the train step for {mesh.size} device(s), mesh {dict(mesh.shape)}, in {compile_seconds:.1f}s",
             f"  parameters            {n_params:,}",
             f"  params / device       {report['param_bytes_per_device'] / gib:.3f} GiB",
             f"  optimizer / device    {report['opt_state_bytes_per_device'] / gib:.3f} GiB",
             f"  step arguments        {report['argument_bytes'] / gib:.3f} GiB (per device)",
             f"  step temporaries      {report['temp_bytes'] / gib:.3f} GiB (per device)",
             f"  FLOPs / step          {report['flops_per_step_compiled']:.3e} (compiled, per device); "
             f"{report['flops_per_step_model']:.3e} (6N + attention, whole batch)"]
    print("\n".join(lines), flush=True)
    return report


def _state_shardings_like(abstract_state, p_shardings, mesh):
    """Shardings for a train state: the parameters' own, the same for every params-shaped subtree of the optimizer
    state (AdamW's moments), replicated for the rest."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_treedef = jax.tree.structure(abstract_state["params"])

    def for_opt(node):
        if jax.tree.structure(node) == params_treedef:
            return p_shardings
        return jax.tree.map(lambda _: replicated, node)

    opt_state = abstract_state["opt_state"]
    opt_shardings = jax.tree.map(for_opt, opt_state,
                                 is_leaf=lambda n: jax.tree.structure(n) == params_treedef)
    return {"params": p_shardings, "opt_state": opt_shardings,
            "rng": replicated, "step": replicated,
            "health": jax.tree.map(lambda _: replicated, abstract_state["health"])}


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
