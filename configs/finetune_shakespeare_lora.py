"""LoRA fine-tuning of SmolLM2-135M-Instruct on the bundled tinyshakespeare: rank-8 adapters on every attention
and MLP projection (2,442,240 trainable parameters, 1.8% of the model's 134.5M); the base stays frozen.

Get the GGUF file as configs/finetune_shakespeare.py says (or pass `--config.init_from=PATH`). Train, then sample,
evaluate or serve the LoRA workdir like any other (its adapters are merged into the `init_from` base as it loads):

    python -m gpt_jax.main --config=configs/finetune_shakespeare_lora.py --workdir=/tmp/lora_shakespeare
    python -m gpt_jax.main --workdir=/tmp/lora_shakespeare --mode=sample --prompt="ROMEO:"

Checkpoints hold the adapters and their AdamW moments only (~28 MB); loading or resuming the run reads the base
from `init_from` again, so keep that file. For a model that stands alone (and an HF export with
`tools/convert.py --to=hf`), merge the adapters into a plain workdir:

    python -m gpt_jax.lora --workdir=/tmp/lora_shakespeare --output=/tmp/lora_shakespeare_merged
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from finetune_shakespeare import get_config as full_finetune_config  # noqa: E402


def get_config():
    config = full_finetune_config()
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.targets = "query,key,value,out,gate,up,down"
    config.learning_rate = 1e-3
    config.min_learning_rate = 1e-4
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    return config
