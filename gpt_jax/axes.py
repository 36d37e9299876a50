"""Logical axis names and the one table that maps them to mesh axes.

Model code names the axes of parameters and activations (`embed`, `mlp`, `heads`, ...) and never a mesh axis;
this table alone says where each goes: `data` (pure data parallelism), `fsdp` (batch split and parameters sharded
along `embed`, ZeRO-3 style) and `tensor` (Megatron-style split of heads, MLP features and vocabulary). The mesh
itself is made in `gpt_jax.sharding`; here it is only read from the context `jax.set_mesh` sets.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

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


def logical_to_spec(axes, shape=None, mesh=None) -> PartitionSpec:
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


def constrain(x, axes):
    """A sharding constraint on an activation by logical axes, when a mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
