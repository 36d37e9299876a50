"""Train, evaluate, sample from or serve a GPT (or an encoder-decoder): flags → config → dispatch by --mode.

    python -m gpt_jax.main --config=configs/NAME.py --workdir=DIR [--mode=train|eval|sample|serve|compile]
        [--config.KEY=VALUE ...]

--config may be left out when DIR holds a config.json (a trained or converted model) or --config.init_from names a
pretrained model. Exit codes: 0 success, 2 a usage, config or input error (one `error: ...` line on stderr), 1
anything else.
"""

from __future__ import annotations

import os
import sys

from gpt_jax import hostmem

hostmem.keep_freed_memory()  # before JAX or TensorFlow start threads (see hostmem.py)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gpt_jax import cli  # noqa: E402
from gpt_jax import config as config_lib  # noqa: E402
from gpt_jax.errors import ConfigError, UserError  # noqa: E402

_DEFAULTS = config_lib.__file__
MODES = ("train", "eval", "sample", "serve", "compile")

_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULTS, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: config, checkpoints, metrics, tokenizer.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do; compile = compile the train step for these devices "
                          "and print its memory and FLOPs, without training.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text for --mode=sample (an encoder-decoder's source).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one prompt per line for --mode=sample.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: config.sample).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling threshold; 1 = off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address for --mode=serve.")
_PORT = flags.DEFINE_integer("port", 8000, "Port for --mode=serve.")
_API_KEY = flags.DEFINE_string("api_key", None, "Bearer token required by the server (or env GPT_JAX_API_KEY).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "--mode=serve: KV-cache rows, i.e. requests decoded together.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "--mode=serve: context length served (0 = the model's).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "--mode=serve: the model id in the API (default: the source's "
                                  "name).")


def _parse_flags(argv):
    try:
        return cli.parse_flags(argv)
    except (FileNotFoundError, OSError) as e:
        cli.fail(f"cannot read config file: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
        hint = " ".join(str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "").split())
        cli.fail(f"unknown config key among {', '.join(overrides) or '--config'}: {hint.strip(chr(39))}")
    except (ValueError, TypeError) as e:
        cli.fail(f"invalid flag value: {e}")


def resolve_config():
    """The run config: the --config file, or the workdir's config.json when --config is left out; overrides
    apply on top either way."""
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        config = _CONFIG.value
        config["seed"]  # the file is loaded lazily: make a failure to load it show here
    except (OSError, AttributeError, KeyError) as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"cannot load config file {config_path}: {detail}") from None
    saved = os.path.join(_WORKDIR.value or "", "config.json")
    default = os.path.abspath(config_path) == os.path.abspath(_DEFAULTS)
    if default and os.path.isfile(saved):
        config = config_lib.from_json_file(saved)
        for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
            config_lib.merge_dict(config, _nest(key, value), "--config")
    elif default and _MODE.value in ("train", "compile") and not config.init_from:
        raise ConfigError("--config is required (or a --workdir holding config.json, or --config.init_from)")
    return config


def _nest(key: str, value) -> dict:
    """"a.b", v → {"a": {"b": v}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _prompts(config) -> list[str]:
    if _PROMPT_FILE.value:
        try:
            with open(_PROMPT_FILE.value, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt_file {_PROMPT_FILE.value}: {e}") from None
        if not prompts:
            raise UserError(f"--prompt_file {_PROMPT_FILE.value} holds no prompt")
        return prompts
    return [_PROMPT.value if _PROMPT.value is not None else config.sample.prompt]


def _model_source(config) -> str:
    """What eval, sample and serve load: the workdir when it holds a model, else `init_from`."""
    has_model = os.path.isfile(os.path.join(_WORKDIR.value, "config.json"))
    if not has_model and not config.init_from:
        raise UserError(f"nothing to load: --workdir {_WORKDIR.value} has no config.json and --config.init_from is "
                        "empty")
    return _WORKDIR.value if has_model else config.init_from


def run(argv) -> None:
    del argv
    if not _WORKDIR.value and _MODE.value != "compile":
        raise UserError("--workdir is required")
    config = resolve_config()
    if _MODE.value in ("train", "compile"):
        from gpt_jax import sharding

        sharding.initialize_distributed(config.distributed)
    if _MODE.value == "compile":
        from gpt_jax import train

        train.compile_report(config)
    elif _MODE.value == "train":
        import jax

        from gpt_jax import decode, train

        try:
            result = train.train_and_evaluate(config, _WORKDIR.value)
        except train.TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        s = config.sample
        if s.max_new_tokens > 0 and result["step"] >= config.train_steps:  # not after a SIGTERM stop
            # every process samples (none waits at the exit barrier while another works); process 0 prints
            text = decode.sample_workdir(_WORKDIR.value, [s.prompt], s.max_new_tokens, s.temperature, s.top_k,
                                         s.top_p, num_samples=1, seed=config.seed)[0][0]
            if jax.process_index() == 0:
                print(f"--- sample\n{s.prompt}{_separator(config)}{text}", flush=True)
    elif _MODE.value == "eval":
        import json

        from gpt_jax import evaluate

        config_lib.validate(config)
        print(json.dumps(evaluate.evaluate_workdir(config, _WORKDIR.value)), flush=True)
    elif _MODE.value == "sample":
        from gpt_jax import decode

        s, prompts = config.sample, _prompts(config)
        pick = lambda flag, default: default if flag.value is None else flag.value
        outputs = decode.sample_workdir(_model_source(config), prompts, pick(_MAX_NEW, s.max_new_tokens),
                                        pick(_TEMPERATURE, s.temperature), pick(_TOP_K, s.top_k),
                                        pick(_TOP_P, s.top_p), num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
                                        weights=(config.model.param_dtype, config.model.quantize))
        if not any(text for texts in outputs for text in texts):
            print("note: the model generated no text (it ended at once)", file=sys.stderr)
        if len(prompts) == 1 and _NUM_SAMPLES.value == 1:  # stdout is the continuation, exactly
            sys.stdout.write(outputs[0][0] + ("\n" if sys.stdout.isatty() else ""))
            sys.stdout.flush()
        else:  # each continuation under a header; the prompts are not repeated
            for i, texts in enumerate(outputs):
                for j, text in enumerate(texts):
                    print(f"--- prompt {i} sample {j}\n{text}", flush=True)
    else:
        cli.require("serve", "fastapi", "uvicorn")
        from gpt_jax import serve

        serve.main(_model_source(config), host=_HOST.value, port=_PORT.value,
                   api_key=_API_KEY.value or os.environ.get("GPT_JAX_API_KEY"), max_batch=_MAX_BATCH.value,
                   max_len=_MAX_LEN.value or None, name=_MODEL_NAME.value,
                   weights=(config.model.param_dtype, config.model.quantize))


def _separator(config) -> str:
    """Between a prompt and its output: nothing for a continuation, a line break for a translation."""
    return "\n" if config.model.kind == "encoder_decoder" else ""


def main() -> None:
    cli.run(run, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
