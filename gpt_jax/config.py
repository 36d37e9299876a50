"""The default configuration every `configs/*.py` starts from, and its validation.

Every key a config may set is defined here, so `--config.KEY=VALUE` can override any of them and a typo is an
error rather than a silently ignored setting. `base_config()` is a decoder-only GPT; `encdec_config()` adds what an
encoder-decoder (`model.kind = encoder_decoder`) needs: its two stacks, warm starts and source/target data.
A run resolves its config once (`train.prepare_run`: the architecture of `init_from`, the tokenizer's vocabulary),
validates it and freezes it; config.json holds that resolved config.
"""

from __future__ import annotations

import json
import os

import ml_collections

from gpt_jax.errors import ConfigError

KINDS = ("decoder_only", "encoder_decoder")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.train_steps = 1000
    c.batch_size = 16
    c.seq_len = 128  # tokens per window; an encoder-decoder's longest target (and source, see data.max_source_len)
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-4
    c.warmup_steps = 100
    c.weight_decay = 0.1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.grad_clip = 1.0
    c.grad_accum_steps = 1
    c.label_smoothing = 0.0  # the training loss's targets smoothed towards uniform by this much
    c.loss_chunk = 2048  # the output layer and loss go this many tokens at a time (0 = all at once)
    c.eval_every = 250
    c.eval_steps = 20
    c.final_eval_full = True  # the last evaluation covers the whole validation split
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.time_limit_s = 0.0  # stop (with a checkpoint and the final evaluation) after this many seconds; 0 = no limit
    c.init_from = ""
    c.max_nonfinite_steps = 10  # halt after this many steps with a NaN/Inf loss or gradient (each is skipped)
    c.peak_flops = 0.0  # per device, for MFU; 0 = known accelerator table, or a measured matmul rate on CPU

    c.model = ml_collections.ConfigDict()
    c.model.kind = "decoder_only"  # decoder_only | encoder_decoder (see encdec_config)
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
    # auto: bfloat16 on TPUs and GPUs; on CPUs bfloat16 matmul inputs where the CPU has bf16 instructions (AVX512-BF16,
    # AMX), else float32, and float32 activations (gpt_jax.ops.auto_dtypes says what was measured)
    c.model.dtype = "float32"  # matmul inputs: float32 | bfloat16 | float16 | auto
    c.model.activation_dtype = "float32"  # residual stream and the tensors between matmuls (same choices)
    c.model.param_dtype = "float32"  # bfloat16: weights stored and read by the matmuls as bf16
    c.model.quantize = "none"  # int8: sampling, eval and serving with int8 weights, a scale per output channel
    c.model.remat = "none"  # none | full | dots
    c.model.scan_layers = False
    c.model.attention_block = 64  # CPU: causal attention by query blocks of this many positions (0 = full square)
    c.model.max_seq_len = 0  # positions the model supports; 0 = seq_len

    c.data = ml_collections.ConfigDict()
    c.data.text_files = ""  # comma-separated paths or globs; empty = the bundled tinyshakespeare
    c.data.path = ""  # a directory written by tools/prepare_data.py
    c.data.tokenizer = "char"  # char | sentencepiece | bpe (byte-level BPE), trained on the training text
    c.data.vocab_size = 4096  # for a trained SentencePiece or BPE tokenizer
    c.data.val_fraction = 0.1  # the last fraction of the text (or, with sft_file, of the records) is validation
    # Supervised fine-tuning: a JSONL file of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}
    # records, rendered with the tokenizer's chat template; the loss covers response (assistant) tokens only.
    c.data.sft_file = ""
    c.data.sft_prompt_field = "prompt"  # record fields of prompt/response pairs (GSM8K: question, answer)
    c.data.sft_response_field = "response"

    # LoRA: train low-rank adapters W + (alpha/rank)·A@B on the named Dense kernels of the `init_from` model;
    # the base stays frozen and checkpoints hold the adapters only (tools/convert.py merges them).
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

    # lm-evaluation-harness tasks run at each evaluation (decoder-only; needs `pip install -e '.[harness]'`),
    # their metrics logged as harness/TASK/METRIC; tasks under harness_include_path or lm-eval's own
    c.eval = ml_collections.ConfigDict()
    c.eval.harness_tasks = ""  # comma list; empty = none
    c.eval.harness_limit = 0  # documents per task (0 = all)
    c.eval.harness_include_path = ""  # a directory of task YAMLs
    c.eval.harness_num_fewshot = -1  # -1 = each task's own
    # an encoder-decoder's --mode=eval: > 1 scores beam search's translations too, beside greedy; beam search ranks
    # finished translations by log-probability / length ** length_penalty
    c.eval.beam_size = 1
    c.eval.length_penalty = 1.0
    return c


