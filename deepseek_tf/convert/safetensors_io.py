"""Reading and writing `.safetensors` files with numpy only (never pickle).

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw little-endian data.
bfloat16 and float8 come from `ml_dtypes` (a TensorFlow dependency), so bf16
checkpoints read without torch.

Example:
    >>> write_safetensors("/tmp/m.safetensors", {"w": np.ones((2, 3), np.float32)})
    >>> SafetensorsDir("/tmp").load("w").shape
    (2, 3)
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset of the data section)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"cannot read safetensors file {path}: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsDir:
    """All tensors of the `*.safetensors` files in a directory, loaded on demand.

    Args:
      directory: a Hugging Face model directory.
    """

    def __init__(self, directory: str):
        self.files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not self.files:
            pickles = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(
                os.path.join(directory, "*.pt"))
            extra = (" (found PyTorch pickle files, which are never loaded: re-save the model "
                     "with save_pretrained(..., safe_serialization=True))" if pickles else "")
            raise UserError(f"no *.safetensors files in {directory}{extra}.")
        self.index: dict[str, tuple[str, dict, int]] = {}
        for path in self.files:
            header, start = read_header(path)
            for name, info in header.items():
                self.index[name] = (path, info, start)
        self._maps = {}

    def names(self) -> list[str]:
        return sorted(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name][1]["shape"])

    def load(self, name: str) -> np.ndarray:
        path, info, start = self.index[name]
        if info["dtype"] not in DTYPES:
            raise UserError(f"tensor {name} in {path} has unsupported dtype {info['dtype']}.")
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = info["data_offsets"]
        buf = self._maps[path][start + begin:start + end]
        return np.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array) to `path` atomically (temp file + rename)."""
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).astype(
                tensors[name].dtype.newbyteorder("<"), copy=False).tobytes())
