"""README.md is tested: every command of its ```bash blocks and its ```python snippet runs, as written, in a temporary
folder laid out like a checkout (`configs/`, `tools/` and `experiments/` link to this repository's), with only step
counts, model sizes of configs/small.py and paths shortened by the table below.

Every command parsed from README.md (backslash continuations joined, comments dropped) must match exactly one
entry of STEPS, and every entry must match a command: a command added to the README fails this test until it is
added here. `python tests/test_readme.py` prints the table as markdown.

The commands run in README order where one needs another (sample after train, eval after train, convert then
sample); the independent ones run concurrently, at most SLOTS processes at a time (servers count while they start).
They start with the session, in conftest.py's background thread (see start_in_background), and the test waits for
them. It prints each command's wall and CPU seconds: about 270 CPU seconds in all, most of them XLA compiling (the
SmolLM2 server's warm-up, the encoder-decoder's train step), some 2.5 minutes on 2 idle cores.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHAKESPEARE = os.path.join(ROOT, "gpt_jax", "data", "tinyshakespeare.txt")
SLOTS = threading.BoundedSemaphore(3)  # processes at work at once (2 CPU cores in CI)
TIMEOUT_S = 600  # per command
GGUF_PATH = "path/to/SmolLM2-135M-Instruct.Q4_1.gguf"

RUN, SERVER, WEB, SNIPPET, NOT_RUN = "run", "server", "web page", "snippet", "not run"
VENV = "python3 -m venv .venv && . .venv/bin/activate && "
CONTAINER = ".ci/run's container step (podman; the test environment has no container engine)"


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    readme: str  # the command as README.md has it (continuations joined, comments dropped)
    how: str  # how the test covers it
    subs: tuple[tuple[str, str], ...] = ()  # (README text, what runs instead), each must occur; {gguf}, {port}
    kind: str = RUN  # RUN: exit 0; SERVER: in the background, /health, exercised, SIGTERM, exit 0;
    #                  WEB: likewise, its page instead of /health and Ctrl-C (SIGINT); SNIPPET: python code run
    #                  against the server `after` names while it is up; NOT_RUN: covered otherwise (`how` says)
    after: str | None = None  # the step whose results this one needs (runs once that one has passed)


# The substitution table. The test writes the user's files into its folder first: corpus/*.txt (6 documents cut
# from the bundled tinyshakespeare plus an exact copy of one: a small corpus, so --vocab_size=32000 clamps with a
# warning), train/val.{en,de} (200 and 8 made-up aligned sentence pairs), some.txt (3,000 characters of
# tinyshakespeare), hyp.txt / ref.txt (two sentences each) and prompts.txt (two prompts).
STEPS = (
    Step("train_tiny",
         VENV + "pip install -e . && python -m gpt_jax.main --config=configs/tiny.py --workdir=runs/tiny",
         "the gpt_jax part, 20 steps instead of 600 (venv and install: the test environment's own)",
         ((VENV + "pip install -e . && ", ""), ("--workdir=runs/tiny", "--workdir=runs/tiny --config.train_steps=20"))),
    Step("test_suite", VENV + "pip install -e '.[test]' && python -m pytest -q",
         "this test suite itself (not run recursively)", kind=NOT_RUN),
    Step("train_mt",
         "python -m gpt_jax.main --config=configs/multi30k_encdec.py --workdir=runs/mt "
         "--config.data.train_source=train.en --config.data.train_target=train.de "
         "--config.data.val_source=val.en --config.data.val_target=val.de",
         "5 steps instead of 11,000, on the made-up pairs",
         (("--workdir=runs/mt", "--workdir=runs/mt --config.train_steps=5"),)),
    Step("eval_mt", "python -m gpt_jax.main --mode=eval --workdir=runs/mt", "as written", after="train_mt"),
    Step("sample_mt", 'python -m gpt_jax.main --mode=sample --workdir=runs/mt --prompt="A man is riding a bike."',
         "as written", after="eval_mt"),
    Step("pip_data", "pip install -e '.[data]'", "the test environment's own install", kind=NOT_RUN),
    Step("prepare_data",
         "python tools/prepare_data.py --input='corpus/*.txt' --output_dir=data/my_corpus --vocab_size=32000 "
         "--dedup=exact,near",
         "as written, on the small corpus"),
    Step("train_small", "python -m gpt_jax.main --config=configs/small.py --workdir=runs/small "
         "--config.data.path=data/my_corpus",
         "2 steps instead of 100,000, and GPT-2 small shrunk to 2 layers, d_model 192, 2 × 256 tokens a batch, "
         "1 evaluation batch (as written one step takes ~7 minutes on 2 cores)",
         (("--config.data.path=data/my_corpus", "--config.data.path=data/my_corpus --config.train_steps=2 "
           "--config.model.n_layer=2 --config.model.d_model=192 --config.batch_size=2 --config.seq_len=256 "
           "--config.eval_steps=1"),),
         after="prepare_data"),
    Step("pip_convert", "pip install -e '.[convert]'", "the test environment's own install", kind=NOT_RUN),
    Step("convert_gguf", f"python tools/convert.py --input={GGUF_PATH} --output=runs/smollm2",
         f"{GGUF_PATH} → the `smollm2_gguf` fixture's file", ((GGUF_PATH, "{gguf}"),)),
    Step("sample_smollm2",
         'python -m gpt_jax.main --mode=sample --workdir=runs/smollm2 --prompt="The capital of France is" '
         "--temperature=0",
         "as written; says Paris", after="convert_gguf"),
    Step("export_hf", "python tools/convert.py --input=runs/my_run --output=hf_export --to=hf",
         "runs/my_run → runs/tiny", (("runs/my_run", "runs/tiny"),), after="train_tiny"),
    Step("pip_eval", "pip install -e '.[eval]'", "the test environment's own install", kind=NOT_RUN),
    Step("eval_tiny", "python -m gpt_jax.main --mode=eval --workdir=runs/tiny", "as written", after="train_tiny"),
    Step("perplexity", "python tools/evaluate.py perplexity --model=runs/tiny --text=some.txt --stride=32",
         "as written", after="train_tiny"),
    Step("bleu", "python tools/evaluate.py bleu --hyp=hyp.txt --ref=ref.txt", "as written"),
    Step("plot", "python tools/plot.py runs/tiny", "as written", after="eval_tiny"),
    Step("human_eval_serve",
         "python tools/human_eval.py serve --a=runs/a --b=runs/b --prompts=prompts.txt --db=ratings.sqlite",
         "runs/a and runs/b → runs/tiny, on a free port; the page shows a pair, one vote is cast, Ctrl-C stops it",
         (("--a=runs/a --b=runs/b", "--a=runs/tiny --b=runs/tiny"), ("--db=ratings.sqlite",
                                                                     "--db=ratings.sqlite --port={port}")),
         kind=WEB, after="train_tiny"),
    Step("human_eval_report", "python tools/human_eval.py report --db=ratings.sqlite", "as written; 1 rating",
         after="human_eval_serve"),
    Step("make_tasks", "python experiments/lm_eval_smollm2/make_tasks.py --out=lm_eval_tasks",
         "as written (without ../shared/data: the two tasks made here)", after="train_tiny"),
    Step("harness", "python tools/evaluate.py harness --model=runs/tiny --tasks=made_lastword,made_choice "
         "--include_path=lm_eval_tasks", "as written", after="make_tasks"),
    Step("export_tiny_hf", "python tools/convert.py --input=runs/tiny --output=tiny_hf --to=hf", "as written",
         after="make_tasks"),
    Step("lm_eval_server",
         "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model local-completions --tasks made_lastword "
         "--include_path lm_eval_tasks --model_args model=tiny,base_url=http://127.0.0.1:8000/v1/completions,"
         "tokenizer=tiny_hf,tokenizer_backend=huggingface,tokenized_requests=True,max_length=64",
         "run while serve_tiny is up, port 8000 → its port", (("127.0.0.1:8000", "127.0.0.1:{port}"),),
         kind=SNIPPET, after="serve_tiny"),
    Step("pip_serve", "pip install -e '.[serve]'", "the test environment's own install", kind=NOT_RUN),
    Step("serve_tiny", "python -m gpt_jax.main --mode=serve --workdir=runs/tiny",
         "on a free port instead of 8000; the python snippet and lm_eval's local-completions run against it; "
         "SIGTERM stops it",
         (("--workdir=runs/tiny", "--workdir=runs/tiny --port={port}"),), kind=SERVER, after="export_tiny_hf"),
    Step("serve_smollm2",
         f"python -m gpt_jax.main --mode=serve --workdir=/tmp/smol --config.init_from={GGUF_PATH}",
         "/tmp/smol → smol in the test's folder, the GGUF → the fixture's file, on a free port; a chat "
         "completion says Paris; SIGTERM stops it",
         (("/tmp/smol", "smol"), (GGUF_PATH, "{gguf} --port={port}")), kind=SERVER),
    Step("openai_snippet",
         'from openai import OpenAI\n'
         'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")\n'
         'print(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=50, temperature=0.8)'
         ".choices[0].text)",
         "run with python against serve_tiny, port 8000 → its port", (("127.0.0.1:8000", "127.0.0.1:{port}"),),
         kind=SNIPPET, after="serve_tiny"),
    Step("build_image", "tools/build_image.sh", CONTAINER + " builds it, with --local-base", kind=NOT_RUN),
    Step("docker_run", 'docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/tiny:/model:ro" gpt-jax',
         CONTAINER + ": --check runs the image so, with podman, and queries it", kind=NOT_RUN),
    Step("build_image_check", "tools/build_image.sh --local-base --check=runs/tiny",
         CONTAINER + " runs it, with a 5-step model", kind=NOT_RUN),
)
NEEDS_GGUF = {"convert_gguf", "sample_smollm2", "serve_smollm2"}
LONGEST = {"serve_smollm2", "train_mt", "train_tiny"}  # ~75, 65 and 25 CPU seconds: started first


def table_markdown() -> str:
    def cell(text: str) -> str:
        return "`" + text.replace("\n", " ⏎ ").replace("|", "\\|") + "`"

    rows = ["| README command | how the test runs it | substitutions |", "| --- | --- | --- |"]
    for step in STEPS:
        subs = "<br>".join(f"{cell(old)} → {cell(new) if new else '(dropped)'}" for old, new in step.subs)
        rows.append(f"| {cell(step.readme)} | {step.kind}: {step.how} | {subs} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# README.md's commands

SHELL_BLOCKS = ("bash", "sh", "shell", "console")


def _drop_comment(line: str) -> str:
    """`line` without a shell comment (a `#` that starts a word, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks (continuations joined, comments dropped) and each ```python block."""
    commands = []
    for lang, body in re.findall(r"^```(\w*)[ \t]*\n(.*?)^```", text, flags=re.M | re.S):
        if lang in SHELL_BLOCKS:
            for line in re.sub(r"[ \t]*\\\n\s*", " ", body).splitlines():
                line = _drop_comment(line).strip()
                if line:
                    commands.append(line)
        elif lang == "python":
            commands.append(body.strip())
    return commands


def test_the_table_covers_every_readme_command_once():
    with open(README, encoding="utf-8") as f:
        commands = readme_commands(f.read())
    assert len(commands) >= 20, commands  # the parser found the README's blocks
    keys = [step.key for step in STEPS]
    assert len(set(keys)) == len(keys)
    uncovered = [c for c in commands if sum(step.readme == c for step in STEPS) != 1]
    assert not uncovered, ("README.md commands that tests/test_readme.py does not cover (add each to STEPS): "
                           + "\n".join(uncovered))
    stale = [step.key for step in STEPS if step.readme not in commands]
    assert not stale, f"STEPS entries no README command matches (update or drop them): {stale}"
    for step in STEPS:
        for old, _ in step.subs:
            assert old in step.readme, f"{step.key}: {old!r} is not in its command"
        assert step.after is None or step.kind == SNIPPET or keys.index(step.after) < keys.index(step.key), step.key
        assert step.key not in LONGEST or step.after is None, step.key  # started first: needs nothing
    for step in STEPS:
        if step.kind not in (NOT_RUN, SNIPPET):
            assert "&&" not in _command(step, "", 0) and ";" not in _command(step, "", 0), step.key


def test_readme_commands_parse():
    text = ("x\n```bash\npip install -e . && a --b='c # d' \\\n    --e=f   # a comment\n# only a comment\n\n```\n"
            "```\nnot a command\n```\n```python\nprint(1)\n```\n")
    assert readme_commands(text) == ["pip install -e . && a --b='c # d' --e=f", "print(1)"]


