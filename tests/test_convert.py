"""HF import/export against transformers (torch on CPU): tiny random GPT-2 and Llama models (GQA; tied and untied
embeddings) give the same logits in gpt_jax within 1e-4, and again in transformers after exporting back; import then
export gives back every tensor bit for bit; a LoRA workdir converts to a standalone one; plus the tokenizer files,
refusals and the command line's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_TEXT
from flax import nnx

from gpt_jax import convert
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.convert.common import ConversionError
from gpt_jax.convert.safetensors_io import read_safetensors
from gpt_jax.model import ModelConfig, Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT_PY = os.path.join(REPO, "tools", "convert.py")
TOL = 1e-4
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"


def _perturb(model, seed: int) -> None:
    """Moves every parameter (norm scales and biases too) off its initial value, so each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _save_hf(model, tiny_bpe, directory: str) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_bpe, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(directory)
    return directory


def _gpt2(tiny_bpe, directory, tie=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _perturb(model, 1)
    return model, _save_hf(model, tiny_bpe, directory)


def _llama(tiny_bpe, directory, tie, bias=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                   rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tie,
                                   attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _perturb(model, 2)
    return model, _save_hf(model, tiny_bpe, directory)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _jax_logits(loaded, ids: np.ndarray) -> np.ndarray:
    return np.asarray(loaded.model(jnp.asarray(ids))[0])


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 24))


def _round_trip(tmp_path, hf_model, hf_dir, vocab):
    """HF dir → gpt_jax (in memory, and through a workdir) → HF dir; returns the max |Δlogit| of each stage."""
    ids = _ids(vocab)
    reference = _torch_logits(hf_model, ids)
    loaded = workdir_lib.load(hf_dir)
    assert loaded.step is None
    import_diff = float(np.abs(_jax_logits(loaded, ids) - reference).max())

    workdir = str(tmp_path / "workdir")
    convert.write_workdir(convert.load_source(hf_dir), workdir)
    from_workdir = workdir_lib.load(workdir)
    assert from_workdir.step == 0
    workdir_diff = float(np.abs(_jax_logits(from_workdir, ids) - reference).max())

    out = str(tmp_path / "hf_out")
    convert.convert_model(workdir, out)  # what tools/convert.py does; --to defaults to hf for a workdir
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(hf_model)
    export_diff = float(np.abs(_torch_logits(exported, ids) - reference).max())

    # the tokenizer travels both ways unchanged
    original_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = TINY_TEXT[:120]
    expected = original_tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer.encode(text) == expected
    assert from_workdir.tokenizer.encode(text) == expected
    assert exported_tok(text, add_special_tokens=False)["input_ids"] == expected
    assert from_workdir.tokenizer.decode(expected) == text
    assert from_workdir.tokenizer.eos_id == 0 and from_workdir.tokenizer.chat_template == CHAT_TEMPLATE
    assert exported_tok.eos_token == "<|endoftext|>" and exported_tok.chat_template == CHAT_TEMPLATE
    return import_diff, workdir_diff, export_diff


