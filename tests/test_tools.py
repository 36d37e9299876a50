"""The command lines: every tools/*.py and `python -m gpt_jax.main` answer --help with exit code 0 and their usage;
a subcommand tool names its commands when given none or a wrong one; a missing optional dependency is one `error:`
line naming the extra that installs it, and --help works without it. `run_in_process` and `load_tool` serve the
other tools' tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import importlib.util
import io
import os
import runpy
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
MODES = ("train", "eval", "sample", "serve", "compile")
SUBCOMMANDS = {"evaluate.py": ("perplexity", "bleu", "translate", "gsm8k", "table"),
               "human_eval.py": ("serve", "report"), "bench.py": ("data", "train", "kernels", "gpu")}


def _forget_flags(module_name: str) -> None:
    """Removes the absl flags a tool defined, so that another tool (or the same one again) can define its own."""
    for flag in list(flags.FLAGS.flags_by_module_dict().get(module_name, [])):
        if flag.name in flags.FLAGS:
            delattr(flags.FLAGS, flag.name)


def run_in_process(path: str, *args: str) -> subprocess.CompletedProcess:
    """Runs the script at `path` in this process as `python PATH ARGS` would run it (its `__main__` block, so the
    same flags, exit code, stdout and stderr) without a new process's start-up; its flags are removed afterwards."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with mock.patch.object(sys, "argv", [path, *args]), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # absl's app.run always ends in sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        _forget_flags(path)  # absl files a script's flags under its path
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())


def load_tool(name: str):
    """tools/NAME.py as a module, for its functions; its flags are removed again at once."""
    module_name = f"_tool_{name}"
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # absl names the module that defines a flag by its sys.modules entry
    try:
        spec.loader.exec_module(module)
    finally:
        _forget_flags(module_name)
        del sys.modules[module_name]
    return module


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_every_command_line_answers_help():
    commands = [[path, "--help"] for path in TOOLS] + [["-m", "gpt_jax.main", "--help"]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda command: _run(*command), commands))
    for command, proc in zip(commands, results, strict=True):
        name = os.path.basename(command[0]) if command[0] != "-m" else "gpt_jax.main"
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert "flags:" in proc.stdout, (name, proc.stdout[:500])  # absl's usage: the docstring, then the flags
        for subcommand in SUBCOMMANDS.get(name, ()):
            assert subcommand in proc.stdout, (name, subcommand)
    usage = next(line for line in results[-1].stdout.splitlines() if "--mode=" in line)
    assert all(mode in usage for mode in MODES), usage
    assert len(TOOLS) >= 9 and all(os.path.basename(t) in {os.path.basename(c[0]) for c in commands} for t in TOOLS)


