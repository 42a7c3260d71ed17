"""Statistics over tasks, seeds and test images: correlations, bootstrap intervals, mean and spread across seeds.

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888),
section 4.3 correlates alignment distances with RPG across the five tasks per FM (Pearson r with p-value; the paper
reports r < -0.8 between D2P and RPG vs specialised). Spearman's rho and bootstrap intervals (Efron and Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 13, percentile interval) are added here.

The bootstrap resamples test images, not tasks: with five tasks, resampling tasks says little. Each task's test set
is resampled independently (the sets are independent samples), and either a callable recomputes the statistic from
the drawn image indices (:func:`bootstrap_ci`) or the caller precomputes per-task statistics on each resample, e.g.
with :func:`common.alignment.bootstrap_mmd2`, and :func:`bootstrap_correlation` correlates them resample by resample.
With several seeds, :func:`resample_seed_means` adds the second level of the hierarchical bootstrap: every image
resample also draws the seeds with replacement, so the interval carries the seed-to-seed spread as well.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from common.alignment._validation import as_float64_vector, check_confidence, check_positive_int, check_seed

__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "bootstrap_correlation",
    "bootstrap_indices",
    "mean_std",
    "pearson",
    "resample_seed_means",
    "spearman",
]

_METHODS = ("pearson", "spearman")


class BootstrapCI(NamedTuple):
    """A point estimate and its percentile bootstrap interval.

    Attributes:
        estimate: the statistic on the original (not resampled) data.
        low: lower bound, the ``(1 - confidence) / 2`` quantile of the resampled statistics.
        high: upper bound, the ``(1 + confidence) / 2`` quantile.
        n_valid: resamples whose statistic was finite and entered the quantiles (a correlation is NaN on a resample
            where one variable is constant); compare with the number of resamples drawn.
    """

    estimate: float
    low: float
    high: float
    n_valid: int


def _paired(x: ArrayLike, y: ArrayLike, min_length: int) -> tuple[np.ndarray, np.ndarray]:
    xv = as_float64_vector(x, "x", min_length)
    yv = as_float64_vector(y, "y", min_length)
    if xv.size != yv.size:
        raise ValueError(f"x and y must have the same length, got {xv.size} and {yv.size}.")
    return xv, yv


def pearson(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Pearson correlation and its two-sided p-value (``scipy.stats.pearsonr``): ``(n,), (n,) -> (r, p)``.

    Args:
        x, y: paired finite values, ``n >= 3`` (e.g. D2P and RPG of the five tasks).

    Returns:
        ``(r, p)``; ``(nan, nan)`` when ``x`` or ``y`` is constant (r is 0 / 0), without scipy's warning.
    """
    xv, yv = _paired(x, y, 3)
    if np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(xv, yv)
    return float(result.statistic), float(result.pvalue)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``, ties get average ranks): ``(n,), (n,) -> rho``.

    Args:
        x, y: paired finite values, ``n >= 3``.

    Returns:
        rho in ``[-1, 1]``; ``nan`` when ``x`` or ``y`` is constant.
    """
    xv, yv = _paired(x, y, 3)
    if np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return float("nan")
    return float(stats.spearmanr(xv, yv).statistic)


def mean_std(values: ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) across seeds: ``(S,) -> (mean, std)``.

    Returns:
        ``(mean, std)``; with a single seed the spread is unknown and ``std`` is ``nan``.

    Raises:
        ValueError: if ``values`` is empty, not 1-D or not finite (a failed run should not vanish into an average).
    """
    v = as_float64_vector(values, "values")
    std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return float(np.mean(v)), std


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Image indices for the ordinary bootstrap: ``-> (n_resamples, n)`` int64, drawn uniformly with replacement.

    Args:
        n: number of test images, >= 1.
        n_resamples: number of resamples, >= 1. Default 1000.
        seed: seed of ``numpy.random.default_rng``. Default 0.
    """
    n = check_positive_int(n, "n")
    n_resamples = check_positive_int(n_resamples, "n_resamples")
    rng = np.random.default_rng(check_seed(seed))
    return rng.integers(0, n, size=(n_resamples, n), dtype=np.int64)


def resample_seed_means(per_seed: ArrayLike, seed: int = 0) -> np.ndarray:
    """Seed mean on every resample with the seeds drawn with replacement: ``(S, B) -> (B,)``.

    Row ``s`` of ``per_seed`` holds seed ``s``'s statistic on ``B`` image resamples; column ``b`` of the result is
    the mean of ``per_seed[i, b]`` over ``S`` seed indices ``i`` drawn uniformly with replacement, independently for
    every column. With one seed it is that seed's row. NaN in a drawn value makes that column NaN.

    Args:
        per_seed: ``(S, B)`` float, ``S >= 1``, ``B >= 1``.
        seed: seed of ``numpy.random.default_rng``. Default 0.
    """
    values = np.asarray(per_seed, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"per_seed must have shape (S >= 1, B >= 1), got {values.shape}.")
    n_seeds, n_resamples = values.shape
    if n_seeds == 1:
        return values[0].copy()
    rng = np.random.default_rng(check_seed(seed))
    drawn = rng.integers(0, n_seeds, size=(n_seeds, n_resamples))
    return np.take_along_axis(values, drawn, axis=0).mean(axis=0)


def _percentile_ci(estimate: float, values: np.ndarray, confidence: float) -> BootstrapCI:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        raise ValueError("no bootstrap resample gave a finite statistic.")
    alpha = 1.0 - confidence
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(float(estimate), float(low), float(high), int(valid.size))


def bootstrap_ci(
    stat: Callable[..., float],
    sizes: int | Sequence[int],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap interval of any statistic of one or more independently resampled test sets.

    ``stat`` is called with one ``(n_s,)`` int64 index array per test set, ``stat(idx_1, ..., idx_S)``: first with
    ``arange(n_s)`` for the point estimate, then with ``n_resamples`` draws with replacement, each set drawn
    independently. For one task, ``stat = lambda idx: compute_mmd2(ft[idx], pre[idx])``; for the correlation across
    tasks, ``stat`` recomputes every task's D2P and RPG on its own indices and returns their Pearson r. Resamples
    where ``stat`` is not finite are left out and counted in ``n_valid``.

    Args:
        stat: callable returning a float.
        sizes: number of test images per set, an int for one set. Each >= 1.
        n_resamples: >= 1. Default 1000.
        confidence: interval coverage in ``(0, 1)``. Default 0.95.
        seed: seed of ``numpy.random.default_rng``. Default 0.

    Raises:
        ValueError: on bad arguments, or if no resample gives a finite statistic.
    """
    size_list = [sizes] if isinstance(sizes, numbers.Integral) else list(sizes)
    if not size_list:
        raise ValueError("sizes must name at least one test set.")
    size_list = [check_positive_int(s, "each size") for s in size_list]
    n_resamples = check_positive_int(n_resamples, "n_resamples")
    confidence = check_confidence(confidence)
    rng = np.random.default_rng(check_seed(seed))
    draws = [rng.integers(0, s, size=(n_resamples, s), dtype=np.int64) for s in size_list]
    estimate = float(stat(*(np.arange(s, dtype=np.int64) for s in size_list)))
    values = np.array([float(stat(*(d[b] for d in draws))) for b in range(n_resamples)])
    return _percentile_ci(estimate, values, confidence)


