"""Corpora that need no download, and the deterministic train/validation split.

The embedded default corpus is the Python standard library's own `.py` sources,
found at run time with `sysconfig` (test suites, `idlelib`, `lib2to3` and
`site-packages` are left out, so the corpus does not depend on what is installed).

Example:
    >>> docs = list(stdlib_documents(max_documents=2))
    >>> docs[0].name.endswith(".py")
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from typing import Iterator

from deepseek_tf.errors import UserError

_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    """One raw document: a stable name (used for the split) and its bytes."""

    name: str
    data: bytes


def stdlib_root() -> str:
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise UserError(f"the Python standard library was not found at {root}; "
                        f"use a Python with its stdlib sources installed.")
    return root


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted (deterministic)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(out)


def stdlib_documents(max_documents: int = 0, root: str | None = None) -> Iterator[Document]:
    """Yields the stdlib's .py files as Documents, in sorted order."""
    root = root or stdlib_root()
    files = stdlib_files(root)
    if max_documents:
        files = files[:max_documents]
    if not files:
        raise UserError(f"no .py files found under {root}; the embedded corpus needs "
                        f"the Python standard library sources.")
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            yield Document(name=rel.replace(os.sep, "/"), data=f.read())


def _split_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def validation_names(names: list[str], val_size: float) -> set[str]:
    """Deterministically picks the validation documents by name.

    Args:
      names: all document names.
      val_size: fraction (< 1) or count (>= 1) of documents for validation.

    Returns the documents with the smallest name hashes: the split depends only on
    the names, never on order or on the machine.
    """
    n = int(val_size) if val_size >= 1 else int(round(val_size * len(names)))
    if val_size > 0 and n == 0 and len(names) > 1:
        n = 1
    n = min(n, max(len(names) - 1, 0))
    return set(sorted(names, key=_split_key)[:n])
