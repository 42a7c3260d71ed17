"""Tests for common.alignment.statistics: correlations, bootstrap intervals, mean and std across seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.alignment import (
    bootstrap_ci,
    bootstrap_correlation,
    bootstrap_indices,
    bootstrap_mmd2,
    compute_mmd2,
    mean_std,
    pearson,
    spearman,
)


@pytest.mark.parametrize(
    ("x", "y", "r", "p"),
    [
        # centred (-1, 0, 1), (-1, 1, 0): r = 1/2; t = r sqrt(1) / sqrt(3/4) = 1/sqrt(3), Cauchy: p = 1 - 2 atan(t)/pi
        ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], 0.5, 2.0 / 3.0),
        # sum dx dy = 4, sum dx^2 = sum dy^2 = 5: r = 0.8; t^2 = 32/9, t-dist with 2 df: p = 1 - t / sqrt(2 + t^2)
        ([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], 0.8, 0.2),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [-2.0, -4.0, -6.0, -8.0, -10.0], -1.0, 0.0),
    ],
)
def test_pearson_hand_values(x: list[float], y: list[float], r: float, p: float) -> None:
    got_r, got_p = pearson(x, y)
    assert got_r == pytest.approx(r, rel=1e-12)
    assert got_p == pytest.approx(p, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("x", "y", "rho"),
    [
        ([10.0, 20.0, 30.0, 40.0], [1.0, 3.0, 2.0, 4.0], 0.8),
        # ties: x ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
        ([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], 3.0 / math.sqrt(10.0)),
        ([1.0, 2.0, 3.0, 4.0, 5.0], list(np.exp([1.0, 2.0, 3.0, 4.0, 5.0])), 1.0),  # monotone, not linear
        ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], -1.0),
    ],
)
def test_spearman_hand_values(x: list[float], y: list[float], rho: float) -> None:
    assert spearman(x, y) == pytest.approx(rho, rel=1e-12)


def test_constant_input_gives_nan() -> None:
    r, p = pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert math.isnan(r) and math.isnan(p)
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0], "same length"),
        ([1.0, 2.0], [1.0, 2.0], "at least 3"),
        ([1, 2, np.nan], [1, 2, 3], "NaN"),
    ],
)
@pytest.mark.parametrize("func", [pearson, spearman])
def test_correlations_reject_bad_input(func, x: list[float], y: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        func(x, y)


def test_mean_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)  # sum of squares 5, ddof = 1
    mean1, std1 = mean_std([0.7])
    assert mean1 == 0.7 and math.isnan(std1)
    for bad in ([], [1.0, float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            mean_std(bad)


def test_bootstrap_indices() -> None:
    idx = bootstrap_indices(7, n_resamples=500, seed=3)
    assert idx.shape == (500, 7) and idx.dtype == np.int64
    assert idx.min() == 0 and idx.max() == 6
    np.testing.assert_array_equal(idx, bootstrap_indices(7, n_resamples=500, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(7, n_resamples=500, seed=4))
    # each draw is uniform: every index appears about 500 * 7 / 7 times
    assert np.all(np.abs(np.bincount(idx.ravel(), minlength=7) - 500) < 100)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 3, "n_resamples": 0}, {"n": 3, "seed": -2}])
def test_bootstrap_indices_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_indices(**kwargs)


def test_bootstrap_ci_of_a_mean_matches_normal_theory_and_narrows() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (25, 400):
        data = rng.normal(loc=3.0, size=n)
        ci = bootstrap_ci(lambda idx, d=data: float(d[idx].mean()), n, n_resamples=2000, seed=1)
        assert ci.estimate == pytest.approx(data.mean(), rel=1e-12)
        assert ci.low < ci.estimate < ci.high
        assert ci.n_valid == 2000
        # normal-theory 95 % interval of a mean: +- 1.96 s / sqrt(n)
        assert ci.high - ci.low == pytest.approx(2 * 1.96 * data.std(ddof=1) / math.sqrt(n), rel=0.15)
        widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2.5  # sqrt(16) = 4 times narrower in theory


def test_bootstrap_ci_several_sets_and_reproducibility() -> None:
    calls: list[tuple[int, int]] = []

    def stat(idx_a: np.ndarray, idx_b: np.ndarray) -> float:
        calls.append((idx_a.size, idx_b.size))
        return float(idx_a.mean() - idx_b.mean())

    ci = bootstrap_ci(stat, [5, 9], n_resamples=50, seed=2)
    assert set(calls) == {(5, 9)} and len(calls) == 51
    assert ci.estimate == pytest.approx(2.0 - 4.0)  # mean of arange(5) minus mean of arange(9)
    assert ci == bootstrap_ci(stat, [5, 9], n_resamples=50, seed=2)


def test_bootstrap_ci_drops_non_finite_resamples() -> None:
    # Pearson r of a 3-point resample is NaN when it draws one point only (constant x)
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([1.0, 3.0, 2.0])
    ci = bootstrap_ci(lambda idx: pearson(x[idx], y[idx])[0], 3, n_resamples=300, seed=0)
    # P(all three draws equal) = 3 / 27
    assert 300 - 3 * 300 / 27 - 20 < ci.n_valid < 300
    assert -1.0 <= ci.low <= ci.estimate <= ci.high <= 1.0
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci(lambda idx: float("nan"), 3, n_resamples=10)


@pytest.mark.parametrize(
    "kwargs", [{"sizes": []}, {"sizes": 0}, {"sizes": 3, "n_resamples": 0}, {"sizes": 3, "confidence": 1.0}]
)
def test_bootstrap_ci_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(lambda *idx: 0.0, **kwargs)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_bootstrap_correlation_against_scipy_per_resample(method: str) -> None:
    rng = np.random.default_rng(5)
    x = np.array([0.1, 0.3, 0.2, 0.5, 0.4])
    y = -2.0 * x + rng.normal(scale=0.1, size=5)
    xr = x[:, None] + rng.normal(scale=0.05, size=(5, 400))
    yr = y[:, None] + rng.normal(scale=0.05, size=(5, 400))
    corr = stats.pearsonr if method == "pearson" else stats.spearmanr
    reference = np.array([corr(xr[:, b], yr[:, b]).statistic for b in range(400)])
    ci = bootstrap_correlation(x, y, xr, yr, method=method, confidence=0.9)
    assert ci.estimate == pytest.approx(corr(x, y).statistic, rel=1e-12)
    assert ci.low == pytest.approx(np.quantile(reference, 0.05), rel=1e-10)
    assert ci.high == pytest.approx(np.quantile(reference, 0.95), rel=1e-10)
    assert ci.n_valid == 400
    assert ci.low <= ci.estimate <= ci.high < 0


def test_bootstrap_correlation_drops_constant_columns() -> None:
    x = np.array([1.0, 2.0, 3.0])
    xr = np.array([[1.0, 2.0, 1.0], [2.0, 2.0, 2.0], [3.0, 2.0, 3.0]])  # column 1 is constant
    ci = bootstrap_correlation(x, 2 * x, xr, 2 * xr)
    assert ci.n_valid == 2
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(1.0)


def test_bootstrap_correlation_of_d2p_over_tasks() -> None:
    """End to end on synthetic tasks: paired snapshots, image-level bootstrap of MMD^2, correlation with a gain."""
    rng = np.random.default_rng(6)
    n_resamples, drifts, sizes = 200, [0.05, 0.2, 0.4, 0.7, 1.0], [20, 20, 20, 26, 20]
    d2p, d2p_resampled = [], []
    for drift, n in zip(drifts, sizes, strict=True):
        pre = rng.normal(size=(n, 6))
        ft = pre + drift * rng.normal(size=(n, 6))
        d2p.append(compute_mmd2(ft, pre))
        d2p_resampled.append(bootstrap_mmd2(ft, pre, bootstrap_indices(n, n_resamples, seed=n)))
    rpg = -10.0 * np.array(drifts)  # further from the pretrained model, less gain
    rpg_resampled = rpg[:, None] + rng.normal(scale=0.5, size=(5, n_resamples))
    ci = bootstrap_correlation(d2p, rpg, np.array(d2p_resampled), rpg_resampled)
    assert ci.estimate == pytest.approx(pearson(d2p, rpg)[0])
    assert ci.estimate < -0.8
    assert ci.low <= ci.estimate <= ci.high


@pytest.mark.parametrize(
    ("xr_shape", "kwargs", "match"),
    [
        ((4, 10), {}, r"shape \(T=3"),
        ((3, 0), {}, r"shape \(T=3"),
        ((3, 10), {"method": "kendall"}, "method"),
        ((3, 10), {"confidence": 0.0}, "confidence"),
    ],
)
def test_bootstrap_correlation_rejects_bad_input(xr_shape: tuple[int, int], kwargs: dict, match: str) -> None:
    x = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=match):
        bootstrap_correlation(x, x, np.ones(xr_shape), np.ones((3, 10)), **kwargs)


def test_resample_seed_means_draws_seeds_per_column() -> None:
    from common.alignment.statistics import resample_seed_means

    # seed s has the constant value s on every resample: a column's mean is the mean of the drawn seed indices
    per_seed = np.repeat(np.array([[0.0], [1.0], [2.0]]), 4000, axis=1)
    means = resample_seed_means(per_seed, seed=1)
    assert means.shape == (4000,)
    assert set(np.round(means * 3).astype(int)) <= set(range(7))  # sums of 3 draws from {0, 1, 2}
    assert means.mean() == pytest.approx(1.0, abs=0.03)
    # the variance of a mean of 3 draws from {0, 1, 2} (variance 2/3) is 2/9; the plain seed mean has none
    assert means.var() == pytest.approx(2.0 / 9.0, rel=0.1)
    np.testing.assert_array_equal(means, resample_seed_means(per_seed, seed=1))
    one = np.array([[0.5, 0.25, np.nan]])
    np.testing.assert_array_equal(resample_seed_means(one), one[0])
    with pytest.raises(ValueError, match="shape"):
        resample_seed_means(np.ones(3))
