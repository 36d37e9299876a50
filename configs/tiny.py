"""A character-level GPT on the bundled tinyshakespeare that trains in a few minutes on one CPU."""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.train_steps = 600
    config.batch_size = 16
    config.seq_len = 64
    config.learning_rate = 2e-3
    config.min_learning_rate = 2e-4
    config.warmup_steps = 50
    config.adam_b2 = 0.99
    config.eval_every = 200
    config.eval_steps = 10
    config.log_every = 50
    config.checkpoint_every = 200
    config.model.n_layer = 2
    config.model.n_head = 4
    config.model.d_model = 128
    config.sample.prompt = "ROMEO:"
    config.sample.max_new_tokens = 200
    return config
