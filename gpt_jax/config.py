"""The default configuration every `configs/*.py` starts from, and its validation.

Every key a config may set is defined here, so `--config.KEY=VALUE` can override any of them and a typo is an
error rather than a silently ignored setting.
"""

from __future__ import annotations

import json

import ml_collections

from gpt_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.train_steps = 1000
    c.batch_size = 16
    c.seq_len = 128
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-4
    c.warmup_steps = 100
    c.weight_decay = 0.1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.grad_clip = 1.0
    c.grad_accum_steps = 1
    c.eval_every = 250
    c.eval_steps = 20
    c.final_eval_full = True  # the last evaluation covers every non-overlapping window of the validation split
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.init_from = ""
    c.max_nonfinite_steps = 10  # halt after this many steps with a NaN/Inf loss or gradient (each is skipped)
    c.peak_flops = 0.0  # per device, for MFU; 0 = known accelerator table, or a measured matmul rate on CPU

    c.model = ml_collections.ConfigDict()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_kv_head = 0  # 0 = n_head (multi-head attention); fewer = grouped-query attention
    c.model.d_model = 128
    c.model.d_ff = 0  # 0 = 4 * d_model
    c.model.vocab_size = 0  # 0 = from the tokenizer
    c.model.pos_embedding = "learned"  # learned | rope
    c.model.rope_theta = 10000.0
    c.model.norm = "layernorm"  # layernorm | rmsnorm
    c.model.norm_eps = 1e-5
    c.model.mlp = "gelu"  # gelu | swiglu
    c.model.use_bias = True
    c.model.dropout = 0.0
    c.model.tie_embeddings = True
    c.model.dtype = "float32"  # matmul inputs
    c.model.activation_dtype = "float32"  # residual stream and the tensors between matmuls
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots
    c.model.scan_layers = False
    c.model.max_seq_len = 0  # positions the model supports; 0 = seq_len

    c.data = ml_collections.ConfigDict()
    c.data.text_files = ""  # comma-separated paths or globs; empty = the bundled tinyshakespeare
    c.data.path = ""  # a directory written by tools/prepare_data.py
    c.data.tokenizer = "char"  # char | sentencepiece (trained on the training text)
    c.data.vocab_size = 4096  # for a trained SentencePiece model
    c.data.val_fraction = 0.1  # the last fraction of the text (or, with sft_file, of the records) is validation
    # Supervised fine-tuning: a JSONL file of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}
    # records, rendered with the tokenizer's chat template; the loss covers response (assistant) tokens only.
    c.data.sft_file = ""
    c.data.sft_prompt_field = "prompt"  # record fields of prompt/response pairs (GSM8K: question, answer)
    c.data.sft_response_field = "response"

    # LoRA: train low-rank adapters W + (alpha/rank)·A@B on the named Dense kernels of the `init_from` model;
    # the base stays frozen and checkpoints hold the adapters only (`python -m gpt_jax.lora` merges them).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning or training from scratch)
    c.lora.alpha = 16.0
    c.lora.targets = "query,value"  # comma list among query,key,value,out,gate,up,down

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "\n"
    c.sample.max_new_tokens = 200  # 0 = print no sample at the end of training
    c.sample.temperature = 0.8
    c.sample.top_k = 0
    c.sample.top_p = 1.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; "auto" = detect (TPU pod, SLURM, MPI)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


_CHOICES = {
    "model.pos_embedding": ("learned", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.remat": ("none", "full", "dots"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.activation_dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.tokenizer": ("char", "sentencepiece"),
}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work."""
    for key, allowed in _CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in ("train_steps", "batch_size", "seq_len", "grad_accum_steps", "eval_steps", "log_every",
                "model.n_layer", "model.n_head", "model.d_model"):
        if _get(config, key) < 1:
            raise ConfigError(f"{key}={_get(config, key)} must be at least 1")
    for key in ("eval_every", "checkpoint_every", "warmup_steps", "keep_checkpoints", "model.n_kv_head",
                "model.d_ff", "model.vocab_size", "learning_rate", "min_learning_rate", "weight_decay"):
        if _get(config, key) < 0:
            raise ConfigError(f"{key}={_get(config, key)} must not be negative")
    m = config.model
    if m.d_model % m.n_head:
        raise ConfigError(f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}")
    n_kv = m.n_kv_head or m.n_head
    if m.n_head % n_kv:
        raise ConfigError(f"model.n_kv_head={n_kv} does not divide model.n_head={m.n_head}")
    if m.pos_embedding == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"model.pos_embedding=rope needs an even head dimension, got {m.d_model // m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={config.data.val_fraction} must be in (0, 1)")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} does not divide batch_size={config.batch_size}")
    if m.max_seq_len and m.max_seq_len < config.seq_len:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} is shorter than seq_len={config.seq_len}")
    if config.data.sft_file and config.data.path:
        raise ConfigError("set data.sft_file or data.path, not both")
    if config.lora.rank < 0:
        raise ConfigError(f"lora.rank={config.lora.rank} must not be negative")
    if config.lora.rank:
        if not config.init_from:
            raise ConfigError("lora.rank > 0 needs init_from (the pretrained model the adapters modify)")
        if config.lora.alpha <= 0:
            raise ConfigError(f"lora.alpha={config.lora.alpha} must be positive")
        lora_targets(config.lora.targets)


LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")


def lora_targets(spec: str) -> tuple[str, ...]:
    """The module names of `lora.targets` (a comma list); ConfigError for an empty list or an unknown name."""
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise ConfigError("lora.targets names no module (use a comma list among " + ",".join(LORA_TARGETS) + ")")
    for name in names:
        if name not in LORA_TARGETS:
            raise ConfigError(f"lora.targets: {name!r} is not one of {', '.join(LORA_TARGETS)}")
    return names


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    """Reads a `config.json` written by a run, on top of the defaults (so older files gain new keys)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    config = base_config()
    merge_dict(config, saved, path)
    return config


def merge_dict(config: ml_collections.ConfigDict, values: dict, source: str, prefix: str = "") -> None:
    for key, value in values.items():
        name = prefix + key
        if key not in config:
            raise ConfigError(f"{source}: unknown config key {name!r}")
        if isinstance(config[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a mapping")
            merge_dict(config[key], value, source, name + ".")
        else:
            with config.ignore_type():
                config[key] = value


def get_config() -> ml_collections.ConfigDict:
    """The defaults, for `--config` left out (ml_collections loads this file like any config file)."""
    return base_config()
