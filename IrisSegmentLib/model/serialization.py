"""Read and write the safetensors format with numpy alone.

Weights and task embeddings are files users pass around, so loading must never execute code
(no pickle). The format is a little-endian u64 header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes. Implemented here because inside Slicer the engine
may depend on torch and numpy only; Testing/ checks files against the `safetensors` package.
"""
from __future__ import annotations

import json
import os
import struct
import secrets
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor | np.ndarray], metadata: dict[str, str]) -> None:
    """Write atomically (temporary file, then rename), so a failure never leaves a partial file."""
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in tensors.items()}
    header: dict[str, object] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name in sorted(arrays):
        arr = np.asarray(arrays[name], order="C")  # not ascontiguousarray: it turns 0-d arrays into shape (1,)
        if arr.dtype not in _NAMES:
            raise TypeError(f"cannot store dtype {arr.dtype} for {name}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays[name] = arr
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(f".{secrets.token_hex(4)}.{path.name}.part")  # default file permissions, unlike mkstemp
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in sorted(arrays):
                f.write(arrays[name].astype(arrays[name].dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; anything malformed raises WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file.")
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError("file is shorter than a header")
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(_MAX_HEADER, len(data) - 8):
            raise ValueError("header length is out of range")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict):
            raise ValueError("the header's __metadata__ is not an object")
        body = memoryview(data)[8 + n :]
        tensors = {}
        for name, info in header.items():
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            if not 0 <= start <= stop <= len(body) or (stop - start) != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"tensor {name!r} does not fit its byte range")
            arr = np.frombuffer(body[start:stop], dtype=dtype).reshape(shape)
            tensors[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise WeightsError(
            f"{path}: not a valid safetensors file ({exc}). It may be truncated or in another format; "
            "use a file written by IrisSegment."
        ) from None
    if not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: the file's metadata is malformed.")
    return tensors, metadata
