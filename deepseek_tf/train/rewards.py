"""GRPO's rewards (`--grpo.reward`) and group-normalised advantages, on the host.

A reward scores one completion of a prompt with a float. `--grpo.reward` lists them,
comma-separated, each `NAME` or `NAME*WEIGHT`; a completion's reward is the weighted
sum. Built in:
  exact_match     1.0 if the answer equals the reference (both stripped), else 0.0; the
                  answer is the whole completion, or with `--grpo.answer_marker=M` the
                  text after the last M (up to the next `</...>` closing tag), 0.0 when M
                  is absent
  format          1.0 if the completion fully matches `--grpo.format_regex`, else 0.0
  length_penalty  -(completion tokens / --grpo.max_new_tokens), in [-1, 0)
  numeric         1 / (1 + |answer - reference|) when the answer (as exact_match takes
                  it) and the reference both parse as numbers (Python float), else 0.0:
                  partial credit that grows as a numeric answer gets closer (1 exact, 1/2
                  off by one, 1/3 off by two); add it to exact_match for a denser signal
A plug-in `module:function` (importable from the Python path) is called as
`function(prompt, completion, reference)` and must return a finite number (bool is not
one); anything else, or an exception, stops the run with one error naming it.

Advantages (DeepSeekMath's outcome supervision): within each group of G completions of
one prompt, A_i = (r_i - mean(r)) / (std(r) + 1e-4) with the sample std (ddof 1, as
TRL); a group whose rewards are all equal has A = 0 (no policy gradient from it).

Example:
    >>> rewards = Rewards(GRPOConfig(reward="exact_match,length_penalty*0.1"))
    >>> total, parts = rewards(["Add."], ["4"], ["4"], [2])
    >>> advantages(np.array([1.0, 0.0, 1.0, 1.0]), group_size=2).round(3).tolist()
    [0.707, -0.707, 0.0, 0.0]
"""

from __future__ import annotations

import importlib
import math
import re

import numpy as np

from deepseek_tf.config import GRPOConfig
from deepseek_tf.data.records import normalize_answer
from deepseek_tf.errors import ConfigError, UserError

EPS = 1e-4
_CLOSE = re.compile(r"</[^>]*>")


def extract_answer(text: str, marker: str) -> str | None:
    """The answer in a completion: all of it, or the text after the last `marker` up to
    the next closing tag; None when the marker is absent."""
    if not marker:
        return text.strip()
    at = text.rfind(marker)
    if at < 0:
        return None
    rest = text[at + len(marker):]
    close = _CLOSE.search(rest)
    return (rest[:close.start()] if close else rest).strip()


def exact_match(prompt, completion, reference, *, cfg: GRPOConfig, num_tokens: int) -> float:
    answer = extract_answer(completion, cfg.answer_marker)
    return float(answer is not None and normalize_answer(answer) == normalize_answer(reference))


def format_reward(prompt, completion, reference, *, cfg: GRPOConfig, num_tokens: int) -> float:
    return float(re.fullmatch(cfg.format_regex, completion) is not None)


def length_penalty(prompt, completion, reference, *, cfg: GRPOConfig,
                   num_tokens: int) -> float:
    return -num_tokens / cfg.max_new_tokens


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def numeric(prompt, completion, reference, *, cfg: GRPOConfig, num_tokens: int) -> float:
    answer, ref = _number(extract_answer(completion, cfg.answer_marker)), _number(reference)
    return 0.0 if answer is None or ref is None else 1.0 / (1.0 + abs(answer - ref))


BUILTIN = {"exact_match": exact_match, "format": format_reward,
           "length_penalty": length_penalty, "numeric": numeric}


def load_plugin(name: str):
    """The callable of a `module:function` plug-in; ConfigError naming it otherwise."""
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"--grpo.reward plug-in {name}: cannot import {module} ({e}); put "
                          f"it on PYTHONPATH.") from e
    except AttributeError as e:
        raise ConfigError(f"--grpo.reward plug-in {name}: {module} has no {attr}.") from e
    if not callable(fn):
        raise ConfigError(f"--grpo.reward plug-in {name}: {attr} is not callable.")
    return fn


class Rewards:
    """The weighted rewards of `--grpo.reward`; plug-ins are imported on construction.

    Args:
      cfg: the run's `GRPOConfig`.

    Example:
        >>> total, parts = Rewards(GRPOConfig())(["Q"], ["a"], ["a"], [2])
        >>> total.tolist(), sorted(parts)
        ([1.0], ['exact_match'])
    """

    def __init__(self, cfg: GRPOConfig):
        self.cfg, self.parts = cfg, []
        for part in cfg.reward_list:
            name, _, weight = (p.strip() for p in part.partition("*"))
            fn = BUILTIN.get(name) or load_plugin(name)
            self.parts.append((name, float(weight or 1.0), fn, name in BUILTIN))

    def _one(self, name, fn, builtin, prompt, completion, reference, n) -> float:
        if builtin:
            return fn(prompt, completion, reference, cfg=self.cfg, num_tokens=n)
        try:
            value = fn(prompt, completion, reference)
        except Exception as e:  # a user's code: one line naming it, never a traceback
            raise UserError(f"reward plug-in {name} raised {type(e).__name__}: {e}; fix the "
                            f"plug-in (the last checkpoint is kept).") from e
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or \
                not math.isfinite(float(value)):
            raise UserError(f"reward plug-in {name} returned {value!r}, not a finite number; "
                            f"fix the plug-in (the last checkpoint is kept).")
        return float(value)

    def __call__(self, prompts, completions, references, num_tokens):
        """(float32 (N,) weighted total, {name: float32 (N,) unweighted part})."""
        parts = {name: np.array([self._one(name, fn, builtin, p, c, r, int(n))
                                 for p, c, r, n in zip(prompts, completions, references,
                                                       num_tokens)], np.float32)
                 for name, _, fn, builtin in self.parts}
        total = sum(w * parts[name] for name, w, _, _ in self.parts)
        return np.asarray(total, np.float32), parts


def advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """float32 (N,) group-normalised advantages of (N,) rewards, groups consecutive."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    std = r.std(axis=1, ddof=1, keepdims=True)
    adv = (r - r.mean(axis=1, keepdims=True)) / (std + EPS)
    return np.where(std > 0, adv, 0.0).reshape(-1).astype(np.float32)


def reward_stats(total: np.ndarray, parts: dict, group_size: int) -> dict:
    """What the log shows of a batch's rewards: mean and std of the total, the share of
    groups with zero variance, and each part's mean."""
    groups = np.asarray(total).reshape(-1, group_size)
    return {"reward": float(np.mean(total)), "reward_std": float(np.std(total)),
            "zero_variance_groups": float(np.mean(groups.std(axis=1) == 0)),
            **{f"rewards/{k}": float(np.mean(v)) for k, v in parts.items()}}
