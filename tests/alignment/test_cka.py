"""Tests for common.alignment.cka.compute_linear_cka against the HSIC formula of Kornblith et al. 2019."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.alignment import compute_linear_cka


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H) / (n - 1)^2, K = X X^T."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k: np.ndarray, l_: np.ndarray) -> float:
        return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2

    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize(("n", "dx", "dy"), [(10, 3, 5), (6, 20, 4), (30, 8, 8)])
def test_matches_hsic_formula(n: int, dx: int, dy: int) -> None:
    rng = np.random.default_rng(n + dx + dy)
    x = rng.normal(size=(n, dx)) + 2.0  # uncentred on purpose
    y = np.tanh(x @ rng.normal(size=(dx, dy))) + rng.normal(scale=0.5, size=(n, dy))
    expected = _hsic_cka(x, y)
    assert 0.05 < expected < 0.999
    assert compute_linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert compute_linear_cka(y, x) == pytest.approx(expected, rel=1e-10)


def test_hand_value_one_dimensional() -> None:
    # for one feature CKA is the squared Pearson r; centred (-1, 0, 1) and (-1, 1, 0) give r = 1/2
    assert compute_linear_cka([[1.0], [2.0], [3.0]], [[1.0], [3.0], [2.0]]) == pytest.approx(0.25, rel=1e-12)


def test_invariances() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert compute_linear_cka(x, x @ q) == pytest.approx(1.0, rel=1e-12)
    assert compute_linear_cka(x, 3.7 * x) == pytest.approx(1.0, rel=1e-12)
    assert compute_linear_cka(x, x + 5.0) == pytest.approx(1.0, rel=1e-12)
    y = rng.normal(size=(12, 4))
    assert compute_linear_cka(x @ q * 2.0, y) == pytest.approx(compute_linear_cka(x, y), rel=1e-10)


def test_torch_float32_input() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    y = rng.normal(size=(9, 3)).astype(np.float32)
    expected = _hsic_cka(x.astype(np.float64), y.astype(np.float64))
    assert compute_linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.ones((4, 2)), np.ones((5, 2)), "same images"),
        (np.ones((1, 2)), np.ones((1, 2)), "at least 2"),
        (np.ones((4, 2)), np.arange(8.0).reshape(4, 2), "x is constant"),
        (np.arange(8.0).reshape(4, 2), np.full((4, 3), 0.1), "y is constant"),
        (np.ones(4), np.ones((4, 2)), "2-D"),
    ],
)
def test_rejects_bad_input(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_linear_cka(x, y)
