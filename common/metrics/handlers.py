"""Ignite handlers for the task metrics, for a bundle's ``key_val_metric`` / ``additional_metrics``.

Each wraps the cumulative metric of the same name in ``monai.handlers.IgniteMetricHandler``: it accumulates over
an epoch of ``SupervisedEvaluator`` iterations and writes the aggregate to ``engine.state.metrics[name]``.
``output_transform`` extracts ``(y_pred, y)`` from ``engine.state.output``, typically
``monai.handlers.from_engine(["pred", "label"])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.handlers import IgniteMetricHandler
from monai.utils import MetricReduction

from .classification import AUCMetric, SpecificityAtSensitivityMetric
from .dice import BinaryDiceMetric
from .ssim import SSIM3DMetric

__all__ = ["AUCHandler", "BinaryDiceHandler", "SSIM3DHandler", "SpecificityAtSensitivityHandler"]


def _identity(x: object) -> object:
    return x


class SpecificityAtSensitivityHandler(IgniteMetricHandler):
    """Epoch-level :class:`~common.metrics.classification.SpecificityAtSensitivityMetric` (paper's metric).

    Args:
        sensitivity: the minimum sensitivity; 0.9 in the paper.
        positive_class: the first positive PI-RADS class index; 1 (PI-RADS >= 3) by default.
        logits: ``True`` when predictions are logits, ``False`` for probabilities.
        output_transform: ``engine.state.output -> (y_pred, y)``.
    """

    def __init__(
        self,
        sensitivity: float = 0.9,
        positive_class: int = 1,
        logits: bool = True,
        output_transform: Callable = _identity,
    ) -> None:
        metric = SpecificityAtSensitivityMetric(sensitivity=sensitivity, positive_class=positive_class, logits=logits)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=False)


class AUCHandler(IgniteMetricHandler):
    """Epoch-level :class:`~common.metrics.classification.AUCMetric` of the binary PI-RADS decision.

    Args:
        positive_class: the first positive PI-RADS class index; 1 (PI-RADS >= 3) by default.
        logits: ``True`` when predictions are logits, ``False`` for probabilities.
        output_transform: ``engine.state.output -> (y_pred, y)``.
    """

    def __init__(self, positive_class: int = 1, logits: bool = True, output_transform: Callable = _identity) -> None:
        metric = AUCMetric(positive_class=positive_class, logits=logits)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=False)


class BinaryDiceHandler(IgniteMetricHandler):
    """Epoch-level :class:`~common.metrics.dice.BinaryDiceMetric`; per-case values go to ``state.metric_details``.

    Args:
        empty_value: Dice when prediction and reference are both empty (1.0, or nan to exclude the case).
        threshold: foreground threshold for single-channel predictions (0.5; 0.0 for logits).
        reduction: reduction over cases (nan skipped).
        output_transform: ``engine.state.output -> (y_pred, y)``.
        save_details: whether to store the per-case values in ``engine.state.metric_details[name]``.
        lesion_cases_only: nan for every lesion-free case, so the value is the Dice on lesion cases (the study's P).
    """

    def __init__(
        self,
        empty_value: float = 1.0,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = _identity,
        save_details: bool = True,
        lesion_cases_only: bool = False,
    ) -> None:
        metric = BinaryDiceMetric(
            empty_value=empty_value, threshold=threshold, reduction=reduction, lesion_cases_only=lesion_cases_only
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


class SSIM3DHandler(IgniteMetricHandler):
    """Epoch-level :class:`~common.metrics.ssim.SSIM3DMetric`; per-case values go to ``state.metric_details``.

    Args:
        data_range, win_size, sigma, k1, k2, truncate, compute_dtype: as in
            :func:`~common.metrics.ssim.compute_ssim_3d`.
        reduction: reduction over cases (nan skipped).
        output_transform: ``engine.state.output -> (y_pred, y)``.
        save_details: whether to store the per-case values in ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        data_range: float = 1.0,
        win_size: int | Sequence[int] = 7,
        sigma: float | Sequence[float] = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        truncate: float = 3.5,
        compute_dtype: str | torch.dtype = torch.float64,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric = SSIM3DMetric(
            data_range=data_range,
            win_size=win_size,
            sigma=sigma,
            k1=k1,
            k2=k2,
            truncate=truncate,
            compute_dtype=compute_dtype,
            reduction=reduction,
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
