"""Host memory: keep freed memory for reuse instead of handing it back to the kernel every step.

XLA:CPU allocates each execution's temporary buffer afresh (750 MB per step for a 6-layer d384 model at batch
8 x 256) and glibc serves blocks that large with `mmap`, so every step maps new pages, faults each one in
(the kernel zeroes it) and unmaps it again: ~187,000 page faults per step there, ~12,000 for the 4-layer
shakespeare_char model. `keep_freed_memory()` sets glibc's malloc to one arena, no `mmap` for large blocks and
no trimming, so a step reuses the pages the step before it freed. Resident memory then stays at its peak
instead of falling between steps, which is what a training or serving process wants. The reuse needs a step's
block freed before the next step asks for its own; the CPU training loop waits for that (`wait_until_in_use_below`).

It must run before other threads start allocating (a thread keeps the arena it first used): call it first thing
in a process, before importing JAX or TensorFlow. Elsewhere than Linux with glibc it does nothing. Set
GPT_JAX_MALLOC=system to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Configures glibc malloc as described above; True when it took effect (once per process)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    mallopt = None if os.environ.get("GPT_JAX_MALLOC", "").lower() == "system" else _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (mallopt(3))
    _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied


def release_freed_memory() -> None:
    """Hands the freed pages of the heap back to the kernel now (glibc's `malloc_trim(0)`), once, when a run's setup
    and compile are done: their memory is free again but scattered between live blocks, where a step's temporaries
    (one large block) do not fit. They then take fresh pages instead of adding to the freed ones; later steps reuse
    theirs as above. Elsewhere than glibc it does nothing."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2
    return mallinfo2


def in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc 2.33+'s `mallinfo2`: uordblks + hblkhd), or None where
    it cannot tell."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def wait_until_in_use_below(limit: int, timeout_s: float = 1.0) -> bool:
    """Polls `in_use()` every millisecond until it is at most `limit` bytes or `timeout_s` has passed; True when it
    got there. XLA:CPU frees an execution's temporaries on one of its threads just after the outputs are ready
    (within ~10 ms; often still allocated when `block_until_ready` returns): a loop that waits for a step's outputs
    and dispatches the next one can have the next step's temporaries allocated while the last one's still are, and
    with the settings above the heap then keeps both for the rest of the run (SmolLM2-135M full fine-tuning, 4.4
    GiB of temporaries a step: 7.8 GB peak resident, but 12.6-17.5 GB in 4 of 13 runs before the loop waited)."""
    deadline = time.perf_counter() + timeout_s
    while (used := in_use()) is not None and used > limit:
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.001)
    return True


def _glibc(name: str):
    """The function `name` of the C library already loaded into this process, or None off Linux or without it (not
    glibc: musl has no mallopt or malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