def test_gpt2_round_trip(tmp_path, tiny_bpe):
    model, hf_dir = _gpt2(tiny_bpe, str(tmp_path / "gpt2"))
    diffs = _round_trip(tmp_path, model, hf_dir, 320)
    print(f"GPT-2 max |Δlogit| import / workdir / export: {diffs}")
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_gqa_round_trip(tmp_path, tiny_bpe, tie):
    model, hf_dir = _llama(tiny_bpe, str(tmp_path / "llama"), tie)
    loaded = workdir_lib.load(hf_dir)
    cfg = loaded.model_cfg
    assert (cfg.n_head, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == (4, 2, 5000.0, tie)
    diffs = _round_trip(tmp_path, model, hf_dir, 300)
    print(f"Llama ({'tied' if tie else 'untied'}) max |Δlogit| import / workdir / export: {diffs}")
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("family", ["gpt2_untied", "llama_biases"])
def test_import_then_export_gives_back_every_tensor(tmp_path, tiny_bpe, family):
    """The family's mapping table read both ways (fused c_attn split and joined, transposes, lm_head, biases)."""
    if family == "gpt2_untied":
        _, hf_dir = _gpt2(tiny_bpe, str(tmp_path / "hf"), tie=False)
    else:
        _, hf_dir = _llama(tiny_bpe, str(tmp_path / "hf"), tie=True, bias=True)
    converted = convert.load_source(hf_dir)
    out = str(tmp_path / "out")
    convert.export_hf(ModelConfig.from_dict(converted.model), converted.params, converted.tokenizer, out)
    original = read_safetensors(os.path.join(hf_dir, "model.safetensors"))
    exported = read_safetensors(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_lora_workdir_converts_to_a_standalone_workdir(tmp_path):
    """tools/convert.py on a LoRA run's workdir (--to=gpt_jax, the default there) writes base + adapters merged, a
    workdir that loads without the base; a plain workdir stays refused with --to=gpt_jax."""
    import jax
    from test_lora import TARGETS, lora_config, write_base_workdir

    from gpt_jax import checkpoint as checkpoint_lib
    from gpt_jax import lora

    base_dir, run_dir, out = (str(tmp_path / name) for name in ("base", "run", "merged"))
    base_params = write_base_workdir(base_dir)
    config = lora_config(base_dir, 3)
    config.model = workdir_lib.read_config(base_dir).model  # a LoRA run has its base's architecture
    workdir_lib.write_config(run_dir, config)
    tokenizer_lib.load_tokenizer(workdir_lib.tokenizer_dir(base_dir)).save(workdir_lib.tokenizer_dir(run_dir))
    spec = lora.LoraSpec(4, 16.0, tuple(TARGETS.split(",")))
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.05, lora.init_adapters(base_params, spec, 0))  # B != 0
    ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"))
    ckpt.save(3, adapters, checkpoint_lib.PLACEHOLDER_OPT_STATE, {"step": 3})
    ckpt.close()

    assert convert.convert_model(run_dir, out).startswith(f"gpt_jax workdir {out}")
    os.rename(base_dir, base_dir + "_moved")  # the merged workdir stands alone
    merged = workdir_lib.load(out)
    assert merged.step == 3 and merged.config.lora.rank == 0 and merged.config.init_from == ""
    expected = lora.merge_params(base_params, adapters, spec.scale)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6),
                 nnx.to_pure_dict(nnx.state(merged.model, nnx.Param)), jax.tree.map(np.asarray, expected))
    assert not np.array_equal(expected["blocks"][0]["attn"]["query"]["kernel"],
                              base_params["blocks"][0]["attn"]["query"]["kernel"])
    with pytest.raises(ConversionError, match="already a gpt_jax workdir"):
        convert.convert_model(out, str(tmp_path / "again"), "gpt_jax")


def test_gpt2_vocab_and_merges_tokenizer(tmp_path, tiny_bpe):
    """A GPT-2 directory with vocab.json + merges.txt (no tokenizer.json) tokenizes like the original."""
    _, hf_dir = _gpt2(tiny_bpe, str(tmp_path / "gpt2"))
    os.remove(os.path.join(hf_dir, "tokenizer.json"))
    tiny_bpe.model.save(hf_dir)  # vocab.json, merges.txt
    tok = convert.load_source(hf_dir).tokenizer
    text = TINY_TEXT[:200]
    assert tok.encode(text) == tiny_bpe.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    lengths = tok.token_byte_lengths()
    assert lengths[0] == 0  # <|endoftext|> is special
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_tokenizer_json_padding_and_truncation_are_switched_off(tmp_path, tiny_bpe):
    """A tokenizer.json that pads and truncates every encoding to a fixed length still gives the text's own ids,
    and the tokenizer saved into a workdir keeps neither setting."""
    from tokenizers import Tokenizer

    from gpt_jax.convert import hf

    text = TINY_TEXT[:200]
    want = tiny_bpe.encode(text).ids
    assert 8 < len(want) < 500
    for padding, truncation in [(True, False), (False, True), (True, True)]:
        directory = tmp_path / f"tok_{padding}_{truncation}"
        directory.mkdir()
        fixed = Tokenizer.from_str(tiny_bpe.to_str())  # a copy: the fixture is shared
        if padding:
            fixed.enable_padding(length=500, pad_id=0, pad_token="<|endoftext|>")
        if truncation:
            fixed.enable_truncation(max_length=8)
        fixed.save(str(directory / "tokenizer.json"))
        assert fixed.encode(text).ids != want  # the file really changes the encoding
        tok = hf.load_hf_tokenizer(str(directory), {})
        assert tok.encode(text) == want
        tok.save(str(directory / "saved"))
        assert tokenizer_lib.load_tokenizer(str(directory / "saved")).encode(text) == want
        # a workdir's tokenizer file written with the settings still on (converted before they were switched off)
        fixed.save(str(directory / "saved" / tokenizer_lib.HFTokenizer.FILE))
        assert tokenizer_lib.load_tokenizer(str(directory / "saved")).encode(text) == want


