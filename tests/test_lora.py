"""LoRA: adapters start as the base model, only adapters train and are saved, resume takes the base from init_from,
and a merged workdir computes the base-plus-adapter logits."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import lora, model, optim, steps, train
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.checkpoint import PLACEHOLDER_OPT_STATE
from gpt_jax.data import text as text_lib
from gpt_jax.errors import ConfigError

TARGETS = "query,value,gate,up,down"


def tiny_model_config(vocab_size: int) -> model.ModelConfig:
    return model.ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                             max_seq_len=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)


def write_base_workdir(path: str) -> dict:
    """A random Llama-style base model as a gpt_jax workdir (config.json, tokenizer/, step-0 checkpoint), as
    tools/convert.py writes one; returns its parameters."""
    tokenizer = tokenizer_lib.CharTokenizer.train(text_lib.load_corpus("")[0])
    cfg = tiny_model_config(tokenizer.vocab_size)
    config = config_lib.base_config()
    for field in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len", "pos_embedding", "norm",
                  "mlp", "use_bias", "vocab_size"):
        config.model[field] = getattr(cfg, field)
    config.seq_len = 32
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    tokenizer.save(os.path.join(path, "tokenizer"))
    params = nnx.to_pure_dict(nnx.state(model.Transformer(cfg, rngs=nnx.Rngs(7)), nnx.Param))
    params = jax.tree.map(np.asarray, params)
    params["embed"] = params["embed"] * 10.0  # tied logits large enough for adapters to shape them
    ckpt = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"), keep=1)
    ckpt.save(0, params, PLACEHOLDER_OPT_STATE, {"step": 0})
    ckpt.close()
    return params


def lora_config(base_dir: str, steps: int):
    config = config_lib.base_config()
    config.init_from = base_dir
    config.train_steps = steps
    config.batch_size, config.seq_len = 4, 32
    config.learning_rate, config.min_learning_rate, config.warmup_steps = 3e-2, 3e-2, 0
    config.weight_decay = 0.0
    config.eval_every, config.eval_steps, config.final_eval_full = 0, 4, False
    config.log_every, config.checkpoint_every = 1, 0
    config.sample.max_new_tokens = 0
    config.lora.rank, config.lora.alpha, config.lora.targets = 4, 16.0, TARGETS
    return config


def tree_digest(directory: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def reference_logits(base_params: dict, adapters: dict, scale: float, cfg, tokens, monkeypatch) -> np.ndarray:
    """Logits with the adapters kept apart: each adapted Dense computes x@W + scale·(x@A)@B."""
    graphdef = nnx.split(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    base_model = nnx.merge(graphdef, base_params)
    by_module = {}
    for path, module in nnx.iter_modules(base_model):
        node = adapters
        for name in path:
            node = node.get(name, {}) if isinstance(node, dict) else {}
        if "lora_a" in node:
            by_module[id(module)] = node
    assert len(by_module) == 2 * len(TARGETS.split(","))
    plain = model.Dense.together  # every Dense computes through it

    def together(denses, x):
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        ys = []
        for dense, y in zip(denses, plain(denses, x), strict=True):
            adapter = by_module.get(id(dense))
            if adapter is not None:
                extra = (flat @ adapter["lora_a"]) @ adapter["lora_b"] * scale
                y = y + extra.reshape(*x.shape[:-1], -1).astype(y.dtype)
            ys.append(y)
        return ys

    monkeypatch.setattr(model.Dense, "together", staticmethod(together))
    try:
        return np.asarray(base_model(jnp.asarray(tokens))[0])
    finally:
        monkeypatch.setattr(model.Dense, "together", staticmethod(plain))


def random_params(cfg: model.ModelConfig) -> dict:
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(np.float32), abstract)


def test_adapters_start_at_the_base_and_merge_only_targeted_kernels():
    base = random_params(tiny_model_config(50))
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("query", "up"))
    adapters = lora.init_adapters(base, spec, seed=0)
    assert sorted(adapters["blocks"][0]["attn"]) == ["query"] and sorted(adapters["blocks"][1]["mlp"]) == ["up"]
    assert adapters["blocks"][0]["attn"]["query"]["lora_a"].shape == (32, 4)
    assert adapters["blocks"][0]["mlp"]["up"]["lora_b"].shape == (4, 64)
    assert lora.count(adapters) == 2 * (32 * 4 + 4 * 32 + 32 * 4 + 4 * 64)
    merged = lora.merge_params(base, adapters, spec.scale)  # B = 0: exactly the base
    jax.tree.map(np.testing.assert_array_equal, merged, base)

    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    merged = lora.merge_params(base, adapters, spec.scale)
    for path, value in jax.tree_util.tree_leaves_with_path(merged):
        names = [getattr(p, "key", None) for p in path]
        original = base
        for name in names:
            original = original[name]
        if names[-1] == "kernel" and names[-2] in ("query", "up"):
            a = adapters["blocks"][names[1]][names[2]][names[3]]
            np.testing.assert_allclose(value, original + 2.0 * a["lora_a"] @ a["lora_b"], rtol=1e-6, atol=1e-6)
        else:
            assert value is original  # untouched leaves are the base's own arrays


def test_lora_config_is_validated():
    config = config_lib.base_config()
    config.lora.rank = 4
    with pytest.raises(ConfigError, match="init_from"):
        config_lib.validate(config)
    config.init_from = "somewhere"
    config.lora.targets = "query,attn"
    with pytest.raises(ConfigError, match="'attn'"):
        config_lib.validate(config)
    config.lora.targets = "query, value"
    config_lib.validate(config)
    cfg = model.ModelConfig(vocab_size=10, n_layer=1, d_model=8, n_head=2, n_kv_head=2, d_ff=16)  # gelu: no gate
    with pytest.raises(ConfigError, match="gate"):
        lora.init_adapters(random_params(cfg), lora.LoraSpec(2, 4.0, ("query", "gate")), 0)


def test_lora_trains_only_adapters_resumes_and_merges(tmp_path, monkeypatch):
    base_dir, run_dir, merged_dir = (str(tmp_path / n) for n in ("base", "run", "merged"))
    base_params = write_base_workdir(base_dir)
    base_digest = tree_digest(base_dir)

    first = train.train_and_evaluate(lora_config(base_dir, 10), run_dir)
    # the checkpoint holds the adapters (params item) and their optimizer state, nothing of the base
    ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [10]
    abstract = jax.eval_shape(lambda: lora.init_adapters(base_params, lora.LoraSpec(4, 16.0, tuple(
        TARGETS.split(","))), 0))
    adapters, _, meta = ckpt.restore(10, abstract)
    ckpt.close()
    leaves = jax.tree_util.tree_leaves_with_path(adapters)
    assert {p[-1].key for p, _ in leaves} == {"lora_a", "lora_b"} and {p[-2].key for p, _ in leaves} == set(
        TARGETS.split(","))
    assert all(np.abs(np.asarray(leaf)).max() > 0 for _, leaf in leaves)  # B moved off zero
    opt_sizes = sum(x.size for x in jax.tree.leaves(jax.tree.map(np.asarray, _restore_opt(run_dir, 10))))
    assert opt_sizes < 3 * lora.count(adapters) + 100  # AdamW moments of the adapters only
    assert tree_digest(base_dir) == base_digest  # the base workdir is never written
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["train_loss"] for line in f if "train_loss" in line]
    assert losses[-1] < losses[0] - 1.0

    # resume: the base comes from init_from again, the adapters from the checkpoint
    train.train_and_evaluate(lora_config(base_dir, 12), run_dir)
    assert checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True).latest_step() == 12
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        resumed = {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}
    assert sorted(resumed) == list(range(1, 13)) and resumed[11] < losses[0] - 1.0  # went on from the adapters

    # merged: a plain workdir whose non-targeted parameters are the base's, bit for bit
    workdir_lib.write_model(merged_dir, workdir_lib.load(run_dir), {"merged_from": run_dir})
    merged = workdir_lib.load(merged_dir)
    assert merged.step == 12 and merged.config.lora.rank == 0 and merged.config.init_from == ""
    merged_params = nnx.to_pure_dict(nnx.state(merged.model, nnx.Param))
    for path, value in jax.tree_util.tree_leaves_with_path(merged_params):
        original = base_params
        for p in path:
            original = original[p.key]
        if len(path) > 1 and path[-2].key in TARGETS.split(","):
            assert not np.array_equal(value, original), path
        else:
            np.testing.assert_array_equal(value, original)

    # the merged model's logits equal the base's with the adapters computed on the side
    ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    adapters, _, _ = ckpt.restore(12, abstract)
    ckpt.close()
    tokens = np.asarray(merged.tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?"))[None]
    got = np.asarray(merged.model(jnp.asarray(tokens))[0])
    want = reference_logits(base_params, adapters, 4.0, merged.model_cfg, tokens, monkeypatch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - np.asarray(workdir_lib.load(base_dir).model(jnp.asarray(tokens))[0])).max() > 1e-2
    assert first["val_loss"] > 0


def _restore_opt(workdir: str, step: int):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("opt_state",),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    restored = manager.restore(step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore()))
    manager.close()
    return restored["opt_state"]


def test_lora_step_gradient_accumulation_matches_one_batch():
    cfg = tiny_model_config(40)
    base = jax.tree.map(jnp.asarray, random_params(cfg))
    graphdef = nnx.split(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    spec = lora.LoraSpec(4, 8.0, ("query", "down"))
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(base, spec, 0))  # B != 0: both get gradients
    config = config_lib.base_config()
    tx = optim.make_optimizer(config)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 40)
    results = []
    run = steps.TrainSetup(graphdef, tx, None, None, None, base, spec)
    for accum in (1, 2):
        state = {"params": adapters, "opt_state": tx.init(adapters), "rng": jax.random.key_data(jax.random.key(0)),
                 "step": jnp.int32(0), "health": steps.initial_health(adapters)}
        step = jax.jit(steps.make_train_step(run, accum, False))
        results.append(step(state, {"tokens": tokens}, base))
    assert float(results[0][1]["train_loss"]) == pytest.approx(float(results[1][1]["train_loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0]["params"],
                 results[1][0]["params"])
    assert not np.allclose(results[0][0]["params"]["blocks"][0]["attn"]["query"]["lora_b"],
                           adapters["blocks"][0]["attn"]["query"]["lora_b"])


def test_a_scanned_lora_step_reads_the_prestacked_base_without_copying_it():
    """With scan_layers a LoRA run stacks its frozen base's layers once (steps.stack_blocks) and the step hands the
    model slices of them, which XLA folds back into the stacked input: the step computes what it computes on the
    per-layer base, whose layers the model stacks into a copy every step, with that copy gone from its
    temporaries."""
    import dataclasses

    cfg = dataclasses.replace(tiny_model_config(40), d_model=128, d_ff=512, n_layer=4, scan_layers=True,
                              remat="full")
    base = jax.tree.map(jnp.asarray, random_params(cfg))
    graphdef = nnx.split(nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    spec = lora.LoraSpec(4, 8.0, ("query", "value", "down"))
    adapters = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(base, spec, 0))
    tx = optim.make_optimizer(config_lib.base_config())
    state = {"params": adapters, "opt_state": tx.init(adapters), "rng": jax.random.key_data(jax.random.key(0)),
             "step": jnp.int32(0), "health": steps.initial_health(adapters)}
    batch = {"tokens": jax.random.randint(jax.random.key(1), (2, 9), 0, 40)}
    stacked = steps.stack_blocks(base)
    assert jax.tree.structure(steps.unstack_blocks(stacked)) == jax.tree.structure(base)
    assert stacked["blocks"]["attn"]["query"]["kernel"].shape == (4, 128, 128)
    results, temporaries = [], []
    for frozen in (base, stacked):
        step = jax.jit(steps.make_train_step(steps.TrainSetup(graphdef, tx, None, None, None, frozen, spec), 1, False))
        temporaries.append(step.lower(state, batch, frozen).compile().memory_analysis().temp_size_in_bytes)
        results.append(step(state, batch, frozen))
    assert float(results[0][1]["train_loss"]) == pytest.approx(float(results[1][1]["train_loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0]["params"],
                 results[1][0]["params"])
    block_bytes = sum(x.nbytes for x in jax.tree.leaves(base["blocks"]))  # 3.9 MB
    assert temporaries[1] < temporaries[0] - 0.9 * block_bytes, (temporaries, block_bytes)


def test_lora_workdir_loads_as_its_merged_model(tmp_path):
    """Evaluation, sampling and serving load a LoRA workdir directly: its adapters merged into the init_from base."""
    from gpt_jax import decode, evaluate
    from gpt_jax.errors import UserError

    base_dir, run_dir, merged_dir = (str(tmp_path / n) for n in ("base", "run", "merged"))
    base_params = write_base_workdir(base_dir)
    text = tmp_path / "text.txt"
    text.write_text(text_lib.load_corpus("")[0][:20000])
    config = lora_config(base_dir, 3)
    config.data.text_files, config.final_eval_full = str(text), True
    final = train.train_and_evaluate(config, run_dir)

    loaded = workdir_lib.load(run_dir)  # the checkpoint holds adapters, not a model
    assert loaded.step == 3 and loaded.config.lora.rank == 0 and loaded.name == "run"
    workdir_lib.write_model(merged_dir, workdir_lib.load(run_dir), {"merged_from": run_dir})
    params = lambda m: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m.model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, params(loaded), params(workdir_lib.load(merged_dir)))
    query = params(loaded)["blocks"][0]["attn"]["query"]["kernel"]
    assert np.abs(query - base_params["blocks"][0]["attn"]["query"]["kernel"]).max() > 1e-3

    # --mode=eval on the LoRA workdir gives the training loop's own final evaluation (base + adapters)
    result = evaluate.evaluate_workdir(config_lib.from_json_file(os.path.join(run_dir, "config.json")), run_dir)
    assert result["step"] == 3 and result["val_tokens"] == final["val_tokens"] > 1000
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    # --mode=sample (and serve, through the same loader): the merged workdir's greedy continuation
    sample = lambda source: decode.sample_workdir(source, ["ROMEO:"], 12, 0.0, 0, 1.0)
    assert sample(run_dir) == sample(merged_dir)

    os.rename(base_dir, base_dir + "_moved")  # the adapters are nothing without their base
    with pytest.raises(UserError, match="init_from=.*base"):
        workdir_lib.load(run_dir)


def test_compile_mode_reports_a_lora_step_with_the_base_architecture(tiny_workdir):
    """`--mode=compile` with init_from takes the pretrained model's architecture (no model.* flags needed) and, with
    LoRA, compiles the step with its frozen base: the model's parameters are counted, the optimizer holds the
    adapters' moments only, and the step's arguments are smaller than full fine-tuning's. Its model FLOPs count 4
    per frozen parameter (no weight gradient) and 6 per adapter parameter, against 6 per parameter for full
    fine-tuning."""
    config = config_lib.base_config()
    config.init_from, config.batch_size, config.seq_len = tiny_workdir, 4, 32
    full = train.compile_report(config)
    config.lora.rank, config.lora.targets = 4, "query,value"
    adapted = train.compile_report(config)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(workdir_lib.load(tiny_workdir).model, nnx.Param)))
    assert full["parameters"] == adapted["parameters"] == n_params
    assert adapted["opt_state_bytes_per_device"] < full["opt_state_bytes_per_device"] / 20
    assert adapted["argument_bytes"] < full["argument_bytes"] / 2
    tokens = config.batch_size * config.seq_len
    saved = full["flops_per_step_model"] - adapted["flops_per_step_model"]  # (2 · params - 6 · adapter params) · tokens
    assert 0.9 * 2 * n_params * tokens < saved < 2 * n_params * tokens
