"""The device mesh, multi-host start-up, and the shardings of a run: batches split over `data` and `fsdp`, every
parameter placed by its logical axes through the one rules table in `gpt_jax.axes`, and the train state sharded
like its parameters.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt_jax.axes import logical_to_spec
from gpt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def initialize_distributed(dist_config) -> None:
    """Starts JAX's multi-controller runtime: with an explicit coordinator from the config, with auto-detection
    (TPU pod slices, SLURM, Open MPI) when `coordinator_address` is "auto" or under a multi-task SLURM job; a no-op
    for a single process. Must run before anything touches the devices."""
    if dist_config.coordinator_address == "auto" or (
            not dist_config.coordinator_address and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        jax.distributed.initialize()
    elif dist_config.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=dist_config.coordinator_address,
            num_processes=dist_config.num_processes or None,
            process_id=dist_config.process_id if dist_config.process_id >= 0 else None,
        )


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one -1 takes the devices left over."""
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be -1 or at least 1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"the mesh's fixed axes ({known} devices) do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices or (jax.process_count() > 1 and math.prod(sizes) != num_devices):
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"{num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh. Axes that ask for fewer devices than there are (single process only) use
    the first ones, e.g. data=fsdp=tensor=1 for a one-device run on a multi-device host."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    devices = devices[: math.prod(shape)]
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [batch, seq] split over data and fsdp."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_seq")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(abstract_model: nnx.Module, mesh: Mesh) -> dict:
    """A pure dict of NamedShardings for the model's parameters (an `nnx.eval_shape` of it), from their logical
    axes."""
    state = nnx.state(abstract_model, nnx.Param)
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, logical_to_spec(v.sharding_axes, v.get_value().shape, mesh)), state,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def state_shardings(abstract_state: dict, params_shardings: dict, mesh: Mesh) -> dict:
    """Shardings for a train state {"params", "opt_state", ...}: the parameters' own, the same for every
    params-shaped subtree of the optimizer state (AdamW's moments), replicated for everything else."""
    params_treedef = jax.tree.structure(abstract_state["params"])
    is_params = lambda node: jax.tree.structure(node) == params_treedef
    out = jax.tree.map(lambda _: replicated(mesh), abstract_state)
    out["params"] = params_shardings
    out["opt_state"] = jax.tree.map(lambda n: params_shardings if is_params(n) else
                                    jax.tree.map(lambda _: replicated(mesh), n),
                                    abstract_state["opt_state"], is_leaf=is_params)
    return out
