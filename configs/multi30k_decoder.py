"""English→German translation on Multi30k with a decoder-only GPT trained from scratch, CPU-sized.

Multi30k is for non-commercial research and not bundled. experiments/multi30k_en_de/make_pairs.py writes its
pairs as plain text in the prompt format `tools/evaluate.py translate` uses ("English: SRC\\nGerman: TGT\\n"),
training pairs first, validation pairs last; 0.0343043 is the `data.val_fraction` it prints for the standard
train/val files, so the validation split is exactly the 1,014 validation pairs. Plain language modelling on that
text: the loss covers the English lines and the template words too, not only the German.

    python experiments/multi30k_en_de/make_pairs.py --data_dir=MULTI30K --output=/tmp/multi30k_pairs.txt
    python -m gpt_jax.main --config=configs/multi30k_decoder.py --workdir=/tmp/multi30k_decoder \\
        --config.data.text_files=/tmp/multi30k_pairs.txt
    python tools/evaluate.py translate --model=/tmp/multi30k_decoder --src=MULTI30K/val.en --ref=MULTI30K/val.de
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.data.text_files = ""  # set on the command line: the file make_pairs.py wrote
    config.data.tokenizer = "sentencepiece"  # one joint English+German BPE, trained on the training pairs
    config.data.vocab_size = 8000
    config.data.val_fraction = 0.0343043
    config.model.n_layer = 4
    config.model.n_head = 4
    config.model.d_model = 256
    config.model.dropout = 0.0  # under one epoch: nothing to regularize yet
    config.seq_len = 128  # about 3.5 pairs (36 tokens each with the 8,000-piece vocabulary)
    config.batch_size = 16
    config.train_steps = 450  # 922k tokens, about 0.9 epoch: ~13 minutes on 2 busy CPU cores
    config.learning_rate = 2e-3
    config.min_learning_rate = 2e-4
    config.warmup_steps = 50
    config.adam_b2 = 0.99
    config.weight_decay = 0.1
    config.eval_every = 150
    config.eval_steps = 10
    config.log_every = 10
    config.checkpoint_every = 200
    config.keep_checkpoints = 1
    config.sample.prompt = "English: A man is riding a bike.\nGerman:"
    config.sample.max_new_tokens = 24
    config.sample.temperature = 0.0
    return config
