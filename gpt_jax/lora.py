"""LoRA: low-rank adapters on the Dense kernels of a pretrained model.

A targeted kernel W [in, out] gains A [in, rank] (small random) and B [rank, out] (zeros, so training starts from
the base model exactly); the model then computes with W + (alpha / rank)·A@B. The adapters live in a pytree that
mirrors the parameters down to each targeted module (`{"blocks": {0: {"attn": {"query": {"lora_a", "lora_b"}}}}}`);
`merge_params` folds them into the base parameters as a pure function, so the train step merges inside jit while
the base stays a frozen input and the model code knows nothing of LoRA.

A LoRA run's workdir loads as a model wherever a workdir does (`--mode=eval|sample|serve`, tools/evaluate.py,
`tools/convert.py --to=hf`): `pretrained.load_workdir` merges its adapters into the `init_from` base, which must
still be there. Merging writes a plain workdir that stands alone, without the base:

    python -m gpt_jax.lora --workdir=LORA_WORKDIR --output=MERGED_DIR [--step=N]
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax.errors import ConfigError, UserError


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


# ----------------------------------------------------------------------------------------------------------------
# LoRA workdirs: load merged, write merged


def load_merged(workdir: str, step: int | None = None):
    """The model of a LoRA workdir with its adapters (latest checkpoint or `step`) merged into the `init_from` base,
    as a `pretrained.LoadedModel` whose config has lora.rank 0."""
    from flax import nnx

    from gpt_jax import checkpoint as checkpoint_lib
    from gpt_jax import pretrained
    from gpt_jax import tokenizer as tokenizer_lib
    from gpt_jax.model import ModelConfig, Transformer

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{workdir} has no config.json: not a gpt_jax workdir")
    config = config_lib.from_json_file(config_path)
    spec = LoraSpec.from_config(config)
    if spec is None:
        raise UserError(f"{workdir} is not a LoRA run (its lora.rank is 0)")
    if not checkpoint_lib.has_checkpoint(workdir):
        raise UserError(f"{workdir} has no checkpoint to load (checkpoints/ is empty or missing)")
    if not os.path.exists(config.init_from):
        raise UserError(f"{workdir} holds LoRA adapters of the base model init_from={config.init_from}, which is "
                        "not there: the base is needed to load them")
    base = pretrained.load(config.init_from)
    base_params = nnx.to_pure_dict(nnx.state(base.model, nnx.Param))
    model_cfg = ModelConfig.from_config(config)
    graphdef, expected = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    if shapes(base_params) != shapes(nnx.to_pure_dict(expected)):
        raise UserError(f"init_from={config.init_from} is not the model {workdir} was trained from (its "
                        "parameter shapes differ)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: init_adapters(base_params, spec, 0)))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = ckpt.latest_step() if step is None else step
    adapters, _, _ = ckpt.restore(step, target)
    ckpt.close()
    merged = jax.jit(lambda b, a: merge_params(b, a, spec.scale))(base_params, adapters)
    model = nnx.merge(graphdef, merged)
    merged_config = config_lib.from_json_file(config_path)
    merged_config.lora.rank = 0
    merged_config.init_from = ""  # the merged parameters stand alone
    tokenizer = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
    return pretrained.LoadedModel(model, model_cfg, tokenizer, merged_config, step,
                                  os.path.basename(os.path.abspath(workdir)))


def merge_into_workdir(workdir: str, output_dir: str, step: int | None = None) -> str:
    """Writes the merged model of LoRA `workdir` as a plain gpt_jax workdir (config.json with lora.rank 0,
    tokenizer/, one checkpoint at the LoRA run's step) that sampling, serving, evaluation and
    `tools/convert.py --to=hf` load like any model. Returns `output_dir`."""
    from flax import nnx

    from gpt_jax import checkpoint as checkpoint_lib
    from gpt_jax.convert.common import PLACEHOLDER_OPT_STATE

    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserError(f"{output_dir}: output directory exists and is not empty")
    loaded = load_merged(workdir, step)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        f.write(config_lib.to_json(loaded.config))
    loaded.tokenizer.save(os.path.join(output_dir, "tokenizer"))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(output_dir, "checkpoints"), keep=1)
    ckpt.save(loaded.step, params, PLACEHOLDER_OPT_STATE,
              {"step": loaded.step, "merged_from": os.path.abspath(workdir), "opt_state": "placeholder"})
    ckpt.close()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt_jax.lora --workdir=DIR --output=DIR [--step=N]`: merge a LoRA run into a plain workdir."""
    import argparse

    parser = argparse.ArgumentParser(description="Merge the adapters of a LoRA run into its base model and write "
                                                 "a plain gpt_jax workdir.")
    parser.add_argument("--workdir", required=True, help="the LoRA run's workdir")
    parser.add_argument("--output", required=True, help="directory to create (must be new or empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        merge_into_workdir(args.workdir, args.output, args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote merged workdir {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
