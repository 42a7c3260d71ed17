"""The tasks' test metrics (paper section 3.1): specificity at sensitivity 0.9 and AUC, Dice, 3D SSIM.

Each metric is a ``compute_x()`` function, a cumulative ``monai.metrics`` class and an Ignite handler
(``common.metrics.handlers``) for bundle configs.
"""

from __future__ import annotations

from .classification import (
    AUCMetric,
    SpecificityAtSensitivityMetric,
    compute_auc,
    compute_pirads_auc,
    compute_pirads_positive_probability,
    compute_pirads_specificity_at_sensitivity,
    compute_specificity_at_sensitivity,
)
from .dice import BinaryDiceMetric, compute_dice, foreground, has_lesion
from .handlers import AUCHandler, BinaryDiceHandler, SpecificityAtSensitivityHandler, SSIM3DHandler
from .ssim import SSIM3DMetric, compute_ssim_3d

__all__ = [
    "AUCHandler",
    "AUCMetric",
    "BinaryDiceHandler",
    "BinaryDiceMetric",
    "SSIM3DHandler",
    "SSIM3DMetric",
    "SpecificityAtSensitivityHandler",
    "SpecificityAtSensitivityMetric",
    "compute_auc",
    "compute_dice",
    "foreground",
    "has_lesion",
    "compute_pirads_auc",
    "compute_pirads_positive_probability",
    "compute_pirads_specificity_at_sensitivity",
    "compute_specificity_at_sensitivity",
    "compute_ssim_3d",
]