def stack_config() -> ml_collections.ConfigDict:
    """One stack of an encoder-decoder: the architecture keys of `model` plus BERT's (a warm start fills them)."""
    s = ml_collections.ConfigDict()
    s.n_layer = 3
    s.n_head = 4
    s.n_kv_head = 0
    s.d_model = 256
    s.d_ff = 1024
    s.vocab_size = 0  # 0 = from the side's tokenizer
    s.max_seq_len = 0  # 0 = data.max_source_len (encoder) or seq_len (decoder)
    s.pos_embedding = "learned"
    s.rope_theta = 10000.0
    s.norm = "layernorm"
    s.norm_eps = 1e-5
    s.mlp = "gelu"
    s.activation = "gelu_tanh"  # gelu_tanh | gelu (exact, BERT) | relu
    s.use_bias = True
    s.tie_embeddings = True
    s.layout = "pre"  # pre (GPT-2) | post (BERT)
    s.type_vocab_size = 0
    s.position_offset = 0
    s.embed_norm = False
    s.head = "linear"  # linear | mlm (BERT's masked-LM head)
    return s


def encdec_config() -> ml_collections.ConfigDict:
    """An encoder-decoder trained on aligned source/target pairs: the loss is the target tokens' cross-entropy;
    the decoder reads [start] + target and predicts target + [end]; sources are [bos] source [eos]."""
    c = base_config()
    c.model.kind = "encoder_decoder"
    c.model.encoder = stack_config()
    c.model.decoder = stack_config()
    c.model.encoder_from = ""  # HF BERT / RoBERTa directory; empty = from scratch with model.encoder
    c.model.decoder_from = ""  # HF BERT / RoBERTa / GPT-2 directory; empty = from scratch with model.decoder
    for key in ("decoder_start_id", "eos_id", "pad_id", "source_bos_id", "source_eos_id"):
        c.model[key] = -1  # resolved from the tokenizers (-1 until then; source ids stay -1 for "none")
    c.data.tokenizer = "bpe"  # byte-level BPE with <pad>, <s>, </s> as ids 0, 1, 2
    c.data.vocab_size = 8000
    c.data.joint_vocab = True  # one BPE for both sides when both are trained
    c.data.train_source = ""  # aligned text files, one sentence per line
    c.data.train_target = ""
    c.data.val_source = ""
    c.data.val_target = ""
    c.data.train_jsonl = ""  # or JSONL files of {"source": ..., "target": ...}
    c.data.val_jsonl = ""
    c.data.max_source_len = 0  # tokens, specials included; longer sources are cut; 0 = seq_len
    c.data.length_buckets = "16,24,32,48,64"  # both sides of a batch are padded to the first that fits
    # translation of the validation sources for BLEU and chrF (the harness_* keys of base_config stay, unused)
    c.eval.max_new_tokens = 96
    c.eval.batch_size = 128
    c.eval.limit = 0  # translate only the first N validation pairs (0 = all)
    return c


