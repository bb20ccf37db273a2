"""The machinery of the config sections: `knob` fields and the `_Section` mixin
(type checks, flat dict round trip, replace, validation helpers)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from deepseek_tf.errors import ConfigError


def knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         resumable: bool = False, stage: str | None = None, flag: str | None = None) -> Any:
    """A dataclass field with the metadata that flags and validation use.

    Args:
      default: the default value (its type must match the annotation).
      help: one-sentence help text, shown by `--help`.
      choices: allowed values for a string field.
      resumable: True if the value may change when a run resumes in a workdir
        whose saved config says otherwise (e.g. the total number of steps).
      stage: `DataConfig` only: when the field acts (see `DATA_STAGES`).
      flag: a field of a nested dataclass (`RopeScaling`): its flat flag and
        config.json key in the enclosing section, when it differs from the field name.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "resumable": resumable, "stage": stage,
        "flag": flag})


def nested(cls: type, help: str) -> Any:
    """A field holding a nested section dataclass (e.g. `ModelConfig.rope_scaling`),
    whose knobs keep flat flags and config.json keys (their `flag` metadata)."""
    return dataclasses.field(default_factory=cls, metadata={
        "help": help, "choices": None, "resumable": False, "stage": None, "flag": None,
        "nested": cls})


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


_SCALAR_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    if t not in (int, float, bool, str):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {t!r}")
    return t


class _Section:
    """Mixin for config dataclasses: type checking, dict round trip, validation."""

    SECTION = ""

    def _coerce_and_check_types(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            sub = f.metadata.get("nested")
            if sub:
                if isinstance(v, Mapping):
                    object.__setattr__(self, f.name, sub.from_dict(v))
                elif not isinstance(v, sub):
                    raise ConfigError(f"{self.SECTION}.{f.name}={v!r} has the wrong type: "
                                      f"expected {sub.__name__}.")
                continue
            t = _field_type(type(self), f)
            where = f"{self.SECTION}.{f.metadata.get('flag') or f.name}"
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                continue
            if t is int and isinstance(v, bool) or not isinstance(v, t):
                raise ConfigError(
                    f"--{where}={v!r} has the wrong type: expected {t.__name__}.")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(
                    f"--{where}={v!r} is not one of {', '.join(choices)}.")

    @classmethod
    def flag_fields(cls) -> list[tuple[str, dataclasses.Field, type]]:
        """(key, field, type) of every knob; a nested section's knobs (e.g.
        `ModelConfig.rope_scaling`) come under their flat flag names. The keys are
        the flags (`--<section>.<key>`) and the keys of `to_dict` / `from_dict`."""
        out = []
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("nested")
            if sub:
                out += [(g.metadata["flag"] or g.name, g, _field_type(sub, g))
                        for g in dataclasses.fields(sub)]
            else:
                out.append((f.name, f, _field_type(cls, f)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Flat: a nested section's knobs under their flag names (see `flag_fields`)."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("nested"):
                d.update({g.metadata["flag"] or g.name: getattr(v, g.name)
                          for g in dataclasses.fields(v)})
            else:
                d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {name for name, _, _ in cls.flag_fields()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.SECTION} config key(s) {', '.join(unknown)}; "
                f"valid keys are listed by --help.")
        return cls(**dict(d))

    def replace(self, **changes):
        """A copy with `changes`: field names, or a nested section's flat keys (e.g.
        `ModelConfig.replace(rope_scaling_factor=4.0)`)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)(**{**kw, **changes})

    def _require(self, ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)
