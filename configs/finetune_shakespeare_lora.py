"""LoRA fine-tuning of SmolLM2-135M-Instruct on the bundled tinyshakespeare: rank-8 adapters on every attention
and MLP projection (2,442,240 trainable parameters, 1.8% of the model's 134.5M); the base stays frozen.

Get the GGUF file as configs/finetune_shakespeare.py says (or pass `--config.init_from=PATH`). Train, then sample,
evaluate or serve the LoRA workdir like any other (its adapters are merged into the `init_from` base as it loads):

    python -m gpt_jax.main --config=configs/finetune_shakespeare_lora.py --workdir=/tmp/lora_shakespeare
    python -m gpt_jax.main --workdir=/tmp/lora_shakespeare --mode=sample --prompt="ROMEO:"

Checkpoints hold the adapters and their AdamW moments only (~28 MB); loading or resuming the run reads the base
from `init_from` again, so keep that file. For a model that stands alone (and an HF export with
`tools/convert.py --to=hf`), merge the adapters into a plain workdir:

    python tools/convert.py --input=/tmp/lora_shakespeare --output=/tmp/lora_shakespeare_merged

Memory and speed (a 2-core CPU, batch 8 x 256; BENCHMARKS.md): the step scans the 30 layers and recomputes each
one's forward pass in the backward pass (`model.scan_layers`, `model.remat=full`), the frozen base is stacked once
for the scan, and the loss goes 512 tokens at a time: ~2.6 GiB peak RSS (2.2 when the step comes from the
compilation cache). The matmuls take bfloat16 inputs and accumulate in float32 where the device multiplies bf16 in
hardware (`model.dtype=auto`: TPUs, GPUs, CPUs with AVX512-BF16 or AMX; float32 elsewhere; the weights, adapters
and AdamW moments stay float32): 1.5x the tokens/s of float32 matmuls on the AVX512-BF16 CPU we measured. The
recomputation costs speed too; with memory to spare, run the layers unrolled and keep their activations at ~7 GiB:
`--config.model.scan_layers=False --config.model.remat=none`. The scanned step also comes back from the compilation
cache (README.md) in seconds, so a resumed or repeated run's first step takes well under half the time (17-18 s
against 42-45 s); the unrolled one loads as slowly as it compiles.

Everything but the LoRA keys, the `model` keys above, the learning rates and the checkpoints is
configs/finetune_shakespeare.py's.
"""

from gpt_jax.config import base_config, cached


def get_config():
    config = base_config()
    config.init_from = cached("SmolLM2-135M-Instruct.Q4_1.gguf")  # $GPT_JAX_CACHE, default ~/.cache/gpt_jax
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.targets = "query,key,value,out,gate,up,down"
    config.model.scan_layers = True  # memory first: see the docstring
    config.model.remat = "full"
    config.model.dtype = "auto"  # matmul inputs (float32 accumulation): see the docstring
    config.train_steps = 300
    config.batch_size = 8
    config.seq_len = 256
    config.loss_chunk = 512  # 49,152-token vocabulary: 100 MB of float32 logits at a time, not 400 MB
    config.learning_rate = 1e-3
    config.min_learning_rate = 1e-4
    config.warmup_steps = 20
    config.weight_decay = 0.0
    config.adam_b2 = 0.99
    config.eval_every = 50
    config.eval_steps = 10
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.sample.prompt = "ROMEO:"
    config.sample.max_new_tokens = 100
    return config
