#!/usr/bin/env bash
# SmolLM2-135M-Instruct (GGUF) on lm-evaluation-harness tasks built from ../shared/data: in process with
# tools/evaluate.py harness, and through the server with lm-eval's own local-completions client. Run from the
# repository root; writes under /tmp only. Times each step (2 shared CPU cores: expect ~35 minutes, GSM8K most).
set -euo pipefail
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GGUF=${GGUF:-$HOME/.cache/gpt_jax/SmolLM2-135M-Instruct.Q4_1.gguf}
TASKS=/tmp/lm_eval_tasks
OUT=/tmp/lm_eval_smollm2
mkdir -p $OUT
t() { local start=$SECONDS; "$@"; echo "[$(( SECONDS - start )) s] $*" >&2; }

t python experiments/lm_eval_smollm2/make_tasks.py --out=$TASKS

# in process: the GGUF file as it is
t python tools/evaluate.py harness --model="$GGUF" --tasks=ptb_lastword,ptb_rolling --include_path=$TASKS \
    --output_path=$OUT/in_process --json_out=$OUT/ptb_in_process.json
t python tools/evaluate.py harness --model="$GGUF" --tasks=gsm8k_train --include_path=$TASKS \
    --output_path=$OUT/in_process --json_out=$OUT/gsm8k_in_process.json

# through the server: the tokenizer as an HF directory for the client, then lm-eval's command line
t python tools/convert.py --input="$GGUF" --output=$OUT/smollm2_hf --to=hf
python -m gpt_jax.main --mode=serve --workdir=$OUT/serve --config.init_from="$GGUF" --model_name=smollm2 --port=8011 2> $OUT/server.log &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf http://127.0.0.1:8011/health > /dev/null; do sleep 2; done
t lm_eval --model local-completions --tasks ptb_lastword,ptb_rolling --include_path $TASKS --batch_size 8 \
    --model_args model=smollm2,base_url=http://127.0.0.1:8011/v1/completions,tokenizer=$OUT/smollm2_hf,tokenizer_backend=huggingface,tokenized_requests=True,max_length=2048 \
    --output_path $OUT/server
