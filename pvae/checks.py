"""Argument checks at the library's boundary: one function per kind of value, one wording everywhere.

Each check returns the value it accepted (real numbers as a ``float``) and raises ``ValueError`` naming the
argument and the accepted range otherwise, e.g.
``check_int("z_dim", 0)`` → ``ValueError: z_dim must be a positive integer, got 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = [
    "check_choice",
    "check_finite",
    "check_int",
    "check_positive",
    "check_probability",
]


def _integer_range(low: int | None, high: int | None) -> str:
    if high is None:
        if low == 1:
            return "a positive integer"
        if low == 0:
            return "a non-negative integer"
        return "an integer" if low is None else f"an integer ≥ {low}"
    if low is None:
        return f"an integer ≤ {high}"
    return f"an integer in [{low}, {high}]"


def check_int(name: str, value, low: int | None = 1, high: int | None = None) -> int:
    """``value`` when it is a Python ``int`` (not a bool) in [low, high], else ``ValueError``.

    :param name: the argument's name, as the caller knows it.
    :param value: what was passed.
    :param low: smallest accepted value (``None``: no lower bound); the default accepts positive integers.
    :param high: largest accepted value (``None``: no upper bound).
    :returns: ``value``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ValueError(f"{name} must be {_integer_range(low, high)}, got {value!r}")
    return value


def check_positive(name: str, value: float | Iterable[float]) -> float:
    """``value`` as a ``float`` when it is a finite real number > 0 (not a bool), else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number > 0, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real number > 0, got {value!r}") from error
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return number


def check_probability(name: str, value, *, include_one: bool = True) -> float:
    """``value`` as a ``float`` when it lies in [0, 1] (or [0, 1) with ``include_one=False``)."""
    accepted = "[0, 1]" if include_one else "[0, 1)"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in {accepted}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number in {accepted}, got {value!r}") from error
    if not (0.0 <= number <= 1.0 and (include_one or number < 1.0)):  # also False for NaN
        raise ValueError(f"{name} must be a number in {accepted}, got {value!r}")
    return number


def check_choice(name: str, value, choices: Iterable):
    """``value`` when it is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    try:
        known = any(isinstance(value, type(choice)) and value == choice for choice in choices)
    except (TypeError, RuntimeError, ValueError):  # e.g. a tensor, whose == is not a bool
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` when it is a floating tensor with only finite entries, else ``ValueError`` naming it."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float32/float64), got {value.dtype}")
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name} must be finite; it has {bad} NaN/inf entr{'y' if bad == 1 else 'ies'}")
    return value
