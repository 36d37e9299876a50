"""The device mesh, the one table of logical-axis rules, and multi-host start-up.

Model code names logical axes only (`embed`, `mlp`, `heads`, ...). This module alone maps them to the mesh axes
`data`, `fsdp` and `tensor`:
- `data`: pure data parallelism (parameters replicated);
- `fsdp`: batch split and parameters/optimizer state sharded along their `embed` dimension (ZeRO-3 style);
- `tensor`: Megatron-style split of heads, MLP features and vocabulary.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or axes, or None for replicated)
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "activation_batch": ("data", "fsdp"),
    "activation_seq": None,
    "activation_embed": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "position": None,
}


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


def logical_to_spec(axes, shape=None, mesh: Mesh | None = None) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec. A mesh axis is used at most once; with `shape` and
    `mesh`, a dimension the mesh axes do not divide is replicated instead."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used)
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
            if shape is not None and targets and shape[i] % math.prod(mesh.shape[t] for t in targets):
                targets = ()
        used.update(targets)
        spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for a pytree of NNX Variables (or plain arrays, which are replicated), by their
    `sharding_axes` metadata."""

    def one(leaf):
        axes = getattr(leaf, "sharding_axes", None) if hasattr(leaf, "get_metadata") else None
        value = leaf.get_value() if hasattr(leaf, "get_metadata") else leaf
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, np.shape(value), mesh))

    from flax import nnx

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches [batch, seq] split over data and fsdp."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_seq")))


def constrain(x, axes):
    """A sharding constraint on an activation by logical axes, when a mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
