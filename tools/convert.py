"""Converts models between gpt_jax workdirs, HF model directories and GGUF files.

    python tools/convert.py --input=PATH --output=DIR [--to=gpt_jax|hf]

--to=gpt_jax writes a gpt_jax workdir (config.json, tokenizer/, a checkpoint): from an HF directory or a .gguf file,
or from a LoRA run's workdir its adapters merged into the init_from base, which the new workdir no longer needs.
--to=hf writes config.json, model.safetensors and tokenizer files that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. The default: hf for a gpt_jax workdir without LoRA
adapters, gpt_jax otherwise. Exit codes: 0 done, 2 an input error (one `error: ...` line on stderr naming the file),
1 anything else.
"""

from __future__ import annotations

import sys

from absl import flags

from gpt_jax import cli

_INPUT = flags.DEFINE_string("input", None, "A gpt_jax workdir (a LoRA run's too), an HF model directory "
                             "(config.json + *.safetensors) or a .gguf file.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to create (must be new or empty).", required=True)
_TO = flags.DEFINE_enum("to", None, ["gpt_jax", "hf"], "Target format; default: hf for a gpt_jax workdir without "
                        "LoRA adapters, gpt_jax otherwise.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.require("convert", "safetensors", "tokenizers", "gguf")
    from gpt_jax import convert

    try:
        written = convert.convert_model(_INPUT.value, _OUTPUT.value, _TO.value)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        cli.fail(f"{e.filename or _INPUT.value}: {e.strerror}")
    print(f"wrote {written}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
