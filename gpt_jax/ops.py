"""Kernels and backend choices, kept out of the model's architecture: the matmul with low-precision inputs, and
attention dispatched per backend (cuDNN flash attention on GPUs, query blocks on CPUs).

Measured facts behind the choices (BENCHMARKS.md): XLA:CPU runs the weight-gradient matmuls of 2-D inputs much
faster than 3-D einsums; bf16 inputs with float32 accumulation pay on CPU only when the backward dots take bf16
too; bf16 attention is slower than float32 on CPU; causal attention by query blocks of 64 gave 1.11x the tokens/s
of the full square at seq 256.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gpt_jax import cpu_kernel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
INT8_ROW_BY_ROW = 8  # int8 products of up to this many rows are computed one row at a time (`_packed_product_of`)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that multiply bf16 in hardware


def auto_dtypes(platform: str | None = None, cpu_flags: frozenset[str] | None = None,
                compute_capability: str | None = None) -> dict[str, str]:
    """What `model.dtype` and `model.activation_dtype` = "auto" stand for on `platform` (default: this process's
    devices). TPUs and GPUs: bfloat16 for both, except NVIDIA GPUs older than Ampere (compute capability below 8,
    e.g. a T4 or V100: no bf16 tensor cores), which keep float32. CPUs: float32 activations, and bfloat16 matmul
    inputs only where the CPU multiplies bf16 in hardware (`CPU_BF16_FLAGS`). SmolLM2-135M full fine-tuning at
    batch 8 x 256 on a 2-core AMX Xeon: bf16 matmul inputs 1.4x the tokens/s of float32; bf16 activations on top
    added nothing and moved the loss further from float32's (BENCHMARKS.md). bf16 training on a CPU without those
    flags is not measured, so float32 stays there."""
    if platform is None:
        device = jax.devices()[0]
        platform, compute_capability = device.platform, getattr(device, "compute_capability", None)
    if platform == "cpu":
        flags = cpu_kernel.cpu_flags() if cpu_flags is None else cpu_flags
        return {"dtype": "bfloat16" if flags & set(CPU_BF16_FLAGS) else "float32", "activation_dtype": "float32"}
    try:
        pre_ampere = float(compute_capability) < 8
    except (TypeError, ValueError):  # not NVIDIA's form (a TPU, an AMD GPU's gfx name)
        pre_ampere = False
    dtype = "float32" if pre_ampere else "bfloat16"
    return {"dtype": dtype, "activation_dtype": dtype}


def _dot(x, w, w_axis: int, out_dtype=None):
    """x [m, k] times w contracted over its axis `w_axis` (0: w is [k, n]; 1: w is [n, k], read as it is stored).
    Written as a dot_general, never as a dot with a transposed operand: XLA:CPU runs a bf16 dot whose operand is a
    transpose in float32, at less than half the rate (BENCHMARKS.md). One row against a stored [n, k] weight (the
    tied head while a lone stream decodes) is the exception: written with the transpose, XLA:CPU reads the bf16
    table once in a fused loop (3.5 ms for SmolLM2's head), where the dot_general first copies it to float32 (49 ms)."""
    if x.shape[0] == 1 and w_axis == 1:
        return jnp.dot(x, w.T, preferred_element_type=out_dtype)
    return jax.lax.dot_general(x, w, (((1,), (w_axis,)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_low_precision(x, w, w_axis: int):
    """x [m, k] @ w with bf16/f16 inputs and float32 accumulation and output. Its backward dots take
    low-precision inputs too (plain autodiff would feed them the float32 cotangent, i.e. float32 dots)."""
    return _dot(x, w, w_axis, jnp.float32)


def _matmul_fwd(x, w, w_axis):
    return _matmul_low_precision(x, w, w_axis), (x, w)


def _matmul_bwd(w_axis, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = _dot(g, w, 1 - w_axis, jnp.float32).astype(x.dtype)
    dw_nk = jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [n, k]
    return dx, (dw_nk.T if w_axis == 0 else dw_nk).astype(w.dtype)


_matmul_low_precision.defvjp(_matmul_fwd, _matmul_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LowRankUpdate:
    """A kernel W + scale·A@B kept factored (LoRA): matmul computes x@W + scale·(x@A)@B, so W is never copied and
    its gradient never formed; only A [k, rank] and B [rank, n] are differentiated. It stands where a kernel array
    does (`kernel[...]` gives itself)."""

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    def __getitem__(self, key):
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedKernel:
    """A matmul weight stored for inference (`workdir.with_weights`): `values` [n, k] hold each of the n output
    channels' k weights side by side (a kernel [k, n] transposed; an embedding table [vocab, d] as it is, its rows
    being the tied head's output channels), in bfloat16, or in int8 with a float32 `scale` per output channel
    (weight-only quantization, w ≈ values·scale, no float copy kept). The layout is the one XLA:CPU's one-row
    product reads fastest (`_packed_product_of`). It stands where a kernel array does (`kernel[...]` gives
    itself)."""

    values: jax.Array
    scale: jax.Array | None = None

    def __getitem__(self, key):
        return self


def pack(w, dtype, *, int8: bool = False, transposed: bool = False) -> PackedKernel:
    """A kernel w [k, n] (or [n, k] if `transposed`) as a `PackedKernel` in `dtype`, or with `int8` symmetric int8
    per output channel (its largest magnitude maps to 127)."""
    w = jnp.asarray(w, jnp.float32)
    w = w if transposed else w.T
    if not int8:
        return PackedKernel(w.astype(dtype))
    scale = jnp.max(jnp.abs(w), axis=1) / 127.0
    q = jnp.round(w / jnp.where(scale > 0, scale, 1.0)[:, None])
    return PackedKernel(jnp.clip(q, -127, 127).astype(jnp.int8), scale)


def _cpu_kernel() -> bool:
    """Whether this computation runs on a CPU where the CPU kernel is built (`cpu_kernel.available`)."""
    return jax.default_backend() == "cpu" and cpu_kernel.available()


def on_cpu_kernel(rows: int, values) -> bool:
    """Whether the CPU kernel multiplies `rows` rows by packed `values`: up to cpu_kernel.MAX_ROWS rows (a decode
    step's streams) where it builds, except one row by float32 weights, which XLA's loop streams faster (SmolLM2's
    decode products in one chain: 19.0 vs 23.1 ms)."""
    return rows <= cpu_kernel.MAX_ROWS and (rows > 1 or values.dtype != jnp.float32) and _cpu_kernel()


def packed_products(x, kernels: list[PackedKernel], compute_dtype) -> list:
    """x [m, k] times each of `kernels` (`PackedKernel`s) → [float32 [m, n_i]]. The CPU kernel (`on_cpu_kernel`)
    computes them in one call, int8 scales applied (a layer's query, key and value, or gate and up: SmolLM2's
    decode chain at one row in bf16 11.1 -> 10.6 ms, int8 8.8 -> 7.1 ms against XLA's loop, at 8 rows int8 15.0 ->
    14.2 ms against one call per product); else each is `_packed_product_of`."""
    values = [w.values for w in kernels]
    if on_cpu_kernel(x.shape[0], values[0]) and len({v.dtype for v in values}) == 1:
        return cpu_kernel.products(x, values, [w.scale for w in kernels] if values[0].dtype == jnp.int8 else None)
    products = [_packed_product_of(x, v, compute_dtype) for v in values]
    return [y if w.scale is None else y * w.scale for y, w in zip(products, kernels, strict=True)]


def _packed_product_of(x, values, compute_dtype):
    """x [m, k] times values [n, k] over k → float32 [m, n] with XLA: a dot_general in the compute dtype, where
    bfloat16 and int8 weights multiply in bfloat16 (int8 values are exact in it; converting them to float32 instead
    made the product 2x slower on a CPU: 30 products of 16 rows by SmolLM2's MLP shape, 48 vs 25 ms), except for a
    few rows on a CPU (where the CPU kernel does not run them). There one row is written as dot(x, values.T) in
    float32, which XLA:CPU makes one loop, fused with the conversion, reading the weight once in its stored type
    (SmolLM2's 210 decode products and head in one chain: bf16 12.3 ms, int8 11.5 ms; float32 kernels [k, n] 30.1
    ms; a one-row bf16 or int8 dot_general 171 and 176 ms, as it copies the weight to float32 first); an int8
    product of up to INT8_ROW_BY_ROW rows is that loop once per row (the engine's 8 streams: 178 tok/s, against 34
    converting the weight to float32 for one product). The CPU kernel's 8 rows: bf16 35.5 -> 17.8 ms, int8 37.1 ->
    16.9 ms, float32 53.6 [k, n] -> 22.7 ms packed."""
    rows, cpu = x.shape[0], jax.default_backend() == "cpu"
    if cpu and values.dtype == jnp.int8 and 1 < rows <= INT8_ROW_BY_ROW:
        return jnp.concatenate([_packed_product_of(x[i:i + 1], values, compute_dtype) for i in range(rows)])
    if cpu and rows == 1:
        # XLA:CPU fuses x's elementwise producers (a norm's scale, the attention output's transpose, SiLU) into
        # the loop and recomputes them for every weight; a reduction never is, so x is summed with zeros once
        x = jnp.stack([x.astype(jnp.float32), jnp.zeros(x.shape, jnp.float32)]).sum(0)
        return jnp.dot(x, values.T.astype(jnp.float32))
    dtype = jnp.bfloat16 if values.dtype in (jnp.bfloat16, jnp.int8) else compute_dtype
    return _dot(x.astype(dtype), values.astype(dtype), 1, jnp.float32)


def argmax(x):
    """jnp.argmax of x [rows, n] over its last axis (int32), by the CPU kernel on a CPU: XLA:CPU's reduction takes
    ~0.3 ms over SmolLM2's 49152 logits, 3-4% of a one-stream decode step."""
    if x.ndim == 2 and _cpu_kernel():
        return cpu_kernel.argmax(x)
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def take_rows(table, ids):
    """Rows `ids` of an embedding table (an array, or a `PackedKernel`) as float32 or its dtype. A packed table's
    rows come from the CPU kernel where it runs: inside a loop of decode steps XLA:CPU gathers from a bf16 table by
    converting all of it to float32 once per call (1.7x the time of a one-row step of SmolLM2)."""
    if isinstance(table, PackedKernel):
        if _cpu_kernel():
            return cpu_kernel.take_rows(table.values, ids, table.scale)
        rows = jnp.take(table.values, ids, axis=0)
        if table.scale is None:
            return rows
        return rows.astype(jnp.float32) * jnp.take(table.scale, ids, axis=0)[..., None]
    return jnp.take(table, ids, axis=0)


def matmul(x, w, dtype: str, *, transposed: bool = False):
    """x [m, k] @ w [k, n] → float32 [m, n], with inputs cast to the compute dtype (float32 | bfloat16 | float16).
    `transposed`: w is stored [n, k] (an embedding table read as the tied output head) and is contracted over its
    last axis where it lies, never copied transposed. A bfloat16 weight is read as it is: with a float32 compute
    dtype x is cast to bfloat16 instead (float32 accumulation either way), so the weight is never copied to
    float32."""
    if isinstance(w, LowRankUpdate):
        assert not transposed, "LoRA adapts kernels [k, n]"
        return matmul(x, w.base, dtype) + w.scale * matmul(matmul(x, w.a, dtype), w.b, dtype)
    if isinstance(w, PackedKernel):  # stored [n, k] whichever it was
        return packed_products(x, [w], DTYPES[dtype])[0]
    if w.dtype == jnp.bfloat16 and DTYPES[dtype] == jnp.float32:
        dtype = "bfloat16"
    if DTYPES[dtype] == jnp.float32:
        return _dot(x.astype(jnp.float32), w.astype(jnp.float32), int(transposed))
    return _matmul_low_precision(x.astype(DTYPES[dtype]), w.astype(DTYPES[dtype]), int(transposed))


def matmuls(x, kernels: list, dtype: str) -> list:
    """[matmul(x, w, dtype) for w in kernels]: products of one input, computed in one pass over packed weights
    (`packed_products`), each on its own otherwise."""
    if all(isinstance(w, PackedKernel) for w in kernels):
        return packed_products(x, kernels, DTYPES[dtype])
    return [matmul(x, w, dtype) for w in kernels]


def causal_attention_by_query_blocks(q, k, v, block: int):
    """Causal attention computed one block of `block` queries at a time, each against the keys up to its last
    query only: the score, softmax and value products skip the upper triangle (5/8 of the full square's work at
    4 blocks). Same result as full causal attention."""
    seq = q.shape[1]
    outs = []
    for start in range(0, seq, block):
        stop = min(start + block, seq)
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]  # [queries, keys]
        outs.append(jax.nn.dot_product_attention(q[:, start:stop], k[:, :stop], v[:, :stop],
                                                 mask=causal[None, None], implementation="xla"))
    return jnp.concatenate(outs, axis=1)


def attention(q, k, v, dtype: str, *, causal: bool = False, mask=None, out_dtype=jnp.float32, query_block: int = 64):
    """Softmax attention: q [batch, seq, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] (grouped-query
    attention when kv_heads < heads), `mask` [batch, 1, seq, kv_len] True where a query may attend.

    GPUs in bf16/f16 use cuDNN's flash attention; CPUs compute in float32, and causal self-attention over more than
    `query_block` positions (training and evaluation; 0 = never) goes by query blocks."""
    compute = DTYPES[dtype]
    backend = jax.default_backend()
    if backend == "cpu":
        compute = jnp.float32
        if causal and mask is None and q.shape[1] == k.shape[1] and 0 < query_block < q.shape[1]:
            q, k, v = (x.astype(compute) for x in (q, k, v))
            return causal_attention_by_query_blocks(q, k, v, query_block).astype(out_dtype)
    implementation = "cudnn" if backend == "gpu" and compute != jnp.float32 and mask is None else None
    y = jax.nn.dot_product_attention(q.astype(compute), k.astype(compute), v.astype(compute), is_causal=causal,
                                     mask=mask, implementation=implementation)
    return y.astype(out_dtype)


def attention_over_cache(q, k, v, mask, *, out_dtype=jnp.float32):
    """Softmax attention of q [batch, seq, heads, head_dim] over a KV cache (`model.init_cache`'s layout: k [batch,
    kv_heads, head_dim, slots], v [batch, kv_heads, slots, head_dim]) where mask [batch, seq, slots] is True.
    Both products read the cache in its own type and layout (bfloat16 caches multiply in bfloat16), accumulating
    and taking the softmax in float32."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads  # query heads per key/value head
    q = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)  # [batch, kv_heads, seq, group, hd]
    q = q.reshape(batch, kv_heads, seq * group, head_dim).astype(k.dtype)
    scores = jnp.einsum("bkqd,bkds->bkqs", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores = scores.reshape(batch, kv_heads, seq, group, -1)
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, seq * group, -1)
    y = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    y = y.reshape(batch, kv_heads, seq, group, head_dim).transpose(0, 2, 1, 3, 4)
    return y.reshape(batch, seq, heads, head_dim).astype(out_dtype)


def attention_of_new_positions(q, cache, cache_index, dtype, out_dtype):
    """Attention of one new position per row, q [batch, 1, heads, head_dim], over a KV cache (`model.init_cache`'s
    layout and rows, `dtype` its type) where row b attends to its slots up to cache_index[b]. On a CPU the kernel
    (`cpu_kernel.attend`) reads the slots in use in place; elsewhere `attention_over_cache` reads all of the
    batch's rows and slots with a mask."""
    batch = q.shape[0]
    if jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and _cpu_kernel():
        return cpu_kernel.attend(q[:, 0], cache["k"], cache["v"], cache_index + 1, dtype)[:, None].astype(out_dtype)
    keys, values = (from_bits(cache[name][:batch], dtype) for name in ("k", "v"))
    mask = jnp.arange(keys.shape[-1])[None, None, :] <= cache_index[:, None, None]  # [batch, 1, slots]
    return attention_over_cache(q, keys, values, mask, out_dtype=out_dtype)


def as_bits(x):
    """A 16-bit float array as its bits (uint16), other arrays as they are. XLA:CPU writes into a bfloat16 array by
    converting all of it to float32 and back, so the KV cache keeps 16-bit floats as bits (see model.init_cache)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def from_bits(x, dtype):
    """The values of `as_bits(values of dtype)`."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x
