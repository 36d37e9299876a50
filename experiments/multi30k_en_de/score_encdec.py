"""Adds uncased, accent-free BLEU/chrF to the encoder-decoder rows' results, beside the cased scores of eval.json.

    python experiments/multi30k_en_de/score_encdec.py MULTI30K_DIR [WORKDIR_BASE]

MiniLM's uncased WordPiece vocabulary lower-cases text and strips accents (Männer → manner), so a MiniLM decoder
cannot produce a cased German reference's spelling. Scoring every row after the same normalization of hypotheses
and references (NFD, combining marks removed, lower case) separates that handicap from translation quality.
Reads WORKDIR_BASE/ROW/val_hypotheses.txt (default base /tmp/multi30k_encdec) and updates encdec_results/ROW.json.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gpt_jax.evaluate import bleu  # noqa: E402


def normalize(text: str) -> str:
    """Lower case without accents, as BERT's uncased normalizer writes text."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn").lower()


def main() -> None:
    data = sys.argv[1]
    base = sys.argv[2] if len(sys.argv) > 2 else "/tmp/multi30k_encdec"
    with open(os.path.join(data, "val.de"), encoding="utf-8") as f:
        references = [line.rstrip("\n") for line in f]
    results_dir = os.path.join(HERE, "encdec_results")
    for name in sorted(os.listdir(results_dir)):
        row = name[:-len(".json")]
        hyp_path = os.path.join(base, row, "val_hypotheses.txt")
        if not name.endswith(".json") or not os.path.isfile(hyp_path):
            continue
        with open(hyp_path, encoding="utf-8") as f:
            hyps = [line.rstrip("\n") for line in f]
        scores = bleu([normalize(h) for h in hyps], [[normalize(r) for r in references]])
        path = os.path.join(results_dir, name)
        with open(path) as f:
            result = json.load(f)
        result.update(bleu_uncased_noaccents=scores["bleu"], chrf_uncased_noaccents=scores["chrf"])
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"{row}: BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f}; uncased, no accents: "
              f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f}")


if __name__ == "__main__":
    main()
