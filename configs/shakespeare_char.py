"""nanoGPT's CPU "baby" shakespeare_char config, for side-by-side comparison.

Character-level tinyshakespeare (bundled): first 90% train, last 10% validation; 4 layers, 4 heads, d_model 128,
seq_len 64, batch 12, 2000 steps, lr 1e-3 (warmup 100, cosine to 1e-4), AdamW betas (0.9, 0.99), weight decay 0.1,
grad clip 1.0, no dropout; evaluation every 250 steps over 20 batches, the final one over the whole validation split.
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.train_steps = 2000
    config.batch_size = 12
    config.seq_len = 64
    config.learning_rate = 1e-3
    config.min_learning_rate = 1e-4
    config.warmup_steps = 100
    config.adam_b1 = 0.9
    config.adam_b2 = 0.99
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    config.eval_every = 250
    config.eval_steps = 20
    config.final_eval_full = True
    config.log_every = 100
    config.checkpoint_every = 1000
    config.data.tokenizer = "char"
    config.data.val_fraction = 0.1
    config.model.n_layer = 4
    config.model.n_head = 4
    config.model.d_model = 128
    config.model.dropout = 0.0
    config.sample.prompt = "\n"
    config.sample.max_new_tokens = 300
    return config
