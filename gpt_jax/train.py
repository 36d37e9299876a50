"""Training, one loop for every model kind: `prepare_run` resolves the config once (the architecture of `init_from`
or of an encoder-decoder's warm starts, the tokenizer's vocabulary, a run already in the workdir) and freezes it;
`train_and_evaluate` runs the jitted train step over a sharded state with periodic evaluation, Orbax checkpoints
(resuming from the latest good one), a clean stop on SIGTERM or `time_limit_s`, and metrics."""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import evaluate, hostmem, metrics, optim, sharding, steps
from gpt_jax import model as model_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.errors import ConfigError
from gpt_jax.metrics import progress

# config.model keys that are training choices, not architecture: a pretrained source or a resumed run's saved
# config does not override them.
TRAINING_CHOICES = ("kind", "dropout", "dtype", "activation_dtype", "param_dtype", "remat", "scan_layers",
                    "attention_block")


# On CPU, a step with at least this many bytes of temporaries is not followed by the next until they are freed
WATCHED_TEMPORARIES = 256 * 2**20


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite steps); the message is the diagnostic."""


def _set(node, values: dict) -> None:
    with node.ignore_type():
        for key, value in values.items():
            if key not in TRAINING_CHOICES:
                node[key] = value


def _take_architecture(config, model_cfg) -> None:
    """config.model takes a pretrained model's architecture (its `ModelConfig`); the training choices stay."""
    _set(config.model, {k: v for k, v in vars(model_cfg).items() if k in config.model})


def _warm_start(config, workdir: str) -> dict:
    """An encoder-decoder's stacks from `model.encoder_from` / `model.decoder_from` (HF BERT, RoBERTa, GPT-2):
    their architecture and special tokens into the config, their tokenizers into the workdir. Returns the
    parameters they hold (a partial tree: cross-attention, heads and the bridge start fresh)."""
    from gpt_jax.convert import bert

    m, params = config.model, {}
    max_len = max(config.data.max_source_len or config.seq_len, config.seq_len)
    for side, source in (("encoder", m.encoder_from), ("decoder", m.decoder_from)):
        if not source:
            continue
        progress(f"loading model.{side}_from={source}")
        stack = bert.load_stack(source, side, max_seq_len=max_len)
        _set(m[side], {k: v for k, v in vars(stack.cfg).items() if k in m[side]})
        stack.tokenizer.save(workdir_lib.tokenizer_dir(workdir, "source" if side == "encoder" else "target"))
        ids = {"source_bos_id": stack.bos_id, "source_eos_id": stack.eos_id} if side == "encoder" else \
            {"decoder_start_id": stack.bos_id, "eos_id": stack.eos_id, "pad_id": stack.pad_id}
        _set(m, {k: -1 if v is None else int(v) for k, v in ids.items()})
        params[side] = stack.params
    return params


