"""Input checks shared by the alignment functions (private)."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from numpy.typing import ArrayLike


def as_float64_matrix(a: ArrayLike | torch.Tensor, name: str) -> torch.Tensor:
    """Return ``a`` as a finite, non-empty ``(N, d)`` float64 CPU tensor that does not share memory with ``a``.

    Raises:
        ValueError: if ``a`` is not 2-D, has no rows or columns, or holds NaN or inf.
    """
    if isinstance(a, torch.Tensor):
        t = a.detach().to(device="cpu", dtype=torch.float64, copy=True)
    else:
        t = torch.from_numpy(np.array(a, dtype=np.float64))  # a copy: reversed views have negative strides
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) array of feature rows, got shape {tuple(t.shape)}.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf.")
    return t


def l2_normalize_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """Divide each row of ``(N, d)`` ``t`` by its L2 norm; a zero row has no direction, so it raises ValueError."""
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    zero = torch.nonzero(norms[:, 0] == 0).flatten().tolist()
    if zero:
        raise ValueError(f"{name} has rows of zero norm (rows {zero[:5]}); they cannot be L2-normalised.")
    return t / norms


def as_float64_vector(a: ArrayLike, name: str, min_length: int = 1) -> np.ndarray:
    """Return ``a`` as a finite 1-D float64 numpy array with at least ``min_length`` entries."""
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}.")
    if v.size < min_length:
        raise ValueError(f"{name} needs at least {min_length} values, got {v.size}.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf.")
    return v


def check_positive_float(value: float, name: str) -> float:
    """Return ``value`` as float if it is a finite real number > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def check_confidence(confidence: float) -> float:
    """Return ``confidence`` if it lies strictly between 0 and 1, else raise ValueError."""
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}.")
    return float(confidence)


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is an int >= 0 (what ``numpy.random.default_rng`` accepts), else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return int(seed)