# ---------------------------------------------------------------------------------------------------------------
# Running them


def _command(step: Step, gguf: str, port: int) -> str:
    command = step.readme
    for old, new in step.subs:
        command = command.replace(old, new.replace("{gguf}", gguf).replace("{port}", str(port)))
    return command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DependencyFailed(Exception):
    pass


@dataclasses.dataclass
class Ran:
    """One command's run: its folder, its output and (servers) its URL."""

    step: Step
    command: str
    dir: str
    out: str = ""
    err: str = ""
    url: str = ""

    def log(self) -> str:
        lines = [x for x in self.err.splitlines() if not re.match(r"[WI]\d{4} ", x)]  # not absl's C++ lines
        return f"$ {self.command}\n--- stdout (end)\n{self.out[-1500:]}\n--- stderr (end)\n" + "\n".join(lines[-30:])


def _reap(proc: subprocess.Popen, timeout: float) -> tuple[int | str, float]:
    """Waits for `proc`, killing it after `timeout` s: (its exit code or why it has none, the CPU seconds it used)."""
    if proc.returncode is not None:  # reaped by poll() already
        return proc.returncode, 0.0
    killed = threading.Event()
    timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (f"killed after {timeout:.0f} s" if killed.is_set() else proc.returncode), usage.ru_utime + usage.ru_stime


