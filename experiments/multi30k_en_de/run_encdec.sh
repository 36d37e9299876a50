#!/usr/bin/env bash
# Encoder-decoder rows of the Multi30k en→de experiment: from scratch, MiniLM-L6 as the encoder with a fresh decoder,
# and MiniLM-L6 as both encoder and decoder (new cross-attention), each trained by `python -m gpt_jax.main` and then
# scored by `--mode=eval` (greedy BLEU/chrF on val).
#
#   bash experiments/multi30k_en_de/run_encdec.sh MULTI30K_DIR MINILM_DIR [WORKDIR_BASE] [ROWS]
#
# MULTI30K_DIR holds train.{en,de} and val.{en,de} (research-only: keep it and the workdirs outside the repo);
# MINILM_DIR is the HF directory of all-MiniLM-L6-v2 (tests/test_bert_import.py unpacks it into
# ~/.cache/gpt_jax/all-MiniLM-L6-v2). ROWS picks rows, e.g. "scratch minilm_enc" (default: all three).
# Each row stops training after TIME_LIMIT seconds (default 720) if it has not finished its steps by then.
set -euo pipefail
data=${1:?MULTI30K_DIR}
minilm=${2:?MINILM_DIR}
base=${3:-/tmp/multi30k_encdec}
rows=${4:-"scratch minilm_enc minilm2minilm"}
limit=${TIME_LIMIT:-720}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mkdir -p "$base" "$here/encdec_results"

# every row: configs/multi30k_encdec.py's or configs/multi30k_minilm.py's model, batch 32, no dropout, label smoothing
# 0.1, the validation loss only at the end, then greedy BLEU/chrF of all validation pairs (`--mode=eval`)
common=(--config.data.train_source="$data/train.en" --config.data.train_target="$data/train.de"
        --config.data.val_source="$data/val.en" --config.data.val_target="$data/val.de"
        --config.batch_size=32 --config.model.dropout=0.0 --config.label_smoothing=0.1
        --config.eval_every=0 --config.log_every=25 --config.checkpoint_every=1000
        --config.eval.max_new_tokens=64 --config.eval.batch_size=128 --config.time_limit_s="$limit")

for row in $rows; do
  case $row in
    scratch)  # 3+3 layers, d_model 256, 4 heads, d_ff 1024, pre-LN; one byte-level BPE of 8000 for both languages
      args=(--config="$repo/configs/multi30k_encdec.py" --config.train_steps=600 --config.warmup_steps=60
            --config.learning_rate=1e-3 --config.min_learning_rate=1e-4) ;;
    minilm_enc)  # MiniLM-L6 encoder (6 layers, d 384, uncased WordPiece) + fresh 3-layer d 256 decoder, German BPE
      args=(--config="$repo/configs/multi30k_minilm.py" --config.model.encoder_from="$minilm"
            --config.train_steps=450 --config.warmup_steps=45 --config.learning_rate=5e-4
            --config.min_learning_rate=5e-5) ;;
    minilm2minilm)  # BERT2BERT: MiniLM-L6 as encoder and as decoder; cross-attention and LM-head transform new
      args=(--config="$repo/configs/multi30k_minilm.py" --config.model.encoder_from="$minilm"
            --config.model.decoder_from="$minilm" --config.train_steps=300 --config.warmup_steps=30
            --config.learning_rate=3e-4 --config.min_learning_rate=3e-5) ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  rm -rf "${base:?}/$row"
  start=$(date +%s)
  python -m gpt_jax.main --workdir="$base/$row" "${args[@]}" "${common[@]}" \
    2>&1 | grep --line-buffered -v -i "warning" | tee "$base/$row.log"
  python -m gpt_jax.main --mode=eval --workdir="$base/$row" \
    2>&1 | grep --line-buffered -v -i "warning" | tee -a "$base/$row.log"  # eval.json: val_loss, bleu, chrf
  echo "{\"row\": \"$row\", \"wall_seconds\": $(( $(date +%s) - start ))}" > "$base/$row.wall.json"
  python - "$base/$row" "$here/encdec_results/$row.json" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
workdir, out, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = json.load(open(f"{workdir}/eval.json"))
run = json.load(open(f"{workdir}/config.json"))
metrics = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
losses = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
json.dump({**result, "wall_seconds": wall, "train_losses": losses,
           "encoder": {k: run["model"]["encoder"][k] for k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "layout")},
           "decoder": {k: run["model"]["decoder"][k] for k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "layout")}},
          open(out, "w"), indent=1)
PY
done