_CHOICES = {
    "pos_embedding": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "activation": ("gelu_tanh", "gelu", "relu"),
    "layout": ("pre", "post"),
    "head": ("linear", "mlm"),
    "remat": ("none", "full", "dots"),
    "dtype": ("float32", "bfloat16", "float16", "auto"),
    "activation_dtype": ("float32", "bfloat16", "float16", "auto"),
    "param_dtype": ("float32", "bfloat16"),
    "quantize": ("none", "int8"),
}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _validate_model(m, name: str) -> None:
    for key, allowed in _CHOICES.items():
        if key in m and m[key] not in allowed:
            raise ConfigError(f"{name}.{key}={m[key]!r} is not one of {', '.join(allowed)}")
    for key in ("n_layer", "n_head", "d_model"):
        if m[key] < 1:
            raise ConfigError(f"{name}.{key}={m[key]} must be at least 1")
    for key in ("n_kv_head", "d_ff", "vocab_size"):
        if m[key] < 0:
            raise ConfigError(f"{name}.{key}={m[key]} must not be negative")
    if m.d_model % m.n_head:
        raise ConfigError(f"{name}.n_head={m.n_head} does not divide {name}.d_model={m.d_model}")
    n_kv = m.n_kv_head or m.n_head
    if m.n_head % n_kv:
        raise ConfigError(f"{name}.n_kv_head={n_kv} does not divide {name}.n_head={m.n_head}")
    if m.pos_embedding == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"{name}.pos_embedding=rope needs an even head dimension, got {m.d_model // m.n_head}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot work."""
    if config.model.kind not in KINDS:
        raise ConfigError(f"model.kind={config.model.kind!r} is not one of {', '.join(KINDS)}")
    encdec = config.model.kind == "encoder_decoder"
    if encdec and "encoder" not in config.model:
        raise ConfigError("model.kind=encoder_decoder needs a config built on gpt_jax.config.encdec_config() "
                          "(e.g. configs/multi30k_encdec.py)")
    for key in ("train_steps", "batch_size", "seq_len", "grad_accum_steps", "eval_steps", "log_every"):
        if _get(config, key) < 1:
            raise ConfigError(f"{key}={_get(config, key)} must be at least 1")
    for key in ("eval_every", "checkpoint_every", "warmup_steps", "keep_checkpoints", "learning_rate",
                "min_learning_rate", "weight_decay", "time_limit_s", "loss_chunk"):
        if _get(config, key) < 0:
            raise ConfigError(f"{key}={_get(config, key)} must not be negative")
    if config.eval.harness_limit < 0:
        raise ConfigError(f"eval.harness_limit={config.eval.harness_limit} must not be negative")
    if config.eval.beam_size < 1:
        raise ConfigError(f"eval.beam_size={config.eval.beam_size} must be at least 1")
    if config.eval.length_penalty < 0:
        raise ConfigError(f"eval.length_penalty={config.eval.length_penalty} must not be negative")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing={config.label_smoothing} must be in [0, 1)")
    m = config.model
    for key in ("remat", "dtype", "activation_dtype", "param_dtype", "quantize"):
        if m[key] not in _CHOICES[key]:
            raise ConfigError(f"model.{key}={m[key]!r} is not one of {', '.join(_CHOICES[key])}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    tokenizers = ("bpe",) if encdec else ("char", "sentencepiece", "bpe")
    if config.data.tokenizer not in tokenizers:
        raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} is not one of {', '.join(tokenizers)}")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} does not divide batch_size={config.batch_size}")
    if encdec:
        _validate_model(m.encoder, "model.encoder")
        _validate_model(m.decoder, "model.decoder")
        if m.decoder_from and not m.encoder_from:
            raise ConfigError("model.decoder_from needs model.encoder_from (a pretrained decoder with a scratch "
                              "encoder is not supported)")
        if config.lora.rank or config.init_from:
            raise ConfigError("an encoder-decoder warm-starts from model.encoder_from / model.decoder_from "
                              "(lora and init_from are for decoder-only models)")
        parse_buckets(config.data.length_buckets)
        return
    _validate_model(m, "model")
    if m.max_seq_len and m.max_seq_len < config.seq_len:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} is shorter than seq_len={config.seq_len}")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={config.data.val_fraction} must be in (0, 1)")
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


def parse_buckets(text: str) -> tuple[int, ...]:
    """"16,24,32" → (16, 24, 32); ConfigError for anything but increasing positive integers."""
    try:
        buckets = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"data.length_buckets={text!r} is not a comma-separated list of integers") from None
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ConfigError(f"data.length_buckets={text!r} must be increasing positive integers")
    return buckets


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json_file(path: str) -> ml_collections.ConfigDict:
    """Reads a `config.json` written by a run, on top of the defaults of its kind (so older files gain new keys)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    kind = saved.get("model", {}).get("kind", "decoder_only") if isinstance(saved.get("model"), dict) else ""
    config = encdec_config() if kind == "encoder_decoder" else base_config()
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


def cached(name: str) -> str:
    """Where configs expect a downloaded model or file: $GPT_JAX_CACHE/name (default ~/.cache/gpt_jax/name)."""
    cache = os.environ.get("GPT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt_jax"))
    return os.path.join(cache, name)


def get_config() -> ml_collections.ConfigDict:
    """The defaults, for `--config` left out (ml_collections loads this file like any config file)."""
    return base_config()
