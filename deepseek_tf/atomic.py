"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything a run depends on (config.json, metadata, tokenizer files, safetensors,
log rewrites) is written to a temporary file next to the target and renamed over it;
a crash leaves the old file and a stray `*.tmp-<pid>`, never a truncated target.

Example:
    >>> with atomic_open("config.json") as f:
    ...     f.write("{}")
    >>> atomic_write("weights.bin", b"...")
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Opens a temporary file next to `path`; renames it over `path` on success and
    removes it if the block raises."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes `data` (text or bytes) to `path` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
