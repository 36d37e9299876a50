"""The encoder-decoder: parity with transformers' EncoderDecoderModel (BERT2BERT, BERT2GPT-2, RoBERTa2RoBERTa; tiny
random models) within 1e-4, cached decoding equal to uncached decoding token for token, masking, logical axes, the
pairs data. Training goes through the one loop: tests/test_main.py runs it through `python -m gpt_jax.main`,
tests/test_sharding.py on a data × fsdp × tensor mesh."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt_jax.axes import LOGICAL_AXIS_RULES
from gpt_jax.convert import bert
from gpt_jax.decode import sample_tokens
from gpt_jax.encdec_decode import beam_search, generate, translate
from gpt_jax.model import EncDecConfig, EncoderDecoder, ModelConfig

TOL = 1e-4


class _Static:
    """A graphdef as a hashable static jit argument: one compile per model shape, shared across tests."""

    def __init__(self, graphdef):
        self.graphdef = graphdef

    def __hash__(self):
        return hash(self.graphdef)

    def __eq__(self, other):
        return isinstance(other, _Static) and other.graphdef == self.graphdef


_jit_forward = jax.jit(lambda static, method, params, *args: getattr(nnx.merge(static.graphdef, params), method)(
    *args), static_argnums=(0, 1))


def forward(module, *args, method="__call__"):
    """module.method(*args), jitted (eager JAX compiles op by op, which is slower for a whole model)."""
    graphdef, params = nnx.split(module)
    return _jit_forward(_Static(graphdef), method, params, *args)


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers


def _perturb(model, seed: int) -> None:
    """Moves every parameter (norms and biases too) off its initial value, so each one matters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _hf_encoder_decoder(kind: str, directory: str):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)

    def bert_like(cls_config, decoder: bool, d: int, **kw):
        kw = {"max_position_embeddings": 64, **kw}
        return cls_config(vocab_size=99, hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37, is_decoder=decoder, add_cross_attention=decoder, **kw)

    if kind == "roberta2roberta":
        rob = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=66, type_vocab_size=1)
        enc = transformers.RobertaModel(bert_like(transformers.RobertaConfig, False, 32, **rob))
        dec = transformers.RobertaForCausalLM(bert_like(transformers.RobertaConfig, True, 32, **rob))
    else:  # a wider encoder than decoder: the encoder output goes through enc_to_dec_proj
        enc = transformers.BertModel(bert_like(transformers.BertConfig, False, 48))
        if kind == "bert2bert":
            dec = transformers.BertLMHeadModel(bert_like(transformers.BertConfig, True, 32))
        else:
            dec = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                bos_token_id=0, eos_token_id=0))
    model = transformers.EncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 0, 1, 2
    _perturb(model, 0)
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind", ["bert2bert", "bert2gpt2", "roberta2roberta"])
def test_encoder_decoder_logits_match_transformers(kind, tmp_path):
    torch = pytest.importorskip("torch")
    hf_model = _hf_encoder_decoder(kind, str(tmp_path))
    rng = np.random.default_rng(0)
    source = rng.integers(3, 99, (2, 9))
    source_mask = np.ones_like(source)
    source_mask[1, 6:] = 0  # the second source is padded: padding must not be attended to
    source[1, 6:] = 1
    target = rng.integers(3, 99, (2, 7))
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(source), attention_mask=torch.tensor(source_mask),
                            decoder_input_ids=torch.tensor(target)).logits.numpy()
    converted = bert.load_encoder_decoder(str(tmp_path))
    model, fresh = bert.build_model(converted)
    assert fresh == []  # every parameter came from the checkpoint
    assert (model.bridge is None) == (kind == "roberta2roberta")
    got = np.asarray(forward(model, jnp.asarray(source), jnp.asarray(target), jnp.asarray(source_mask > 0)))
    diff = np.abs(got - expected).max()
    print(f"{kind}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL


def _write_tokenizers(bert_dir: str, gpt2_dir: str) -> None:
    """A 99-token WordPiece vocab.txt for the BERT directory and a byte-level BPE for the GPT-2 one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    with open(os.path.join(bert_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 4, trainers.BpeTrainer(
        vocab_size=101, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(os.path.join(gpt2_dir, "tokenizer.json"))
    with open(os.path.join(gpt2_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, f)


def test_warm_start_keeps_pretrained_weights_and_adds_fresh_cross_attention(tmp_path):
    """Rothe et al.'s BERT2GPT2: encoder and decoder from checkpoints without cross-attention; the new parts are
    exactly cross-attention (and the bridge between widths)."""
    transformers = pytest.importorskip("transformers")
    enc_dir, dec_dir = str(tmp_path / "bert"), str(tmp_path / "gpt2")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64)).save_pretrained(enc_dir)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(dec_dir)
    _write_tokenizers(enc_dir, dec_dir)
    converted = bert.warm_start(enc_dir, dec_dir)
    model, fresh = bert.build_model(converted)
    groups = {p.split(".")[3] if p.startswith("decoder.blocks.") else p.split(".")[0] for p in fresh}
    assert groups == {"bridge", "cross_attn", "cross_norm"}
    np.testing.assert_array_equal(np.asarray(model.decoder.blocks[1].mlp.up.kernel[...]),
                                  converted.params["decoder"]["blocks"][1]["mlp"]["up"]["kernel"])
    assert converted.cfg.decoder_start_id == converted.cfg.eos_id == 0  # GPT-2's <|endoftext|>
    assert (converted.source_bos_id, converted.source_eos_id) == (2, 3)  # [CLS] ... [SEP]
    assert converted.source_tokenizer.encode("w5 w17") == [10, 22]  # WordPiece built from vocab.txt


def test_gpt2_cannot_be_the_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=16)).save_pretrained(str(tmp_path))
    with pytest.raises(bert.ConversionError, match="cannot be the encoder"):
        bert.load_stack(str(tmp_path), "encoder", with_tokenizer=False)


# ----------------------------------------------------------------------------------------------------------------
# The model itself

ENC = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=64, max_seq_len=32,
                  layout="post", activation="gelu", type_vocab_size=2, embed_norm=True)
DEC = ModelConfig(vocab_size=45, n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=48, max_seq_len=32, head="mlm")


def _model(enc=ENC, dec=DEC, noise: float = 0.0, eos_id: int = 2) -> EncoderDecoder:
    model = EncoderDecoder(EncDecConfig(enc, dec, decoder_start_id=1, eos_id=eos_id, pad_id=0), rngs=nnx.Rngs(0))
    if noise:  # larger weights give peaked, well-separated logits, so an argmax does not hinge on rounding
        rng = np.random.default_rng(1)  # numpy: no per-shape compiles of JAX random ops
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + noise * rng.normal(size=x.shape),
                                                             x.dtype), state))
    return model


def test_encoder_is_bidirectional_and_ignores_padding():
    model = _model()
    source = jax.random.randint(jax.random.key(0), (2, 8), 3, 40)
    source = source.at[1].set(source[0].at[7].set((source[0, 7] + 5) % 40))  # row 1: row 0, last token changed
    valid = jnp.ones((2, 8), bool)
    out = forward(model, source, valid, method="encode")
    assert np.abs(np.asarray(out[0, 0] - out[1, 0])).max() > 1e-4  # a later token reaches the first one
    padded = jnp.concatenate([source, jnp.zeros((2, 8), source.dtype)], axis=1)
    padded_valid = jnp.arange(16)[None] < jnp.array([[8], [8]])
    target = jnp.array([[1, 5, 6, 7]] * 2)
    np.testing.assert_allclose(np.asarray(forward(model, padded, target, padded_valid)),
                               np.asarray(forward(model, source, target, valid)), atol=1e-5)


@functools.lru_cache(maxsize=8)
def _compiled_forward(graphdef):
    return jax.jit(lambda params, source_ids, source_valid, inputs: nnx.merge(graphdef, params)(
        source_ids, inputs, source_valid))


def generate_uncached(model, source_ids, source_valid, max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """Like `generate`, recomputing encoder and decoder over the whole prefix for every token (no caches), with the
    same per-row random keys."""
    cfg = model.cfg
    batch = source_ids.shape[0]
    graphdef, params = nnx.split(model, nnx.Param)
    forward = functools.partial(_compiled_forward(graphdef), params, jnp.asarray(source_ids),
                                jnp.asarray(source_valid, bool))
    sample = jax.jit(lambda logits, step: sample_tokens(
        logits, jax.random.split(jax.random.fold_in(jax.random.key(jnp.uint32(seed)), step), batch), temperature,
        top_k, top_p))
    inputs = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.decoder_start_id)
    out = np.full((batch, max_new_tokens), cfg.pad_id, np.int32)
    done = np.zeros(batch, bool)
    for i in range(max_new_tokens):
        nxt = np.where(done, cfg.pad_id, np.asarray(sample(forward(inputs)[:, i], i)))  # causal: later inputs unseen
        out[:, i] = nxt
        done |= nxt == cfg.eos_id
        if done.all():
            break
        if i + 1 < max_new_tokens:
            inputs = inputs.at[:, i + 1].set(nxt)
    return out


def test_cached_decoding_equals_uncached_decoding_token_for_token():
    # with end token 10 some rows stop early, others run to the end
    model = _model(dec=dataclasses.replace(DEC, head="linear"), noise=0.5, eos_id=10)
    source = jax.random.randint(jax.random.key(3), (4, 16), 3, 40)
    lengths = [16, 7, 3, 1]
    valid = jnp.arange(16)[None] < jnp.array(lengths)[:, None]
    for kwargs in ({}, {"temperature": 1.0, "top_k": 10, "seed": 4}):
        cached = generate(model, source, valid, 12, **kwargs)
        uncached = generate_uncached(model, source, valid, 12, **kwargs)
        np.testing.assert_array_equal(cached, uncached)
        assert len({tuple(r) for r in cached}) > 1  # not a degenerate output
    ended = (cached == 10).any(axis=1)
    assert ended.any() and not ended.all()
    # translate: rows given in another order come back in theirs, cut before the end token
    rows = [np.asarray(source[i, :n]).tolist() for i, n in enumerate(lengths)]
    greedy = generate(model, source, valid, 12)
    expected = [[int(t) for t in (r[:list(r).index(10)] if 10 in r else r) if t] for r in greedy]
    assert translate(model, rows[::-1], max_new_tokens=12, batch_size=4) == expected[::-1]


def _exhaustive_scores(model, source, valid, max_new_tokens: int) -> tuple[list[tuple], np.ndarray]:
    """Every finished target (ending with the end token, at most max_new_tokens long) and its log-probability
    [sources, targets] under the teacher-forced model, all sources in one forward pass."""
    cfg = model.cfg
    others = [t for t in range(cfg.decoder.vocab_size) if t != cfg.eos_id]
    candidates = [(*prefix, cfg.eos_id) for n in range(max_new_tokens)
                  for prefix in itertools.product(others, repeat=n)]
    inputs = np.full((len(candidates), max_new_tokens), cfg.pad_id, np.int32)
    inputs[:, 0] = cfg.decoder_start_id
    for row, c in enumerate(candidates):
        inputs[row, 1:len(c)] = c[:-1]
    n, m = len(source), len(candidates)
    logp = np.asarray(jax.nn.log_softmax(forward(model, jnp.repeat(source, m, axis=0), jnp.tile(inputs, (n, 1)),
                                                 jnp.repeat(valid, m, axis=0)))).reshape(n, m, max_new_tokens, -1)
    targets = np.full((m, max_new_tokens), cfg.pad_id, np.int64)
    for row, c in enumerate(candidates):
        targets[row, :len(c)] = c
    picked = np.take_along_axis(logp, np.broadcast_to(targets[None, ..., None], (n, m, max_new_tokens, 1)), -1)[..., 0]
    lengths = np.array([len(c) for c in candidates])
    return candidates, np.where(np.arange(max_new_tokens) < lengths[:, None], picked, 0.0).sum(-1)


def test_beam_search_finds_the_best_translation_when_the_beam_holds_every_hypothesis():
    # a 5-token target vocabulary and 4 new tokens: 85 finished hypotheses, so a beam of 128 never drops one and beam
    # search must return what scoring all of them finds, for each source of the batch (some best ones were not the
    # best prefix at every step: without the cache rows following their hypotheses, some of these 24 differ)
    eos = 3
    model = _model(dec=dataclasses.replace(DEC, vocab_size=5, head="linear"), noise=0.5, eos_id=eos)
    source = jax.random.randint(jax.random.key(5), (8, 16), 3, 40)  # 16: translate's source bucket, one compile
    valid = jnp.arange(16)[None] < jnp.array([8, 5, 2, 7, 3, 6, 4, 1])[:, None]
    candidates, scores = _exhaustive_scores(model, source, valid, 4)
    lengths = np.array([len(c) for c in candidates])
    found = set()
    for length_penalty in (1.0, 0.5, 0.0):
        out = beam_search(model, source, valid, 4, beam_size=128, length_penalty=length_penalty)
        assert out.shape == (8, 4)
        for row in range(8):
            best = list(candidates[int(np.argmax(scores[row] / lengths ** length_penalty))])
            assert out[row].tolist() == best + [model.cfg.pad_id] * (4 - len(best)), (row, length_penalty)
            found.add(tuple(best))
    assert max(len(b) for b in found) == 4 and len(found) > 3  # not one answer for every source and penalty
    # a small beam through `translate`: sources come back in their order, cut before the end token
    rows = [np.asarray(source[i][np.asarray(valid[i])]).tolist() for i in range(8)]
    small = beam_search(model, source, valid, 4, beam_size=4)
    expected = [[int(t) for t in (r[:list(r).index(eos)] if eos in r else r) if t not in (0, 1)] for r in small]
    assert translate(model, rows[::-1], max_new_tokens=4, batch_size=8, beam_size=4) == expected[::-1]


def test_every_parameter_has_known_logical_axes():
    model = _model(dec=dataclasses.replace(DEC, tie_embeddings=False))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.sharding_axes
        assert len(axes) == var.get_value().ndim, path
        assert all(a is None or a in LOGICAL_AXIS_RULES for a in axes), (path, axes)


def test_run_config_describes_the_model_and_round_trips_through_config_json(tmp_path):
    from gpt_jax import config as config_lib
    from gpt_jax.errors import ConfigError

    config = config_lib.encdec_config()
    config.model.encoder.vocab_size, config.model.decoder.vocab_size = 40, 45
    config.model.decoder.n_kv_head, config.data.max_source_len = 2, 48
    config.model.decoder_start_id, config.model.eos_id, config.model.pad_id = 1, 2, 0
    cfg = EncDecConfig.from_config(config)
    assert (cfg.encoder.max_seq_len, cfg.decoder.max_seq_len, cfg.decoder.n_kv_head) == (48, config.seq_len, 2)
    assert cfg.encoder.dropout == cfg.decoder.dropout == config.model.dropout
    (tmp_path / "config.json").write_text(config_lib.to_json(config))
    assert EncDecConfig.from_config(config_lib.from_json_file(str(tmp_path / "config.json"))) == cfg
    config.model.encoder.layout = "sandwich"
    with pytest.raises(ConfigError, match="model.encoder.layout"):
        config_lib.validate(config)


# ----------------------------------------------------------------------------------------------------------------
# Data and training


def _pairs(n: int) -> tuple[list[str], list[str]]:
    """A toy translation: the target is the source's words reversed."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "dog", "cat", "runs", "sits", "big", "small"]
    sources = [" ".join(rng.choice(words, rng.integers(2, 5))) for _ in range(n)]
    return sources, [" ".join(reversed(s.split())) for s in sources]


def _config(tmp_path, steps: int):
    from gpt_jax import config as config_lib

    sources, targets = _pairs(96)
    with open(tmp_path / "train.jsonl", "w") as f:
        for s, t in zip(sources, targets, strict=True):
            f.write(json.dumps({"source": s, "target": t}) + "\n")
    (tmp_path / "val.src").write_text("\n".join(sources[:8]) + "\n")
    (tmp_path / "val.tgt").write_text("\n".join(targets[:8]) + "\n")
    c = config_lib.encdec_config()
    c.train_steps, c.batch_size, c.warmup_steps, c.learning_rate = steps, 16, 5, 3e-3
    c.log_every, c.eval_every, c.checkpoint_every, c.label_smoothing = 5, 0, 10, 0.0
    c.data.length_buckets, c.seq_len = "16", 16
    c.data.train_jsonl = str(tmp_path / "train.jsonl")
    c.data.val_source, c.data.val_target = str(tmp_path / "val.src"), str(tmp_path / "val.tgt")
    c.data.vocab_size = 300
    c.eval.max_new_tokens, c.eval.batch_size = 16, 8
    c.sample.max_new_tokens = 0
    for side in (c.model.encoder, c.model.decoder):
        side.n_layer, side.d_model, side.d_ff, side.n_head = 1, 32, 64, 4
    return c


def test_pairs_from_aligned_files_and_clear_errors(tmp_path):
    from gpt_jax.config import parse_buckets
    from gpt_jax.data import pairs
    from gpt_jax.errors import ConfigError, DataError

    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "short.de").write_text("eins\n")
    (tmp_path / "bad.jsonl").write_text('{"source": "x", "target": "y"}\n{"source": 3}\n')
    assert pairs.load_pairs(source=str(tmp_path / "a.en"), target=str(tmp_path / "a.de")) == \
        (["one", "two"], ["eins", "zwei"])
    with pytest.raises(DataError, match="line-aligned"):
        pairs.load_pairs(source=str(tmp_path / "a.en"), target=str(tmp_path / "short.de"))
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        pairs.load_pairs(jsonl=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="data.train"):
        pairs.load_pairs()
    with pytest.raises(ConfigError, match="length_buckets"):
        parse_buckets("32,16")


