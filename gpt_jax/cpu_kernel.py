"""The decode step's products and attention on a CPU as a kernel of our own (`cpu_kernel.cc`), compiled on first use
with the system's C++ compiler and registered with XLA as custom calls.

A decode step multiplies 1-8 rows (the streams being served) by every weight once. XLA:CPU runs that product at its
small-batch GEMM rate, after converting a bf16 or int8 weight to float32 (BENCHMARKS.md); the kernel reads each weight
row once in its stored type and multiplies it with all the rows, the weights of one input (query, key and value;
gate and up) in one call, split over XLA's intra-op threads. One float32 row stays with XLA, whose fused loop streams
it faster, and so do products of more rows (prompts), which XLA's GEMM does well. Its attention reads each row's
slots in use of the KV cache in place, where XLA reads every slot (masked) and converts a bf16 cache to float32 per
layer. It also takes the rows of a packed embedding table and the greedy token, which XLA:CPU does slowly.

The kernel needs an x86-64 CPU with AVX-512 (the x86-64-v4 level: F, BW, CD, DQ, VL) and a C++17 compiler (`$CXX`,
else `c++`); without them, or with GPT_JAX_CPU_KERNEL=0, `ops` computes the same with XLA. The library is built for
x86-64-v4, not for this CPU alone (as fast here as -march=native), once per source, jaxlib version and compiler,
into $GPT_JAX_CACHE/kernels (~/.cache/gpt_jax/kernels). GPT_JAX_CPU_KERNEL_LIBRARY names a library built beforehand
for this source and jaxlib (the server image builds it in a stage of its own and ships no compiler).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging

from gpt_jax.config import cached

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
MAX_ROWS = 8  # products of up to MAX_ROWS rows go to the kernel
_AVX512 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
_TARGETS = {jnp.dtype(jnp.bfloat16): "GptJaxProductBF16", jnp.dtype(jnp.int8): "GptJaxProductS8",
            jnp.dtype(jnp.float32): "GptJaxProductF32"}
_ROWS = {jnp.dtype(jnp.bfloat16): "GptJaxRowsBF16", jnp.dtype(jnp.int8): "GptJaxRowsS8",
         jnp.dtype(jnp.float32): "GptJaxRowsF32"}
_ATTEND = {jnp.dtype(jnp.bfloat16): "GptJaxAttendBF16", jnp.dtype(jnp.float32): "GptJaxAttendF32"}  # by cache type


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supported() -> bool:
    """Whether this CPU has what the kernel needs (x86-64-v4's AVX-512 F, BW, CD, DQ, VL)."""
    return platform.machine().lower() in ("x86_64", "amd64") and set(_AVX512) <= cpu_flags()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def buildable() -> bool:
    """Whether the kernel can be built here: a CPU it runs on (`cpu_supported`) and a C++ compiler."""
    return cpu_supported() and _compiler() is not None


def _build() -> str:
    """The path of the compiled library: GPT_JAX_CPU_KERNEL_LIBRARY's, else the one built for this source, jaxlib
    and compiler (built now if there is none yet)."""
    prebuilt = os.environ.get("GPT_JAX_CPU_KERNEL_LIBRARY")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            raise RuntimeError(f"GPT_JAX_CPU_KERNEL_LIBRARY={prebuilt}: no such file")
        return prebuilt
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + jaxlib.__version__.encode() + version.encode())
    folder = cached("kernels")
    path = os.path.join(folder, f"cpu_kernel-{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then moved in: processes may race here
        out = os.path.join(tmp, "cpu_kernel.so")
        build = subprocess.run([compiler, "-O3", "-march=x86-64-v4", "-std=c++17", "-shared", "-fPIC", "-w",
                                f"-I{jax.ffi.include_dir()}", SOURCE, "-o", out], capture_output=True, text=True)
        if build.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {build.stderr.strip().splitlines()[-1:]}")
        os.replace(out, path)
    logging.info("built the CPU decode kernel in %.1f s: %s", time.perf_counter() - start, path)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call; a failed build is
    logged once and XLA computes the products and attention)."""
    if os.environ.get("GPT_JAX_CPU_KERNEL", "1") == "0" or not cpu_supported():
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build())
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        logging.warning("the CPU decode kernel is not used (%s); XLA computes what it would", e)
        return False
    for name in (*_TARGETS.values(), *_ROWS.values(), *_ATTEND.values(), "GptJaxArgmax"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


def products(x, weights, scales=None):
    """x [m, k] times each of weights [n_i, k] (of one type: bfloat16, int8 or float32) over k → [float32 [m, n_i]],
    in one call (their output channels split over the threads together), times `scales` [n_i] of int8 weights per
    output channel; for m <= MAX_ROWS where `available()`."""
    call = jax.ffi.ffi_call(_TARGETS[jnp.dtype(weights[0].dtype)],
                            [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w in weights],
                            vmap_method="sequential")
    args = weights if scales is None else [a for pair in zip(weights, scales, strict=True) for a in pair]
    return list(call(x.astype(jnp.float32), *args))


def take_rows(values, ids, scale=None):
    """Rows `ids` (int, any shape) of values [n, k] (bfloat16, int8 or float32) as float32 [*ids.shape, k], times
    `scale` [n] of int8 values per row, by the kernel."""
    call = jax.ffi.ffi_call(_ROWS[jnp.dtype(values.dtype)], jax.ShapeDtypeStruct((ids.size, values.shape[1]),
                                                                                 jnp.float32),
                            vmap_method="sequential")
    args = (values,) if scale is None else (values, scale)
    return call(ids.reshape(-1).astype(jnp.int32), *args).reshape(*ids.shape, values.shape[1])


def attend(q, keys, values, lengths, dtype):
    """Softmax attention of one new position per row over the KV cache, by the kernel: q [batch, heads, head_dim];
    keys [rows, kv_heads, head_dim, slots] and values [rows, kv_heads, slots, head_dim] as `model.init_cache` keeps
    them (rows >= batch; a `dtype` bfloat16 cache as its bits); row b attends to its slots < lengths[b]. Only the
    slots in use are read, and the cache is read in place. → float32 [batch, heads, head_dim]."""
    call = jax.ffi.ffi_call(_ATTEND[jnp.dtype(dtype)], jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q.astype(jnp.float32), keys, values, lengths.astype(jnp.int32))


def argmax(x):
    """The index of each row's largest value in x [rows, n] (float32; the first of equals, as jnp.argmax for rows
    without NaN) → int32 [rows], by the kernel."""
    call = jax.ffi.ffi_call("GptJaxArgmax", jax.ShapeDtypeStruct(x.shape[:1], jnp.int32), vmap_method="sequential")
    return call(x.astype(jnp.float32))
