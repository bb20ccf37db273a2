"""XLA's persistent compilation cache for the command-line entry points (imports only the
leaf `deepseek_tf.autojit`).

TensorFlow can save every XLA program it compiles (`TF_XLA_FLAGS=
--tf_xla_persistent_cache_directory=DIR`) and load it in a later process instead of
compiling again; it looks an entry up by a hash of the program and loads it only if the
stored program is equal. `enable_xla_cache()` turns that on, before TensorFlow's first
XLA compile, in a directory per TensorFlow version and CPU (XLA compiles for the
machine's instruction set, and the cache key does not say which):
`$DEEPSEEK_TF_XLA_CACHE` or `~/.cache/deepseek_tf/xla` (`$XDG_CACHE_HOME` if set),
then `tf<version>-<hash of the CPU's feature flags and XLA_FLAGS>`. A second run of the
same model and shapes on the same machine so skips `--jit_compile=auto`'s XLA compile,
an XLA train step's and the XLA decode loop's (V4-tiny's train start: ~20 s less).

`DEEPSEEK_TF_XLA_CACHE=off` disables it; a `--tf_xla_persistent_cache_directory` the
user put in `TF_XLA_FLAGS` is left alone. Before each use the directory is tidied:
entries whose protobuf framing does not add up (a damaged file would make TensorFlow fail
the run) and temporary files older than an hour are deleted, then the entries written
longest ago while it holds more than `MAX_BYTES`.

Example:
    >>> enable_xla_cache()   # in an entry point, next to quiet_tensorflow()
    '/home/me/.cache/deepseek_tf/xla/tf2.20.0-3f0c9a1b2c4d'
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
import time

from deepseek_tf.autojit import cpu_flags

ENV = "DEEPSEEK_TF_XLA_CACHE"
FLAG = "--tf_xla_persistent_cache_directory"
OFF = ("off", "0", "false", "no", "none")
#: The cache's size limit: beyond it the entries written longest ago are deleted.
MAX_BYTES = 2 << 30
_STALE_TMP_SECONDS = 3600


#: The distributions TensorFlow is installed as (the first one found gives the version).
_TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly")


def tensorflow_version() -> str | None:
    """The installed TensorFlow's version, read without importing it (None if unknown)."""
    from importlib import metadata

    for name in _TF_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_key(cpuinfo: str = "/proc/cpuinfo", xla_flags: str = "") -> str | None:
    """`tf<version>-<12 hex digits>`: TensorFlow's version and a hash of the CPU
    architecture, its feature flags (the instruction sets XLA compiles for) and
    `xla_flags` (XLA's own options); None when TensorFlow's version is unknown (a
    program another version compiled must not be loaded)."""
    version = tensorflow_version()
    if version is None:
        return None
    cpu = [platform.machine(), " ".join(sorted(cpu_flags(cpuinfo))), xla_flags]
    return f"tf{version}-" + hashlib.sha256("\n".join(cpu).encode()).hexdigest()[:12]


def cache_dir(env=None) -> str | None:
    """The directory this machine's entries go to, or None when disabled (or TensorFlow's
    version is unknown)."""
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    key = machine_key(xla_flags=env.get("XLA_FLAGS", ""))
    if key is None:
        return None
    base = value or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                 "deepseek_tf", "xla")
    return os.path.join(os.path.abspath(base), key)


def framing_ok(path: str) -> bool:
    """Whether the file is a sequence of well-formed top-level protobuf fields ending
    exactly at its end (a truncated or overwritten entry is not). Reads only the field
    headers: cheap for entries of many megabytes."""
    def varint(f):
        shift = value = 0
        while True:
            byte = f.read(1)
            if not byte or shift > 63:
                return None
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7

    try:
        size = os.path.getsize(path)
        if size == 0:
            return False
        with open(path, "rb") as f:
            while f.tell() < size:
                tag = varint(f)
                if tag is None or tag >> 3 == 0:
                    return False
                wire = tag & 7
                if wire == 0:
                    ok = varint(f) is not None
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                    ok = True
                elif wire == 2:
                    length = varint(f)
                    ok = length is not None and f.tell() + length <= size
                    if ok:
                        f.seek(length, os.SEEK_CUR)
                else:
                    return False
                if not ok:
                    return False
            return f.tell() == size
    except OSError:
        return False


def tidy(directory: str, max_bytes: int = MAX_BYTES, now: float | None = None) -> None:
    """Deletes damaged entries, stale temporary files and, beyond `max_bytes`, the
    entries written longest ago."""
    now = time.time() if now is None else now
    entries = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
            if name.endswith(".pb") and framing_ok(path):
                entries.append((st.st_mtime, st.st_size, path))
            elif name.endswith(".pb") or now - st.st_mtime > _STALE_TMP_SECONDS:
                os.remove(path)  # damaged, or a writer's temporary file left behind
        except OSError:
            continue  # another process removed or renamed it meanwhile
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        try:
            os.remove(path)
            total -= size
        except OSError:
            pass


def enable_xla_cache(env=None) -> str | None:
    """Points TensorFlow's XLA persistent cache at this machine's directory (see the
    module docstring); call before TensorFlow's first XLA compile. Returns the directory,
    or None when disabled, set by the user already, or unusable (then runs compile as
    before; a `DEEPSEEK_TF_XLA_CACHE` directory that cannot be used is named in one
    warning line on stderr)."""
    env = os.environ if env is None else env
    flags = env.get("TF_XLA_FLAGS", "")
    if FLAG in flags:
        return None
    directory = cache_dir(env)
    if directory is None:
        return None
    try:
        if any(c.isspace() for c in directory):
            raise OSError("a path with whitespace cannot go into TF_XLA_FLAGS")
        os.makedirs(directory, exist_ok=True)
        os.remove(tempfile.mkstemp(dir=directory, suffix=".tmp")[1])  # writable?
        tidy(directory)
    except OSError as err:
        if env.get(ENV, "").strip():
            print(f"warning: {ENV}: cannot use {directory} ({err}); compiling without the "
                  f"XLA cache (give a writable directory, or {ENV}=off)", file=sys.stderr)
        return None
    env["TF_XLA_FLAGS"] = f"{flags} {FLAG}={directory}".strip()
    return directory
