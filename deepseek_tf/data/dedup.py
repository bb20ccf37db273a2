"""Deduplication: exact (content hash) and near (MinHash + LSH over word n-grams).

Both keep the first occurrence in input order and drop later copies; both run
on the cleaned text, before the train/validation split (so no near copy of a
training document can land in validation).

Near duplicates: a document is cut into tokens (`\\w+` runs and single
punctuation marks, lowercased), shingled into `ngram`-token windows, and each
shingle is hashed (crc32 of its tokens, combined). `num_perm` seeded
multiply-shift hashes `(a * x + b) mod 2^64 >> 32` (a 2-universal family; the
linear `(a * x + b) mod p` with small `a` is nearly order-preserving and badly
biases the estimate) give the MinHash signature; the fraction of equal
signature entries estimates the Jaccard similarity of the shingle sets. LSH
splits the signature into `bands` of `rows` (chosen to minimise the false
positive + false negative area around the threshold, as datasketch does), so
only documents sharing a band are compared; a candidate is a duplicate when
its estimated similarity with a kept document is >= the threshold.

Example:
    >>> d = NearDedup(threshold=0.8)
    >>> d.add("the quick brown fox jumps over the lazy dog " * 5)
    False
    >>> d.add("the quick brown fox jumps over the lazy dog " * 5 + "!")
    True
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MIX = np.uint64(0x9E3779B1)


def exact_key(text: str) -> bytes:
    """128-bit content hash of a text (collisions are negligible at any corpus size)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers content hashes; `add` returns True for a text seen before."""

    def __init__(self):
        self.seen: set[bytes] = set()

    def add_key(self, key: bytes) -> bool:
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def add(self, text: str) -> bool:
        return self.add_key(exact_key(text))


def shingles(text: str, ngram: int) -> np.ndarray:
    """Unique uint64 (< 2^32) hashes of the text's `ngram`-token windows."""
    words = _TOKEN.findall(text.lower())
    if not words:
        return np.array([zlib.crc32(text.encode("utf-8"))], np.uint64)
    h = np.array([zlib.crc32(w.encode("utf-8")) for w in words], np.uint64)
    n = min(ngram, len(h))
    acc = h[: len(h) - n + 1].copy()
    for k in range(1, n):  # polynomial combination, mod 2^32
        acc = (acc * _MIX + h[k: len(h) - n + 1 + k]) & np.uint64(0xFFFFFFFF)
    return np.unique(acc)


class MinHasher:
    """MinHash signatures with `num_perm` seeded universal hash functions.

    Args:
      num_perm: signature length.
      ngram: tokens per shingle.
      seed: seed of the hash functions (fixed: signatures are comparable across runs).
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * 2 + 1  # odd
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self.num_perm, self.ngram = num_perm, ngram

    def signature(self, text: str) -> np.ndarray:
        """uint32 (num_perm,) signature: per hash function, the minimum over shingles."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        x = shingles(text, self.ngram)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64 by design
            for lo in range(0, len(x), 2048):
                block = x[lo: lo + 2048, None]
                sig = np.minimum(sig, ((block * self.a + self.b) >> np.uint64(32)).min(axis=0))
        return sig.astype(np.uint32)


def _prob_collide(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    return 1.0 - (1.0 - s ** rows) ** bands


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising FP + FN areas."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows < 1:
            break
        fp = np.trapezoid(_prob_collide(lo, bands, rows), lo)
        fn = np.trapezoid(1.0 - _prob_collide(hi, bands, rows), hi)
        if fp + fn < best_err:
            best, best_err = (bands, rows), fp + fn
    return best


class NearDedup:
    """An LSH index over the signatures of kept documents.

    Args:
      threshold: Jaccard similarity at or above which a document is a duplicate.
      num_perm: MinHash signature length.
      ngram: tokens per shingle.
    """

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5):
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, ngram)
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def add_signature(self, sig: np.ndarray) -> bool:
        """True if `sig` duplicates a kept document; otherwise it is kept (indexed)."""
        r = self.rows
        keys = [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]
        candidates = set()
        for table, key in zip(self.tables, keys):
            candidates.update(table.get(key, ()))
        for c in sorted(candidates):
            if np.mean(self.signatures[c] == sig) >= self.threshold:
                return True
        idx = len(self.signatures)
        self.signatures.append(sig)
        for table, key in zip(self.tables, keys):
            table.setdefault(key, []).append(idx)
        return False

    def add(self, text: str) -> bool:
        return self.add_signature(self.hasher.signature(text))
