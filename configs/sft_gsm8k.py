"""Supervised fine-tuning of SmolLM2-135M-Instruct on GSM8K's training problems: each record's question is the
user turn and its worked answer (ending in `#### NUMBER`) the assistant turn, rendered with the model's chat
template (ChatML); the loss covers the answer tokens and the closing `<|im_end|>` only. 5% of the records are held
out for the validation loss.

GSM8K is not bundled. `data.sft_file` takes any JSONL of {"question", "answer"} records (GSM8K's own train.jsonl,
e.g. from https://github.com/openai/grade-school-math); the default is $GPT_JAX_GSM8K or
../shared/data/gsm8k/train.jsonl beside the repository. For {"prompt", "response"} or {"messages": [...]} records
set `--config.data.sft_prompt_field=prompt --config.data.sft_response_field=response` (the base defaults). Get the
GGUF file as configs/finetune_shakespeare.py says (or pass `--config.init_from=PATH`).

    python -m gpt_jax.main --config=configs/sft_gsm8k.py --workdir=/tmp/sft_gsm8k \\
        --config.data.sft_file=PATH/TO/gsm8k/train.jsonl
    python tools/evaluate.py gsm8k --model=/tmp/sft_gsm8k --data=PATH/TO/gsm8k/test.jsonl --limit=200 \
        --template="$(python -c 'import configs.sft_gsm8k as c; print(c.CHAT_PROMPT)')"

The evaluation prompt must be the chat rendering the model was trained on (CHAT_PROMPT below; SmolLM2's template
adds its default system turn when a chat has none).

Full fine-tuning by default; add `--config.lora.rank=8` for LoRA (the LoRA workdir evaluates and samples as it
is; `python tools/convert.py --input=LORA_WORKDIR --output=DIR` merges it into a workdir that stands alone).
"""

import os

from gpt_jax.config import base_config, cached

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def get_config():
    config = base_config()
    config.init_from = cached("SmolLM2-135M-Instruct.Q4_1.gguf")  # $GPT_JAX_CACHE, default ~/.cache/gpt_jax
    config.data.sft_file = os.environ.get(
        "GPT_JAX_GSM8K", os.path.join(os.path.dirname(_REPO), "shared", "data", "gsm8k", "train.jsonl"))
    config.data.sft_prompt_field = "question"
    config.data.sft_response_field = "answer"
    config.data.val_fraction = 0.05
    config.train_steps = 1000  # ~2.3 epochs of 7,100 problems at batch 16
    config.batch_size = 16
    config.seq_len = 512  # 99.9% of the rendered problems fit; longer ones are cut
    config.learning_rate = 2e-5
    config.min_learning_rate = 2e-6
    config.warmup_steps = 50
    config.weight_decay = 0.0
    config.adam_b2 = 0.99
    config.eval_every = 100
    config.eval_steps = 8
    config.log_every = 10
    config.checkpoint_every = 200
    config.keep_checkpoints = 1
    config.sample.prompt = CHAT_PROMPT.format(question="A baker sells 12 cakes a day for 5 days. How many cakes "
                                                       "does she sell?")
    config.sample.max_new_tokens = 80
    config.sample.temperature = 0.0
    return config
