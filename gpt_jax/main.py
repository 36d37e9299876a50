"""Command line: flags → config → dispatch by --mode.

    python -m gpt_jax.main --config=configs/tiny.py --workdir=DIR [--mode=train|eval|sample] [--config.KEY=VALUE]

Exit codes: 0 success, 2 a usage/config/input error (one `error: ...` line on stderr), 1 anything else.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpt_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX or TensorFlow start threads (see hostmem.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULTS = os.path.join(os.path.dirname(__file__), "config.py")

_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULTS, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: config, checkpoints, metrics, tokenizer.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "serve", "compile"],
                          "What to do; compile = compile the train step for these devices and print its memory "
                          "and FLOPs, without training.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text for --mode=sample.")
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


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])
    except (FileNotFoundError, OSError) as e:
        _fail(f"cannot read config file: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
        hint = " ".join(str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "").split())
        _fail(f"unknown config key among {', '.join(overrides) or '--config'}: {hint.strip(chr(39))}")
    except (ValueError, TypeError) as e:
        _fail(f"invalid flag value: {e}")


def resolve_config():
    """The run config: the --config file, or the workdir's config.json when --config is left out; overrides
    apply on top either way."""
    from gpt_jax import config as config_lib
    from gpt_jax.errors import ConfigError

    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        config = _CONFIG.value
        config["seed"]  # the file is loaded lazily: make a failure to load it show here
    except (OSError, AttributeError, KeyError) as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"cannot load config file {config_path}: {detail}") from None
    saved = os.path.join(_WORKDIR.value or "", "config.json")
    if os.path.abspath(config_path) == os.path.abspath(_DEFAULTS) and os.path.isfile(saved):
        config = config_lib.from_json_file(saved)
        for key, value in config_flags.get_override_values(flags.FLAGS["config"]).items():
            config_lib.merge_dict(config, _unflatten(key, value), "--config." + key)
    elif (os.path.abspath(config_path) == os.path.abspath(_DEFAULTS) and _MODE.value in ("train", "compile")
          and not config.init_from):
        raise ConfigError("--config is required (or a --workdir holding config.json, or --config.init_from)")
    config_lib.validate(config)
    return config


def _unflatten(key: str, value) -> dict:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _prompts() -> list[str]:
    from gpt_jax.errors import UserError

    if _PROMPT_FILE.value:
        try:
            with open(_PROMPT_FILE.value, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt_file {_PROMPT_FILE.value}: {e}") from None
        if not prompts:
            raise UserError(f"--prompt_file {_PROMPT_FILE.value} holds no prompt")
        return prompts
    return [_PROMPT.value] if _PROMPT.value is not None else []


def run(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from gpt_jax.errors import UserError

    if not _WORKDIR.value and _MODE.value != "compile":
        _fail("--workdir is required")
    try:
        config = resolve_config()
        if _MODE.value in ("train", "compile"):
            from gpt_jax import sharding

            sharding.initialize_distributed(config.distributed)
        if _MODE.value == "compile":
            from gpt_jax import train

            train.compile_report(config)
        elif _MODE.value == "train":
            from gpt_jax import decode, train

            try:
                train.train_and_evaluate(config, _WORKDIR.value)
            except train.TrainingError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(1)
            if config.sample.max_new_tokens > 0 and _is_main_process():
                s = config.sample
                text = decode.sample_workdir(_WORKDIR.value, [s.prompt], s.max_new_tokens, s.temperature, s.top_k,
                                             s.top_p, num_samples=1, seed=config.seed)[0][0]
                print(f"--- sample\n{s.prompt}{text}", flush=True)
        elif _MODE.value == "eval":
            import json

            from gpt_jax import evaluate

            print(json.dumps(evaluate.evaluate_workdir(config, _WORKDIR.value)), flush=True)
        elif _MODE.value == "sample":
            from gpt_jax import decode

            prompts = _prompts() or [config.sample.prompt]
            s = config.sample
            source = _WORKDIR.value if os.path.isfile(os.path.join(_WORKDIR.value, "config.json")) \
                else (config.init_from or _WORKDIR.value)
            outputs = decode.sample_workdir(
                source, prompts,
                s.max_new_tokens if _MAX_NEW.value is None else _MAX_NEW.value,
                s.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value,
                s.top_k if _TOP_K.value is None else _TOP_K.value,
                s.top_p if _TOP_P.value is None else _TOP_P.value,
                num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
            if len(prompts) == 1 and _NUM_SAMPLES.value == 1:
                sys.stdout.write(outputs[0][0])
                sys.stdout.flush()
            else:
                for i, prompt in enumerate(prompts):
                    for j, text in enumerate(outputs[i]):
                        print(f"--- prompt {i} sample {j}\n{prompt}{text}", flush=True)
        else:
            from gpt_jax import serve

            source = _WORKDIR.value if os.path.isfile(os.path.join(_WORKDIR.value, "config.json")) \
                else config.init_from
            serve.main(source, host=_HOST.value, port=_PORT.value,
                       api_key=_API_KEY.value or os.environ.get("GPT_JAX_API_KEY"))
    except UserError as e:
        _fail(str(e))


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def main() -> None:
    app.run(run, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
