"""Adds two more scorings to the encoder-decoder rows' results, beside the cased, detokenized scores of eval.json.

    python experiments/multi30k_en_de/score_encdec.py MULTI30K_DIR [WORKDIR_BASE]
    python experiments/multi30k_en_de/score_encdec.py --hyp=HYPOTHESES --ref=REFERENCES

- uncased, accent-free BLEU/chrF: MiniLM's uncased WordPiece vocabulary lower-cases text and strips accents
  (Männer → manner), so a MiniLM decoder cannot produce a cased German reference's spelling. Scoring every row after
  the same normalization of hypotheses and references (NFD, combining marks removed, lower case) separates that
  handicap from translation quality.
- lower-cased, tokenized BLEU, the literature's convention: hypotheses lower-cased and split by sacrebleu's 13a
  tokenizer, scored without further tokenization against MULTI30K_DIR/val.lc.norm.tok.de (lower-cased, Moses-
  tokenized references; 13a of the lower-cased val.de matches their tokens on 1,005 of the 1,014 lines).

Reads WORKDIR_BASE/ROW/val_hypotheses.txt and, when beam search ran, val_hypotheses_beam.txt (default base
/tmp/multi30k_encdec) and updates encdec_results/ROW.json; with --hyp and --ref, prints the uncased, accent-free
scores of one hypothesis file (a decoder-only row's, say) as JSON.
"""

from __future__ import annotations

import json
import os
import unicodedata

from absl import flags

from gpt_jax import cli
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
_HYP = flags.DEFINE_string("hyp", None, "score this hypothesis file (one line each) instead of the rows")
_REF = flags.DEFINE_string("ref", None, "with --hyp: the reference file")


def normalize(text: str) -> str:
    """Lower case without accents, as BERT's uncased normalizer writes text."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn").lower()


def normalized_scores(hypotheses: list[str], references: list[str]) -> dict:
    """BLEU and chrF (sacrebleu defaults) after `normalize` of both sides."""
    from gpt_jax.evaluate import bleu

    return bleu([normalize(h) for h in hypotheses], [[normalize(r) for r in references]])


def lowercase_tokenized_bleu(hypotheses: list[str], tokenized_references: list[str]) -> float:
    """BLEU of lower-cased, 13a-tokenized hypotheses against already lower-cased, tokenized references."""
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    hyps = [tokenize(h.lower()) for h in hypotheses]
    return sacrebleu.BLEU(tokenize="none", force=True).corpus_score(hyps, [tokenized_references]).score


def main(argv: list[str]) -> int:
    """Scores every row that has hypotheses (updating its encdec_results/ROW.json), or the --hyp file; prints the
    scores."""
    cli.require("eval", "sacrebleu")
    if _HYP.value or _REF.value:
        if not (_HYP.value and _REF.value) or len(argv) > 1:
            raise UserError("give --hyp and --ref (and no MULTI30K_DIR), or MULTI30K_DIR [WORKDIR_BASE]")
        hyps = [line.rstrip() for line in text_lib.read_lines(_HYP.value, "--hyp")]
        refs = [line.rstrip() for line in text_lib.read_lines(_REF.value, "--ref")]
        print(json.dumps(normalized_scores(hyps, refs)))
        return 0
    if not 2 <= len(argv) <= 3:
        raise UserError("give MULTI30K_DIR and optionally WORKDIR_BASE (or --hyp and --ref)")
    data = argv[1]
    base = argv[2] if len(argv) > 2 else "/tmp/multi30k_encdec"
    references = text_lib.read_lines(os.path.join(data, "val.de"), "MULTI30K_DIR")
    tokenized = [line.rstrip() for line in
                 text_lib.read_lines(os.path.join(data, "val.lc.norm.tok.de"), "MULTI30K_DIR")]
    results_dir = os.path.join(HERE, "encdec_results")
    for name in sorted(n for n in os.listdir(results_dir) if n.endswith(".json")):
        row = name[:-len(".json")]
        path = os.path.join(results_dir, name)
        updates = {}
        for suffix, prefix in (("", ""), ("_beam", "beam_")):
            hyp_path = os.path.join(base, row, f"val_hypotheses{suffix}.txt")
            if not os.path.isfile(hyp_path):
                continue
            hyps = text_lib.read_lines(hyp_path, "hypotheses")
            scores = normalized_scores(hyps, references)
            updates.update({f"{prefix}bleu_uncased_noaccents": scores["bleu"],
                            f"{prefix}chrf_uncased_noaccents": scores["chrf"],
                            f"{prefix}bleu_lc_tok": lowercase_tokenized_bleu(hyps, tokenized)})
        if not updates:
            continue
        with open(path) as f:
            result = json.load(f)
        result.update(updates)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        for prefix in ("", "beam_"):
            if f"{prefix}bleu_lc_tok" in result:
                print(f"{row}, {prefix[:-1] or 'greedy'}: BLEU {result[prefix + 'bleu']:.2f} chrF "
                      f"{result[prefix + 'chrf']:.2f}; lower-cased tokenized BLEU {result[prefix + 'bleu_lc_tok']:.2f};"
                      f" uncased, no accents: BLEU {result[prefix + 'bleu_uncased_noaccents']:.2f} "
                      f"chrF {result[prefix + 'chrf_uncased_noaccents']:.2f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
