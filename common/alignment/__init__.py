"""Alignment and gain statistics of the study (paper sections 3.2, 3.3, 4.3; DESIGN.md section 4).

- ``mmd``: squared MMD (paper Eq. 1), its permutation test and its image-level bootstrap.
- ``cka``: linear CKA (Kornblith et al. 2019).
- ``pairing``: pairing two feature snapshots by image id.
- ``gain``: relative performance gain (paper Eq. 2).
- ``statistics``: Pearson, Spearman, bootstrap intervals, mean and std across seeds.
- ``convergence``: epochs to reach a fraction of the final validation value (paper Fig. 3).
"""

from __future__ import annotations

from common.alignment.cka import compute_linear_cka
from common.alignment.convergence import epochs_to_fraction
from common.alignment.gain import compute_rpg
from common.alignment.mmd import bootstrap_mmd2, compute_mmd2, mmd_permutation_test
from common.alignment.pairing import pair_by_ids
from common.alignment.statistics import (
    BootstrapCI,
    bootstrap_ci,
    bootstrap_correlation,
    bootstrap_indices,
    mean_std,
    pearson,
    spearman,
)

__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "bootstrap_correlation",
    "bootstrap_indices",
    "bootstrap_mmd2",
    "compute_linear_cka",
    "compute_mmd2",
    "compute_rpg",
    "epochs_to_fraction",
    "mean_std",
    "mmd_permutation_test",
    "pair_by_ids",
    "pearson",
    "spearman",
]
