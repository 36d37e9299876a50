"""What every command line of gpt_jax shares (`python -m gpt_jax.main` and tools/*.py, all absl flags): `--help`
prints the usage and exits 0; a bad flag or a user error (`errors.UserError`) is one `error: ...` line on stderr
and exit code 2; a missing optional dependency names the extra that installs it."""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from gpt_jax.errors import UserError  # noqa: E402

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def require(extra: str, *modules: str) -> None:
    """UserError naming `pip install -e '.[EXTRA]'` when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
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


def run(main, flags_parser=parse_flags) -> None:
    """app.run(main) with the conventions above."""

    def guarded(argv):
        try:
            return main(argv)
        except UserError as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    app.run(guarded, flags_parser=flags_parser)
