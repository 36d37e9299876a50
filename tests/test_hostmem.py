"""gpt_jax.hostmem: with it, a process that allocates and frees the same large block every step stops faulting
fresh pages in; without it (GPT_JAX_MALLOC=system) glibc maps and unmaps the block each time."""

import json
import os
import subprocess
import sys

import pytest

_SNIPPET = r"""
import ctypes, json, resource, threading
from gpt_jax import hostmem
applied = hostmem.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)

def step():  # what XLA does with an execution's temporary buffer: allocate, write all of it, free
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)
    libc.free(p)

faults = []
def worker():  # allocate from a second thread too: XLA's executions run on its own threads
    for _ in range(2):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)

t = threading.Thread(target=worker); t.start(); t.join()
print(json.dumps({"applied": applied, "faults_per_step": faults[0]}))
"""


def _run(malloc_env: str | None) -> dict:
    env = dict(os.environ)
    env.pop("GPT_JAX_MALLOC", None)
    if malloc_env:
        env["GPT_JAX_MALLOC"] = malloc_env
    out = subprocess.run([sys.executable, "-c", _SNIPPET], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_keep_freed_memory_stops_per_step_page_faults():
    kept = _run(None)
    system = _run("system")
    if not kept["applied"]:
        pytest.skip("this libc has no mallopt (not glibc)")
    assert system["applied"] is False
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    # glibc's default: the 64 MiB block is mmap'd afresh each step, so every page faults (every 2 MiB page where
    # transparent huge pages are always on); kept: the freed block is reused, so (almost) nothing faults
    assert system["faults_per_step"] >= min(0.9 * pages, 16), system
    assert kept["faults_per_step"] < min(0.02 * pages, system["faults_per_step"] / 10), (kept, system)


_RELEASE = r"""
import ctypes, json
from gpt_jax import hostmem
applied = hostmem.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

# blocks a setup and a compiler leave behind: many of them, each freed but the last, which stays live above them
blocks = [libc.malloc(2**20) for _ in range(256)]
for p in blocks:
    ctypes.memset(p, 1, 2**20)
for p in blocks[:-1]:
    libc.free(p)
kept = rss()
hostmem.release_freed_memory()
print(json.dumps({"applied": applied, "kept": kept, "released": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_release_freed_memory_hands_the_kept_pages_back():
    """With freed memory kept, 255 MiB of freed blocks below a live one stay resident until
    release_freed_memory(), which the train loop calls after setup and after compiling its step."""
    out = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["applied"]:
        pytest.skip("this libc has no mallopt (not glibc)")
    assert result["kept"] - result["released"] > 200 * 2**20, result


_TEMPORARIES = r"""
import json
from gpt_jax import hostmem
hostmem.keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def step(a, b):  # a [n, 8] @ b [8, n]: ~0.6 GB of temporaries for 2 GFLOP
    return jnp.sin(a @ b).sum()

a = jnp.ones((12000, 8), jnp.float32)
temp = step.lower(a, a.T).compile().memory_analysis().temp_size_in_bytes
rows = []
for _ in range(10):
    before = hostmem.in_use()  # with the wait below, the step before's temporaries are not counted here
    step(a, a.T).block_until_ready()
    at_ready = hostmem.in_use()
    freed = hostmem.wait_until_in_use_below(before + temp // 2)
    rows.append([at_ready - before, hostmem.in_use() - before, freed])
print(json.dumps({"temp": temp, "rows": rows}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc statistics are Linux-only")
def test_waiting_until_a_steps_temporaries_are_freed():
    """XLA:CPU frees an execution's temporaries on its own thread just after the outputs are ready; the training
    loop waits for that (`wait_until_in_use_below`) before it dispatches the next step, which would otherwise
    allocate its own while they are still held. `at ready` is printed to show how often they still were."""
    out = subprocess.run([sys.executable, "-c", _TEMPORARIES], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    temp, rows = result["temp"], result["rows"]
    if rows[0][0] is None:
        pytest.skip("this libc has no mallinfo2 (not glibc 2.33+)")
    assert temp > 256 * 2**20
    print("MiB in use beyond the step's start, at ready / after the wait:",
          [(round(a / 2**20), round(b / 2**20)) for a, b, _ in rows])
    assert all(freed for _, _, freed in rows), rows
    assert max(after for _, after, _ in rows) < temp / 2, rows
