"""Checks that name what is wrong: config field types (a string k or a float step count is an error that names the
field) and tensors that hold NaN or inf.

Python dataclasses do not check their fields' types, so a config built in Python (or from JSON) could carry "8" for
k and fail later with a bare TypeError, or train on a schedule computed from the wrong value.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import torch


@functools.cache
def declared_types(cls: type, module: str, extra: tuple[str, ...] = ()) -> dict[str, tuple[type, ...]]:
    """The allowed types of every field that classes of `module` declare on `cls` (and of `extra` fields)."""
    hints = typing.get_type_hints(cls)
    own = set(extra).union(
        *(vars(klass).get("__annotations__", {}) for klass in cls.__mro__[:-1] if klass.__module__ == module)
    )
    return {
        name: typing.get_args(hints[name]) if isinstance(hints[name], types.UnionType) else (hints[name],)
        for name in own
    }


def _has_type(value: Any, expected: type) -> bool:
    # bool is an int to Python, and numpy scalars are not int or float: compare by the numbers hierarchy.
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected is float:
        return isinstance(value, numbers.Real)
    return value is None if expected is type(None) else isinstance(value, expected)


def check_types(cfg: Any, module: str, *, extra: tuple[str, ...] = (), what: str = "softsae") -> None:
    """Raise a TypeError naming the field, its value and the expected type for every field of `cfg` declared in
    `module` (plus `extra`) whose value has another type, and a ValueError for a number that is not finite."""
    for name, options in declared_types(type(cfg), module, extra).items():
        value = getattr(cfg, name)
        if not any(_has_type(value, option) for option in options):
            expected = " or ".join("None" if option is type(None) else option.__name__ for option in options)
            raise TypeError(f"{what}: {name}={value!r} has type {type(value).__name__}; expected {expected}")
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise ValueError(f"{what}: {name}={value!r} is invalid; expected a finite number")


def check_finite(tensors: Mapping[str, torch.Tensor], action: str) -> None:
    """Raise a ValueError, led by `action`, naming every floating-point tensor that holds NaN or inf and how many."""
    bad = {
        name: (int((~torch.isfinite(t)).sum()), t.numel())
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    }
    if bad:
        details = ", ".join(f"{name} has {n_bad} of {n} values NaN or inf" for name, (n_bad, n) in bad.items())
        raise ValueError(f"{action}: {details}; expected finite values")
