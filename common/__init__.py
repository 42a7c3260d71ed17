"""vfm-transfer shared package: data, transforms, networks, metrics and alignment for the study bundles.

The study reproduces "Understanding the Transfer Limits of Vision Foundation Models" (Huang et al., ISBI 2026,
arXiv 2601.15888) on prostate MRI. Subpackages:

- ``common.data``: the synthetic cohort, datalist validation and adapters for public cohorts (PI-CAI).
- ``common.transforms``: MONAI dictionary transforms and the five tasks' pipelines.
- ``common.metrics``: the tasks' test metrics (specificity at sensitivity 0.9, AUC, Dice, 3D SSIM).
- ``common.networks``: the foundation models and their heads.
- ``common.alignment``: squared MMD, CKA, relative performance gain and their statistics.
"""

from __future__ import annotations

__version__ = "0.1.0"
