"""Runs short trainings under several meshes of 8 CPU devices in one process and prints their losses as JSON (the
decoder-only model, and the encoder-decoder of tests/test_encdec.py).

Used by tests/test_sharding.py in a subprocess, since the device count is fixed when JAX starts."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

from gpt_jax import config as config_lib  # noqa: E402
from gpt_jax import train  # noqa: E402

MESHES = {"single": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2), "d2t4": (2, 1, 4)}


def make_config(mesh, steps):
    c = config_lib.base_config()
    c.train_steps, c.batch_size, c.seq_len = steps, 8, 32
    c.warmup_steps, c.learning_rate = 5, 3e-3
    c.eval_every, c.final_eval_full, c.eval_steps, c.log_every, c.checkpoint_every = 0, False, 1, 1, 10
    c.model.n_layer, c.model.n_head, c.model.d_model = 1, 4, 32
    c.sample.max_new_tokens = 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def main(base):
    out = {}
    for name, mesh in MESHES.items():
        train.train_and_evaluate(make_config(mesh, 20), os.path.join(base, name))
        out[name] = losses(os.path.join(base, name))
    # the data=8 run's step-10 checkpoint (as if it had been preempted after step 10) restores under
    # fsdp=4 x tensor=2 and under one device, and training goes on to step 20
    for name, mesh in (("data8_then_f4t2", (1, 4, 2)), ("data8_then_single", (1, 1, 1))):
        workdir = os.path.join(base, name)
        shutil.copytree(os.path.join(base, "data8"), workdir)
        shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
        train.train_and_evaluate(make_config(mesh, 20), workdir)
        out[name] = losses(workdir)
    # the encoder-decoder (tests/test_encdec.py's toy translation) on one device and on data=2 x fsdp=2 x tensor=2
    import pathlib

    import test_encdec

    for name, mesh in (("encdec_single", (1, 1, 1)), ("encdec_d2f2t2", (2, 2, 2))):
        directory = pathlib.Path(base) / name
        directory.mkdir()
        config = test_encdec._config(directory, 6)
        config.data.val_source = config.data.val_target = ""
        config.log_every, (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) = 1, mesh
        train.train_and_evaluate(config, str(directory / "run"))
        out[name] = losses(str(directory / "run"))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