@pytest.mark.parametrize("tool,args,choices", [
    ("evaluate.py", [], SUBCOMMANDS["evaluate.py"]),
    ("evaluate.py", ["perplex"], SUBCOMMANDS["evaluate.py"]),
    ("human_eval.py", [], SUBCOMMANDS["human_eval.py"]),
    ("human_eval.py", ["rate", "--db=x.sqlite"], SUBCOMMANDS["human_eval.py"]),
])
def test_subcommand_tools_name_their_commands(tool, args, choices):
    proc = run_in_process(os.path.join(ROOT, "tools", tool), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(choice in lines[0] for choice in choices), lines[0]


@pytest.mark.parametrize("tool,args,message", [
    ("evaluate.py", ["bleu", "--hyp=h.txt"], "error: bleu needs --ref"),
    ("evaluate.py", ["bleu", "--hyp=h.txt", "--ref=r.txt", "--window=3"], "error: --window does not apply to bleu"),
    ("evaluate.py", ["bleu", "--hyp=h.txt", "--ref=r.txt", "--nonsense=1"], "error: Unknown command line flag"),
    ("human_eval.py", ["report", "--db=x.sqlite", "extra"], "error: unexpected argument 'extra'"),
    ("plot.py", [], "error: give one WORKDIR"),
])
def test_bad_command_lines_are_one_error_line(tool, args, message):
    proc = run_in_process(os.path.join(ROOT, "tools", tool), *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr


# what a tool runs with an optional dependency hidden: sys.modules[name] = None makes `import name` fail and
# importlib.util.find_spec(name) (which cli.require asks) answer None, as when the package is not installed
_HIDDEN = """
import runpy, sys
for name in {hidden!r}:
    sys.modules[name] = None
sys.argv = {argv!r}
{run}
"""


MISSING_EXTRAS = [
    ("matplotlib", ["tools/plot.py", "{tmp}"], "eval"),
    ("sacrebleu", ["tools/evaluate.py", "bleu", "--hyp={tmp}/h.txt", "--ref={tmp}/h.txt"], "eval"),
    ("httpx", ["tools/load_test.py", "--url=http://127.0.0.1:9"], "serve"),
    ("fastapi", ["-m", "gpt_jax.main", "--mode=serve", "--workdir={tmp}"], "serve"),
    ("apache_beam", ["tools/prepare_data.py", "--input={tmp}/h.txt", "--output_dir={tmp}/out"], "data"),
]


def _run_without(hidden: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`python ARGV` (a script path or -m MODULE, then its arguments) with the module `hidden` not importable."""
    if argv[0] == "-m":
        run = f"runpy.run_module({argv[1]!r}, run_name='__main__', alter_sys=True)"
        argv = [argv[1], *argv[2:]]
    else:
        run = f"runpy.run_path({argv[0]!r}, run_name='__main__')"
    return _run("-c", _HIDDEN.format(hidden=[hidden], argv=argv, run=run))


@pytest.mark.parametrize("hidden,argv,extra", MISSING_EXTRAS)
def test_a_missing_extra_is_one_error_line(tmp_path, hidden, argv, extra):
    (tmp_path / "h.txt").write_text("a line\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n')
    proc = _run_without(hidden, [a.format(tmp=tmp_path) for a in argv])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-2000:]
    assert f"pip install -e '.[{extra}]'" in errors[0] and hidden in errors[0], errors


@pytest.mark.parametrize("hidden,argv,extra", [case for case in MISSING_EXTRAS if case[0] != "apache_beam"])
def test_help_works_without_the_extra(hidden, argv, extra):
    """(tools/prepare_data.py's flags come from the Beam pipeline's options: without Beam it says so, help or not.)"""
    proc = _run_without(hidden, [*argv[:2 if argv[0] == "-m" else 1], "--help"])
    assert proc.returncode == 0 and "flags:" in proc.stdout, proc.stderr[-2000:]


def test_commands_compile_through_a_persistent_cache_in_the_gpt_jax_cache_folder(tmp_path):
    """Every command imports gpt_jax.cli before JAX, which points XLA's persistent compilation cache at
    $GPT_JAX_CACHE/xla unless JAX_COMPILATION_CACHE_DIR is set; set to nothing, nothing is cached."""
    snippet = ("import gpt_jax.cli, jax, jax.numpy as jnp; print(jax.config.jax_compilation_cache_dir); "
               "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()")
    env = {k: v for k, v in ENV.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # this compile is quicker than the default second
    on = subprocess.run([sys.executable, "-c", snippet], env={**env, "GPT_JAX_CACHE": str(tmp_path / "on")},
                        capture_output=True, text=True, timeout=120)
    assert on.returncode == 0 and on.stdout.strip() == str(tmp_path / "on" / "xla"), on.stderr[-2000:]
    assert os.listdir(tmp_path / "on" / "xla")
    off = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                         env={**env, "GPT_JAX_CACHE": str(tmp_path / "off"), "JAX_COMPILATION_CACHE_DIR": ""})
    assert off.returncode == 0 and off.stdout.strip() == "", off.stderr[-2000:]
    assert not (tmp_path / "off").exists()
