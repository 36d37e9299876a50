"""What every command line of gpt_jax shares (`python -m gpt_jax.main` and tools/*.py, all absl flags): `--help`
prints the usage and exits 0; a bad flag or a user error (`errors.UserError`) is one `error: ...` line on stderr
and exit code 2; a missing optional dependency names the extra that installs it."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

from gpt_jax.config import cached

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow 2.21 logs that its math ops use oneDNN (two lines, each time it loads) whatever that level; gpt_jax's
# tf.data and TensorBoard ops do no math that oneDNN speeds up, so it is off, and quiet.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# gpt_jax uses TensorFlow for tf.data and TensorBoard only. TensorFlow 2.21 imports Keras 3 eagerly unless told to
# use the separate tf_keras package (which is not installed, so nothing is imported): 3.5 of the 8.5 s that
# `import tensorflow` takes here. A user who wants tf.keras in the same process sets TF_USE_LEGACY_KERAS=0.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# XLA's persistent compilation cache: a program compiled once (a train step, the server's decode
# steps) is read back by the next command that compiles it, so a resumed run, a second sample or a restarted server
# skips the compiler. JAX reads these when it is imported, which every command does after this module. Entries are
# keyed by the program, its compile options, the devices and the JAX version, so a cached executable is the one a
# compile would give. Only compiles that took a second or more are kept; the size limit (LRU) also turns on JAX's
# file lock, so processes sharing the folder never read an entry another is still writing. It lives in
# $GPT_JAX_CACHE/xla (~/.cache/gpt_jax/xla); set JAX_COMPILATION_CACHE_DIR to move it, or to nothing to turn it off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cached("xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))

from absl import app, flags, logging  # noqa: E402

from gpt_jax.errors import UserError  # noqa: E402

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def require(extra: str, *modules: str) -> None:
    """UserError naming `pip install -e '.[EXTRA]'` when one of `modules` is not installed."""
    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a dotted name whose parent is missing, or a module set to None
            return False

    missing = [m for m in modules if not installed(m)]
    if missing:
        raise UserError(f"this needs {', '.join(missing)}: pip install -e '.[{extra}]'")


def parse_flags(argv: list[str]) -> list[str]:
    if any(arg in _HELP for arg in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])


def subcommand(argv: list[str], commands: dict, module: str, defaults: dict | None = None,
               takes_files: tuple[str, ...] = ()) -> tuple[str, types.SimpleNamespace]:
    """For tools with commands (`python tools/X.py COMMAND --flags`): the command in argv[1], one of `commands`
    ({name: (handler, required flags, optional flags)}), and the values of `module`'s flags, a command's `defaults`
    filling the unset ones; positional arguments after it (only for `takes_files`) as `.files`. UserError for a
    missing or unknown command, a missing flag or a flag the command does not take."""
    if len(argv) < 2:
        raise UserError(f"give a command: {', '.join(commands)}")
    command = argv[1]
    if command not in commands:
        raise UserError(f"unknown command {command!r}: choose one of {', '.join(commands)}")
    if command not in takes_files and len(argv) > 2:
        raise UserError(f"unexpected argument {argv[2]!r}")
    if command in takes_files and len(argv) < 3:
        raise UserError(f"{command} needs at least one file")
    _, required, optional = commands[command]
    own = {f.name: f for f in flags.FLAGS.get_flags_for_module(sys.modules[module])}
    stray = [name for name, f in own.items() if f.present and name not in required + optional]
    if stray:
        raise UserError(f"--{stray[0]} does not apply to {command}")
    missing = [name for name in required if own[name].value is None]
    if missing:
        raise UserError(f"{command} needs --{missing[0]}")
    values = {name: f.value for name, f in own.items()}
    for name, default in (defaults or {}).get(command, {}).items():
        values[name] = default if values[name] is None else values[name]
    return command, types.SimpleNamespace(**values, files=argv[2:])


def run(main, flags_parser=parse_flags) -> None:
    """app.run(main) with the conventions above (and absl's logging at WARNING: Orbax, httpx and friends log every
    step at INFO)."""

    def guarded(argv):
        logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    app.run(guarded, flags_parser=flags_parser)
