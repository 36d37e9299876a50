"""English→German translation on Multi30k with an encoder-decoder trained from scratch, CPU-sized.

Multi30k is for non-commercial research and not bundled: pass its aligned files on the command line.

    M=../shared/data/multi30k
    python -m gpt_jax.main --config=configs/multi30k_encdec.py --workdir=/tmp/multi30k_encdec \\
        --config.data.train_source=$M/train.en --config.data.train_target=$M/train.de \\
        --config.data.val_source=$M/val.en --config.data.val_target=$M/val.de
    python -m gpt_jax.main --mode=eval --workdir=/tmp/multi30k_encdec          # eval.json: val_loss, bleu, chrf
    python -m gpt_jax.main --mode=sample --workdir=/tmp/multi30k_encdec --prompt="A man is riding a bike."

3 encoder + 3 decoder layers, d_model 256, 4 heads, d_ff 1024, pre-LayerNorm, tanh GELU, tied embeddings; one
byte-level BPE of 8,000 tokens for both languages, trained on the training pairs; batch 32 pairs padded to one of
16/24/32/48/64 tokens, dropout 0.1, label smoothing 0.1, bf16 matmul inputs, 11,000 steps (12 epochs; chosen from
the two-epoch probes in experiments/multi30k_en_de/sweeps/: on a CPU more updates of a small batch beat a larger
batch). configs/multi30k_minilm.py warm-starts the encoder from MiniLM-L6.
"""

from gpt_jax.config import encdec_config


def get_config():
    config = encdec_config()
    config.train_steps = 11000  # 12.1 epochs of the 29,000 pairs: 46 minutes of training on 2 CPU cores
    config.batch_size = 32
    config.seq_len = 64  # tokens per side, special tokens included; longer sentences are cut
    config.learning_rate = 1e-3
    config.min_learning_rate = 1e-4
    config.warmup_steps = 500
    config.weight_decay = 0.01
    config.adam_b2 = 0.98
    config.label_smoothing = 0.1
    config.eval_every = 1000
    config.eval_steps = 10
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.model.dropout = 0.1
    config.model.dtype = "bfloat16"  # matmul inputs; weights, residual stream and loss stay float32
    for stack in (config.model.encoder, config.model.decoder):
        stack.n_layer, stack.n_head, stack.d_model, stack.d_ff = 3, 4, 256, 1024
    config.data.vocab_size = 8000
    config.eval.max_new_tokens = 64
    config.sample.prompt = "A man is riding a bike."
    config.sample.max_new_tokens = 64
    config.sample.temperature = 0.0
    return config
