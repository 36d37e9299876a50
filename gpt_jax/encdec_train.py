"""Training an encoder-decoder on source/target pairs, and translating with it.

Pairs come from JSONL ({"source": ..., "target": ...} per line) or two line-aligned text files. The loss is the
target tokens' cross-entropy (optionally label-smoothed): the decoder reads [start] + target and predicts target +
[end]. Batches are grouped by length and both sides padded to one of `length_buckets`, so a handful of shapes
compile (each costs seconds on a CPU).
The train step is one pure `jax.jit` over a state pytree with explicit shardings from the parameters' logical axes;
the optimizer is `gpt_jax.optim.make_optimizer`; checkpoints are Orbax (`gpt_jax.checkpoint.Checkpointer`), and a
run resumes from the latest one.

The model is from scratch (tokenizers: byte-level BPE trained on the training pairs, joint or per side) or
warm-started (`model.encoder_from` / `model.decoder_from`: HF BERT / RoBERTa / GPT-2 directories, their
tokenizers with them).

The workdir: config.json ({"model": the resolved encoder-decoder config with kind = encoder_decoder, "tokens": the
source's wrapping ids, "run": this module's config}), tokenizer/source/ and tokenizer/target/, checkpoints/,
metrics.jsonl, and after evaluation eval.json and val_hypotheses.txt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import optim, sharding
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.encdec import EncDecConfig, EncoderDecoder, StackConfig
from gpt_jax.errors import ConfigError, DataError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # the specials of a trained BPE tokenizer, ids 0, 1, 2


def seq2seq_config() -> ml_collections.ConfigDict:
    """Every key a sequence-to-sequence run may set, with defaults for a small from-scratch model."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.train_steps = 2000
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-4
    c.warmup_steps = 200
    c.weight_decay = 0.01
    c.adam_b1 = 0.9
    c.adam_b2 = 0.98
    c.grad_clip = 1.0
    c.label_smoothing = 0.1
    c.eval_every = 500  # validation loss every so many steps (0 = only at the end)
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.time_limit_s = 0.0  # stop training (and checkpoint) after this many seconds; 0 = no limit
    c.max_source_len = 64  # tokens, special tokens included; longer sources are cut
    c.max_target_len = 64
    c.length_buckets = "16,24,32,48,64"  # both sides of a batch are padded to the first of these that fits

    c.model = ml_collections.ConfigDict()
    c.model.kind = "encoder_decoder"  # what gpt_jax.main would dispatch on (decoder_only runs use gpt_jax.train)
    c.model.encoder_from = ""  # HF BERT / RoBERTa directory; empty = from scratch with model.encoder
    c.model.decoder_from = ""  # HF BERT / RoBERTa / GPT-2 directory; empty = from scratch with model.decoder
    for side in ("encoder", "decoder"):
        s = ml_collections.ConfigDict()
        s.n_layer = 3
        s.n_head = 4
        s.n_kv_head = 0  # 0 = n_head
        s.d_model = 256
        s.d_ff = 1024
        s.pos_embedding = "learned"
        s.norm = "layernorm"
        s.norm_eps = 1e-5
        s.mlp = "gelu"
        s.activation = "gelu_tanh"
        s.layout = "pre"
        s.tie_embeddings = True
        s.dtype = "float32"
        s.param_dtype = "float32"
        c.model[side] = s
    c.model.dropout = 0.1  # both stacks, pretrained ones too

    c.data = ml_collections.ConfigDict()
    c.data.train_jsonl = ""
    c.data.train_source = ""
    c.data.train_target = ""
    c.data.val_jsonl = ""
    c.data.val_source = ""
    c.data.val_target = ""
    c.data.vocab_size = 8000  # trained BPE tokenizers
    c.data.joint_vocab = True  # one BPE for both sides when both are trained
    c.data.val_limit = 0  # translate only the first N validation pairs for BLEU (0 = all)

    c.decode = ml_collections.ConfigDict()
    c.decode.max_new_tokens = 96
    c.decode.batch_size = 128

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


# ----------------------------------------------------------------------------------------------------------------
# Data


