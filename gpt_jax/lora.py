"""LoRA: low-rank adapters on the Dense kernels of a pretrained model.

A targeted kernel W [in, out] gains A [in, rank] (small random) and B [rank, out] (zeros, so training starts from
the base model exactly); the model then computes with W + (alpha / rank)·A@B. The adapters live in a pytree that
mirrors the parameters down to each targeted module (`{"blocks": {0: {"attn": {"query": {"lora_a", "lora_b"}}}}}`);
Training attaches them to the base parameters as factored kernels (`attach`: x@W + scale·(x@A)@B in
`ops.matmul`, so the frozen W is never copied or differentiated and the model code knows nothing of LoRA);
`merge_params` folds them into W for a model that stands alone.

A LoRA run's workdir loads as a model wherever a workdir does (`--mode=eval|sample|serve`, tools/evaluate.py,
`tools/convert.py --to=hf`): `workdir.load_workdir` merges its adapters into the `init_from` base, which must
still be there. `tools/convert.py --input=LORA_WORKDIR --output=DIR` writes the merged model as a workdir that
stands alone, without the base.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import ops
from gpt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # module names: query, key, value, out, gate, up, down

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> LoraSpec | None:
        """The run's LoRA settings (`config.lora`), or None when lora.rank is 0."""
        if not config.lora.rank:
            return None
        return cls(int(config.lora.rank), float(config.lora.alpha), config_lib.lora_targets(config.lora.targets))


def _targeted(params: dict, targets: tuple[str, ...], name=None) -> dict | None:
    """The sub-tree of `params` down to the modules named in `targets` that hold a kernel (None if none)."""
    if not isinstance(params, dict):
        return None
    if name in targets and "kernel" in params:
        return params
    out = {}
    for key, value in params.items():
        sub = _targeted(value, targets, key)
        if sub is not None:
            out[key] = sub
    return out or None


def init_adapters(base_params: dict, spec: LoraSpec, seed: int) -> dict:
    """Adapters for every targeted kernel of `base_params` (arrays or ShapeDtypeStructs): A uniform in
    ±1/sqrt(in) (as PEFT's default), B zeros, both float32. ConfigError when a target matches no module."""
    modules = _targeted(base_params, spec.targets)
    if modules is None:
        raise ConfigError(f"lora.targets={','.join(spec.targets)} matches no Dense kernel of this model")
    found = {str(getattr(path[-2], "key", "")) for path, _ in jax.tree_util.tree_leaves_with_path(modules)}
    missing = [t for t in spec.targets if t not in found]
    if missing:
        raise ConfigError(f"lora.targets: this model has no {', '.join(missing)} module (e.g. gate exists only "
                          "with model.mlp=swiglu)")
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(modules)
               if getattr(path[-1], "key", None) == "kernel"]
    keys = iter(jax.random.split(jax.random.key(seed), len(kernels)))

    def make(node):
        if "kernel" in node:
            d_in, d_out = node["kernel"].shape
            bound = 1.0 / np.sqrt(d_in)
            return {"lora_a": jax.random.uniform(next(keys), (d_in, spec.rank), jnp.float32, -bound, bound),
                    "lora_b": jnp.zeros((spec.rank, d_out), jnp.float32)}
        return {key: make(value) for key, value in node.items()}

    return make(modules)


def merge_params(base_params: dict, adapters: dict, scale: float) -> dict:
    """The base parameters with each adapted kernel replaced by W + scale·A@B (in W's dtype); every other leaf is
    the base's own array. Pure and jittable."""

    def walk(base, adapter):
        if "lora_a" in adapter:
            kernel = base["kernel"]
            delta = jnp.dot(adapter["lora_a"], adapter["lora_b"], preferred_element_type=jnp.float32) * scale
            return {**base, "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
        return {**base, **{key: walk(base[key], value) for key, value in adapter.items()}}

    return walk(base_params, adapters)


def attach(base_params: dict, adapters: dict, scale: float) -> dict:
    """The base parameters with each adapted kernel as an `ops.LowRankUpdate` (W + scale·A@B kept factored): what
    training runs, so the frozen W is neither copied nor differentiated."""

    def walk(base, adapter):
        if "lora_a" in adapter:
            return {**base, "kernel": ops.LowRankUpdate(base["kernel"], adapter["lora_a"], adapter["lora_b"], scale)}
        return {**base, **{key: walk(base[key], value) for key, value in adapter.items()}}

    return walk(base_params, adapters)


def adapter_shardings(adapters: dict, param_shardings: dict) -> dict:
    """Shardings for the adapters from their kernels': A [in, rank] split like the kernel's input axis, B
    [rank, out] like its output axis; rank is never split."""

    def walk(adapter, shardings):
        if "lora_a" in adapter:
            kernel = shardings["kernel"]
            spec = tuple(kernel.spec) + (None,) * (2 - len(kernel.spec))
            named = lambda s: jax.sharding.NamedSharding(kernel.mesh, jax.sharding.PartitionSpec(*s))
            return {"lora_a": named((spec[0], None)), "lora_b": named((None, spec[1]))}
        return {key: walk(value, shardings[key]) for key, value in adapter.items()}

    return walk(adapters, param_shardings)


def count(adapters: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