def test_native_model_exports_to_transformers(tmp_path):
    """A gpt_jax-born Llama-shaped model with a character tokenizer exports to LlamaForCausalLM."""
    chars = tokenizer_lib.CharTokenizer.train(TINY_TEXT)
    cfg = ModelConfig(vocab_size=chars.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                      max_seq_len=64, pos_embedding="rope", rope_theta=1000.0, norm="rmsnorm", mlp="swiglu",
                      use_bias=False, tie_embeddings=False)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["final_norm"] = {"scale": params["final_norm"]["scale"] * 1.5}
    nnx.update(model, params)
    out = str(tmp_path / "hf")
    convert.export_hf(cfg, params, chars, out)
    ids = _ids(cfg.vocab_size, 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    diff = float(np.abs(_torch_logits(hf, ids) - np.asarray(model(jnp.asarray(ids))[0])).max())
    assert diff <= TOL, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = TINY_TEXT[:80]
    assert hf_tok(text)["input_ids"] == chars.encode(text)
    assert hf_tok.decode(chars.encode(text)) == text


def test_native_gpt2_shape_with_sentencepiece_exports(tmp_path):
    """A GPT-2-shaped gpt_jax model exports to GPT2LMHeadModel; its SentencePiece model is copied alongside."""
    sp = tokenizer_lib.SentencePieceTokenizer.train(TINY_TEXT.splitlines(keepends=True) * 10, 400,
                                                    str(tmp_path / "sp"))
    cfg = ModelConfig(vocab_size=sp.vocab_size, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=32)
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = str(tmp_path / "hf")
    with pytest.warns(UserWarning, match="tokenizer.model"):
        convert.export_hf(cfg, params, sp, out)
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    ids = _ids(cfg.vocab_size, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    diff = float(np.abs(_torch_logits(hf, ids) - np.asarray(model(jnp.asarray(ids))[0])).max())
    assert diff <= TOL, diff


def test_export_refuses_other_shapes(tmp_path):
    cfg = ModelConfig(vocab_size=10, pos_embedding="rope", norm="layernorm", mlp="gelu")
    with pytest.raises(ConversionError, match="no HF architecture for pos_embedding=rope, norm=layernorm"):
        convert.model_family(cfg)
    with pytest.raises(ConversionError, match="grouped-query"):
        convert.model_family(ModelConfig(vocab_size=10, n_head=4, n_kv_head=2))


def test_import_refuses_unsupported_config(tmp_path):
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match=r"config\.json: model_type 'bert' is not supported"):
        convert.load_source(str(directory))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
        "intermediate_size": 128, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(ConversionError, match="RoPE scaling 'llama3'"):
        convert.load_source(str(directory))


# ----------------------------------------------------------------------------------------------------------------
# The command line


def _run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)  # this checkout's gpt_jax
    return subprocess.run([sys.executable, CONVERT_PY, *args], capture_output=True, text=True, env=env, timeout=120)


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_help():
    result = _run_cli("--help")
    assert result.returncode == 0 and "--input" in result.stdout and "--to" in result.stdout
    _assert_one_line_error(_run_cli("--output=somewhere"), "--input")


def test_cli_truncated_safetensors(tmp_path, tiny_bpe):
    _, hf_dir = _gpt2(tiny_bpe, str(tmp_path / "gpt2"))
    weights = os.path.join(hf_dir, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    _assert_one_line_error(_run_cli(f"--input={hf_dir}", f"--output={tmp_path / 'out'}"),
                           "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_pickle(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    _assert_one_line_error(_run_cli(f"--input={path}", f"--output={tmp_path / 'out'}"), "model.pt", "pickle")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                    "n_positions": 8}))
    torch.save({"w": torch.zeros(2)}, hf_dir / "pytorch_model.bin")
    _assert_one_line_error(_run_cli(f"--input={hf_dir}", f"--output={tmp_path / 'out2'}"),
                           "pytorch_model.bin", "pickle")


def test_cli_missing_input(tmp_path):
    _assert_one_line_error(_run_cli(f"--input={tmp_path / 'nope.gguf'}", f"--output={tmp_path / 'out'}"),
                           "nope.gguf")