def _read_lines(path: str, key: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n").rstrip("\r") for line in f]
    except OSError as e:
        raise DataError(f"{key}={path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{key}={path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def load_pairs(jsonl: str = "", source: str = "", target: str = "", key: str = "data.train") -> \
        tuple[list[str], list[str]]:
    """(sources, targets) from a JSONL file with "source" and "target" fields, or two line-aligned text files."""
    if jsonl:
        sources, targets = [], []
        for number, line in enumerate(_read_lines(jsonl, f"{key}_jsonl"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{jsonl}:{number}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("source"), str) or \
                    not isinstance(record.get("target"), str):
                raise DataError(f"{jsonl}:{number}: a line needs string fields \"source\" and \"target\"")
            sources.append(record["source"])
            targets.append(record["target"])
    elif source and target:
        sources, targets = _read_lines(source, f"{key}_source"), _read_lines(target, f"{key}_target")
        if len(sources) != len(targets):
            raise DataError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: the files must be "
                            "line-aligned")
    else:
        raise ConfigError(f"set {key}_jsonl, or both {key}_source and {key}_target")
    if not sources:
        raise DataError(f"{jsonl or source}: no pairs")
    return sources, targets


def train_bpe(texts: Sequence[str], vocab_size: int) -> tokenizer_lib.HFTokenizer:
    """A byte-level BPE tokenizer trained on `texts`, with <pad>, <s>, </s> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tokenizer_lib.HFTokenizer(tok, eos_id=tok.token_to_id(EOS), bos_id=tok.token_to_id(BOS))


@dataclasses.dataclass
class Vocab:
    """How texts become token ids on each side: source = [bos] text [eos]; decoder input = [start] target,
    labels = target [eos]."""

    source_tokenizer: object
    target_tokenizer: object
    source_bos_id: int | None
    source_eos_id: int | None

    def encode_sources(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        head = [] if self.source_bos_id is None else [self.source_bos_id]
        tail = [] if self.source_eos_id is None else [self.source_eos_id]
        room = max_len - len(head) - len(tail)
        return [head + self.source_tokenizer.encode(t)[:room] + tail for t in texts]

    def encode_targets(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        return [self.target_tokenizer.encode(t)[:max_len - 1] for t in texts]

    def decode_targets(self, rows: Sequence[Sequence[int]]) -> list[str]:
        return [self.target_tokenizer.decode(r).strip() for r in rows]


def parse_buckets(text: str) -> tuple[int, ...]:
    """"16,24,32" → (16, 24, 32); ConfigError for anything but increasing positive integers."""
    try:
        buckets = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"length_buckets={text!r} is not a comma-separated list of integers") from None
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ConfigError(f"length_buckets={text!r} must be increasing positive integers")
    return buckets


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The first bucket ≥ n; past the last one, n rounded up to a multiple of the last."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


class PairBatches:
    """Length-grouped batches of encoded pairs, in an order fixed by (seed, epoch): batch k of a run is the same
    after a resume. Each batch: source [b, L], source_valid, target_in [b, L], target_out, target_mask, with L the
    bucket that fits both sides."""

    POOL = 50  # batches per length-sorting pool

    def __init__(self, sources: list[list[int]], targets: list[list[int]], cfg: EncDecConfig, batch_size: int,
                 buckets: Sequence[int], seed: int):
        if len(sources) < batch_size:
            raise DataError(f"{len(sources)} training pairs are fewer than batch_size={batch_size}")
        self.sources, self.targets, self.cfg = sources, targets, cfg
        self.batch_size, self.buckets, self.seed = batch_size, tuple(buckets), seed
        self.per_epoch = len(sources) // batch_size
        self._epoch, self._order = -1, []

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        index = rng.permutation(len(self.sources))[:self.per_epoch * self.batch_size]
        lengths = np.array([len(self.sources[i]) + len(self.targets[i]) for i in index])
        pool = self.POOL * self.batch_size
        batches = []
        for start in range(0, len(index), pool):
            chunk = index[start:start + pool][np.argsort(lengths[start:start + pool], kind="stable")]
            batches += [chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def batch(self, step: int) -> dict:
        """Batch number `step` (0-based) of the run."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        return self.make([self.sources[i] for i in self._order[k]], [self.targets[i] for i in self._order[k]])

    def make(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], rows: int | None = None) -> dict:
        """Pads pairs into a batch of `rows` (default: as many as pairs; filler rows have no valid tokens)."""
        cfg, n = self.cfg, rows or len(sources)
        src_len = tgt_len = bucket_length(max(max(len(s) for s in sources), max(len(t) for t in targets) + 1),
                                          self.buckets)
        batch = {"source": np.full((n, src_len), cfg.pad_id, np.int32),
                 "source_valid": np.zeros((n, src_len), bool),
                 "target_in": np.full((n, tgt_len), cfg.pad_id, np.int32),
                 "target_out": np.full((n, tgt_len), cfg.pad_id, np.int32),
                 "target_mask": np.zeros((n, tgt_len), np.float32)}
        batch["source_valid"][:, 0] = True  # a filler row attends to one padding token rather than to none
        for r, (s, t) in enumerate(zip(sources, targets, strict=True)):
            batch["source"][r, :len(s)] = s
            batch["source_valid"][r, :len(s)] = True
            batch["target_in"][r, :len(t) + 1] = [cfg.decoder_start_id, *t]
            batch["target_out"][r, :len(t) + 1] = [*t, cfg.eos_id]
            batch["target_mask"][r, :len(t) + 1] = 1.0
        return batch

    def iterate_all(self, sources: list[list[int]], targets: list[list[int]]) -> Iterator[dict]:
        """Every pair once, in length-sorted batches of batch_size rows (the last padded with filler rows)."""
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]) + len(targets[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            yield self.make([sources[i] for i in chunk], [targets[i] for i in chunk], rows=self.batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Model and steps


def _stack_from_config(side, vocab_size: int, max_seq_len: int, dropout: float) -> StackConfig:
    values = side.to_dict()
    values["n_kv_head"] = values["n_kv_head"] or values["n_head"]
    return StackConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, dropout=dropout, use_bias=True, **values)


def param_shardings(cfg: EncDecConfig, mesh) -> tuple[nnx.GraphDef, dict]:
    """The model's graphdef and a pure dict of NamedShardings from its parameters' logical axes."""
    abstract = nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = jax.tree.map(
        lambda v: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(v.sharding_axes, v.get_value().shape,
                                                                            mesh)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, nnx.to_pure_dict(shardings)


def token_losses(logits, labels, label_smoothing: float = 0.0):
    """Cross-entropy per position of logits [batch, seq, vocab] (float32) against labels [batch, seq], with the
    target distribution smoothed towards uniform by `label_smoothing`."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll + label_smoothing * (log_z - logits.mean(-1))


def make_loss_fn(graphdef, label_smoothing: float, use_dropout: bool):
    """loss_fn(params, batch, key) → (sum of target-token losses, number of target tokens)."""

    def loss_fn(params, batch, key=None):
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=key) if use_dropout else None
        logits = model(batch["source"], batch["target_in"], batch["source_valid"], deterministic=not use_dropout,
                       rngs=rngs)
        losses = token_losses(logits, batch["target_out"], label_smoothing)
        return jnp.sum(losses * batch["target_mask"]), jnp.sum(batch["target_mask"])

    return loss_fn


def make_train_step(graphdef, tx, label_smoothing: float, use_dropout: bool):
    """train_step(state, batch) → (state, metrics); state = {"params", "opt_state", "rng", "step"}."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, label_smoothing, use_dropout), has_aux=True)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss_sum, count), grads = grad_fn(state["params"], batch, key)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "rng": state["rng"], "step": state["step"] + 1}
        return new_state, {"train_loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "tokens": count}

    return train_step


def make_eval_step(graphdef):
    """eval_step(params, batch) → (sum of target-token NLL, number of target tokens), no smoothing, no dropout."""
    return make_loss_fn(graphdef, 0.0, False)


# ----------------------------------------------------------------------------------------------------------------
# Preparing a run


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Prepared:
    cfg: EncDecConfig
    vocab: Vocab
    pretrained: object  # a convert.bert.ConvertedEncDec for a warm start, else None


def _save_workdir_config(workdir: str, cfg: EncDecConfig, vocab: Vocab, config) -> None:
    record = {"model": cfg.to_dict(),
              "tokens": {"source_bos_id": vocab.source_bos_id, "source_eos_id": vocab.source_eos_id},
              "run": config.to_dict()}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=2)


def _load_workdir_config(workdir: str) -> tuple[EncDecConfig, Vocab, dict]:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{workdir} has no config.json: not an encoder-decoder workdir") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record.get("model"), dict) or record["model"].get("kind") != "encoder_decoder":
        raise DataError(f"{path}: model.kind is not encoder_decoder")
    try:
        cfg = EncDecConfig.from_dict(record["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: bad model config: {e}") from None
    tokens = record.get("tokens", {})
    vocab = Vocab(tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer", "source")),
                  tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer", "target")),
                  tokens.get("source_bos_id"), tokens.get("source_eos_id"))
    return cfg, vocab, record.get("run", {})


def prepare(config, workdir: str, train_sources: Sequence[str], train_targets: Sequence[str]) -> Prepared:
    """Resolves tokenizers and the model config (from the workdir when resuming, else from the config: trained
    BPE and scratch stacks, or pretrained stacks); writes config.json and tokenizer/."""
    if os.path.isfile(os.path.join(workdir, "config.json")) and checkpoint_lib.has_checkpoint(workdir):
        cfg, vocab, _ = _load_workdir_config(workdir)
        return Prepared(cfg, vocab, None)
    m = config.model
    if m.kind != "encoder_decoder":
        raise ConfigError(f"model.kind={m.kind!r}: this trainer runs encoder_decoder models (decoder_only ones train "
                          "with gpt_jax.train)")
    max_len = max(config.max_source_len, config.max_target_len)
    pretrained = None
    if m.encoder_from:
        from gpt_jax.convert import bert

        target_tok, ids, dec_cfg = None, (), None
        if not m.decoder_from:
            target_tok = train_bpe(train_targets, config.data.vocab_size)
            ids = (target_tok.bos_id, target_tok.eos_id, target_tok.tokenizer.token_to_id(PAD))
            dec_cfg = _stack_from_config(m.decoder, target_tok.vocab_size, config.max_target_len, m.dropout)
        pretrained = bert.warm_start(m.encoder_from, m.decoder_from or None, decoder_cfg=dec_cfg,
                                     target_tokenizer=target_tok, target_ids=ids, max_seq_len=max_len)
        cfg = pretrained.cfg
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, dropout=m.dropout),
                                  decoder=dataclasses.replace(cfg.decoder, dropout=m.dropout))
        vocab = Vocab(pretrained.source_tokenizer, pretrained.target_tokenizer, pretrained.source_bos_id,
                      pretrained.source_eos_id)
    elif m.decoder_from:
        raise ConfigError("model.decoder_from needs model.encoder_from (a pretrained decoder with a scratch encoder "
                          "is not supported)")
    else:
        if config.data.joint_vocab:
            source_tok = target_tok = train_bpe([*train_sources, *train_targets], config.data.vocab_size)
        else:
            source_tok = train_bpe(train_sources, config.data.vocab_size)
            target_tok = train_bpe(train_targets, config.data.vocab_size)
        pad = target_tok.tokenizer.token_to_id(PAD)
        cfg = EncDecConfig(_stack_from_config(m.encoder, source_tok.vocab_size, config.max_source_len, m.dropout),
                           _stack_from_config(m.decoder, target_tok.vocab_size, config.max_target_len, m.dropout),
                           decoder_start_id=target_tok.bos_id, eos_id=target_tok.eos_id, pad_id=pad)
        vocab = Vocab(source_tok, target_tok, source_tok.bos_id, source_tok.eos_id)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    os.makedirs(workdir, exist_ok=True)
    vocab.source_tokenizer.save(os.path.join(workdir, "tokenizer", "source"))
    vocab.target_tokenizer.save(os.path.join(workdir, "tokenizer", "target"))
    _save_workdir_config(workdir, cfg, vocab, config)
    return Prepared(cfg, vocab, pretrained)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class MetricsLog:
    """metrics.jsonl: one JSON object per line (lines after `resume_step` from a killed run are dropped)."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)

    def write(self, step: int, values: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")


def evaluate_loss(eval_step, params, batches: PairBatches, sources, targets, put) -> dict:
    nll, count = 0.0, 0.0
    for batch in batches.iterate_all(sources, targets):
        s, n = eval_step(params, put(batch))
        nll, count = nll + float(s), count + float(n)
    loss = nll / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir`), evaluates validation loss every `eval_every`
    steps, and at the end translates the validation sources greedily for BLEU/chrF; returns the final metrics."""
    train_sources, train_targets = load_pairs(config.data.train_jsonl, config.data.train_source,
                                              config.data.train_target, "data.train")
    has_val = bool(config.data.val_jsonl or config.data.val_source)
    val_sources, val_targets = (load_pairs(config.data.val_jsonl, config.data.val_source, config.data.val_target,
                                           "data.val") if has_val else ([], []))
    prep = prepare(config, workdir, train_sources, train_targets)
    cfg, vocab = prep.cfg, prep.vocab
    t0 = time.perf_counter()
    src_ids = vocab.encode_sources(train_sources, config.max_source_len)
    tgt_ids = vocab.encode_targets(train_targets, config.max_target_len)
    val_src_ids = vocab.encode_sources(val_sources, config.max_source_len)
    val_tgt_ids = vocab.encode_targets(val_targets, config.max_target_len)
    _log(f"tokenized {len(src_ids):,} training pairs in {time.perf_counter() - t0:.1f}s: "
         f"{sum(map(len, src_ids)):,} source and {sum(map(len, tgt_ids)):,} target tokens")
    batches = PairBatches(src_ids, tgt_ids, cfg, config.batch_size, parse_buckets(config.length_buckets),
                          config.seed)

    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        graphdef, p_shardings = param_shardings(cfg, mesh)
        if prep.pretrained is not None:
            from gpt_jax.convert import bert

            converted = dataclasses.replace(prep.pretrained, cfg=cfg)
            model, fresh = bert.build_model(converted, config.seed)
            params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), p_shardings)
            _log(f"warm start from {converted.source}; freshly initialized: {_summarize(fresh)}")
            del model
        else:
            params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(EncoderDecoder(cfg, rngs=nnx.Rngs(config.seed)),
                                                                 nnx.Param)), out_shardings=p_shardings)()
        n_params = sum(x.size for x in jax.tree.leaves(params))
        tx = optim.make_optimizer(config)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = {"params": params, "opt_state": jax.jit(tx.init)(params),
                 "rng": jax.device_put(jax.random.key_data(jax.random.key(config.seed)), replicated),
                 "step": jax.device_put(jnp.int32(0), replicated)}
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = sharding.batch_sharding(mesh)

        ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        start_step = 0
        restored = ckpt.restore_latest(state["params"], state["opt_state"], warn=_log)
        if restored is not None:
            start_step, params, opt_state, meta = restored
            state.update(params=params, opt_state=opt_state, step=jax.device_put(jnp.int32(start_step), replicated))
            _log(f"resumed from {ckpt.directory} at step {start_step}")
        else:
            _log(f"model: {n_params:,} parameters; {mesh.size} device(s)")

        train_step = jax.jit(make_train_step(graphdef, tx, config.label_smoothing, cfg.decoder.dropout > 0 or
                                             cfg.encoder.dropout > 0),
                             in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(p_shardings, batch_sharding))

        def put(batch):
            return jax.device_put(batch, batch_sharding)

        log = MetricsLog(workdir, start_step)
        schedule = optim.learning_rate_schedule(config)
        step, window_step, window_start, train_start = start_step, start_step, time.perf_counter(), time.perf_counter()
        last_saved = start_step
        result: dict = {}
        for step in range(start_step + 1, config.train_steps + 1):
            state, metrics = train_step(state, put(batches.batch(step - 1)))
            out_of_time = config.time_limit_s and time.perf_counter() - train_start > config.time_limit_s
            if step % config.log_every == 0 or step == config.train_steps or out_of_time:
                values = jax.device_get(metrics)
                now = time.perf_counter()
                seconds_per_step = (now - window_start) / max(step - window_step, 1)
                log.write(step, {"train_loss": values["train_loss"], "lr": schedule(step - 1),
                                 "grad_norm": values["grad_norm"], "steps_per_sec": 1.0 / max(seconds_per_step, 1e-9)})
                _log(f"step {step}/{config.train_steps}: train_loss {float(values['train_loss']):.4f}  "
                     f"{seconds_per_step * 1000:.0f} ms/step  elapsed {now - train_start:.0f}s")
                window_start, window_step = now, step
            if val_src_ids and config.eval_every and step % config.eval_every == 0 and step != config.train_steps:
                result = evaluate_loss(eval_step, state["params"], batches, val_src_ids, val_tgt_ids, put)
                log.write(step, result)
                _log(f"step {step}: val_loss {result['val_loss']:.4f}")
            if step % config.checkpoint_every == 0 or step == config.train_steps or out_of_time:
                ckpt.save(step, state["params"], state["opt_state"], {"step": step})
                last_saved = step
            if out_of_time:
                _log(f"time limit of {config.time_limit_s:.0f}s reached at step {step}")
                break
        if last_saved != step:
            ckpt.save(step, state["params"], state["opt_state"], {"step": step})
        ckpt.close()
        train_seconds = time.perf_counter() - train_start
        if val_src_ids:
            result = evaluate_loss(eval_step, state["params"], batches, val_src_ids, val_tgt_ids, put)
            log.write(step, result)
            _log(f"step {step}: val_loss {result['val_loss']:.4f}")
        params = jax.device_get(state["params"])
    result = {"step": step, "train_seconds": train_seconds, **result}
    if val_src_ids:
        model = nnx.merge(graphdef, params)
        result.update(evaluate_translation(model, vocab, val_sources[:config.data.val_limit or None],
                                           val_targets[:config.data.val_limit or None], config, workdir))
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _summarize(paths: list[str]) -> str:
    """Parameter paths grouped with block numbers folded: decoder.blocks.*.cross_attn.query.kernel."""
    import re

    groups = sorted({re.sub(r"\.\d+\.", ".*.", p).rsplit(".", 1)[0] for p in paths})
    return ", ".join(groups) if groups else "nothing"


