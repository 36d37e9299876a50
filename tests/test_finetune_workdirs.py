"""`--mode=eval` of a pretrained model (`init_from`) into an empty workdir: the model's own tokenizer is saved there
and tokenizes the evaluation data, so the numbers equal those of the model's workdir evaluated in place."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import TINY_TEXT
from flax import nnx

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax import config as config_lib
from gpt_jax import evaluate, model
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.checkpoint import PLACEHOLDER_OPT_STATE
from gpt_jax.errors import UserError


def write_bpe_workdir(path: str, tiny_bpe) -> None:
    """A random model with the 300-token byte-level BPE as a gpt_jax workdir, as tools/convert.py writes one."""
    tokenizer = tokenizer_lib.HFTokenizer(tiny_bpe, eos_id=0)
    cfg = model.ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=32, d_ff=64,
                            max_seq_len=64)
    config = config_lib.base_config()
    for field in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"):
        config.model[field] = getattr(cfg, field)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    tokenizer.save(os.path.join(path, "tokenizer"))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.Transformer(cfg, rngs=nnx.Rngs(3)),
                                                                 nnx.Param)))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"), keep=1)
    ckpt.save(0, params, PLACEHOLDER_OPT_STATE, {"step": 0, "opt_state": "placeholder"})
    ckpt.close()


def test_eval_of_init_from_uses_the_models_tokenizer(tmp_path, tiny_bpe):
    base_dir = str(tmp_path / "base")
    write_bpe_workdir(base_dir, tiny_bpe)
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT * 10)
    config = config_lib.base_config()
    config.data.text_files, config.seq_len, config.batch_size = str(text), 32, 4

    shutil.copytree(base_dir, tmp_path / "in_place")  # the model's workdir evaluated in place: its own tokenizer
    reference = evaluate.evaluate_workdir(config, str(tmp_path / "in_place"))
    assert reference["val_tokens"] > 100

    config.init_from = base_dir
    fresh = str(tmp_path / "fresh")
    result = evaluate.evaluate_workdir(config, fresh)  # trained a character tokenizer on the text before
    saved = tokenizer_lib.load_tokenizer(os.path.join(fresh, "tokenizer"))
    assert isinstance(saved, tokenizer_lib.HFTokenizer) and saved.vocab_size == 300
    assert result["val_tokens"] == reference["val_tokens"]
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
    assert result["model"] == "base" and result["step"] == 0

    # a workdir whose run wrote config.json and tokenizer/ but no checkpoint yet evaluates init_from
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(os.path.join(base_dir, "config.json"), started)
    shutil.copytree(os.path.join(base_dir, "tokenizer"), started / "tokenizer")
    assert evaluate.evaluate_workdir(config, str(started))["val_loss"] == pytest.approx(reference["val_loss"],
                                                                                        rel=1e-6)

    # an evaluation workdir holding another tokenizer is refused, not silently mixed with the model
    stale = tmp_path / "stale"
    tokenizer_lib.CharTokenizer.train(TINY_TEXT).save(str(stale / "tokenizer"))
    with pytest.raises(UserError, match="another tokenizer than base's"):
        evaluate.evaluate_workdir(config, str(stale))
