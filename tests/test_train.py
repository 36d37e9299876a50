"""Training: the loss falls, a SIGKILLed run resumes bit for bit, the schedule and optimizer behave."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.n_layer=1", "--config.model.d_model=32", "--config.model.n_head=2", "--config.batch_size=4",
         "--config.seq_len=32", "--config.sample.max_new_tokens=0", "--config.eval_every=0",
         "--config.final_eval_full=false", "--config.eval_steps=2"]


def run_train(workdir, *overrides, env=None):
    cmd = [sys.executable, "-m", "gpt_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *SMALL,
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    return {m["step"]: m["train_loss"] for m in read_metrics(workdir) if "train_loss" in m}


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_for_bit(tmp_path):
    steps = ["--config.train_steps=200", "--config.checkpoint_every=100", "--config.log_every=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run and the run that dies share nothing: they run as two processes at once
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        r_full = pool.submit(run_train, full, *steps)
        r = run_train(killed, *steps, env={"GPT_JAX_SIGKILL_AFTER_STEP": "100"})
        assert r_full.result().returncode == 0, r_full.result().stderr
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert max(train_losses(killed)) == 100
    r = run_train(killed, *steps)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at step 100" in r.stderr

    a, b = train_losses(full), train_losses(killed)
    assert sorted(b) == list(range(1, 201))
    for step in range(101, 201):
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit: exact float equality
    assert a[200] < a[1] - 0.5  # and it learned something


def test_schedule_warms_up_then_decays_to_the_floor():
    config = config_lib.base_config()
    config.learning_rate, config.min_learning_rate = 1e-3, 1e-4
    config.warmup_steps, config.train_steps = 10, 110
    schedule = optim.learning_rate_schedule(config)
    lrs = np.array([float(schedule(s)) for s in range(111)])
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert np.all(np.diff(lrs[:11]) > 0) and lrs[10] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[10:]) <= 1e-12) and lrs[110] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3, rel=1e-5)


def test_weight_decay_applies_to_matrices_only():
    config = config_lib.base_config()
    config.learning_rate = config.min_learning_rate = 0.1
    config.warmup_steps, config.weight_decay, config.grad_clip = 0, 0.5, 0.0
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    tx = optim.make_optimizer(config)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates["bias"][0]) == 0.0
    assert float(updates["kernel"][0, 0]) == pytest.approx(-0.1 * 0.5)


def test_grad_accumulation_matches_one_big_batch():
    from gpt_jax import model as model_lib
    from gpt_jax import sharding, steps

    config = config_lib.base_config()
    config.model.vocab_size = 31
    config.model.n_layer, config.model.d_model, config.model.n_head = 1, 16, 2
    config.seq_len = 8
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    run = steps.setup(config, model_lib.ModelConfig.from_config(config), mesh)
    tokens = jax.random.randint(jax.random.key(0), (8, 9), 0, 31)
    results = [jax.jit(steps.make_train_step(run, accum, False))(run.state, {"tokens": tokens}) for accum in (1, 4)]
    assert float(results[0][1]["train_loss"]) == pytest.approx(float(results[1][1]["train_loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0]["params"]), jax.tree.leaves(results[1][0]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama_untied", "encoder_decoder"])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(kind):
    """The loss `loss_chunk` tokens at a time (the logits of a chunk recomputed in the backward pass) is the loss of
    the whole [tokens, vocab] logits: the same sum, gradients within float32 rounding; label smoothing on."""
    from flax import nnx

    from gpt_jax import model as model_lib
    from gpt_jax import steps

    tokens = jax.random.randint(jax.random.key(1), (3, 41), 3, 97)  # 120 targets: 7 chunks of 16, the last ragged
    if kind == "encoder_decoder":
        stack = model_lib.ModelConfig(vocab_size=97, n_layer=1, n_head=2, n_kv_head=2, d_model=32, d_ff=64,
                                      max_seq_len=64, head="mlm", layout="post", activation="gelu")
        model = model_lib.EncoderDecoder(model_lib.EncDecConfig(stack, stack, 1, 2), rngs=nnx.Rngs(0))
        batch = {"source": tokens[:, :20], "source_valid": jnp.ones((3, 20), bool), "target_in": tokens[:, :-1],
                 "target_out": tokens[:, 1:]}
    else:
        shape = {} if kind == "gpt2" else dict(tie_embeddings=False, pos_embedding="rope", norm="rmsnorm",
                                               mlp="swiglu", use_bias=False)
        cfg = model_lib.ModelConfig(vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64,
                                    max_seq_len=64, **shape)
        model, batch = model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), {"tokens": tokens}
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, chunk):
        return jnp.sum(steps.token_losses(graphdef, p, batch, label_smoothing=0.1, chunk=chunk)[0])

    (plain, plain_grads), (chunked, chunked_grads) = [
        jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk) for chunk in (0, 16)]
    assert float(chunked) == pytest.approx(float(plain), rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(chunked_grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


# ---- faults: SIGTERM, a truncated checkpoint, a non-finite step -------------------------------------------------


def tiny_config(**overrides):
    c = config_lib.base_config()
    c.train_steps, c.batch_size, c.seq_len, c.warmup_steps = 20, 4, 32, 2
    c.eval_every, c.final_eval_full, c.eval_steps, c.log_every, c.checkpoint_every = 0, False, 1, 1, 10
    c.model.n_layer, c.model.n_head, c.model.d_model = 1, 2, 32
    c.sample.max_new_tokens = 0
    c.mesh.data = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    import time

    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "gpt_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", *SMALL,
           "--config.train_steps=100000", "--config.log_every=1", "--config.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: saved a checkpoint at step" in stderr
    saved = int(stderr.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
    assert saved >= 3 and (workdir / "checkpoints" / str(saved)).is_dir()
    r = run_train(workdir, f"--config.train_steps={saved + 2}", "--config.log_every=1")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in r.stderr
    assert max(train_losses(workdir)) == saved + 2


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    from gpt_jax import train

    workdir = str(tmp_path / "w")
    train.train_and_evaluate(tiny_config(), workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["10", "20"]
    truncated = 0
    for root, _, files in os.walk(os.path.join(ckpt_dir, "20", "params")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 64:
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                truncated += 1
    assert truncated
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(train_steps=25), workdir)
    err = capsys.readouterr().err
    assert "warning: checkpoint 20 cannot be restored" in err
    assert "at step 10" in err
    assert any(name.startswith("corrupt-20-") for name in os.listdir(ckpt_dir))  # kept aside, not deleted
    assert max(train_losses(workdir)) == 25


def test_on_cpu_a_step_is_dispatched_only_after_the_one_before_finished_and_freed_its_temporaries(tmp_path,
                                                                                                   monkeypatch):
    """Between log steps the host does not run ahead of the CPU: when the loop dispatches a train step, the step
    before it has finished. Run ahead, SmolLM2-135M fine-tuning at its configs' defaults held more than one step's
    temporaries (peak RSS 16-21 GB full, 3.3-3.6 GB LoRA, against 7.8 and 2.4-2.8). The steps here (batch 32 x 256)
    are long enough that a loop running ahead finds the one before still running: the old loop did at every step.
    Their temporaries (~0.3 GiB) are also freed by then: XLA:CPU frees them on its own thread just after the
    outputs are ready, and a step dispatched first had the heap grow by a second set of them for good."""
    from gpt_jax import hostmem, train

    real_jit, real_compile, finished_before, in_use, temp = jax.jit, train._compile, [], [], []

    def jit(fn, **kwargs):
        jitted = real_jit(fn, **kwargs)
        if kwargs.get("donate_argnums") != (0,):  # not the train step
            return jitted
        last = {}

        def train_step(*args):
            in_use.append(hostmem.in_use())
            if last:
                finished_before.append(all(x.is_ready() for x in jax.tree.leaves(last["metrics"])))
            state, last["metrics"] = jitted(*args)
            return state, last["metrics"]

        train_step.lower = jitted.lower
        return train_step

    monkeypatch.setattr(train.jax, "jit", jit)
    monkeypatch.setattr(train, "_compile", lambda *args: temp.append(real_compile(*args)) or temp[0])
    config = tiny_config(train_steps=8, log_every=100, batch_size=32, seq_len=256, **{
        "model.n_layer": 2, "model.d_model": 128})
    train.train_and_evaluate(config, str(tmp_path / "w"))
    assert finished_before == [True] * 7, finished_before
    assert temp[0] >= train.WATCHED_TEMPORARIES
    if in_use[0] is not None:  # glibc 2.33+
        grown = [(used - in_use[0]) / 2**20 for used in in_use[1:]]
        assert max(grown) < temp[0] / 2 / 2**20, f"MiB in use at each dispatch beyond the first's: {grown}"


def test_non_finite_step_is_skipped_and_reported_then_halts(tmp_path, monkeypatch, capsys):
    from gpt_jax import train

    monkeypatch.setenv("GPT_JAX_INJECT_NAN_AT_STEP", "5")
    workdir = str(tmp_path / "w")
    train.train_and_evaluate(tiny_config(train_steps=8), workdir)
    err = capsys.readouterr().err
    assert "warning: 1 non-finite step(s) skipped; the first at step 5" in err
    assert "blocks.0.attn.query.kernel" in err
    losses = train_losses(workdir)
    assert np.isnan(losses[5]) and all(np.isfinite(losses[s]) for s in (4, 6, 7, 8))
    assert losses[8] < losses[1]

    with pytest.raises(train.TrainingError, match="halted: 1 non-finite step"):
        train.train_and_evaluate(tiny_config(train_steps=8, max_nonfinite_steps=1), str(tmp_path / "halt"))


def _tiny_train_step(n_layer):
    """(setup, the jitted train step with its state donated, a batch's shapes) of a tiny model."""
    from gpt_jax import model as model_lib
    from gpt_jax import sharding, steps

    config = config_lib.base_config()
    config.batch_size, config.seq_len = 2, 16
    config.model.n_layer, config.model.n_head, config.model.d_model, config.model.vocab_size = n_layer, 2, 16, 64
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        run = steps.setup(config, model_lib.ModelConfig.from_config(config), mesh)
        step = jax.jit(steps.make_train_step(run, 1, False), donate_argnums=(0,))
    return run, step, {"tokens": jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32)}


