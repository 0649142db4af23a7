"""Checks of numeric settings (config fields, CLI options): finite and in range, one CraftError line each.

Config dataclasses call these from ``__post_init__`` so an invalid value fails when the config is built,
before any work starts, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

from craft.errors import CraftError

SEED_MAX = 2**31 - 1
"""Largest seed accepted (seeds are offset and combined, and must stay valid for numpy and torch)."""


LR_MAX = 1.0
"""Largest learning rate accepted: AdamW moves every weight by about the learning rate per step, so a rate
above 1 only diverges (non-finite weights)."""


def check_range(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False) -> None:
    """``value`` must be a finite number (an integer if ``integer``) within ``lo`` / ``hi`` (open ends if
    ``lo_open`` / ``hi_open``); CraftError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise CraftError(f"{name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise CraftError(f"{name} must be an integer, got {value}")
    if not math.isfinite(float(value)):
        raise CraftError(f"{name} must be a finite number, got {value}")
    lo_bad = lo is not None and (value <= lo if lo_open else value < lo)
    hi_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if lo_bad or hi_bad:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            want = f"in {left}, {right}"
        elif lo is not None:
            want = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            want = f"{'<' if hi_open else '<='} {hi:g}"
        raise CraftError(f"{name} must be {want}, got {value}")


def check_seed(name: str, value) -> None:
    """A seed: an integer in [0, 2**31 - 1]."""
    check_range(name, value, 0, SEED_MAX, integer=True)


def check_finite_fields(cfg, prefix: str | None = None) -> None:
    """Every number in the dataclass ``cfg`` (nested dataclasses, tuples and lists included) is finite."""
    prefix = prefix or type(cfg).__name__
    for f in dataclasses.fields(cfg):
        _check_finite(f"{prefix}.{f.name}", getattr(cfg, f.name))


def _check_finite(name: str, v) -> None:
    if isinstance(v, bool) or v is None:
        return
    if isinstance(v, Real):
        if not math.isfinite(float(v)):
            raise CraftError(f"{name} must be a finite number, got {v}")
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        check_finite_fields(v, name)
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            _check_finite(f"{name}[{i}]", x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_finite(f"{name}[{k!r}]", x)


__all__ = ["LR_MAX", "SEED_MAX", "check_range", "check_seed", "check_finite_fields"]
