"""Reading and writing `.safetensors` files and sharded HF checkpoints (never pickle).

Plain dtypes (F32, F16, BF16, integers) go through the `safetensors` library's numpy
API. What it lacks, and we keep: float8 tensors (its numpy API has no F8_E4M3 /
F8_E5M2: numpy has no float8; `ml_dtypes`, a TensorFlow dependency, does), read with
`np.fromfile` at the header's offset and written by `write_safetensors`; a check that
a shard is not truncated (the library maps the file and fails later, or not at all,
on the tensor that runs past its end); and `model.safetensors.index.json` (a shard it
names that is missing is an error, not a silently smaller model).

Example:
    >>> write_safetensors("/tmp/m.safetensors", {"w": np.ones((2, 3), np.float32)})
    >>> SafetensorsDir("/tmp").load("w").shape
    (2, 3)
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
          "F8_E8M0": ml_dtypes.float8_e8m0fnu}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
OWN_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")  # the library's numpy API cannot read these
INDEX_FILE = "model.safetensors.index.json"


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset of the data section).

    A file shorter than its header says (a truncated download or copy) is a UserError.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise UserError(f"cannot read safetensors file {path}: {e}") from e
    header.pop("__metadata__", None)
    end = max([info["data_offsets"][1] for info in header.values()] + [0])
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated ({size:,} bytes, its header needs "
                        f"{8 + n + end:,}): download or copy it again.")
    return header, 8 + n


class ShardFile:
    """One `.safetensors` file: header read at once, tensors loaded one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.header, self.start = read_header(path)
        self.size = os.path.getsize(path)
        self._file = None

    def names(self) -> list[str]:
        return sorted(self.header)

    def load(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise UserError(f"tensor {name} in {self.path} has unsupported dtype "
                            f"{info['dtype']}.")
        if info["dtype"] in OWN_DTYPES:
            begin, end = info["data_offsets"]
            dtype = np.dtype(DTYPES[info["dtype"]])
            a = np.fromfile(self.path, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=self.start + begin)
            return a.reshape(info["shape"])
        if self._file is None:
            self._file = safe_open(self.path, framework="numpy")
        return self._file.get_tensor(name)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `name` (axis 0), read alone from the file."""
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise UserError(f"tensor {name} in {self.path} has unsupported dtype "
                            f"{info['dtype']}.")
        dtype = np.dtype(DTYPES[info["dtype"]])
        row = int(np.prod(info["shape"][1:])) if len(info["shape"]) > 1 else 1
        a = np.fromfile(self.path, dtype=dtype, count=(stop - start) * row,
                        offset=self.start + info["data_offsets"][0] + start * row * dtype.itemsize)
        return a.reshape([stop - start] + list(info["shape"][1:]))

    def close(self) -> None:
        self._file = None  # the library unmaps the file when its handle is dropped


class SafetensorsDir:
    """All tensors of a Hugging Face model directory, loaded on demand.

    With `model.safetensors.index.json` the shards are those it names (each must
    exist and hold the tensors the index says); without it, every `*.safetensors`.

    Args:
      directory: a Hugging Face model directory.
      rename: maps a stored tensor name to the name it is known by here (None: the
        tensor is skipped), e.g. `hf_v4.from_release_name`; default: as stored.
    """

    def __init__(self, directory: str, rename=None):
        index = os.path.join(directory, INDEX_FILE)
        self._expected: dict[str, str] = {}  # tensor -> shard, as the index says
        if os.path.exists(index):
            files = self._from_index(directory, index)
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            pickles = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(
                os.path.join(directory, "*.pt"))
            extra = (" (found PyTorch pickle files, which are never loaded: re-save the model "
                     "with save_pretrained(..., safe_serialization=True))" if pickles else "")
            raise UserError(f"no *.safetensors files in {directory}{extra}.")
        self.shards = [ShardFile(p) for p in files]
        self.index: dict[str, ShardFile] = {}
        self._stored: dict[str, str] = {}  # name here -> name in the file, where they differ
        stored = set()
        for shard in self.shards:
            for name in shard.header:
                stored.add(name)
                known = rename(name) if rename else name
                if known is not None:
                    self.index[known] = shard
                    if known != name:
                        self._stored[known] = name
        missing = sorted(set(self._expected) - stored)
        if missing:
            raise UserError(f"{index}: tensor {missing[0]} is not in "
                            f"{self._expected[missing[0]]}: the shard does not match its "
                            f"index; download it again.")

    def _from_index(self, directory: str, index: str) -> list[str]:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {index}: {e}") from e
        self._expected = dict(weight_map)
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            path = os.path.join(directory, shard)
            if not os.path.exists(path):
                raise UserError(f"{index} names shard {shard}, which is missing from "
                                f"{directory}: download it (or the whole checkpoint) again.")
            files.append(path)
        return files

    def names(self) -> list[str]:
        return sorted(self.index)

    def info(self, name: str) -> dict:
        """{"dtype": "BF16", "shape": [...], "data_offsets": [...]} of a tensor."""
        return self.index[name].header[self._stored.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name`, or only its rows [start, stop) along axis 0."""
        shard, stored = self.index[name], self._stored.get(name, name)
        return shard.load(stored) if rows is None else shard.load_rows(stored, *rows)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array) to `path` atomically (temp file + rename).

    The library serializes plain dtypes; float8 tensors (which its numpy API cannot
    take) are written by the same layout here.
    """
    metadata = {"format": "pt", **(metadata or {})}
    if not any(np.dtype(a.dtype).name.startswith("float8") for a in tensors.values()):
        data = st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata)
        with atomic_open(path, "wb") as f:
            f.write(data)
        return
    header, offset, order = {}, 0, sorted(tensors)
    for name in order:
        a = tensors[name]
        if a.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).astype(
                tensors[name].dtype.newbyteorder("<"), copy=False).tobytes())


def write_sharded(directory: str, tensors: dict[str, np.ndarray], shard_bytes: int) -> list[str]:
    """Writes `tensors` as `model.safetensors`, or, past `shard_bytes`, as
    `model-0000i-of-0000N.safetensors` shards + `model.safetensors.index.json` (the layout
    transformers' save_pretrained uses); returns the file names."""
    groups, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(groups):
        files.append(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        write_safetensors(os.path.join(directory, files[-1]), {n: tensors[n] for n in names})
        weight_map.update({n: files[-1] for n in names})
    total = sum(a.nbytes for a in tensors.values())
    with atomic_open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX_FILE]
