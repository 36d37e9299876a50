#!/usr/bin/env bash
# Encoder-decoder rows of the Multi30k en→de experiment, each trained by `python -m gpt_jax.main` and then scored by
# `--mode=eval` (greedy and beam-search BLEU/chrF on val, eval.json):
#   scratch        configs/multi30k_encdec.py as it is: 3+3 layers from scratch, 11,000 steps (~46 min on 2 cores)
#   minilm_enc     configs/multi30k_minilm.py as it is: MiniLM-L6 encoder + fresh decoder, the same wall-clock budget
#   minilm2minilm  MiniLM-L6 as encoder and decoder, the 12-minute row of 2026-11-26 (TIME_LIMIT, default 720 s)
#
#   bash experiments/multi30k_en_de/run_encdec.sh MULTI30K_DIR MINILM_DIR [WORKDIR_BASE] [ROWS]
#
# MULTI30K_DIR holds train.{en,de} and val.{en,de} (research-only: keep it and the workdirs outside the repo);
# MINILM_DIR is the HF directory of all-MiniLM-L6-v2 (tests/test_bert_import.py unpacks it into
# ~/.cache/gpt_jax/all-MiniLM-L6-v2). ROWS picks rows (default: "scratch minilm_enc"). BEAM is the beam size of
# the evaluation (default 5; 1 scores greedy decoding only).
set -euo pipefail
data=${1:?MULTI30K_DIR}
minilm=${2:?MINILM_DIR}
base=${3:-/tmp/multi30k_encdec}
rows=${4:-"scratch minilm_enc"}
beam=${BEAM:-5}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mkdir -p "$base" "$here/encdec_results"

common=(--config.data.train_source="$data/train.en" --config.data.train_target="$data/train.de"
        --config.data.val_source="$data/val.en" --config.data.val_target="$data/val.de")

for row in $rows; do
  case $row in
    scratch)  # 3+3 layers, d_model 256, 4 heads, d_ff 1024, pre-LN; one byte-level BPE of 8000 for both languages
      args=(--config="$repo/configs/multi30k_encdec.py") ;;
    minilm_enc)  # MiniLM-L6 encoder (6 layers, d 384, uncased WordPiece) + fresh 3-layer d 256 decoder, German BPE
      args=(--config="$repo/configs/multi30k_minilm.py" --config.model.encoder_from="$minilm") ;;
    minilm2minilm)  # BERT2BERT: MiniLM-L6 as encoder and as decoder; cross-attention and LM-head transform new
      args=(--config="$repo/configs/multi30k_minilm.py" --config.model.encoder_from="$minilm"
            --config.model.decoder_from="$minilm" --config.train_steps=300 --config.warmup_steps=30
            --config.learning_rate=3e-4 --config.min_learning_rate=3e-5 --config.batch_size=32
            --config.model.dropout=0.0 --config.model.dtype=float32 --config.eval_every=0 --config.log_every=25
            --config.time_limit_s="${TIME_LIMIT:-720}") ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  rm -rf "${base:?}/$row"
  start=$(date +%s)
  python -m gpt_jax.main --workdir="$base/$row" "${args[@]}" "${common[@]}" \
    2>&1 | grep --line-buffered -v -i "warning" | tee "$base/$row.log"
  python -m gpt_jax.main --mode=eval --workdir="$base/$row" --config.eval.beam_size="$beam" \
    2>&1 | grep --line-buffered -v -i "warning" | tee -a "$base/$row.log"  # eval.json: val_loss, bleu, chrf
  echo "{\"row\": \"$row\", \"wall_seconds\": $(( $(date +%s) - start ))}" > "$base/$row.wall.json"
  python - "$base/$row" "$here/encdec_results/$row.json" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
workdir, out, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = json.load(open(f"{workdir}/eval.json"))
run = json.load(open(f"{workdir}/config.json"))
metrics = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
losses = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
val_losses = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
json.dump({**result, "wall_seconds": wall, "train_losses": losses, "val_losses": val_losses,
           "encoder": {k: run["model"]["encoder"][k] for k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "layout")},
           "decoder": {k: run["model"]["decoder"][k] for k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "layout")}},
          open(out, "w"), indent=1)
PY
done
