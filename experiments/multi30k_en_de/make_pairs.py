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

import os

from absl import flags

from gpt_jax import cli
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError

_DATA_DIR = flags.DEFINE_string("data_dir", None, "folder with train.en, train.de, val.en, val.de")
_OUTPUT = flags.DEFINE_string("output", None, "the formatted text file to write (outside the repository)")


def format_pairs(sources: list[str], targets: list[str]) -> str:
    """One `TRANSLATE_TEMPLATE` prompt plus " target\\n" per pair."""
    from gpt_jax.evaluate import TRANSLATE_TEMPLATE

    if len(sources) != len(targets):
        raise UserError(f"{len(sources)} source lines but {len(targets)} target lines")
    return "".join(TRANSLATE_TEMPLATE.format(source=s.strip()) + " " + t.strip() + "\n"
                   for s, t in zip(sources, targets, strict=True))


def main(argv: list[str]) -> int:
    """Writes --output from the pairs in --data_dir; prints the matching data.val_fraction."""
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    for flag in (_DATA_DIR, _OUTPUT):
        if not flag.value:
            raise UserError(f"--{flag.name} is required")
    parts = []
    for split in ("train", "val"):
        sources = text_lib.read_lines(os.path.join(_DATA_DIR.value, f"{split}.en"), "--data_dir")
        targets = text_lib.read_lines(os.path.join(_DATA_DIR.value, f"{split}.de"), "--data_dir")
        parts.append(format_pairs(sources, targets))
    train_text, val_text = parts
    text = train_text + val_text
    with open(_OUTPUT.value, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)

    # gpt_jax.data.text.split_text cuts at int(len(text) * (1 - val_fraction)); aim half a character inside.
    val_fraction = (len(val_text) - 0.5) / len(text)
    assert int(len(text) * (1.0 - val_fraction)) == len(train_text)
    print(f"wrote {_OUTPUT.value}: {train_text.count(chr(10)) // 2:,} training and {val_text.count(chr(10)) // 2:,} "
          f"validation pairs, {len(text):,} characters")
    print(f"--config.data.val_fraction={val_fraction!r}")
    return 0


if __name__ == "__main__":
    cli.run(main)
