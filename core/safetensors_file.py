"""The safetensors file format, read and written without torch (the API image has none): the header, and tensors
as float32 numpy arrays, with bfloat16 converted bit for bit.

A file is an 8-byte little-endian header length, a JSON header (`{name: {"dtype", "shape", "data_offsets"}}` plus
an optional `__metadata__` of strings), then the tensors' bytes, contiguous. Only the float dtypes of model
weights are converted; the header of any dtype is read (and checked: offsets inside the file, sizes that match
the shapes), so an untrusted file can be refused before any tensor is read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit (safetensors refuses larger headers)
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})  # what `read_tensor` and `encode` convert


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    end: int  # absolute offset past the last byte


@dataclass(frozen=True)
class Header:
    raw: bytes  # the length prefix and the JSON header, as in the file
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(path: Path) -> Header:
    """The checked header of the safetensors file at `path`.

    Raises:
        SafetensorsError: not a safetensors file, or offsets, sizes or dtypes that do not add up.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError("the header length is larger than the file or the format's limit")
        text = handle.read(length)
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsError("the header is not JSON") from None
    if not isinstance(document, dict):
        raise SafetensorsError("the header is not a JSON object")
    return _header(prefix + text, document, size)


def _header(raw: bytes, document: dict[str, Any], size: int) -> Header:
    metadata = document.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError("`__metadata__` must map strings to strings")
    tensors = {name: _tensor(name, entry, len(raw)) for name, entry in document.items()}
    position = len(raw)
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise SafetensorsError("the tensors' bytes overlap or leave a gap")
        position = info.end
    if position != size:
        raise SafetensorsError(f"the tensors' bytes end at {position}, the file at {size}")
    return Header(raw=raw, tensors=tensors, metadata=metadata)


def _tensor(name: str, entry: Any, start: int) -> TensorInfo:
    if not isinstance(entry, dict) or entry.get("dtype") not in ITEM_BYTES:
        raise SafetensorsError(f"tensor {name!r}: missing or unknown dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"tensor {name!r}: bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise SafetensorsError(f"tensor {name!r}: bad data_offsets")
    if (
        not 0 <= offsets[0] <= offsets[1]
        or offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[entry["dtype"]]
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets do not match its shape and dtype")
    return TensorInfo(entry["dtype"], tuple(shape), start + offsets[0], start + offsets[1])


def read_tensor(handle: BinaryIO, info: TensorInfo) -> np.ndarray:
    """Tensor `info` of the open file `handle` as float32 (exact for F32, F16 and BF16).

    Raises:
        SafetensorsError: a dtype other than F32, F16, BF16.
    """
    handle.seek(info.begin)
    raw = handle.read(info.end - info.begin)
    if info.dtype == "F32":
        array = np.frombuffer(raw, dtype="<f4")
    elif info.dtype == "F16":
        array = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif info.dtype == "BF16":
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise SafetensorsError(f"dtype {info.dtype} is not a float dtype of weights")
    return array.reshape(info.shape)


def encode(array: np.ndarray, dtype: str) -> bytes:
    """The little-endian bytes of float32 `array` in `dtype`, rounded to nearest even (as torch casts).

    Raises:
        SafetensorsError: a dtype other than F32, F16, BF16.
    """
    values = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        return to_bfloat16_bits(values).astype("<u2").tobytes()
    raise SafetensorsError(f"dtype {dtype} is not a float dtype of weights")


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of bfloat16, round to nearest even; NaN stays a (quiet) NaN."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits >> 16) & 1  # in place from here: one temporary for a whole weight matrix
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    result = rounded.astype(np.uint16)
    result[np.isnan(values)] = 0x7FC0
    return result
