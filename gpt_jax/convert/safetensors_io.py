"""Reading and writing `.safetensors` files.

Reading parses the format directly (8-byte little-endian header length, JSON header, raw little-endian data) over a
memory map: it handles bfloat16 and float8 without torch, and a truncated or corrupt file becomes one clear error.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from gpt_jax.convert.common import ConversionError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (memory-mapped, in the stored dtype)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ConversionError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if data_start + end > size:
        raise ConversionError(f"{path}: truncated safetensors file: the header promises {data_start + end} bytes, "
                              f"the file holds {size}")
    data = np.memmap(path, np.uint8, "r") if size else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, stop = info["data_offsets"]
        try:
            tensors[name] = data[data_start + begin:data_start + stop].view(dtype).reshape(info["shape"])
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{path}: tensor {name} does not match its header entry ({e})") from None
    return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes float arrays as a safetensors file that transformers loads (metadata format "pt")."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the library creates the file private (0600); follow the umask like open()
