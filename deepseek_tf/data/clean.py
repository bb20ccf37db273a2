"""Cleaning: Unicode normalization, regex replace / drop, length filters.

Each step is configurable (`--data.normalize`, `--data.replace_regex` +
`--data.replacement`, `--data.drop_regex`, `--data.min_chars`,
`--data.max_chars`) and counted in the prepare report. Deduplication is
separate (dedup.py) and runs after cleaning, on the cleaned text.

Example:
    >>> c = Cleaner.from_config(DataConfig(replace_regex=r"\\d+", replacement="#"))
    >>> c.clean("call 555 1234")
    ('call # #', ['replaced'])
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from deepseek_tf.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Cleaner:
    """Text transforms and filters of one prepare run.

    Args:
      normalize: "none", "NFC" or "NFKC".
      replace: regex whose matches become `replacement` (None = off).
      replacement: the replacement text.
      drop: regex; a text with a match is dropped (None = off).
      min_chars: drop texts with fewer non-whitespace-trimmed characters.
      max_chars: drop longer texts (0 = no limit).
    """

    normalize: str = "NFC"
    replace: re.Pattern | None = None
    replacement: str = ""
    drop: re.Pattern | None = None
    min_chars: int = 1
    max_chars: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "Cleaner":
        return cls(normalize=cfg.normalize,
                   replace=re.compile(cfg.replace_regex) if cfg.replace_regex else None,
                   replacement=cfg.replacement,
                   drop=re.compile(cfg.drop_regex) if cfg.drop_regex else None,
                   min_chars=cfg.min_chars, max_chars=cfg.max_chars)

    def clean(self, text: str) -> tuple[str, list[str]]:
        """Normalizes and applies the replacement; returns (text, steps that changed it)."""
        changed = []
        if self.normalize != "none" and not unicodedata.is_normalized(self.normalize, text):
            text = unicodedata.normalize(self.normalize, text)
            changed.append("normalized")
        if self.replace is not None:
            text, n = self.replace.subn(self.replacement, text)
            if n:
                changed.append("replaced")
        return text, changed

    def reject(self, text: str) -> str | None:
        """The filter that drops `text` (drop_regex, too_short, too_long), or None."""
        if self.drop is not None and self.drop.search(text):
            return "drop_regex"
        n = len(text.strip())
        if n < self.min_chars:
            return "too_short"
        if self.max_chars and n > self.max_chars:
            return "too_long"
        return None
