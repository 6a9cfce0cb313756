"""Typed configuration: one dataclass per stage, named presets, command-line overrides.

Precedence: command line > preset > dataclass default. Unknown keys are an error, so a
typo never silently falls back to a default.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     lr: float = 0.1  # learning rate
...     epochs: int = 3
...     name: str = "x"
>>> resolve(Demo, {"fast": {"epochs": 1}}, "fast", ["lr=0.5"])
Demo(lr=0.5, epochs=1, name='x')
>>> resolve(Demo, {}, None, ["lrr=1"])
Traceback (most recent call last):
...
faceattrs.config.ConfigError: unknown setting 'lrr' for Demo; known: epochs, lr, name
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .exceptions import FaceattrsError

T = TypeVar("T")


class ConfigError(FaceattrsError, ValueError):
    """A setting that does not exist or cannot be parsed."""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn ``value`` (often a command-line string) into ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        inner = args[0] if args else str
        return (tuple if origin is tuple else list)(_coerce(v, inner, key) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except ValueError:
        raise ConfigError(f"setting {key!r}: cannot read {value!r} as {typ.__name__}") from None
    return value


coerce = _coerce  # for settings held inside a setting (a training run's heads)


def replace(cfg: T, values: Mapping[str, Any]) -> T:
    """Return a copy of ``cfg`` with ``values`` applied; unknown keys raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} for {type(cfg).__name__}; known: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(cfg, **{k: _coerce(v, hints[k], k) for k, v in values.items()})


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["lr=0.1", "epochs=3"]`` -> ``{"lr": "0.1", "epochs": "3"}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def resolve(
    cls: type[T],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str | None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> T:
    """Default, then the named preset, then the overrides."""
    cfg = cls()
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
        cfg = replace(cfg, presets[preset])
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    return replace(cfg, overrides)


def check_range(
    cfg,
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError naming ``key`` unless ``lo <= cfg.key <= hi`` (``<`` when open;
    None = unbounded). NaN is never in range.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class D:
    ...     n: int = 0
    >>> check_range(D(n=0), "n", 1)
    Traceback (most recent call last):
    ...
    faceattrs.config.ConfigError: setting 'n' must be at least 1, got 0
    """
    v = getattr(cfg, key)
    ok = v == v  # NaN
    if ok and lo is not None:
        ok = v > lo if low_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if high_open else v <= hi
    if ok:
        return
    if lo is not None and hi is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        want = f"in {left}{lo:g}, {hi:g}{right}"
    elif lo is not None:
        want = f"above {lo:g}" if low_open else f"at least {lo:g}"
    else:
        want = f"below {hi:g}" if high_open else f"at most {hi:g}"
    raise ConfigError(f"setting {key!r} must be {want}, got {v!r}")


def check_choice(cfg, key: str, choices: Iterable[str]) -> None:
    """Raise ConfigError naming ``key`` unless ``cfg.key`` is one of ``choices``."""
    v = getattr(cfg, key)
    if v not in tuple(choices):
        raise ConfigError(f"setting {key!r} must be one of {', '.join(choices)}, got {v!r}")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Rebuild a config saved with :func:`to_dict` (unknown keys are an error)."""
    return replace(cls(), dict(values))


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2)
