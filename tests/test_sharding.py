"""Sharding over 8 CPU devices: every mesh gives the losses of one device; checkpoints restore across meshes;
two processes train like one; the logical-axis rules."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


# The mesh runner (one process of 8 CPU devices) and the two-process run (two processes of 4 devices, killed after
# step 10 and resumed) run at the same time as subprocesses, in conftest.py's background thread from the start of the
# session (see start_in_background), so on a machine of two or more cores they overlap with the tests that come before
# this module's, instead of adding a minute and a half to the session's wall time.

TWO_PROCESS_TEST = "test_two_processes_train_like_one_with_eight_devices"
# mesh_runner.make_config((8, 1, 1), 20) as flags: tiny.py put back to the base config's adam_b2 and
# min_learning_rate, and the runner's overrides, so the losses must match. The run ends as tiny.py's does, with its
# sample, which every process computes (none waits at the exit barrier while another works).
TWO_PROCESS_FLAGS = [
    "--config=configs/tiny.py", "--config.adam_b2=0.95", "--config.min_learning_rate=1e-4",
    "--config.batch_size=8", "--config.seq_len=32", "--config.warmup_steps=5",
    "--config.learning_rate=3e-3", "--config.eval_every=0", "--config.final_eval_full=false",
    "--config.eval_steps=1", "--config.log_every=1", "--config.checkpoint_every=10", "--config.model.n_layer=1",
    "--config.model.n_head=4", "--config.model.d_model=32", "--config.train_steps=20", "--config.mesh.data=8",
    "--config.mesh.fsdp=1", "--config.distributed.num_processes=2"]


def _run_mesh_runner(base) -> dict:
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_runner.py"), str(base)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return {name: {int(k): v for k, v in losses.items()} for name, losses in json.loads(lines[0][7:]).items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(workdir, env_of_process_1=None) -> list[tuple[int, str, str]]:
    """`gpt_jax.main` as processes 0 and 1 of a jax.distributed run on localhost; (exit code, stderr, stdout) of
    each."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gpt_jax.main", *TWO_PROCESS_FLAGS, f"--workdir={workdir}",
         f"--config.distributed.coordinator_address=localhost:{port}", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env={**env, **(env_of_process_1 or {})} if i else env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:  # both pipes are read at once, so that neither process blocks on a full pipe while the other is waited for
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda p: p.communicate(timeout=600), procs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, err, out) for p, (out, err) in zip(procs, outputs, strict=True)]


def _run_two_processes(workdir) -> tuple[list, list | None]:
    """Process 1 gets SIGTERM after step 10 (a preemption notice, which may reach one host first): both processes
    must agree to stop there, save and exit 0; then, if they did, a second pair resumes to step 20. Returns the two
    pairs' (exit code, stderr, stdout) lists (None for a second pair not run)."""
    stopped = _run_pair(workdir, {"GPT_JAX_SIGTERM_AFTER_STEP": "10"})
    if any(code != 0 for code, _, _ in stopped):
        return stopped, None
    return stopped, _run_pair(workdir)


_RUNS: dict = {}  # the session's background runs, once submitted