class Runner:
    def __init__(self, folder: str, gguf: str):
        self.dir, self.gguf = folder, gguf
        self.env = {**os.environ, "PYTHONPATH": ROOT,  # the commands import this checkout's gpt_jax
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        self.ports: dict[str, int] = {}
        self.times: dict[str, tuple[float, float]] = {}  # step → (wall seconds, CPU seconds)
        os.makedirs(os.path.join(folder, "logs"))

    def _popen(self, step: Step, argv: list[str]) -> tuple[subprocess.Popen, str, str]:
        out, err = (os.path.join(self.dir, "logs", f"{step.key}.{x}") for x in ("out", "err"))
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(argv, cwd=self.dir, env=self.env, stdout=stdout, stderr=stderr,
                                    stdin=subprocess.DEVNULL)
        return proc, out, err

    @staticmethod
    def _read(ran: Ran, out: str, err: str) -> None:
        with open(out, encoding="utf-8", errors="replace") as f:
            ran.out = f.read()
        with open(err, encoding="utf-8", errors="replace") as f:
            ran.err = f.read()

    def run(self, step: Step, argv: list[str] | None = None) -> Ran:
        """A command in the foreground: it must exit 0."""
        ran = Ran(step, _command(step, self.gguf, self.ports.get(step.after, 0)), self.dir)
        with SLOTS:
            start = time.perf_counter()
            proc, out, err = self._popen(step, argv or ["bash", "-c", "exec " + ran.command])
            rc, cpu = _reap(proc, TIMEOUT_S)
            self.times[step.key] = (time.perf_counter() - start, cpu)
        self._read(ran, out, err)
        assert rc == 0, f"exit code {rc}\n{ran.log()}"
        return ran

    def serve(self, step: Step, exercise) -> Ran:
        """A server in the background: up (its health URL answers), exercised, stopped; it must exit 0."""
        port = self.ports[step.key] = _free_port()
        ran = Ran(step, _command(step, self.gguf, port), self.dir, url=f"http://127.0.0.1:{port}")
        health = ran.url + ("/health" if step.kind == SERVER else "/")
        SLOTS.acquire()  # while it starts
        start = time.perf_counter()
        proc, out, err = self._popen(step, ["bash", "-c", "exec " + ran.command])
        try:
            try:
                deadline = time.time() + TIMEOUT_S
                while True:
                    try:
                        with urllib.request.urlopen(health, timeout=10) as r:
                            if r.status == 200:
                                break
                    except (urllib.error.URLError, OSError):
                        pass
                    if proc.poll() is not None or time.time() > deadline:
                        raise AssertionError(f"the server did not come up (exit code {proc.poll()})")
                    time.sleep(0.5)
            finally:
                SLOTS.release()
            exercise(ran)
        except Exception as e:
            self._read(ran, out, err)
            raise AssertionError(f"{e}\n{ran.log()}") from e
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM if step.kind == SERVER else signal.SIGINT)
            rc, cpu = _reap(proc, 60)
            self.times[step.key] = (time.perf_counter() - start, cpu)
        self._read(ran, out, err)
        assert rc == 0, f"exit code {rc} after it was stopped\n{ran.log()}"
        return ran


