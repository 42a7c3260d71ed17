"""Squared maximum mean discrepancy (MMD^2) between two sets of feature vectors, paper Eq. 1, and its resampling.

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888),
section 3.2, Eq. 1: the biased (V-statistic) estimate with the Gaussian kernel k(u, v) = exp(-||u - v||^2 / sigma^2)
(sigma^2, not 2 sigma^2). D2R, D2P and D2S are this quantity between the fine-tuned model's features and those of
the random-weight, pretrained and scratch models on the same test images. The permutation test follows Gretton et
al., "A Kernel Two-Sample Test", JMLR 2012.

Not to be confused with ``monai.metrics.MMDMetric``, which is a linear-kernel MMD between image batches; here the
kernel is Gaussian and each row is one image's pooled feature vector.

All three functions build the Gaussian kernel matrix of the pooled rows ``z = [x; y]`` once; MMD^2 for any weighting
of the rows is then the quadratic form ``w^T K w`` with ``w = (a / sum(a), -b / sum(b))``, so permutations and
bootstrap resamples cost one matrix product each, not a new kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

from common.alignment._validation import (
    as_float64_matrix,
    check_positive_float,
    check_positive_int,
    check_seed,
    l2_normalize_rows,
)

__all__ = ["bootstrap_mmd2", "compute_mmd2", "mmd_permutation_test"]

# Weight vectors per matrix product; bounds memory at _CHUNK x (N + M) float64 values.
_CHUNK = 256
# A permutation that only reorders rows within each set reproduces the observed statistic up to rounding; it must
# count as ">= observed", so the comparison allows this much absolute slack (MMD^2 with this kernel lies in [0, 2]).
_TIE_TOL = 1e-12


def _pooled_kernel(
    x: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, sigma: float, normalize: bool
) -> tuple[torch.Tensor, int]:
    """Gaussian kernel matrix of the pooled rows ``[x; y]`` and ``N``: ``(N, d), (M, d) -> (N + M, N + M), N``."""
    sigma = check_positive_float(sigma, "sigma")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}.")
    xt = as_float64_matrix(x, "x")
    yt = as_float64_matrix(y, "y")
    if xt.shape[1] != yt.shape[1]:
        raise ValueError(f"x and y must have the same feature size, got {xt.shape[1]} and {yt.shape[1]}.")
    if normalize:
        xt = l2_normalize_rows(xt, "x")
        yt = l2_normalize_rows(yt, "y")
    z = torch.cat([xt, yt])
    sq = (z * z).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    d2.fill_diagonal_(0.0)  # the expanded form reaches the exact zero self-distance only up to rounding
    return torch.exp(-d2 / sigma**2), xt.shape[0]


def _quadratic_forms(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w_b^T K w_b`` for every row ``w_b``: ``(n, n), (B, n) -> (B,)``."""
    return ((w @ k) * w).sum(dim=1)


def _set_weights(n: int, m: int) -> torch.Tensor:
    """The row weights ``(1/N, ..., 1/N, -1/M, ..., -1/M)`` that turn ``w^T K w`` into Eq. 1: ``-> (N + M,)``."""
    return torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), -1.0 / m, dtype=torch.float64)])


def compute_mmd2(
    x: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, sigma: float = 1.0, normalize: bool = True
) -> float:
    """Squared MMD between two sets of feature vectors, paper Eq. 1 (biased V-statistic, Gaussian kernel).

    ``MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)`` with
    ``k(u, v) = exp(-||u - v||^2 / sigma^2)``, computed in float64. This is a different quantity from MONAI's
    ``monai.metrics.MMDMetric`` (linear kernel on images).

    Args:
        x: ``(N, d)`` features, one row per image (numpy, torch or nested lists).
        y: ``(M, d)`` features; ``M`` may differ from ``N``, ``d`` may not.
        sigma: kernel bandwidth, > 0. Default 1.0 (the paper's value, meant for L2-normalised rows).
        normalize: L2-normalise every row first (default True), so that ``sigma = 1`` means the same for any
            architecture; a row of zero norm then raises ValueError.

    Returns:
        MMD^2 as a float in ``[0, 2]`` (the kernel lies in ``(0, 1]``). The V-statistic is a squared RKHS norm, so a
        value that rounding pushes below zero is clamped to 0.

    Raises:
        ValueError: if the inputs are not finite non-empty 2-D arrays of equal width, or ``sigma`` is not > 0.
    """
    k, n = _pooled_kernel(x, y, sigma, normalize)
    w = _set_weights(n, k.shape[0] - n)
    return max(float(_quadratic_forms(k, w[None])[0]), 0.0)