def _run_both(base, two_process_workdir) -> dict:
    """The mesh runner and (with a workdir) the two-process run, at the same time: a future of each, done."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {"meshes": pool.submit(_run_mesh_runner, base)}
        if two_process_workdir is not None:
            runs["two_processes"] = pool.submit(_run_two_processes, two_process_workdir)
    return runs


def start_in_background(request, tmp_path_factory, submit) -> None:
    """Submits the mesh runner, and the two-process run when its test is selected (conftest.py calls this once)."""
    workdir = None
    if any(getattr(item, "originalname", None) == TWO_PROCESS_TEST for item in request.session.items):
        workdir = tmp_path_factory.mktemp("two_processes") / "mp"
    _RUNS["both"] = submit(_run_both, tmp_path_factory.mktemp("meshes"), workdir)
    _RUNS["two_processes_workdir"] = workdir


@pytest.fixture(scope="module")
def background_runs():
    """The mesh runner's losses and the two-process run's outcome (the latter only when its test is selected), as
    futures, from the runs conftest.py submitted as the session started."""
    return {**_RUNS["both"].result(), "two_processes_workdir": _RUNS["two_processes_workdir"]}


@pytest.fixture(scope="module")
def mesh_losses(background_runs):
    return background_runs["meshes"].result()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2", "d2t4"])
def test_mesh_losses_equal_one_device(mesh_losses, mesh):
    single, sharded = mesh_losses["single"], mesh_losses[mesh]
    assert sorted(sharded) == list(range(1, 21))
    for step in range(1, 21):
        assert close(sharded[step], single[step]), (step, sharded[step], single[step])


@pytest.mark.slow
def test_encoder_decoder_on_a_data_fsdp_tensor_mesh_matches_one_device(mesh_losses):
    """The encoder-decoder's parameters (cross-attention and the rest) shard by their logical axes like the
    decoder-only model's; 6 steps on data=2 x fsdp=2 x tensor=2 give one device's losses."""
    single, sharded = mesh_losses["encdec_single"], mesh_losses["encdec_d2f2t2"]
    assert sorted(sharded) == sorted(single) == list(range(1, 7))
    for step in range(1, 7):
        assert close(sharded[step], single[step], rel=1e-4), (step, sharded[step], single[step])


@pytest.mark.slow
@pytest.mark.parametrize("run", ["data8_then_f4t2", "data8_then_single"])
def test_checkpoint_restores_under_another_mesh(mesh_losses, run):
    single, resumed = mesh_losses["single"], mesh_losses[run]
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert close(resumed[step], single[step]), (step, resumed[step], single[step])


@pytest.mark.slow
def test_two_processes_train_like_one_with_eight_devices(background_runs, mesh_losses):
    """jax.distributed on localhost, 4 CPU devices per process: SIGTERM to one process after step 10 stops both
    there with a checkpoint and exit code 0; a second pair resumes to step 20 and ends with the default sample."""
    stopped, results = background_runs["two_processes"].result()
    workdir = background_runs["two_processes_workdir"]
    assert all(code == 0 for code, _, _ in stopped), stopped[0][1][-2000:] + stopped[1][1][-2000:]
    assert "SIGTERM: saved a checkpoint at step 10" in stopped[0][1]
    assert "--- sample" not in stopped[0][2]  # a stopped run does not sample
    assert all(code == 0 for code, _, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    assert "resumed from" in results[0][1] and "at step 10" in results[0][1]
    assert "--- sample\n" in results[0][2] and "--- sample" not in results[1][2]  # both sampled, 0 printed
    with open(workdir / "metrics.jsonl") as f:
        losses = {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}
    assert sorted(losses) == list(range(1, 21))
    # The flags above are the mesh runner's base config and overrides, so the run is the data=8 run of one process:
    # every step agrees to float32 rounding (1.3e-7 relative was the largest difference measured).
    reference = mesh_losses["data8"]
    for step in range(1, 21):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6), (step, losses, reference)


def test_logical_rules_map_axes_and_replicate_what_does_not_divide():
    from types import SimpleNamespace

    from jax.sharding import PartitionSpec

    from gpt_jax import axes

    assert axes.logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert axes.logical_to_spec(("activation_batch", "activation_seq")) == PartitionSpec(("data", "fsdp"), None)
    assert axes.logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert axes.logical_to_spec(("norm",)) == PartitionSpec(None)
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 4})  # logical_to_spec reads only the sizes
    assert axes.logical_to_spec(("vocab", "embed"), (65, 32), mesh) == PartitionSpec(None, "fsdp")
    assert axes.logical_to_spec(("embed", "mlp"), (32, 128), mesh) == PartitionSpec("fsdp", "tensor")
    one_device = SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1})
    assert axes.logical_to_spec(("embed", "mlp"), (32, 128), one_device) == PartitionSpec(None, None)


def test_mesh_shape_fills_minus_one_and_rejects_bad_sizes():
    from gpt_jax import config as config_lib
    from gpt_jax import sharding
    from gpt_jax.errors import ConfigError

    m = config_lib.base_config().mesh
    m.data, m.fsdp, m.tensor = -1, 2, 2
    assert sharding.mesh_shape(m, 8) == (2, 2, 2)
    m.data, m.fsdp, m.tensor = 1, 4, 4
    with pytest.raises(ConfigError, match="needs 16 devices"):
        sharding.mesh_shape(m, 8)
    m.data, m.fsdp, m.tensor = -1, -1, 1
    with pytest.raises(ConfigError, match="at most one"):
        sharding.mesh_shape(m, 8)
