"""Argument checks shared across the package (torch-free): one error wording for every constructor that uses them."""

from __future__ import annotations

import math

__all__ = ["check_float", "check_int"]


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` when it is an int (not a bool) ``>= minimum``; a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_float(value: object, name: str, low: float, high: float | None = None, open_low: bool = False) -> float:
    """``float(value)`` when it is a finite real number (not a bool) in ``[low, high]`` (``(low, high]`` with
    ``open_low``; no upper bound when ``high`` is None); a ``ValueError`` naming ``name`` and the bounds otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}.")
    return float(value)
