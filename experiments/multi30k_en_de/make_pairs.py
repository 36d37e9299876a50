"""Writes Multi30k English→German pairs as plain text in the translate prompt format, for a decoder-only LM.

    python experiments/multi30k_en_de/make_pairs.py --data_dir=MULTI30K --output=/tmp/multi30k_pairs.txt

Each pair becomes two lines, exactly what `tools/evaluate.py translate` prompts with (gpt_jax.evaluate's
TRANSLATE_TEMPLATE, "English: {source}\\nGerman:") followed by the reference and the newline that ends a
translation:

    English: A man is riding a bike.
    German: Ein Mann fährt Fahrrad.

The training pairs (train.en/train.de) come first, then the validation pairs (val.en/val.de), and the script prints
the `data.val_fraction` that makes the run's validation split exactly the validation pairs (gpt_jax splits text by
characters). Multi30k is for non-commercial research: write the output outside the repository.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from gpt_jax.evaluate import TRANSLATE_TEMPLATE  # noqa: E402


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


def format_pairs(sources: list[str], targets: list[str]) -> str:
    """One `TRANSLATE_TEMPLATE` prompt plus " target\\n" per pair."""
    if len(sources) != len(targets):
        raise SystemExit(f"error: {len(sources)} source lines but {len(targets)} target lines")
    return "".join(TRANSLATE_TEMPLATE.format(source=s.strip()) + " " + t.strip() + "\n"
                   for s, t in zip(sources, targets, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="folder with train.en, train.de, val.en, val.de")
    parser.add_argument("--output", required=True, help="the formatted text file to write (outside the repo)")
    args = parser.parse_args()

    parts = []
    for split in ("train", "val"):
        sources = read_lines(os.path.join(args.data_dir, f"{split}.en"))
        targets = read_lines(os.path.join(args.data_dir, f"{split}.de"))
        parts.append(format_pairs(sources, targets))
    train_text, val_text = parts
    text = train_text + val_text
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)

    # gpt_jax.data.text.split_text cuts at int(len(text) * (1 - val_fraction)); aim half a character inside.
    val_fraction = (len(val_text) - 0.5) / len(text)
    assert int(len(text) * (1.0 - val_fraction)) == len(train_text)
    print(f"wrote {args.output}: {train_text.count(chr(10)) // 2:,} training and {val_text.count(chr(10)) // 2:,} "
          f"validation pairs, {len(text):,} characters")
    print(f"--config.data.val_fraction={val_fraction!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
