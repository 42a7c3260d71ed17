"""Linear centred kernel alignment (CKA), a second representation-similarity measure beside MMD^2.

Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019, Eq. 2 and section 4
(linear kernel): CKA is HSIC normalised to [0, 1], invariant to orthogonal transforms and isotropic scaling of
either representation, so it complements the paper's distribution distance (Eq. 1) with a pairwise-geometry one.
"""

from __future__ import annotations

import torch
from numpy.typing import ArrayLike

from common.alignment._validation import as_float64_matrix

__all__ = ["compute_linear_cka"]


def compute_linear_cka(x: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor) -> float:
    """Linear CKA between two representations of the same images, in float64.

    ``CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred ``X_c``, ``Y_c``; equal to
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` for the linear Gram matrices ``K = X X^T``, ``L = Y Y^T``.

    Args:
        x: ``(N, d_x)`` features, one row per image.
        y: ``(N, d_y)`` features of the same images in the same order (see
            :func:`common.alignment.pair_by_ids`); ``d_y`` may differ from ``d_x``.

    Returns:
        CKA in ``[0, 1]``; 1 when ``y`` is an orthogonal transform or isotropic scaling of ``x`` (up to translation).

    Raises:
        ValueError: if the inputs are not finite 2-D arrays with the same number of rows (at least 2), or either is
            constant across rows (CKA is then 0 / 0).
    """
    xt = as_float64_matrix(x, "x")
    yt = as_float64_matrix(y, "y")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x and y must hold the same images (rows), got {xt.shape[0]} and {yt.shape[0]}.")
    if xt.shape[0] < 2:
        raise ValueError("CKA needs at least 2 images (rows).")
    for name, t in (("x", xt), ("y", yt)):
        if bool((t == t[0]).all()):
            raise ValueError(f"{name} is constant across rows; CKA is undefined.")
    xc = xt - xt.mean(dim=0, keepdim=True)
    yc = yt - yt.mean(dim=0, keepdim=True)
    norm_x = torch.linalg.matrix_norm(xc.T @ xc)
    norm_y = torch.linalg.matrix_norm(yc.T @ yc)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    return float(cross / (norm_x * norm_y))
