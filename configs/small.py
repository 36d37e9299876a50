"""GPT-2 small (124M parameters with GPT-2's 50,257-token vocabulary): the config to run on TPU VMs with data
prepared by tools/prepare_data.py (`--config.data.path=DIR`)."""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.train_steps = 100_000
    config.batch_size = 256
    config.seq_len = 1024
    config.learning_rate = 6e-4
    config.min_learning_rate = 6e-5
    config.warmup_steps = 2000
    config.adam_b2 = 0.95
    config.weight_decay = 0.1
    config.eval_every = 1000
    config.eval_steps = 50
    config.final_eval_full = False
    config.log_every = 20
    config.checkpoint_every = 1000
    config.data.tokenizer = "sentencepiece"
    config.data.vocab_size = 32768
    config.model.n_layer = 12
    config.model.n_head = 12
    config.model.d_model = 768
    config.model.dtype = "auto"  # bfloat16 matmul inputs on TPUs, GPUs and CPUs with bf16 instructions
    config.model.activation_dtype = "auto"  # bfloat16 on TPUs and GPUs, float32 on CPUs
    config.sample.max_new_tokens = 0
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