def prepare_run(config, workdir: str):
    """Resolves `config` for a run in `workdir` and writes config.json. Returns (the resolved, validated and frozen
    config, the data source, pretrained parameters or None)."""
    config = ml_collections.ConfigDict(config.to_dict())
    encdec = config.model.kind == "encoder_decoder"
    if config.model.get("quantize", "none") != "none":
        raise ConfigError(f"model.quantize={config.model.quantize} is for sampling, eval and serving (weight-only); "
                          "train with model.param_dtype=float32 or bfloat16")
    os.makedirs(workdir, exist_ok=True)
    pretrained = None
    if workdir_lib.has_checkpoint(workdir) and os.path.isfile(workdir_lib.path(workdir, workdir_lib.CONFIG)):
        saved = workdir_lib.read_config(workdir)  # resuming: the architecture is the run's own
        if encdec or config.init_from:
            _set(config.model, saved.model.to_dict())
            _set(config.lora, saved.lora.to_dict())  # the checkpoint's adapters have the run's own shape
    elif encdec:
        pretrained = _warm_start(config, workdir) or None
    elif config.init_from:
        progress(f"loading init_from={config.init_from}")
        loaded = workdir_lib.load(config.init_from)
        _take_architecture(config, loaded.model_cfg)
        if config.seq_len > loaded.model_cfg.max_seq_len:
            raise ConfigError(f"seq_len={config.seq_len} is longer than init_from's context of "
                              f"{loaded.model_cfg.max_seq_len}")
        loaded.tokenizer.save(workdir_lib.tokenizer_dir(workdir))
        pretrained = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    if config.lora.rank and pretrained is None:  # LoRA checkpoints hold adapters; the base is init_from
        progress(f"loading the LoRA base init_from={config.init_from}")
        pretrained = nnx.to_pure_dict(nnx.state(workdir_lib.load(config.init_from).model, nnx.Param))
    start = time.perf_counter()
    data = data_lib.load_data(config, workdir_lib.tokenizer_dir(workdir))
    progress(f"data ready in {time.perf_counter() - start:.1f}s")
    sides = {"encoder": data.source_tokenizer, "decoder": data.tokenizer} if encdec else {"": data.tokenizer}
    for side, tokenizer in sides.items():
        node = config.model[side] if side else config.model
        if not node.vocab_size:
            node.vocab_size = tokenizer.vocab_size
        elif node.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.{side + '.' if side else ''}vocab_size={node.vocab_size} is smaller than the "
                              f"tokenizer's {tokenizer.vocab_size}")
    if encdec:
        _set(config.model, data.ids)
    config_lib.validate(config)
    workdir_lib.write_config(workdir, config)
    if encdec and pretrained is not None:  # the warm start's parts, the rest freshly initialized
        from gpt_jax.convert import bert

        fresh = nnx.state(model_lib.create(model_lib.model_config(config), config.seed), nnx.Param)
        pretrained, left = bert.overlay(nnx.to_pure_dict(fresh), pretrained, "warm start")
        progress(f"warm start from {', '.join(s for s in (config.model.encoder_from, config.model.decoder_from) if s)}"
                 f"; freshly initialized: {_summarize(left)}")
    return ml_collections.FrozenConfigDict(config), data, pretrained


