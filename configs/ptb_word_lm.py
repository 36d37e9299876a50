"""Word-level Penn Treebank (Mikolov's `simple-examples` version, the one Zaremba et al. 2014 used), CPU-sized.

PTB is research-only and not bundled: pass the standard train and validation files, in that order. They are
joined with one "\\n" and the last `data.val_fraction` of the characters is validation; 0.072669 puts the cut
exactly after ptb.train.txt and its joining newline, so the validation split is ptb.valid.txt, byte for byte
(5,101,618 + 1 training characters, 399,782 validation ones; other files need their own fraction).

    python -m gpt_jax.main --config=configs/ptb_word_lm.py --workdir=/tmp/ptb_word_lm \\
        --config.data.text_files=PTB/ptb.train.txt,PTB/ptb.valid.txt

A word-level tokenizer is not available, so a SentencePiece BPE of 10,000 pieces is trained on the training
text; most PTB words are one piece and each line's "\\n" is predicted like PTB's `<eos>`. Word perplexity:
`tools/evaluate.py perplexity --text=PTB/ptb.valid.txt` reports PTB's convention (words + <eos>) as `word_ppl_eos`:
119.0 after this config's ten epochs (experiments/ptb_word_lm/README.md).
"""

from gpt_jax.config import base_config


def get_config():
    config = base_config()
    config.data.text_files = ""  # set on the command line: ptb.train.txt,ptb.valid.txt
    config.data.tokenizer = "sentencepiece"
    config.data.vocab_size = 10000
    config.data.val_fraction = 0.072669
    config.model.n_layer = 4
    config.model.n_head = 4
    config.model.d_model = 256
    config.model.dropout = 0.3  # ten passes over 1.2M training pieces: without it the model memorizes them
    config.seq_len = 128
    config.batch_size = 16
    config.train_steps = 6000  # 12.3M tokens, 10.3 epochs: about an hour on 2 quiet CPU cores
    config.learning_rate = 2e-3  # the best of 1e-3 / 2e-3 / 4e-3 over one epoch (experiments/ptb_word_lm/sweeps)
    config.min_learning_rate = 1e-4
    config.warmup_steps = 100
    config.adam_b2 = 0.99
    config.weight_decay = 0.1
    config.eval_every = 600
    config.eval_steps = 20
    config.log_every = 50
    config.checkpoint_every = 600
    config.keep_checkpoints = 1
    config.sample.prompt = " the"
    config.sample.max_new_tokens = 60
    return config
