"""The prepare report: what came in, what each step removed or changed, what went out.

Saved as `<data_dir>/report.json` and in metadata.json; `lines()` is what
prepare prints.

Example:
    >>> r = Report()
    >>> r.bad("a.jsonl:3", "malformed_json", "malformed JSON: Expecting value")
    >>> r.to_dict()["bad_input"]["count"]
    1
"""

from __future__ import annotations

import collections

REMOVAL_STEPS = ("drop_regex", "too_short", "too_long", "exact_duplicate", "near_duplicate",
                 "perplexity", "no_target")
MAX_LISTED = 1000  # bad inputs listed by location; all are counted


class Report:
    """Counters of one prepare run (JSON round trip through to_dict / from_dict)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.removed: collections.Counter = collections.Counter()
        self.bad_kinds: collections.Counter = collections.Counter()
        self.bad_items: list[str] = []
        self.info: dict = {}

    def bad(self, where: str, kind: str, reason: str) -> None:
        self.bad_kinds[kind] += 1
        if len(self.bad_items) < MAX_LISTED:
            self.bad_items.append(f"{where}: {reason}")

    def remove(self, step: str, n: int = 1) -> None:
        self.removed[step] += n

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts),
                "removed": {s: self.removed.get(s, 0) for s in REMOVAL_STEPS},
                "bad_input": {"count": sum(self.bad_kinds.values()),
                              "by_kind": dict(self.bad_kinds), "items": list(self.bad_items)},
                **self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        r = cls()
        r.counts.update(d.get("counts", {}))
        r.removed.update({k: v for k, v in d.get("removed", {}).items() if v})
        r.bad_kinds.update(d.get("bad_input", {}).get("by_kind", {}))
        r.bad_items = list(d.get("bad_input", {}).get("items", []))
        r.info = {k: v for k, v in d.items() if k not in ("counts", "removed", "bad_input")}
        return r

    def lines(self, shown_bad: int = 10) -> list[str]:
        c, d = self.counts, self.to_dict()
        bad = d["bad_input"]["count"]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.bad_kinds.items()))
        out = [f"  documents in       {c['documents_in']:>12,}"
               + (f"   (+ {bad:,} bad input: {kinds})" if bad else "")]
        out.append(f"  changed            normalized {c['normalized']:,} | "
                   f"replaced {c['replaced']:,}")
        steps = []
        for step in REMOVAL_STEPS:
            if step == "near_duplicate" and not self.info.get("near_dedup"):
                steps.append("near_duplicate off")
            elif step == "perplexity" and not self.info.get("ppl_filter"):
                continue
            elif step != "no_target" or self.removed[step]:
                steps.append(f"{step} {self.removed[step]:,}")
        out.append("  removed            " + " | ".join(steps))
        trunc = self.info.get("truncated")
        if trunc:
            out.append(f"  truncated          turns dropped {trunc['turns_dropped']:,} | "
                       f"tail cut {trunc['cut']:,} samples")
        splits = self.info.get("splits", {})
        if splits:
            docs = " / ".join(f"{s} {v['documents']:,}" for s, v in splits.items())
            toks = " / ".join(f"{s} {v['tokens']:,}" for s, v in splits.items())
            out.append(f"  documents out      {c['documents_out']:>12,}   ({docs})")
            out.append(f"  tokens out         {c['tokens_out']:>12,}   ({toks})")
            if c.get("target_tokens_out"):
                out.append(f"  target tokens      {c['target_tokens_out']:>12,}   "
                           f"(loss mask = 1)")
        if bad:
            out.append(f"  bad input (first {min(shown_bad, bad)} of {bad:,}; all "
                       f"{'listed' if bad <= MAX_LISTED else 'counted'} in report.json):")
            out += [f"    {item}" for item in self.bad_items[:shown_bad]]
        return out