def test_the_non_finite_guard_compiles_to_a_program_linear_in_the_layers():
    """The guard that skips a non-finite step reduces one flag over every gradient array, then keeps new or old
    values. Kept as a `where` per array, XLA copied that reduction's chain of `and`s into each of them: a program
    that grew with the square of the array count (SmolLM2's LoRA step compiled for 6 minutes). With one `lax.cond`
    the `and`s grow linearly: 4x the layers (4x the arrays) gives fewer than 4x the `and` instructions (the old step
    gave 11x from 1 to 4 layers)."""

    def and_count(n_layer):
        run, step, batch = _tiny_train_step(n_layer)
        return len(re.findall(r"= pred\S* and\(", step.lower(run.state, batch).compile().as_text()))

    one, four = and_count(1), and_count(4)
    assert 0 < four < 4 * one, (one, four)


def test_the_guard_updates_in_place_and_a_non_finite_step_changes_nothing(monkeypatch):
    """The optimizer runs inside the guard's taken branch: the compiled branches copy no float array (a cond
    choosing between updated and old values copied the parameters and both moments, 3x the parameter count, every
    step). A finite step changes the parameters; a non-finite one leaves parameters and optimizer state bit for
    bit as they were."""
    monkeypatch.setenv("GPT_JAX_INJECT_NAN_AT_STEP", "2")
    run, step, shapes = _tiny_train_step(2)
    hlo = step.lower(run.state, shapes).compile().as_text()
    bodies, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?(%\S+) ", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name:
            bodies[name].append(line)
    branches = {b for line in hlo.splitlines() if " conditional(" in line
                for b in re.findall(r"%[\w.\-]+", line.split("branch_computations=")[1].split("}")[0])}
    assert branches and run.parameter_counts()[0] > 1000
    copied = sum(int(np.prod([int(d) for d in dims.split(",") if d])) for b in branches for line in bodies[b]
                 for dims in re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} copy\(", line))
    assert copied == 0, copied

    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 17)), jnp.int32)}
    as_numpy = lambda state: jax.tree.map(np.array, {k: state[k] for k in ("params", "opt_state")})
    before = as_numpy(run.state)
    state, metrics = step(run.state, batch)  # step 1: finite
    after_one = as_numpy(state)
    assert np.isfinite(metrics["train_loss"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"], after_one["params"])
    assert all(jax.tree.leaves(changed)), changed
    state, metrics = step(state, batch)  # step 2: non-finite, skipped
    assert np.isnan(metrics["train_loss"]) and int(state["health"]["count"]) == 1
    jax.tree.map(np.testing.assert_array_equal, as_numpy(state), after_one)


def test_one_pass_over_the_gradients_serves_the_guard_the_clip_and_the_logged_norm():
    """The step reduces each gradient array once (its sum of squares): the non-finite guard, the clip inside the
    guard's branch and the logged grad_norm all use it. Before, each was a reduction of its own (3 per array; on CPU
    the optimizer's part of a GPT-2 124M step took 2x as long). The update is optax's clip + AdamW's, to rounding."""
    import dataclasses

    import optax

    from gpt_jax import steps

    run, step, shapes = _tiny_train_step(2)
    hlo = step.lower(run.state, shapes).compile().as_text()
    outside_the_model = [name for name in re.findall(r"= \S+ reduce\([^\n]*?op_name=\"([^\"]+)\"", hlo)
                         if "jvp(" not in name]  # the forward and backward passes' reductions are jvp(...)
    assert len(outside_the_model) == len(jax.tree.leaves(run.state["params"])), outside_the_model
    assert not [name for name in outside_the_model if "cond/" in name], outside_the_model

    config = config_lib.base_config()
    config.grad_clip = 0.05  # below the tiny model's first gradient norm, so the clip scales
    ours = optim.make_optimizer(config)
    plain = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adamw(
        optim.learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay,
        mask=optim.decay_mask))
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 17)), jnp.int32)}
    results = []
    for tx in (ours, plain):
        setup = dataclasses.replace(run, tx=tx)
        state = {**run.state, "opt_state": tx.init(run.state["params"])}
        state = jax.tree.map(jnp.copy, state)  # the step donates its state
        results.append(jax.jit(steps.make_train_step(setup, 1, False))(state, batch))
    assert float(results[0][1]["grad_norm"]) > config.grad_clip
    np.testing.assert_allclose(results[0][1]["grad_norm"], optax.tree.norm(jax.grad(
        lambda p: steps.token_losses(run.graphdef, p, batch)[0].mean())(run.state["params"])), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), results[0][0]["params"],
                 results[1][0]["params"])

    grads = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.arange(4.0)}
    for max_norm in (1.0, 100.0):  # clipped, kept
        expected, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        for given in (None, optax.tree.norm(grads)):
            got, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState(), global_norm=given)
            jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_auto_dtypes_pick_per_device_kind_and_the_run_keeps_auto(tmp_path, capsys):
    """model.dtype / model.activation_dtype = "auto" (configs/small.py, the fine-tuning configs): bfloat16 on TPUs
    and GPUs; on CPUs float32 activations and bf16 matmul inputs only with bf16 instructions. A run prints what it
    picked and keeps "auto" in config.json (like mesh.data=-1: the device that loads the model picks); a value set
    explicitly stays as it is."""
    from gpt_jax import model as model_lib
    from gpt_jax import ops, train
    from gpt_jax import workdir as workdir_lib

    both_bf16 = {"dtype": "bfloat16", "activation_dtype": "bfloat16"}
    assert ops.auto_dtypes("tpu") == ops.auto_dtypes("gpu", compute_capability="9.0") == both_bf16
    assert ops.auto_dtypes("gpu", compute_capability="7.5") == {"dtype": "float32", "activation_dtype": "float32"}
    assert ops.auto_dtypes("cpu", frozenset({"avx2", "fma"})) == {"dtype": "float32", "activation_dtype": "float32"}
    for flag in ops.CPU_BF16_FLAGS:
        assert ops.auto_dtypes("cpu", frozenset({"avx512f", flag})) == {"dtype": "bfloat16",
                                                                        "activation_dtype": "float32"}
    picked = ops.auto_dtypes()
    mixed = model_lib.ModelConfig.from_dict({"dtype": "auto", "activation_dtype": "bfloat16", "vocab_size": 65})
    assert (mixed.dtype, mixed.activation_dtype) == (picked["dtype"], "bfloat16")

    workdir = str(tmp_path / "w")
    auto = {"model.dtype": "auto", "model.activation_dtype": "auto"}
    train.train_and_evaluate(tiny_config(train_steps=2, **auto), workdir)
    assert f"matmul inputs {picked['dtype']}, activations {picked['activation_dtype']}" in capsys.readouterr().err
    saved = workdir_lib.read_config(workdir)
    assert (saved.model.dtype, saved.model.activation_dtype) == ("auto", "auto")
    loaded = workdir_lib.load(workdir).model_cfg
    assert (loaded.dtype, loaded.activation_dtype) == (picked["dtype"], picked["activation_dtype"])
    train.compile_report(tiny_config(**auto, **{"model.vocab_size": 65}))
    assert re.search(rf"dtypes +matmul inputs {picked['dtype']}, activations {picked['activation_dtype']}",
                     capsys.readouterr().out)
