"""Streaming an HF checkpoint into a TF checkpoint, a few tensors at a time, resumably.

The model is never materialised. Its variables are declared inside a
`keras.StatelessScope` (shapes and dtypes only, no values); a tiny stand-in
checkpoint of that structure (one marker value per variable) gives the object graph
and each variable's checkpoint key. Then, shard by shard, each HF tensor is read,
dequantized (FP8 / FP4, `quant.py`) to float32, transposed to our layout and saved
in the variable's dtype (float32 or bfloat16) as its slice of the target variable (TF
checkpoints store a variable as slices, as they did partitioned variables: one expert of a stacked `[E, d, 2f]` weight is the
slice `i, :, :f`). A keep-quantized conversion (`weight_quantization="int8"`) saves
each projection and expert as int8 plus its scale slice instead (`layers/quantized.py`;
an expert's per-output scales are the slice `i, :f` of the stack's [E, 2f] scale).
Tensors are grouped into parts of about `part_bytes`; each part is
a small checkpoint bundle, marked done once written. `MergeV2Checkpoints` joins the
parts into `checkpoints/ckpt-0` at the end (it renames the data files: nothing is
copied), and only then is the checkpoint state file written.

Peak memory: one part plus the tensor being converted (read, cast to float32 and
handed to TensorFlow: ~3x its float32 bytes at once) and the shard pages the
`safetensors` library maps while a shard is open (each shard is closed after its last
part; freed heap pages go back to the OS after each part). An interrupted run leaves its done
parts in `checkpoints/.convert/`; running the same command again redoes only the rest
and writes the same bytes.

Example:
    >>> write_streaming(cfg, SafetensorsDir(hf_dir), "runs/v3/checkpoints", quant)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from deepseek_tf.convert.quant import SCALE_SUFFIX, Quantization, dequantize_fp4, \
    dequantize_fp8
from deepseek_tf.atomic import atomic_open
from deepseek_tf.errors import UserError

PARTS_DIR = ".convert"
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def declared_model(cfg):
    """A DeepSeekCausalLM whose variables have shapes but no values.

    The model is built (one eager pass) inside a `keras.StatelessScope`, where a variable
    without a value reads as a placeholder: Keras' placeholder is the variable's initial
    value, drawn each read (random normal: ~3 float32 copies of the largest variable at
    once); here it is zeros (one copy, `_declaring_scope`). Keras' scope also initialises
    every variable created inside it when it exits (`initialize_variables=True`, its
    default), which held the whole model in float32 (3.2 GB for a 0.93 GB FP8
    checkpoint): here they stay uninitialised and are taken off Keras' list of variables
    to initialise later (`_skeleton` gives each a marker value).
    """
    from keras.src.backend.common import global_state

    from deepseek_tf.model import DeepSeekCausalLM
    with _declaring_scope():
        model = DeepSeekCausalLM(cfg)
    ours = {id(v) for v in model.variables}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    global_state.set_global_attribute("uninitialized_variables",
                                      [v for v in pending if id(v) not in ours])
    return model


def _declaring_scope():
    """A stateless scope in which an uninitialised variable reads as zeros and that
    initialises nothing when it exits."""
    import keras
    import tensorflow as tf

    class Declaring(keras.StatelessScope):
        def get_current_value(self, variable):
            value = super().get_current_value(variable)
            if value is None and getattr(variable, "_value", True) is None:
                value = tf.zeros(variable.shape, variable.dtype)
            return value

    return Declaring(initialize_variables=False)


def _skeleton(model, directory: str) -> tuple[dict, dict]:
    """({id(variable): checkpoint key}, {other key: value}) of `model`'s checkpoint.

    Every variable gets a one-element value holding its index + 1 (a marker); the
    stand-in checkpoint written with the trainer's own CheckpointManager then names
    each variable's key, and supplies the object graph, step and save counter as is.
    """
    import tensorflow as tf

    variables = model.variables
    for i, v in enumerate(variables):  # the declared variables get a tiny marker value
        v._initialize(_marker(i + 1, v))
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, step=step), directory,
                               max_to_keep=1, step_counter=step).save(checkpoint_number=0)
    reader = tf.train.load_checkpoint(os.path.join(directory, "ckpt-0"))
    keys, other = {}, {}
    for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)
        if key.startswith("model/") and key.endswith(SUFFIX):
            keys[id(variables[_marked(value) - 1])] = key
        else:
            other[key] = value
    if len(keys) != len(variables):
        raise RuntimeError(f"the checkpoint names {len(keys)} of {len(variables)} variables")
    return keys, other


def _marker(n: int, v) -> np.ndarray:
    """`n` as a tiny value of `v`'s rank and dtype; int8 (quantized) weights hold it in
    base-100 digits along the last axis."""
    if v.dtype != "int8":
        return np.full([1] * len(v.shape), n).astype(_np_dtype(v))
    digits = [n // 10000, n // 100 % 100, n % 100]
    return np.asarray(digits, np.int8).reshape([1] * (len(v.shape) - 1) + [3])


def _np_dtype(v):
    """The numpy dtype of variable `v` (bfloat16 is ml_dtypes')."""
    import tensorflow as tf
    return tf.as_dtype(v.dtype).as_numpy_dtype


def _marked(value: np.ndarray) -> int:
    flat = np.ravel(value)
    return int(flat[0]) if flat.size == 1 else int(flat[0]) * 10000 + int(flat[1]) * 100 \
        + int(flat[2])


def _scale_index(index, ndim: int) -> tuple:
    """The index into an int8 weight's scale (its shape without axis -2) of `index`
    into the weight."""
    full = tuple(index) + (slice(None),) * (ndim - len(index))
    return full[:ndim - 2] + full[ndim - 1:]


def _slice_spec(shape, index) -> tuple[str, tuple]:
    """(SaveV2 shape_and_slice, the slice's shape) of numpy `index` into `shape`."""
    if not index:
        return "", tuple(shape)
    parts, sub = [], []
    for d, n in enumerate(shape):
        i = index[d] if d < len(index) else slice(None)
        start, stop = (i, i + 1) if isinstance(i, int) else i.indices(n)[:2]
        parts.append("-" if (start, stop) == (0, n) else f"{start},{stop - start}")
        sub.append(stop - start)
    return " ".join(map(str, shape)) + " " + ":".join(parts), tuple(sub)


def _packed_fp4(tensors, name: str) -> bool:
    """Whether HF tensor `name` is FP4-packed (int8/uint8 with a scale: V4's experts)."""
    return tensors.info(name)["dtype"] in ("I8", "U8") and name + SCALE_SUFFIX in tensors.index


def hf_shape(tensors, name: str) -> tuple[int, ...]:
    """The shape of the weight HF tensor `name` holds (an FP4-packed one holds two values
    per byte of its last axis)."""
    shape = tensors.shape(name)
    return shape[:-1] + (2 * shape[-1],) if _packed_fp4(tensors, name) else shape


def hf_value(tensors, name: str, quant: Quantization, transpose: bool = False,
             rows: tuple[int, int] | None = None) -> np.ndarray:
    """HF tensor `name` (or its rows [start, stop); FP8: `start` a multiple of the block's
    rows) as contiguous float32, transposed if asked, dequantized with its `_scale_inv` if
    it has one; a plain tensor is cast and transposed in one copy."""
    dtype = tensors.info(name)["dtype"]
    scale = name + SCALE_SUFFIX
    if scale not in tensors.index:
        if dtype.startswith("F8") or dtype in ("I8", "U8"):
            raise UserError(f"tensor {name} is {dtype} but the checkpoint has no "
                            f"{scale} to dequantize it with.")
        a = tensors.load(name, rows)
        return np.asarray(a.T if transpose else a, np.float32, order="C")
    if not quant.method:
        raise UserError(f"the checkpoint has {scale} but config.json has no "
                        f"quantization_config: add the release's quantization_config.")
    if _packed_fp4(tensors, name):
        a = dequantize_fp4(tensors.load(name), tensors.load(scale), name)
    else:
        scale_rows = rows and (rows[0] // quant.block[0], -(-rows[1] // quant.block[0]))
        a = dequantize_fp8(tensors.load(name, rows), tensors.load(scale, scale_rows),
                           quant.block, name)
    return np.ascontiguousarray(a.T) if transpose else a


def _pieces(e, tensors, quant: Quantization, part_bytes: int, whole: bool) -> list:
    """[(entry, rows)]: a whole 2-D float-stored tensor larger than `part_bytes` in float32
    (an embedding, the head) goes in row ranges of about `part_bytes` (FP8: whole blocks),
    each saved as its slice of the variable; anything else whole (rows None)."""
    shape = tensors.shape(e.name)
    if whole or e.index or len(shape) != 2 or 4 * shape[0] * shape[1] <= part_bytes \
            or _packed_fp4(tensors, e.name):
        return [(e, None)]
    step = max(part_bytes // (4 * shape[1]), 1)
    if e.name + SCALE_SUFFIX in tensors.index:
        step = max(step // quant.block[0], 1) * quant.block[0]
    return [(e, (r, min(r + step, shape[0]))) for r in range(0, shape[0], step)]


def _nbytes(piece) -> int:
    e, rows = piece
    shape = e.hf_shape()
    return 4 * int(np.prod(shape)) * (rows[1] - rows[0]) // shape[0] if rows else \
        4 * int(np.prod(shape))


def _plan(entries, tensors, quant: Quantization, part_bytes: int, whole) -> list[list]:
    """Parts: lists of (entry, rows) pieces, shard by shard in file order, ~part_bytes
    each; `whole` holds the ids of variables that are never split (int8-kept ones)."""
    by_name = {e.name: e for e in entries}
    by_shard: dict[int, list] = {}
    for n in by_name:
        by_shard.setdefault(id(tensors.index[n]), []).append(n)
    parts, current, size = [], [], 0
    for shard in tensors.shards:
        names = sorted(by_shard.get(id(shard), ()),
                       key=lambda n: tensors.info(n)["data_offsets"][0])
        for n in names:
            e = by_name[n]
            for piece in _pieces(e, tensors, quant, part_bytes, id(e.variable) in whole):
                nbytes = _nbytes(piece)
                if current and size + nbytes > part_bytes:
                    parts.append(current)
                    current, size = [], 0
                current.append(piece)
                size += nbytes
    return parts + ([current] if current else [])


def _release_free_memory() -> None:
    """Hands the heap's free pages back to the OS (glibc keeps them, and the RSS of a
    long conversion crept up by ~350 MB of freed part buffers without this)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _last_use(tensors, parts) -> dict[int, list]:
    """{part index: the shards no later part reads}: after that part their handles (and
    the library's file mappings, whose pages count in RSS) can go."""
    last = {}
    for i, part in enumerate(parts):
        for e, _ in part:
            last[id(tensors.index[e.name])] = i
    out: dict[int, list] = {}
    for shard in tensors.shards:
        out.setdefault(last.get(id(shard), -1), []).append(shard)
    return out


def _fingerprint(tensors, part_bytes: int, quant: Quantization) -> str:
    meta = [(s.path, s.size, os.path.getmtime(s.path)) for s in tensors.shards]
    return hashlib.sha256(json.dumps([meta, part_bytes, str(quant)]).encode()).hexdigest()


def _save(prefix: str, names, specs, values) -> None:
    import tensorflow as tf
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=specs,
                      tensors=values)
    with open(prefix + ".done", "w"):
        pass


def _done(prefix: str) -> bool:
    return all(os.path.exists(prefix + s) for s in (".done", ".index",
                                                     ".data-00000-of-00001"))


def write_streaming(model, entries, tensors, ckpt_dir: str, quant: Quantization,
                    part_bytes: int, log=print) -> str:
    """Writes `ckpt_dir`/ckpt-0 with every entry's tensor; returns its path.

    Args:
      model: `declared_model(cfg)` (no values).
      entries: its `weights.checked_entries` against `tensors`.
      tensors: a `SafetensorsDir`.
      ckpt_dir: the workdir's checkpoints/ directory.
      quant: the checkpoint's quantization.
      part_bytes: float32 bytes per part (memory bound and resume granularity).
      log: progress printer.
    """
    import tensorflow as tf

    work = os.path.join(ckpt_dir, PARTS_DIR)
    fingerprint = _fingerprint(tensors, part_bytes, quant)
    stamp = os.path.join(work, "fingerprint")
    if os.path.isdir(work) and (not os.path.exists(stamp) or open(stamp).read() != fingerprint):
        log("note: the partial conversion there came from other inputs or settings; "
            "starting over")
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    with open(stamp, "w") as f:
        f.write(fingerprint)
    keys, other = _skeleton(model, os.path.join(work, "skeleton"))
    from deepseek_tf.layers.quantized import quantize_int8, scale_variables

    scales = scale_variables(model)  # int8 weights (a keep-quantized conversion)
    filled = {id(e.variable) for e in entries}
    filled |= {id(scales[i]) for i in filled if i in scales}
    fresh = [v for v in model.variables if id(v) not in filled]  # e.g. new MTP modules
    prefixes = [os.path.join(work, "part-meta")]
    if not _done(prefixes[0]):
        names = sorted(other)
        values = [tf.constant(other[k]) for k in names]
        names += [keys[id(v)] for v in fresh]
        values += [v._initializer(tuple(v.shape), v.dtype) for v in fresh]
        _save(prefixes[0], names, [""] * len(names), values)
    parts = _plan(entries, tensors, quant, part_bytes, set(scales))
    done_with = _last_use(tensors, parts)
    total = sum(_nbytes(piece) for p in parts for piece in p)
    done_bytes, resumed, start = 0, 0, time.time()
    for i, part in enumerate(parts):
        prefix = os.path.join(work, f"part-{i:05d}")
        prefixes.append(prefix)
        nbytes = sum(_nbytes(piece) for piece in part)
        if _done(prefix):
            resumed += nbytes
        else:
            names, specs, values = [], [], []
            for e, rows in part:
                a = hf_value(tensors, e.name, quant, e.transpose, rows)
                index = e.index
                if rows:  # HF rows: our rows, or our columns of a transposed kernel
                    index = (slice(None), slice(*rows)) if e.transpose else (slice(*rows),)
                spec, shape = _slice_spec(tuple(e.variable.shape), index)
                a = a.reshape(shape)
                names.append(keys[id(e.variable)])
                specs.append(spec)
                scale = scales.get(id(e.variable))
                if scale is None:  # a TF tensor now: SaveV2 would copy the whole part
                    values.append(tf.convert_to_tensor(a.astype(_np_dtype(e.variable),
                                                                copy=False)))
                    del a
                    continue
                q, s = quantize_int8(a)  # kept quantized: int8 + its scale slice
                values.append(q)
                names.append(keys[id(scale)])
                spec, shape = _slice_spec(tuple(scale.shape),
                                          _scale_index(e.index, len(e.variable.shape)))
                specs.append(spec)
                values.append(s.reshape(shape).astype(_np_dtype(scale)))
            _save(prefix, names, specs, values)
            del values
            _release_free_memory()
        for shard in done_with.get(i, ()):
            shard.close()
        done_bytes += nbytes
        rate = (done_bytes - resumed) / max(time.time() - start, 1e-6)
        eta = (total - done_bytes) / rate if rate > 0 else 0.0
        log(f"converted {done_bytes / 2**20:,.1f} / {total / 2**20:,.1f} MiB "
            f"({100 * done_bytes / max(total, 1):.0f}%, part {i + 1}/{len(parts)}"
            + (f", {resumed / 2**20:,.1f} MiB from before" if resumed else "")
            + f", ETA {eta:.0f}s)")
    final = os.path.join(ckpt_dir, "ckpt-0")
    for f in os.listdir(ckpt_dir):  # a merge that an interruption cut short
        if f.startswith("ckpt-0."):
            os.remove(os.path.join(ckpt_dir, f))
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=prefixes, destination_prefix=final,
                                  delete_old_dirs=False)
    shutil.rmtree(work)
    # What the trainer reads. tf.train.CheckpointManager lists only the checkpoints that
    # have a timestamp: without one a converted workdir trained from random weights.
    with atomic_open(os.path.join(ckpt_dir, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "ckpt-0"\nall_model_checkpoint_paths: "ckpt-0"\n'
                f"all_model_checkpoint_timestamps: {time.time()}\n")
    return final