def test_pair_batches_pad_both_sides_to_a_bucket_and_resume_at_the_same_batch(tmp_path):
    from gpt_jax.data import pairs

    config = _config(tmp_path, 1)
    config.data.length_buckets = "4,8,16"
    source = pairs.PairSource(config, str(tmp_path / "tokenizer"))
    assert source.ids == {"decoder_start_id": 1, "eos_id": 2, "pad_id": 0, "source_bos_id": 1, "source_eos_id": 2}
    batches = source.train_batches(16, 16, seed=3)
    first = [next(batches) for _ in range(8)]  # more than one epoch of 96 pairs
    assert {b["source"].shape[1] for b in first} <= {4, 8, 16}
    for b in first:
        assert b["target_in"].shape == b["source"].shape and (b["target_in"][:, 0] == 1).all()
        n = b["loss_mask"].sum(1).astype(int)  # targets + the end token
        assert (b["target_out"][np.arange(16), n - 1] == 2).all()
    resumed = source.train_batches(16, 16, seed=3, state={"batch_index": 5})
    np.testing.assert_array_equal(next(resumed)["target_out"], first[5]["target_out"])
    val = source.val_batches(16, 16)
    assert len(val) == 1 and val[0]["loss_mask"][8:].sum() == 0  # 8 pairs, 8 filler rows
