"""Tests for common.alignment.mmd: MMD^2 (paper Eq. 1), its permutation test and its bootstrap."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from common.alignment import bootstrap_indices, bootstrap_mmd2, compute_mmd2, mmd_permutation_test


def _loop_mmd2(x: np.ndarray, y: np.ndarray, sigma: float, normalize: bool) -> float:
    """Eq. 1 written out with python loops, the independent reference."""
    rows_x = [list(map(float, r)) for r in x]
    rows_y = [list(map(float, r)) for r in y]
    if normalize:
        rows_x = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows_x]
        rows_y = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows_y]

    def k(a: list[float], b: list[float]) -> float:
        return math.exp(-sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / sigma**2)

    kxx = sum(k(a, b) for a in rows_x for b in rows_x) / len(rows_x) ** 2
    kyy = sum(k(a, b) for a in rows_y for b in rows_y) / len(rows_y) ** 2
    kxy = sum(k(a, b) for a in rows_x for b in rows_y) / (len(rows_x) * len(rows_y))
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("n", "m", "d"), [(5, 7, 3), (6, 6, 4), (1, 4, 2)])
def test_matches_double_loop(sigma: float, normalize: bool, n: int, m: int, d: int) -> None:
    rng = np.random.default_rng(n * 100 + m * 10 + d)
    x = rng.normal(size=(n, d))
    y = rng.normal(loc=0.3, size=(m, d))
    expected = _loop_mmd2(x, y, sigma, normalize)
    assert expected > 1e-3  # the case is not degenerate
    assert compute_mmd2(x, y, sigma=sigma, normalize=normalize) == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_hand_computed_value() -> None:
    # x = {(0,0), (1,0)}, y = {(0,0)}: mean Kxx = (1 + e^-1)/2, Kyy = 1, mean Kxy = (1 + e^-1)/2 -> (1 - e^-1)/2
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    y = np.array([[0.0, 0.0]])
    assert compute_mmd2(x, y, normalize=False) == pytest.approx((1 - math.exp(-1)) / 2, rel=1e-12)


@pytest.mark.parametrize(
    ("u", "v", "sigma", "normalize", "dist2"),
    [
        ([3.0, 4.0], [1.0, 0.0], 1.0, True, 0.8),  # unit vectors (0.6, 0.8) and (1, 0)
        ([3.0, 4.0], [1.0, 0.0], 2.0, True, 0.8),
        ([1.0, 2.0, 2.0], [0.0, 0.0, 1.0], 1.5, False, 6.0),
        ([1.0, 0.0], [-1.0, 0.0], 1.0, True, 4.0),  # antipodal unit vectors
    ],
)
def test_closed_form_point_masses(u: list[float], v: list[float], sigma: float, normalize: bool, dist2: float) -> None:
    x = np.tile(u, (4, 1))
    y = np.tile(v, (3, 1))
    expected = 2 - 2 * math.exp(-dist2 / sigma**2)
    assert compute_mmd2(x, y, sigma=sigma, normalize=normalize) == pytest.approx(expected, rel=1e-12)


def test_properties() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 5))
    y = rng.normal(size=(7, 5))
    assert compute_mmd2(x, x) == pytest.approx(0.0, abs=1e-14)
    assert compute_mmd2(x, x[::-1]) == pytest.approx(0.0, abs=1e-14)
    assert compute_mmd2(x, y) == pytest.approx(compute_mmd2(y, x), rel=1e-12)
    perm_x, perm_y = rng.permutation(9), rng.permutation(7)
    assert compute_mmd2(x[perm_x], y[perm_y]) == pytest.approx(compute_mmd2(x, y), rel=1e-12)
    # with normalize=True only the direction of each row counts
    scales = rng.uniform(0.1, 10.0, size=(9, 1))
    assert compute_mmd2(x * scales, y * 3.0) == pytest.approx(compute_mmd2(x, y), rel=1e-10)


def test_shifted_sets_are_far() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(scale=0.1, size=(20, 4))
    near = compute_mmd2(x, x + 0.1, normalize=False)
    far = compute_mmd2(x, x + 3.0, normalize=False)
    assert 0 < near < far
    assert far > 1.5  # tight clusters 6 apart: cross terms ~ exp(-36), within terms ~ exp(-0.08)


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    y = rng.normal(size=(5, 8)).astype(np.float32)
    expected = _loop_mmd2(x.astype(np.float64), y.astype(np.float64), 1.0, True)
    assert compute_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)
    assert compute_mmd2(x.tolist(), y.tolist()) == pytest.approx(expected, rel=1e-10)


def test_does_not_modify_inputs() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    y = np.array([[2.0, 0.0], [0.0, 5.0]])
    x0, y0 = x.clone(), y.copy()
    compute_mmd2(x, y)
    assert torch.equal(x, x0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (np.ones((3, 2)), np.ones((3, 3)), {}, "same feature size"),
        (np.ones(3), np.ones((3, 3)), {}, "2-D"),
        (np.ones((0, 3)), np.ones((3, 3)), {}, "at least one row"),
        (np.array([[1.0, np.nan]]), np.ones((3, 2)), {}, "NaN"),
        (np.array([[0.0, 0.0], [1.0, 0.0]]), np.ones((3, 2)), {}, "zero norm"),
        (np.ones((3, 2)), np.ones((3, 2)), {"sigma": 0.0}, "sigma"),
        (np.ones((3, 2)), np.ones((3, 2)), {"sigma": float("inf")}, "sigma"),
        (np.ones((3, 2)), np.ones((3, 2)), {"normalize": 1}, "normalize"),
    ],
)
def test_rejects_bad_input(x: np.ndarray, y: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_mmd2(x, y, **kwargs)


def test_zero_row_allowed_without_normalization() -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert compute_mmd2(x, x[:1], normalize=False) == pytest.approx((1 - math.exp(-1)) / 2, rel=1e-12)


def test_permutation_test_different_sets_small_p() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 6))
    y = rng.normal(loc=1.0, size=(25, 6))
    mmd2, p = mmd_permutation_test(x, y, n_permutations=200, seed=0)
    assert mmd2 == pytest.approx(_loop_mmd2(x, y, 1.0, True), rel=1e-10)
    assert p == pytest.approx(1 / 201)  # no relabelling comes close to the observed value


def test_permutation_test_same_distribution_large_p() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 6))
    y = rng.normal(size=(30, 6))
    _, p = mmd_permutation_test(x, y, n_permutations=500, seed=0)
    assert p > 0.1
    # the same rows in another order: MMD^2 = 0, so every relabelling is >= observed and p is exactly 1
    mmd2, p_same = mmd_permutation_test(x, x[::-1], n_permutations=50, seed=3)
    assert mmd2 == pytest.approx(0.0, abs=1e-14)
    assert p_same == 1.0


def test_permutation_test_reproducible() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 3))
    y = rng.normal(loc=0.2, size=(10, 3))
    assert mmd_permutation_test(x, y, 300, seed=11) == mmd_permutation_test(x, y, 300, seed=11)


def test_permutation_p_matches_exact_enumeration() -> None:
    # 3 + 3 rows: 20 distinct splits; the Monte Carlo p approaches the exact permutation p
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 2))
    y = rng.normal(loc=0.8, size=(3, 2))
    pooled = np.vstack([x, y])
    observed = _loop_mmd2(x, y, 1.0, True)
    splits = list(itertools.combinations(range(6), 3))
    values = [_loop_mmd2(pooled[list(s)], pooled[[i for i in range(6) if i not in s]], 1.0, True) for s in splits]
    exact = np.mean([v >= observed - 1e-12 for v in values])
    _, p = mmd_permutation_test(x, y, n_permutations=20000, seed=0)
    assert 0.05 < exact < 1.0
    assert p == pytest.approx(exact, abs=0.015)


def test_permutation_test_fast_at_paper_size() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(148, 768))
    y = rng.normal(size=(148, 768))
    start = time.perf_counter()
    mmd_permutation_test(x, y, n_permutations=1000, seed=0)
    assert time.perf_counter() - start < 5.0  # typically ~0.1 s


@pytest.mark.parametrize("kwargs", [{"n_permutations": 0}, {"seed": -1}, {"n_permutations": 2.5}])
def test_permutation_test_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        mmd_permutation_test(np.ones((3, 2)), np.eye(2), **kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_bootstrap_mmd2_matches_loop_on_resampled_rows(normalize: bool) -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 3))
    y = x + rng.normal(scale=0.5, size=(8, 3))
    idx = bootstrap_indices(8, n_resamples=6, seed=1)
    got = bootstrap_mmd2(x, y, idx, sigma=0.7, normalize=normalize)
    expected = [_loop_mmd2(x[i], y[i], 0.7, normalize) for i in idx]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    # a resample of size m != N, with repeated images
    sub = np.array([[0, 0, 5], [7, 1, 1]])
    np.testing.assert_allclose(
        bootstrap_mmd2(x, y, sub, sigma=0.7, normalize=normalize),
        [_loop_mmd2(x[i], y[i], 0.7, normalize) for i in sub],
        rtol=1e-10,
    )


@pytest.mark.parametrize(
    ("n_y", "indices", "match"),
    [(5, [[0, 1]], "same number of rows"), (4, [[0, 4]], r"\[0, 4\)"), (4, [0, 1], "2-D"), (4, [[0.0, 1.0]], "2-D")],
)
def test_bootstrap_mmd2_rejects_bad_input(n_y: int, indices: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_mmd2(np.eye(4), np.eye(n_y, 4), indices)