def _write_user_files(folder: str) -> None:
    """What the README's commands expect the user to have, small."""
    for name in ("configs", "tools", "experiments"):
        os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    paragraphs = text[:120_000].split("\n\n")
    os.makedirs(os.path.join(folder, "corpus"))
    n = len(paragraphs) // 6
    documents = ["\n\n".join(paragraphs[i * n:(i + 1) * n]) + "\n" for i in range(6)]
    for i, document in enumerate(documents + documents[:1]):  # the last is an exact duplicate
        with open(os.path.join(folder, "corpus", f"part{i}.txt"), "w", encoding="utf-8") as f:
            f.write(document)
    words = [("a", "ein"), ("man", "mann"), ("woman", "frau"), ("dog", "hund"), ("child", "kind"), ("is", "ist"),
             ("riding", "fährt"), ("walking", "geht"), ("the", "das"), ("bike", "fahrrad"), ("street", "straße"),
             ("park", "park"), ("red", "rot"), ("blue", "blau")]
    rng = random.Random(0)
    for split, count in (("train", 200), ("val", 8)):
        pairs = [[rng.choice(words) for _ in range(rng.randint(3, 8))] for _ in range(count)]
        for side, lang in enumerate(("en", "de")):
            with open(os.path.join(folder, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(" ".join(w[side] for w in p).capitalize() + ".\n" for p in pairs)
    files = {"some.txt": text[200_000:203_000], "hyp.txt": "the cat sat on the mat\na dog barks\n",
             "ref.txt": "the cat sat on the mat\nthe dog barks\n", "prompts.txt": "ROMEO:\nJULIET:\n"}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(content)


def _read_json(folder: str, *path: str) -> dict:
    with open(os.path.join(folder, *path), encoding="utf-8") as f:
        return json.load(f)


def _http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


# What each command must have done, beyond exiting 0 (`ran.dir` is the test's folder).
def check_train_tiny(ran: Ran) -> None:
    assert os.listdir(os.path.join(ran.dir, "runs", "tiny", "checkpoints"))
    assert "\nROMEO:" in ran.out and len(ran.out) > 100  # it ends by printing generated text


def check_train_mt(ran: Ran) -> None:
    evals = [json.loads(x) for x in open(os.path.join(ran.dir, "runs", "mt", "metrics.jsonl")) if "val_loss" in x]
    assert evals[-1]["step"] == 5 and "val_bleu" in evals[-1]


def check_eval_mt(ran: Ran) -> None:
    assert {"val_loss", "bleu", "chrf"} <= set(_read_json(ran.dir, "runs", "mt", "eval.json"))


def check_sample_mt(ran: Ran) -> None:
    assert ran.out.strip()


def check_prepare_data(ran: Ran) -> None:
    manifest = _read_json(ran.dir, "data", "my_corpus", "manifest.json")
    assert manifest["documents_read"] == 7 and manifest["removed"].get("exact_duplicate") == 1
    assert "warning: --vocab_size=32000 is more than this corpus supports" in ran.out + ran.err


def check_train_small(ran: Ran) -> None:
    config = _read_json(ran.dir, "runs", "small", "config.json")
    assert config["data"]["tokenizer"] == "sentencepiece" and config["model"]["vocab_size"] < 32000
    assert any('"val_loss"' in x for x in open(os.path.join(ran.dir, "runs", "small", "metrics.jsonl")))


def check_convert_gguf(ran: Ran) -> None:
    assert sorted(os.listdir(os.path.join(ran.dir, "runs", "smollm2"))) == ["checkpoints", "config.json", "tokenizer"]


def check_sample_smollm2(ran: Ran) -> None:
    assert ran.out.startswith(" Paris."), ran.out


def check_export_hf(ran: Ran) -> None:
    assert {"config.json", "model.safetensors"} <= set(os.listdir(os.path.join(ran.dir, "hf_export")))


def check_harness(ran: Ran) -> None:
    result = json.loads(ran.out)
    assert set(result) == {"made_lastword", "made_choice"} and 0 <= result["made_choice"]["acc"] <= 1, result


def check_export_tiny_hf(ran: Ran) -> None:
    assert os.path.isfile(os.path.join(ran.dir, "tiny_hf", "tokenizer.json"))


def check_eval_tiny(ran: Ran) -> None:
    assert _read_json(ran.dir, "runs", "tiny", "eval.json")["step"] == 20
    assert os.path.isfile(os.path.join(ran.dir, "runs", "tiny", "eval.md"))


def check_perplexity(ran: Ran) -> None:
    assert {"ppl", "bpb", "word_ppl"} <= set(json.loads(ran.out))


def check_bleu(ran: Ran) -> None:
    result = json.loads(ran.out)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100


def check_plot(ran: Ran) -> None:
    pngs = ran.out.split()
    assert any(p.endswith("loss.png") for p in pngs)
    assert all(os.path.isfile(os.path.join(ran.dir, p)) for p in pngs)


def exercise_human_eval_serve(ran: Ran) -> None:
    with urllib.request.urlopen(ran.url + "/?rater=readme", timeout=30) as r:
        page = r.read().decode()
    assert "ROMEO:" in page and "0 of 2 pairs rated" in page
    form = dict(re.findall(r'<input type=hidden name=(\w+) value="([^"]*)">', page))
    body = urllib.parse.urlencode({**form, "choice": "a", "comment": ""}).encode()
    with urllib.request.urlopen(ran.url + "/rate", data=body, timeout=30) as r:  # follows the 303
        assert "1 of 2 pairs rated" in r.read().decode()


def check_human_eval_report(ran: Ran) -> None:
    assert "1 rating(s) by 1 rater(s)" in ran.out and "95% CI" in ran.out


def exercise_serve_tiny(ran: Ran, runner: Runner, snippet: Step, lm_eval: Step) -> None:
    assert [m["id"] for m in _http(ran.url + "/v1/models")["data"]] == ["tiny"]
    printed = runner.run(snippet, [sys.executable, "-c", _command(snippet, "", runner.ports[snippet.after])])
    assert printed.out.strip("\n"), "the snippet printed no text"
    scored = runner.run(lm_eval, ["bash", "-c", _command(lm_eval, "", runner.ports[lm_eval.after])])
    assert "made_lastword" in scored.out and "acc" in scored.out, scored.out[-2000:]


def exercise_serve_smollm2(ran: Ran) -> None:
    model = _http(ran.url + "/v1/models")["data"][0]["id"]
    answer = _http(ran.url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0})
    assert "Paris" in answer["choices"][0]["message"]["content"], answer
    assert answer["usage"]["prompt_tokens"] > 20, answer  # the GGUF's chat template: system prompt, ChatML markers
    assert answer["choices"][0]["finish_reason"] == "stop", answer  # the model's end token, before max_tokens
    on = _http(ran.url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert on["choices"][0]["finish_reason"] == "length" and on["usage"]["completion_tokens"] == 24, on


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


TEST = "test_every_readme_command_runs"
_RUN: dict = {}  # the session's run of the commands, once submitted


def _run_commands(folder: str, gguf: str) -> tuple[dict, dict, float]:
    """Every README command that runs here: (each command's (wall, CPU) seconds, each command's exception or None,
    wall seconds in all)."""
    _write_user_files(folder)
    runner = Runner(folder, gguf)
    steps = {step.key: step for step in STEPS}

    def one(step: Step, before: concurrent.futures.Future | None) -> None:
        if before is not None and before.exception() is not None:
            raise DependencyFailed(f"not run: {step.after} failed")
        if step.kind == RUN:
            ran = runner.run(step)
        elif step.key == "serve_tiny":
            ran = runner.serve(step, lambda ran: exercise_serve_tiny(ran, runner, steps["openai_snippet"],
                                                                     steps["lm_eval_server"]))
        else:
            ran = runner.serve(step, globals()[f"exercise_{step.key}"])
        CHECKS.get(step.key, lambda ran: None)(ran)

    to_run = [s for s in STEPS if s.kind not in (NOT_RUN, SNIPPET) and (gguf or s.key not in NEEDS_GGUF)]
    start = time.perf_counter()
    futures: dict[str, concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(to_run)) as pool:
        # the longest first (mostly single-threaded XLA compiles), then README order, which submits what a step
        # needs before the step
        for step in sorted(to_run, key=lambda s: s.key not in LONGEST):
            futures[step.key] = pool.submit(one, step, futures.get(step.after))
    return runner.times, {k: f.exception() for k, f in futures.items()}, time.perf_counter() - start


def start_in_background(request, tmp_path_factory, submit) -> None:
    """Submits the commands' run when the test is selected (conftest.py calls this once and runs the job in the
    session's background thread)."""
    if not any(getattr(item, "originalname", None) == TEST for item in request.session.items):
        return
    try:
        gguf, _RUN["missing_gguf"] = request.getfixturevalue("smollm2_gguf"), ""
    except pytest.skip.Exception as e:
        gguf, _RUN["missing_gguf"] = "", str(e)
    # Ctrl-C reaches a command run in a terminal. A pytest started in the background of a script inherits SIGINT
    # ignored from the shell, and so would the commands; with a handler here they start with SIGINT at its default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _RUN["result"] = submit(_run_commands, str(tmp_path_factory.mktemp("readme")), gguf)


@pytest.mark.slow
def test_every_readme_command_runs():
    print("\n" + table_markdown())
    assert set(CHECKS) <= {step.key for step in STEPS}
    times, outcomes, wall = _RUN["result"].result()
    failures = {k: e for k, e in outcomes.items() if e is not None}
    cpu = sum(c for _, c in times.values())
    print(f"\n{len(outcomes)} commands in {wall:.0f} s, {cpu:.0f} CPU seconds (per command: wall/CPU s): "
          + ", ".join(f"{k} {w:.0f}/{c:.0f}" for k, (w, c) in sorted(times.items(), key=lambda x: -x[1][1])))
    broken = [f"README command {k} failed: {e}" for k, e in failures.items() if not isinstance(e, DependencyFailed)]
    skipped = [f"{k} ({e})" for k, e in failures.items() if isinstance(e, DependencyFailed)]
    assert not failures, "\n\n".join(broken + skipped)
    if _RUN["missing_gguf"]:
        pytest.skip(f"every other README command passed; not run: {sorted(NEEDS_GGUF)} ({_RUN['missing_gguf']})")


if __name__ == "__main__":
    print(table_markdown())
