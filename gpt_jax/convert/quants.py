"""Dequantization of GGML tensor data to float32, vectorized over blocks with numpy.

Each function takes the raw bytes of a tensor as a uint8 array whose size is a whole number of blocks and returns
the float32 values in file order (flat). Block layouts follow ggml's `block_*` structs (little-endian):

    Q8_0  d:f16, q:int8[32]                       w = d·q
    Q4_0  d:f16, qs:u8[16]                        w = d·(q − 8)
    Q4_1  d:f16, m:f16, qs:u8[16]                 w = d·q + m
    Q5_0  d:f16, qh:u32, qs:u8[16]                w = d·(q − 16)
    Q5_1  d:f16, m:f16, qh:u32, qs:u8[16]         w = d·q + m
    Q2_K … Q6_K: super-blocks of 256 with 6-bit or 8-bit sub-block scales (see each function).

In the 32-element formats, low nibbles hold elements 0–15 and high nibbles elements 16–31.
"""

from __future__ import annotations

import numpy as np

QK = 32  # elements per block of the simple formats
QK_K = 256  # elements per super-block of the K-quants


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes → [n, 32] values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """[n, count/8] bytes → [n, count] bits, least significant bit of each byte first."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[:, :count]


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size % block_bytes:
        raise ValueError(f"{data.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return data.reshape(-1, block_bytes)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    b = _blocks(data, 34)
    return (_f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    b = _blocks(data, 18)
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8.0
    return (_f16(b, 0) * q).reshape(-1)


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    b = _blocks(data, 20)
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)


def dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    b = _blocks(data, 22)
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return (_f16(b, 0) * (q.astype(np.float32) - 16.0)).reshape(-1)


def dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    b = _blocks(data, 24)
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return (_f16(b, 0) * q.astype(np.float32) + _f16(b, 2)).reshape(-1)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes → 8 six-bit scales and 8 six-bit mins, each [n, 8]."""
    p = packed.astype(np.uint8)
    scales = np.empty((p.shape[0], 8), np.uint8)
    mins = np.empty((p.shape[0], 8), np.uint8)
    scales[:, :4] = p[:, 0:4] & 63
    mins[:, :4] = p[:, 4:8] & 63
    scales[:, 4:] = (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    return scales.astype(np.float32), mins.astype(np.float32)


def dequantize_q2_k(data: np.ndarray) -> np.ndarray:
    """scales:u8[16] (low nibble scale, high nibble min), qs:u8[64], d:f16, dmin:f16; 16 sub-blocks of 16."""
    b = _blocks(data, 84)
    n = b.shape[0]
    sc = b[:, 0:16]
    qs = b[:, 16:80].reshape(n, 2, 1, 32)  # two halves of 128 elements, 32 bytes each
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).reshape(n, 16, 16).astype(np.float32)  # [half, shift, byte] → sub-blocks of 16
    d, dmin = _f16(b, 80), _f16(b, 82)
    scale = d * (sc & 0x0F).astype(np.float32)
    offset = dmin * (sc >> 4).astype(np.float32)
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(-1)


def dequantize_q3_k(data: np.ndarray) -> np.ndarray:
    """hmask:u8[32], qs:u8[64], scales:u8[12] (16 six-bit scales, offset 32), d:f16; 16 sub-blocks of 16."""
    b = _blocks(data, 110)
    n = b.shape[0]
    hmask = b[:, 0:32]
    qs = b[:, 32:96].reshape(n, 2, 1, 32)
    s = b[:, 96:108]
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=-1)  # [n, 16]
    high = (s[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3  # [n, 4, 4]
    scales = (low | (high.reshape(n, 16) << 4)).astype(np.float32) - 32.0
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((qs >> shifts) & 3).astype(np.int8)  # [n, half, shift, 32]
    # the high bit: bit (4·half + shift index) of hmask[byte]; a clear bit subtracts 4
    hbit = (hmask[:, None, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)) & 1
    q = (q - 4 * (1 - hbit.astype(np.int8))).reshape(n, 16, 16).astype(np.float32)
    return ((_f16(b, 108) * scales)[:, :, None] * q).reshape(-1)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """d:f16, dmin:f16, scales:u8[12], qs:u8[128]; 8 sub-blocks of 32 (pairs share 32 bytes: low, high)."""
    b = _blocks(data, 144)
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1)


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    """d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]; sub-block s takes its fifth bit from bit s of qh."""
    b = _blocks(data, 176)
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(n, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).astype(np.float32)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1)


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """ql:u8[128], qh:u8[64], scales:i8[16], d:f16; 16 sub-blocks of 16, values 6-bit minus 32.

    Each half of 128 elements uses 64 bytes of ql and 32 of qh: element 32·k + l (k = 0..3) takes the low
    (k even) or high (k odd) nibble of ql[l + 32·(k mod 2)] and bits 2k, 2k+1 of qh[l]."""
    b = _blocks(data, 210)
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, which 32 bytes, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.float32) - 32.0).reshape(n, 16, 16)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return ((_f16(b, 208) * scales)[:, :, None] * q).reshape(-1)


def _plain(dtype):
    def convert(data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).view(dtype).astype(np.float32)

    return convert


def _bf16(data: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8).view(np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32)


# type name (gguf.GGMLQuantizationType member name) → (elements per block, bytes per block, function)
DEQUANTIZERS = {
    "F32": (1, 4, _plain(np.float32)),
    "F16": (1, 2, _plain(np.float16)),
    "BF16": (1, 2, _bf16),
    "Q8_0": (32, 34, dequantize_q8_0),
    "Q4_0": (32, 18, dequantize_q4_0),
    "Q4_1": (32, 20, dequantize_q4_1),
    "Q5_0": (32, 22, dequantize_q5_0),
    "Q5_1": (32, 24, dequantize_q5_1),
    "Q2_K": (256, 84, dequantize_q2_k),
    "Q3_K": (256, 110, dequantize_q3_k),
    "Q4_K": (256, 144, dequantize_q4_k),
    "Q5_K": (256, 176, dequantize_q5_k),
    "Q6_K": (256, 210, dequantize_q6_k),
}


def dequantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """Raw tensor bytes of GGML type `type_name` → flat float32 values. KeyError for an unsupported type."""
    return DEQUANTIZERS[type_name][2](data)