def _columnwise_correlation(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
    """Correlation of column ``j`` of ``a`` with column ``j`` of ``b``: ``(T, B), (T, B) -> (B,)``, NaN if constant."""
    if method == "spearman":
        a = stats.rankdata(a, axis=0)
        b = stats.rankdata(b, axis=0)
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(axis=0) / np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def bootstrap_correlation(
    x: ArrayLike,
    y: ArrayLike,
    x_resampled: ArrayLike,
    y_resampled: ArrayLike,
    method: str = "pearson",
    confidence: float = 0.95,
) -> BootstrapCI:
    """Percentile bootstrap interval of the correlation across tasks, from statistics precomputed per resample.

    Row ``t`` of ``x_resampled`` holds task ``t``'s statistic (e.g. D2P from :func:`common.alignment.bootstrap_mmd2`)
    on ``B`` bootstrap resamples of that task's test images, and likewise ``y_resampled`` (e.g. RPG); column ``b`` of
    both must come from the same image resamples. The correlation over tasks is computed for every column; columns
    where either variable is constant are left out and counted in ``n_valid``.

    Args:
        x, y: ``(T,)`` statistics on the full test sets, ``T >= 3``; their correlation is the point estimate.
        x_resampled, y_resampled: ``(T, B)`` resampled statistics, finite.
        method: ``"pearson"`` (default) or ``"spearman"``.
        confidence: interval coverage in ``(0, 1)``. Default 0.95.

    Raises:
        ValueError: on mismatched shapes, non-finite values, an unknown method, or no column with a finite correlation.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    confidence = check_confidence(confidence)
    xv, yv = _paired(x, y, 3)
    xr = np.asarray(x_resampled, dtype=np.float64)
    yr = np.asarray(y_resampled, dtype=np.float64)
    for name, arr in (("x_resampled", xr), ("y_resampled", yr)):
        if arr.ndim != 2 or arr.shape[0] != xv.size or arr.shape[1] == 0:
            raise ValueError(f"{name} must have shape (T={xv.size}, B >= 1), got {arr.shape}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf.")
    if xr.shape != yr.shape:
        raise ValueError(f"x_resampled and y_resampled must have the same shape, got {xr.shape} and {yr.shape}.")
    estimate = pearson(xv, yv)[0] if method == "pearson" else spearman(xv, yv)
    return _percentile_ci(estimate, _columnwise_correlation(xr, yr, method), confidence)
