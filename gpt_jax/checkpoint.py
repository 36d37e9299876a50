"""Orbax checkpoints of a run: parameters, optimizer state, and a JSON record of step, RNG and data position.

Items are stored separately so evaluation, sampling and serving restore the parameters alone.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

# A workdir that holds a model without training state (an import, a LoRA merge) saves this as its optimizer state:
# Orbax refuses an empty tree. Its meta record says {"opt_state": "placeholder"}.
PLACEHOLDER_OPT_STATE = {"none": np.zeros((), np.int32)}


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        # read-only (eval, sample, serve, export): nothing is saved or deleted. The options say so in full, and
        # Orbax's one remaining notice ("Given directory is read only") is kept off the user's terminal.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep or None, save_interval_steps=0 if read_only else 1,
            create=not read_only, read_only=read_only, enable_async_checkpointing=True)
        self._options = options
        verbosity = absl_logging.get_verbosity()
        if read_only:
            absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("params", "opt_state", "meta"))
        finally:
            absl_logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Saves asynchronously; the next save or `close()` waits for this one to finish."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, params_target, opt_state_target=None):
        """Restores (params, opt_state or None, meta) at `step`, placed like the given targets (arrays or
        jax.ShapeDtypeStruct with shardings)."""
        items = {"params": ocp.args.StandardRestore(_abstract(params_target)), "meta": ocp.args.JsonRestore()}
        if opt_state_target is not None and not self._is_converted(step):
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored.get("opt_state"), restored["meta"]

    def _is_converted(self, step: int) -> bool:
        """A workdir written by tools/convert.py holds parameters only (PLACEHOLDER_OPT_STATE)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return meta.get("opt_state") == "placeholder"

    def restore_latest(self, params_target, opt_state_target, warn=print):
        """(step, params, opt_state, meta) from the newest checkpoint that restores, or None when there is none.

        A checkpoint that fails to restore (truncated or corrupt files) is moved aside to `corrupt-STEP-TIME` with
        a warning, never deleted, and the one before it is tried."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                params, opt_state, meta = self.restore(step, params_target, opt_state_target)
                return step, params, opt_state, meta
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                reason = " ".join(str(e).split())[:200]
                moved = self._quarantine(step)
                warn(f"warning: checkpoint {step} cannot be restored ({type(e).__name__}: {reason}); moved it to "
                     f"{moved} and trying the one before")
        return None

    def _quarantine(self, step: int) -> str:
        import time

        self.manager.close()
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.rename(source, target)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options,
                                             item_names=("params", "opt_state", "meta"))
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree):
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def restore_model(directory: str, abstract_model, step: int | None = None):
    """(model, step): the parameters of the checkpoint in `directory` at `step` (default: the latest) merged into
    `abstract_model` (an `nnx.eval_shape` of the module), on the first device, for inference and export."""
    from flax import nnx

    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        graphdef, state = nnx.split(abstract_model, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              nnx.to_pure_dict(state))
        params, _, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), step