def _summarize(paths: list[str]) -> str:
    """Parameter paths grouped with block numbers folded: decoder.blocks.*.cross_attn.query.kernel."""
    import re

    groups = sorted({re.sub(r"\.\d+\.", ".*.", p).rsplit(".", 1)[0] for p in paths})
    return ", ".join(groups) if groups else "nothing"


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


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the latest good checkpoint in `workdir/checkpoints`), evaluates every `eval_every`
    steps and at the end; returns the last evaluation's metrics and the last step. SIGTERM checkpoints and returns
    early."""
    config, data, pretrained = prepare_run(config, workdir)
    model_cfg = model_lib.model_config(config)
    if "auto" in (config.model.dtype, config.model.activation_dtype):
        picked = model_cfg.decoder
        progress(f"model.dtype={config.model.dtype}, model.activation_dtype={config.model.activation_dtype} on "
                 f"{jax.devices()[0].platform}: matmul inputs {picked.dtype}, activations {picked.activation_dtype}")
    mesh = sharding.make_mesh(config.mesh)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"] * config.grad_accum_steps):
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by grad_accum_steps × the mesh's "
                          f"data × fsdp = {config.grad_accum_steps * mesh.shape['data'] * mesh.shape['fsdp']}")
    with jax.set_mesh(mesh):
        run = steps.setup(config, model_cfg, mesh, pretrained)
        ckpt = checkpoint_lib.Checkpointer(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS),
                                           keep=config.keep_checkpoints)
        start_step, data_state = _restore(ckpt, run, mesh, config, pretrained)
        del pretrained  # the host copy of a pretrained model: its arrays are on the mesh now (run)
        batch_sharding = sharding.batch_sharding(mesh)
        train_step = jax.jit(steps.make_train_step(run, config.grad_accum_steps, config.model.dropout > 0,
                                                   config.label_smoothing, config.loss_chunk),
                             in_shardings=(run.shardings, batch_sharding) + run.frozen_shardings,
                             out_shardings=(run.shardings, None), donate_argnums=(0,))
        evaluator = evaluate.Evaluator(config, data, run, batch_sharding, workdir)
        batches = data.train_batches(config.batch_size, config.seq_len, config.seed, data_state,
                                     jax.process_index(), jax.process_count())
        log = _Log(config, workdir, start_step, run, model_cfg)
        stop = _StopSignal()
        result, step, on_cpu = {}, start_step, jax.devices()[0].platform == "cpu"
        try:
            for step in range(start_step + 1, config.train_steps + 1):
                host_batch = next(batches)
                log.count_tokens(host_batch)
                batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
                                     host_batch)
                if step == start_step + 1:
                    temp_bytes = _compile(train_step, run, batch, log)
                    watch = on_cpu and temp_bytes >= WATCHED_TEMPORARIES and hostmem.in_use() is not None
                used_before = hostmem.in_use() if watch else 0
                run.state, step_metrics = train_step(run.state, batch, *run.frozen)
                if on_cpu:
                    # On CPU the loop waits for each step before dispatching the next. Running ahead (the host
                    # blocks only at log steps) held more than one step's temporaries in memory: SmolLM2-135M
                    # fine-tuning at its configs' defaults peaked at 16-21 GB resident (full) and 3.3-3.6 GB
                    # (LoRA), against 7.8 and 2.4-2.8 waiting, at the same tokens/s. Accelerators run ahead, which
                    # keeps them busy. Large temporaries are also waited for until freed (hostmem.py says why).
                    jax.block_until_ready(step_metrics)
                    if watch:
                        hostmem.wait_until_in_use_below(used_before + temp_bytes // 2)
                out_of_time = bool(config.time_limit_s) and log.elapsed() > config.time_limit_s
                last = step == config.train_steps or out_of_time
                if step % config.log_every == 0 or last:
                    log.train(step, step_metrics, run.state["health"])
                if evaluator.quick and ((config.eval_every and step % config.eval_every == 0) or last):
                    result = evaluator(run.state["params"], step, full=last and config.final_eval_full)
                    log.eval(step, result, full=last and config.final_eval_full)
                if os.environ.get("GPT_JAX_SIGTERM_AFTER_STEP") == str(step):  # a preemption notice, for the tests
                    os.kill(os.getpid(), signal.SIGTERM)
                stopping = not last and stop.should_stop()
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or last or stopping:
                    ckpt.save(step, run.state["params"], run.state["opt_state"],
                              {"step": step, "rng": np.asarray(jax.device_get(run.state["rng"])).tolist(),
                               "data": batches.state()})
                    _fault_injection_hook(ckpt, step)
                if out_of_time:
                    progress(f"time_limit_s={config.time_limit_s:g} reached at step {step}")
                if stopping:
                    progress(f"SIGTERM: saved a checkpoint at step {step}; run the same command to resume")
                if last or stopping:
                    break
            if step == start_step and start_step:
                progress(f"the checkpoint at step {start_step} already reached train_steps={config.train_steps}")
        finally:
            stop.restore()
            ckpt.close()
        log.done(step)
        return {**result, "step": step}


def _compile(train_step, run: steps.TrainSetup, batch: dict, log: _Log) -> int:
    """Compiles the train step ahead of its first call (which then finds it compiled), says how long that took, and
    releases what the setup, the pretrained host copy and the compiler freed before the step's temporaries are
    allocated (hostmem.py; SmolLM2-135M LoRA, scanned: peak RSS through the first steps 3.54 → 2.90 GiB). The
    first step's tokens/s leave the compile out. Returns the bytes of the step's temporaries."""
    start = time.perf_counter()
    compiled = train_step.lower(run.state, batch, *run.frozen).compile()
    hostmem.release_freed_memory()
    progress(f"compiled the train step in {time.perf_counter() - start:.1f}s")
    log.restart_clock()
    memory = compiled.memory_analysis()
    return int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0


def _restore(ckpt, run: steps.TrainSetup, mesh, config, pretrained) -> tuple[int, dict | None]:
    """(start step, data position) from the latest good checkpoint, put into `run.state`; (0, None) for none."""
    restored = ckpt.restore_latest(run.state["params"], run.state["opt_state"], warn=progress)
    trained, frozen = run.parameter_counts()
    if restored is None:
        lora = run.lora
        progress(f"model: {frozen or trained:,} parameters; {mesh.size} device(s), mesh {dict(mesh.shape)}"
                 + (f"; initialized from {config.init_from}" if config.init_from and pretrained is not None else "")
                 + (f"; LoRA rank {lora.rank} on {','.join(lora.targets)}: {trained:,} trainable" if lora else ""))
        return 0, None
    step, params, opt_state, meta = restored
    replicated = sharding.replicated(mesh)
    run.state.update(params=params, opt_state=opt_state if opt_state is not None else jax.jit(run.tx.init)(params),
                     rng=jax.device_put(np.asarray(meta.get("rng", run.state["rng"]), np.uint32), replicated),
                     step=jax.device_put(jnp.int32(step), replicated))
    progress(f"resumed from {ckpt.directory} at step {step}")
    return step, meta.get("data")


class _Log:
    """Progress lines and metrics of the loop: loss, learning rate, tokens/s, MFU, ETA, non-finite steps."""

    def __init__(self, config, workdir: str, start_step: int, run: steps.TrainSetup, model_cfg):
        self.config, self.start_step = config, start_step
        self.writer = metrics.MetricsWriter(workdir, start_step)
        trained, frozen = run.parameter_counts()
        self.flops_per_token = metrics.flops_per_token(model_cfg, trained, config.seq_len, frozen)
        self.peak = metrics.device_peak_flops(config, model_cfg) * jax.device_count()
        self.schedule = optim.learning_rate_schedule(config)
        self.nonfinite_seen = 0
        self.start = self.last_time = time.perf_counter()
        self.last_step, self.tokens, self.total_tokens = start_step, 0, 0
        self.eta_from = None  # (time, step) of the first log

    def count_tokens(self, batch: dict) -> None:
        """Adds the positions a batch runs through the model (all processes'; an encoder-decoder's padded to its
        length bucket)."""
        rows, length = (batch["tokens"].shape[0], batch["tokens"].shape[1] - 1) if "tokens" in batch else \
            batch["target_in"].shape
        self.tokens += rows * length * jax.process_count()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train(self, step: int, step_metrics, health) -> None:
        c = self.config
        values, health = jax.device_get((step_metrics, health))
        now = time.perf_counter()
        tokens_per_sec = self.tokens / max(now - self.last_time, 1e-9)
        self.total_tokens, self.tokens = self.total_tokens + self.tokens, 0
        mfu = self.flops_per_token * tokens_per_sec / self.peak
        if self.eta_from is None:  # the first steps include compiling: the ETA counts from the first log on
            self.eta_from = (now, step)
        done = step - self.eta_from[1]
        eta = metrics.fmt_time((c.train_steps - step) * (now - self.eta_from[0]) / done) if done else "-"
        lr, loss = float(self.schedule(step - 1)), float(values["train_loss"])
        self.writer.write(step, {"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
                                 "grad_norm": float(values["grad_norm"])})
        progress(f"step {step}/{c.train_steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_sec:,.0f} tok/s  "
                 f"mfu {mfu:.1%}  eta {eta}")
        if int(health["count"]) > self.nonfinite_seen:
            self.nonfinite_seen = int(health["count"])
            progress("warning: " + steps.nonfinite_report(health))
            if self.nonfinite_seen >= c.max_nonfinite_steps:
                raise TrainingError("halted: " + steps.nonfinite_report(health))
        self.last_time, self.last_step = time.perf_counter(), step

    def eval(self, step: int, result: dict, full: bool) -> None:
        self.writer.write(step, result)
        extra = "".join(f"  {k[4:]} {result[k]:.2f}" for k in ("val_bleu", "val_chrf") if k in result)
        progress(f"step {step}: val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                 f"val_bpb {result['val_bpb']:.4f}{extra}" + ("  (whole validation split)" if full else ""))
        self.restart_clock()

    def restart_clock(self) -> None:
        """What ran since (compiling, evaluating) stays out of the next tokens/s."""
        self.last_time = time.perf_counter()

    def done(self, step: int) -> None:
        elapsed = self.elapsed()
        if step > self.start_step:
            progress(f"trained steps {self.start_step + 1}-{step} in {elapsed:.1f}s "
                     f"({(self.total_tokens + self.tokens) / elapsed:,.0f} tok/s)")


def compile_report(config) -> dict:
    """Compiles the train step of `config` for the current devices without training; returns (and prints) the
    per-device memory of parameters, optimizer state and the compiled step, and FLOPs per step."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.init_from and config.model.kind == "decoder_only":  # the architecture is the pretrained model's
        progress(f"loading init_from={config.init_from} for its architecture")
        _take_architecture(config, workdir_lib.load(config.init_from).model_cfg)
    if not config.model.vocab_size:
        if config.data.tokenizer == "char":
            raise ConfigError("--mode=compile needs model.vocab_size (or a trained tokenizer's data.vocab_size)")
        config.model.vocab_size = config.data.vocab_size
    config_lib.validate(config)
    model_cfg = model_lib.ModelConfig.from_config(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        run = steps.setup(config, model_cfg, mesh, abstract=True)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32,
                                                sharding=batch_sharding)}
        placed = lambda tree, shardings: jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)
        state_in = placed(run.state, run.shardings)
        frozen = tuple(map(placed, run.frozen, run.frozen_shardings))  # LoRA's base
        step_fn = jax.jit(steps.make_train_step(run, config.grad_accum_steps, config.model.dropout > 0,
                                                config.label_smoothing, config.loss_chunk),
                          in_shardings=(run.shardings, batch_sharding) + run.frozen_shardings,
                          out_shardings=(run.shardings, None), donate_argnums=(0,))
        progress(f"compiling the train step of {config.model.n_layer} layers for {mesh.size} device(s) "
                 f"(minutes for a large model) ...")
        t = time.perf_counter()
        compiled = step_fn.lower(state_in, batch, *frozen).compile()
        compile_seconds = time.perf_counter() - t

    def per_device_bytes(tree, shardings_tree):
        return sum(int(np.prod(sh.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
                   for a, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings_tree), strict=True))

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trained, frozen = run.parameter_counts()
    n_params = frozen or trained  # the model's; LoRA's adapters are `trained`
    report = {
        "devices": mesh.size, "mesh": dict(mesh.shape), "parameters": n_params,
        "param_bytes_per_device": per_device_bytes(run.state["params"], run.shardings["params"]),
        "opt_state_bytes_per_device": per_device_bytes(run.state["opt_state"], run.shardings["opt_state"]),
        "argument_bytes": int(getattr(memory, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(memory, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)),
        "generated_code_bytes": int(getattr(memory, "generated_code_size_in_bytes", 0)),
        "flops_per_step_compiled": float(cost.get("flops", 0.0)) if cost else 0.0,
        "flops_per_step_model": metrics.flops_per_token(model_cfg, trained, config.seq_len, frozen) * config.batch_size
        * config.seq_len,
        "compile_seconds": compile_seconds,
    }
    gib = 1024**3
    lines = [f"compiled the train step for {mesh.size} device(s), mesh {dict(mesh.shape)}, in {compile_seconds:.1f}s",
             f"  parameters            {n_params:,}",
             f"  dtypes                matmul inputs {model_cfg.dtype}, activations {model_cfg.activation_dtype}",
             f"  params / device       {report['param_bytes_per_device'] / gib:.3f} GiB",
             f"  optimizer / device    {report['opt_state_bytes_per_device'] / gib:.3f} GiB",
             f"  step arguments        {report['argument_bytes'] / gib:.3f} GiB (per device)",
             f"  step temporaries      {report['temp_bytes'] / gib:.3f} GiB (per device)",
             f"  FLOPs / step          {report['flops_per_step_compiled']:.3e} (compiled, per device); "
             f"{report['flops_per_step_model']:.3e} (model: 6 per trained parameter, 4 per frozen, attention; "
             "whole batch)"]
    needed = report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
    available = device_memory_bytes()
    if available and needed > available:
        lines.append(f"warning: the step needs {needed / gib:.1f} GiB per device, more than the device's "
                     f"{available / gib:.1f} GiB: use a smaller batch_size (or grad_accum_steps), model.remat, or "
                     "more devices (mesh.fsdp)")
    print("\n".join(lines), flush=True)
    return report


def device_memory_bytes() -> int:
    """Memory of one device: an accelerator's own, or the host's RAM for CPU devices (0 when unknown)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _fault_injection_hook(ckpt: checkpoint_lib.Checkpointer, step: int) -> None:
    """For the resume tests: GPT_JAX_SIGKILL_AFTER_STEP=N makes the process SIGKILL itself once the checkpoint of
    step N is on disk, as a preempted or crashed machine would die (no cleanup, no flush)."""
    target = os.environ.get("GPT_JAX_SIGKILL_AFTER_STEP")
    if target and int(target) == step:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
