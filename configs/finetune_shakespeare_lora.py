"""LoRA fine-tuning of SmolLM2-135M-Instruct on the bundled tinyshakespeare: rank-8 adapters on every attention
and MLP projection (~1.6M trainable parameters, 1.2% of the model); the base stays frozen.

Get the GGUF file as configs/finetune_shakespeare.py says (or pass `--config.init_from=PATH`). Train, then merge the
adapters into a plain workdir for sampling, serving, `--mode=eval` and `tools/convert.py --to=hf`:

    python -m gpt_jax.main --config=configs/finetune_shakespeare_lora.py --workdir=/tmp/lora_shakespeare
    python -m gpt_jax.lora --workdir=/tmp/lora_shakespeare --output=/tmp/lora_shakespeare_merged
    python -m gpt_jax.main --workdir=/tmp/lora_shakespeare_merged --mode=sample --prompt="ROMEO:"

Checkpoints hold the adapters and their optimizer state only (~20 MB); a resumed run reloads the base from
`init_from`. The LoRA workdir itself is not a loadable model (sampling at the end of training is off): merge it.
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
    config.sample.max_new_tokens = 0
    return config
