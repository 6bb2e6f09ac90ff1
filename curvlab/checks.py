"""Argument checks shared by every package: one place, one wording of the errors.

Each check takes the value and the name to report (``"NewtonCG.c1"``, ``"maxiter"``),
returns the value (converted where that is safe) and raises a ``ValueError`` or
``TypeError`` that names the argument, what was expected and what came. ``bool`` is
never accepted as a number (``lr=True`` is a mistake, not ``1``).

The ``*_fields`` forms check dataclass options by attribute name and report them as
``ClassName.option``.

Example:
    >>> from curvlab.checks import check_int, check_positive
    >>> check_int(3, "maxiter")
    3
    >>> check_positive(0.0, "lr")
    Traceback (most recent call last):
        ...
    ValueError: lr must be a finite number > 0, got 0.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_number",
    "is_finite",
    "check_positive",
    "check_int",
    "check_choice",
    "check_bool",
    "check_unit",
    "positive_fields",
    "int_fields",
]


def is_number(v: Any) -> bool:
    """Whether ``v`` is a real Python/numpy number (not a bool, not a tensor)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_finite(t: Any) -> bool:
    """Whether ``t`` (``None``, a number or a tensor) holds only finite values (``None`` counts as finite)."""
    if t is None:
        return True
    if isinstance(t, Tensor):
        return bool(torch.isfinite(t).all())
    return math.isfinite(float(t))


def check_positive(value: Any, name: str, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a float, checked to be a finite number ``> 0`` (``>= 0`` with ``allow_zero``).

    Raises:
        ValueError: ``value`` is not such a number.
    """
    ok = is_number(value) and (math.isfinite(value) or (allow_inf and value == math.inf))
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        want = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return float(value)


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` checked to be an integer (not a bool) in ``[minimum, maximum]``.

    Raises:
        ValueError: ``value`` is not such an integer.
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """``value`` checked to be one of ``choices``.

    Raises:
        ValueError: it is not.
    """
    choices = list(choices)
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` checked to be ``True`` or ``False``.

    Raises:
        TypeError: it is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_unit(value: Any, name: str, closed_right: bool = False, open_left: bool = False) -> float:
    """``value`` checked to lie in ``[0, 1)`` (``[0, 1]`` with ``closed_right``; ``(0, ...`` with ``open_left``).

    Raises:
        ValueError: it does not.
    """
    ok = is_number(value) and (value > 0 if open_left else value >= 0) and (value <= 1 if closed_right else value < 1)
    if not ok:
        rng = f"{'(' if open_left else '['}0, 1{']' if closed_right else ')'}"
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    return float(value)


def positive_fields(obj: Any, *names: str, allow_zero: bool = False, optional: bool = False) -> None:
    """:func:`check_positive` on options of ``obj`` (``None`` passes when ``optional``)."""
    for n in names:
        v = getattr(obj, n)
        if optional and v is None:
            continue
        check_positive(v, f"{type(obj).__name__}.{n}", allow_zero=allow_zero)


def int_fields(obj: Any, *names: str, minimum: int = 1, optional: bool = False) -> None:
    """:func:`check_int` on options of ``obj`` (``None`` passes when ``optional``)."""
    for n in names:
        v = getattr(obj, n)
        if optional and v is None:
            continue
        check_int(v, f"{type(obj).__name__}.{n}", minimum=minimum)
