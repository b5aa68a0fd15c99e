"""Argument checks shared by every public constructor, with one wording.

Each check raises at construction time: `TypeError` for a value of the wrong
type, `ValueError` for one out of range, and both name the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval given by ``low``/``high``.

    Args:
        value: the argument to check (a real number, not a bool).
        name: its name, for the error message.
        low: the lower bound (``None``: unbounded).
        high: the upper bound (``None``: unbounded).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.

    Returns:
        ``value`` as a Python float.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is NaN, infinite or out of range.

    Examples:
        >>> check_real(0.5, "gamma", low=0.0, high=1.0, high_open=True)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or not _within(value, low, high, low_open, high_open):
        raise ValueError(
            f"`{name}` must be a finite number in {_interval(low, high, low_open, high_open)}, "
            f"got {value!r}."
        )
    return value


def check_int(value: Any, name: str, *, low: int | None = None) -> int:
    """``value`` as a Python int >= ``low``.

    Raises:
        TypeError: ``value`` is not an integer (bools are refused).
        ValueError: ``value`` is below ``low``.

    Examples:
        >>> check_int(5, "k", low=1)
        5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value}.")
    return int(value)


def check_count_or_fraction(value: Any, name: str, *, min_count: int, what: str) -> int | float:
    """``value`` as an int count >= ``min_count``, or a float fraction of ``what``.

    The fraction lies in (0, 1], or in [0, 1] when ``min_count`` is 0.

    Raises:
        TypeError: ``value`` is not a real number (bools are refused).
        ValueError: the count or the fraction is out of range.

    Examples:
        >>> check_count_or_fraction(0.25, "k", min_count=1, what="the batch")
        0.25
        >>> check_count_or_fraction(8, "k", min_count=1, what="the batch")
        8
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be an int >= {min_count} (a count) or a float (a fraction of "
            f"{what}), got {type(value).__name__}."
        )
    if isinstance(value, numbers.Integral):
        return check_int(value, name, low=min_count)
    return check_real(value, name, low=0.0, high=1.0, low_open=min_count > 0)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: otherwise.

    Examples:
        >>> check_choice("joint", "radius", ("joint", "per_layer"))
        'joint'
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return value


def _within(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    return f"{left}, {right}"
