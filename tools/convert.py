"""Converts models between gpt_jax workdirs, HF model directories and GGUF files.

    python tools/convert.py --input=PATH --output=DIR [--to=gpt_jax|hf]

--to=gpt_jax (the default for an HF directory or a .gguf file) writes a gpt_jax workdir: config.json, tokenizer/ and
a step-0 checkpoint. --to=hf (the default for a gpt_jax workdir) writes config.json, model.safetensors and tokenizer
files that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. Exit codes: 0 done, 2 an input error
(one `error: ...` line on stderr naming the file), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Import an HF model directory or a GGUF file into a gpt_jax workdir, or export a gpt_jax "
                    "workdir (or any of those) to an HF model directory.")
    parser.add_argument("--input", required=True,
                        help="gpt_jax workdir, HF model directory (config.json + *.safetensors) or .gguf file")
    parser.add_argument("--output", required=True, help="directory to create (must be new or empty)")
    parser.add_argument("--to", choices=("gpt_jax", "hf"), default=None,
                        help="target format; default: hf for a gpt_jax workdir, gpt_jax otherwise")
    return parser.parse_args(argv)


def convert(input_path: str, output_dir: str, to: str | None = None) -> str:
    """Runs one conversion; returns a short description of what was written."""
    from flax import nnx

    from gpt_jax import convert as convert_lib
    from gpt_jax import pretrained
    from gpt_jax.errors import UserError

    is_workdir = pretrained.is_workdir(input_path)
    to = to or ("hf" if is_workdir else "gpt_jax")
    if to == "gpt_jax":
        if is_workdir:
            raise UserError(f"{input_path} is already a gpt_jax workdir (use --to=hf to export it)")
        converted = convert_lib.load_source(input_path)
        convert_lib.write_workdir(converted, output_dir)
        return f"gpt_jax workdir {output_dir} (from {input_path})"
    loaded = pretrained.load(input_path)
    convert_lib.model_family(loaded.model_cfg)  # refuse unexportable shapes before anything is written
    params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
    convert_lib.export_hf(loaded.model_cfg, params, loaded.tokenizer, output_dir)
    return f"HF model directory {output_dir} ({convert_lib.model_family(loaded.model_cfg)}, from {input_path})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gpt_jax.errors import UserError

    try:
        print(f"wrote {convert(args.input, args.output, args.to)}", file=sys.stderr)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e.filename or args.input}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