def mmd_permutation_test(
    x: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    n_permutations: int = 1000,
    seed: int = 0,
    sigma: float = 1.0,
    normalize: bool = True,
) -> tuple[float, float]:
    """Permutation two-sample test of ``H0: x and y come from one distribution`` with the MMD^2 of Eq. 1.

    The pooled rows ``[x; y]`` are relabelled ``n_permutations`` times (the first ``N`` of each shuffle play ``x``);
    ``p = (1 + #{perm MMD^2 >= observed}) / (1 + n_permutations)``, which is never 0. The kernel matrix is built once
    and each permutation is one quadratic form, so 1000 permutations of 2 x 148 x 768 take well under a second.

    Args:
        x: ``(N, d)`` features; y: ``(M, d)`` features (unpaired; ``M`` may differ from ``N``).
        n_permutations: number of random relabellings, >= 1. Default 1000.
        seed: seed of the ``numpy.random.default_rng`` that draws them; same seed, same p-value. Default 0.
        sigma, normalize: as in :func:`compute_mmd2`.

    Returns:
        ``(mmd2, p_value)``: the observed MMD^2 (equal to :func:`compute_mmd2`) and the permutation p-value.
    """
    n_permutations = check_positive_int(n_permutations, "n_permutations")
    rng = np.random.default_rng(check_seed(seed))
    k, n = _pooled_kernel(x, y, sigma, normalize)
    n_total = k.shape[0]
    w0 = _set_weights(n, n_total - n)
    observed = float(_quadratic_forms(k, w0[None])[0])
    exceed = 0
    for start in range(0, n_permutations, _CHUNK):
        size = min(_CHUNK, n_permutations - start)
        perms = rng.permuted(np.tile(np.arange(n_total), (size, 1)), axis=1)  # (size, N + M)
        stats = _quadratic_forms(k, w0[torch.from_numpy(perms)])
        exceed += int((stats >= observed - _TIE_TOL).sum())
    return max(observed, 0.0), (1 + exceed) / (1 + n_permutations)


def bootstrap_mmd2(
    x: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    indices: ArrayLike,
    sigma: float = 1.0,
    normalize: bool = True,
) -> np.ndarray:
    """MMD^2 of paired snapshots on bootstrap resamples of the test images (for the CIs of D2R, D2P, D2S).

    ``x`` and ``y`` hold two models' features of the same ``N`` images in the same order (see
    :func:`common.alignment.pair_by_ids`). Resample ``b`` keeps both rows of every drawn image, with multiplicity, so
    its value equals ``compute_mmd2(x[indices[b]], y[indices[b]])``; all resamples share one kernel matrix.

    Args:
        x: ``(N, d)`` features; y: ``(N, d)`` features of the same images.
        indices: ``(B, m)`` integer image indices in ``[0, N)``, e.g. from
            :func:`common.alignment.bootstrap_indices` (``m = N`` for the ordinary bootstrap).
        sigma, normalize: as in :func:`compute_mmd2`.

    Returns:
        ``(B,)`` float64 array of MMD^2 values.
    """
    xt = as_float64_matrix(x, "x")
    yt = as_float64_matrix(y, "y")
    n = xt.shape[0]
    if yt.shape[0] != n:
        raise ValueError(f"paired x and y need the same number of rows (images), got {n} and {yt.shape[0]}.")
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 2-D (B, m) integer array, got {idx.dtype} {idx.shape}.")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}), got values in [{idx.min()}, {idx.max()}].")
    k, _ = _pooled_kernel(xt, yt, sigma, normalize)
    n_resamples, m = idx.shape
    out = torch.empty(n_resamples, dtype=torch.float64)
    for start in range(0, n_resamples, _CHUNK):
        block = idx[start : start + _CHUNK]
        rows = block.shape[0]
        # multiplicity of each image in each resample, (rows, N), via one bincount over row-offset indices
        offsets = block + (np.arange(rows) * n)[:, None]
        counts = torch.from_numpy(np.bincount(offsets.ravel(), minlength=rows * n).reshape(rows, n) / m)
        w = torch.cat([counts, -counts], dim=1)
        out[start : start + rows] = _quadratic_forms(k, w)
    return out.clamp_min(0.0).numpy()
