"""GGUF import: dequantization against the `gguf` package's reference, a tiny Llama GGUF written here (several
tensor types, llama.cpp's Q/K row order) against torch, truncated files, and SmolLM2-135M-Instruct against
transformers' own GGUF loading and through the command line (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_TEXT

from gpt_jax import convert, decode
from gpt_jax import workdir as workdir_lib
from gpt_jax.convert import quants

gguf = pytest.importorskip("gguf")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT_PY = os.path.join(REPO, "tools", "convert.py")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"]


# the byte offsets of the float16 scale / min fields in each block type, which must hold finite values
_F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("type_name", sorted(quants.DEQUANTIZERS))
def test_dequantize_matches_gguf_reference(type_name):
    block_elems, block_bytes, _ = quants.DEQUANTIZERS[type_name]
    rng = np.random.default_rng(0)
    n_blocks = 48
    if block_elems == 1:
        values = rng.standard_normal(n_blocks * 16).astype(np.float32)
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name]) if type_name != "F32" else values
        raw = np.asarray(raw).view(np.uint8).reshape(-1)
    else:
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        for offset in _F16_FIELDS[type_name]:
            raw[:, offset:offset + 2] = rng.uniform(-0.1, 0.1, (n_blocks, 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(-1)
    reference = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[type_name]).reshape(-1)
    np.testing.assert_array_equal(quants.dequantize(raw, type_name), reference.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# A tiny Llama written as GGUF the way llama.cpp's converter does it


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for attn_q / attn_k: within each head, rows i and i + head_dim/2 side by side."""
    d_out, d_in = w.shape
    return w.reshape(n_heads, 2, d_out // n_heads // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


_TYPES = {"q_proj": "Q8_0", "k_proj": "Q4_0", "v_proj": "BF16", "o_proj": "Q5_1", "gate_proj": "Q4_1",
          "up_proj": "Q5_0", "down_proj": "F16"}


def _write_tiny_gguf(path: str, tiny_bpe, tie: bool):
    """Writes a random 2-layer Llama (GQA) as GGUF; returns the torch model holding the dequantized weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                   rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    vocab = tiny_bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    import json

    merges = json.loads(tiny_bpe.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(0)
    writer.add_chat_template("{{ messages }}")

    gen = torch.Generator().manual_seed(1)

    def put(name, param, type_name="F32", heads=None):
        with torch.no_grad():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
            w = param.numpy().astype(np.float32)
            if type_name == "F32":
                data, stored = w, w
            else:
                qtype = gguf.GGMLQuantizationType[type_name]
                data = gguf.quants.quantize(w, qtype)
                stored = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(w.shape)
                if type_name == "F16":
                    data = w.astype(np.float16)
            param.copy_(torch.from_numpy(stored))  # the reference uses exactly what the file holds
        if heads is not None:
            data = _interleave(np.asarray(data).reshape(w.shape[0], -1), heads)
        writer.add_tensor(name, data, raw_dtype=None if type_name in ("F32", "F16")
                          else gguf.GGMLQuantizationType[type_name])

    put("token_embd.weight", model.model.embed_tokens.weight, "Q8_0")
    for i, layer in enumerate(model.model.layers):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", layer.input_layernorm.weight)
        put(p + "ffn_norm.weight", layer.post_attention_layernorm.weight)
        attn, mlp = layer.self_attn, layer.mlp
        put(p + "attn_q.weight", attn.q_proj.weight, _TYPES["q_proj"], heads=4)
        put(p + "attn_k.weight", attn.k_proj.weight, _TYPES["k_proj"], heads=2)
        put(p + "attn_v.weight", attn.v_proj.weight, _TYPES["v_proj"])
        put(p + "attn_output.weight", attn.o_proj.weight, _TYPES["o_proj"])
        for name in ("gate", "up", "down"):
            put(p + f"ffn_{name}.weight", getattr(mlp, f"{name}_proj").weight, _TYPES[f"{name}_proj"])
    put("output_norm.weight", model.model.norm.weight)
    if not tie:
        put("output.weight", model.lm_head.weight, "Q8_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_matches_torch(tmp_path, tiny_bpe, tie):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "tiny.gguf")
    reference_model = _write_tiny_gguf(path, tiny_bpe, tie)
    loaded = workdir_lib.load(path)
    cfg = loaded.model_cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == (2, 4, 2, 5000.0, tie)
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 20))
    with torch.no_grad():
        expected = reference_model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(loaded.model(jnp.asarray(ids))[0])
    assert np.abs(got - expected).max() <= 1e-4
    tok = loaded.tokenizer
    text = TINY_TEXT[:150]
    assert tok.encode(text) == tiny_bpe.encode(text).ids
    assert tok.encode("<|endoftext|>Paris") == tiny_bpe.encode("<|endoftext|>Paris").ids
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.chat_template) == (0, "{{ messages }}")
    lengths = tok.token_byte_lengths()
    assert lengths[0] == 0 and int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_truncated_gguf_is_one_line_error(tmp_path, tiny_bpe):
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path, tiny_bpe, tie=True)
    size = os.path.getsize(path)
    for cut in (size - 100, 2000, 10):  # inside the tensor data, inside the metadata, inside the header
        with open(path, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(convert.ConversionError, match="tiny.gguf: truncated"):
            convert.load_source(path)
    result = subprocess.run([sys.executable, CONVERT_PY, f"--input={path}", f"--output={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=REPO))  # this checkout's gpt_jax
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tiny.gguf" in lines[0], result.stderr


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32 tensors)


# smollm2_converted, smollm2 (what `workdir_lib.load(gguf)` returns) and smollm2_reference (transformers' answers)
# are session fixtures in conftest.py, shared with the evaluation and serving tests.


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smollm2, smollm2_reference):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg, tok = smollm2.model_cfg, smollm2.tokenizer
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (100000.0, 1e-5, True)
    assert (tok.eos_id, tok.bos_id, tok.vocab_size, tok.add_bos) == (2, 1, 49152, False)
    assert "<|im_start|>" in tok.chat_template
    # the ids transformers' GGUF tokenizer gives (AutoTokenizer.from_pretrained(dir, gguf_file=name))
    assert tok.encode(PROMPTS[0]) == [504, 3575, 282, 4649, 314]
    assert tok.encode("<|im_start|>user 12345") == [1, 4093, 216, 33, 34, 35, 36, 37]

    prompt_ids = [tok.encode(prompt) for prompt in PROMPTS]

    def transformers_answers(reference):
        answers = {f"logits_{i}": reference(torch.tensor([ids])).logits[0].numpy()
                   for i, ids in enumerate(prompt_ids)}
        answers["greedy"] = reference.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=4, do_sample=False)[0]
        return answers

    # transformers' logits for each prompt and its greedy generate on the first (kept on disk once computed)
    expected = smollm2_reference.answer("logits, and greedy generate of 4 tokens on the first prompt",
                                        {"prompt_ids": prompt_ids}, transformers_answers)
    worst = 0.0
    for i, ids in enumerate(prompt_ids):
        got = np.asarray(smollm2.model(jnp.asarray([ids]))[0][0])
        worst = max(worst, float(np.abs(got - expected[f"logits_{i}"]).max()))
    print(f"SmolLM2 GGUF max |Δlogit| vs transformers: {worst:.3g}")
    assert worst <= 1e-3

    # greedy decoding through the KV cache agrees with transformers' greedy generate
    out = decode.generate(smollm2.model, cfg, [prompt_ids[0]], 4, decode.SamplingParams(temperature=0.0),
                          eos_id=tok.eos_id)[0].token_ids
    assert out == expected["greedy"][len(prompt_ids[0]):].tolist()
    print(f"SmolLM2 greedy continuation: {tok.decode(out)!r}")
    assert tok.decode(out).startswith(" Paris.")