# ----------------------------------------------------------------------------------------------------------------
# Translation


@dataclasses.dataclass
class LoadedSeq2Seq:
    model: EncoderDecoder
    vocab: Vocab
    run: dict
    step: int


def load_workdir(workdir: str) -> LoadedSeq2Seq:
    """The model of an encoder-decoder workdir at its latest checkpoint, with its tokenizers."""
    cfg, vocab, run = _load_workdir_config(workdir)
    if not checkpoint_lib.has_checkpoint(workdir):
        raise DataError(f"{workdir} has no checkpoint to load")
    model, step = checkpoint_lib.restore_model(workdir, nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0))))
    return LoadedSeq2Seq(model, vocab, run, step)


def translate_texts(model: EncoderDecoder, vocab: Vocab, sources: Sequence[str], *, max_source_len: int = 64,
                    max_new_tokens: int = 96, batch_size: int = 128, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Translations of `sources` (greedy at temperature 0), decoded with the KV cache."""
    from gpt_jax import encdec_decode

    rows = encdec_decode.translate(model, vocab.encode_sources(sources, max_source_len),
                                   max_new_tokens=max_new_tokens, batch_size=min(batch_size, max(len(sources), 1)),
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return vocab.decode_targets(rows)


def evaluate_translation(model: EncoderDecoder, vocab: Vocab, sources: Sequence[str], references: Sequence[str],
                         config, workdir: str | None = None) -> dict:
    """Greedy translations of `sources` scored against `references`: BLEU and chrF (sacrebleu defaults), and the
    seconds decoding took. Hypotheses go to workdir/val_hypotheses.txt."""
    from gpt_jax.evaluate import bleu

    start = time.perf_counter()
    hyps = translate_texts(model, vocab, sources, max_source_len=config.max_source_len,
                           max_new_tokens=config.decode.max_new_tokens, batch_size=config.decode.batch_size)
    seconds = time.perf_counter() - start
    if workdir:
        with open(os.path.join(workdir, "val_hypotheses.txt"), "w", encoding="utf-8") as f:
            f.writelines(h.replace("\n", " ") + "\n" for h in hyps)
    scores = bleu(hyps, [list(references)])
    _log(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f} on {len(hyps)} sentences (decoding {seconds:.0f}s)")
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "sentences": len(hyps), "decode_seconds": seconds,
            "bleu_signature": scores["bleu_signature"]}
