"""Per-case Dice of a binary lesion mask, the segmentation task's test metric (paper section 3.1)."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["BinaryDiceMetric", "compute_dice", "foreground", "has_lesion"]


def foreground(x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, *spatial)`` bool foreground: ``C == 1`` above ``threshold`` (default 0.5), else
    ``argmax != 0``; the one rule of :func:`compute_dice`, :func:`has_lesion` and the false-positive volume."""
    if x.shape[1] == 1:
        return x[:, 0] > (0.5 if threshold is None else threshold)
    return x.argmax(dim=1) != 0


def has_lesion(target: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` reference -> ``(B,)`` bool: whether each case's reference has a lesion (the foreground rules
    of :func:`compute_dice`); the cases the study's P averages over."""
    return foreground(target.detach(), None).flatten(1).any(dim=1)


def compute_dice(
    pred: torch.Tensor, target: torch.Tensor, empty_value: float = 1.0, threshold: float = 0.5
) -> torch.Tensor:
    """Dice ``2 |A n B| / (|A| + |B|)`` per case between a predicted and a reference binary lesion mask.

    Foreground rules, ``(B, C, *spatial)`` inputs (3D: ``(B, C, H, W, D)``):

    - ``pred`` with C = 1: a mask, probability or logit map, foreground where ``pred > threshold``
      (0.5 for masks and probabilities; pass 0.0 for logits).
    - ``pred`` with C >= 2: per-class scores (logits, probabilities or one-hot), foreground where the argmax over
      C is not channel 0 (background); ``threshold`` is not used.
    - ``target`` with C = 1: a label map, foreground where ``target > 0.5`` (any label >= 1).
    - ``target`` with C >= 2: one-hot, foreground where the argmax is not channel 0.

    Lesion-free cases (PI-RADS <= 2) are part of the test split; when both masks are empty Dice is 0/0 and
    ``empty_value`` is returned: 1.0 (default, a correct empty prediction is perfect) or ``nan`` to leave such
    cases out of a nan-aware mean. An empty reference with a non-empty prediction scores 0.

    Args:
        pred: ``(B, C, *spatial)`` prediction.
        target: ``(B, C', *spatial)`` reference, same B and spatial shape.
        empty_value: the value for cases where both masks are empty.
        threshold: the foreground threshold for single-channel ``pred``.

    Returns:
        ``(B,)`` float32 Dice on ``pred``'s device.

    Raises:
        ValueError: on inputs with fewer than 3 dims or mismatched batch/spatial shapes.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("pred and target must be torch tensors.")
    if pred.ndim < 3 or target.ndim != pred.ndim:
        raise ValueError(
            f"pred and target must be (B, C, *spatial) with the same ndim, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}."
        )
    if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[2:]:
        raise ValueError(f"batch and spatial shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}.")
    a = foreground(pred.detach(), threshold).flatten(1)
    b = foreground(target.detach().to(pred.device), None).flatten(1)
    intersection = (a & b).sum(dim=1, dtype=torch.float64)
    total = a.sum(dim=1, dtype=torch.float64) + b.sum(dim=1, dtype=torch.float64)
    dice = torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0), torch.full_like(total, empty_value))
    return dice.to(torch.float32)


class BinaryDiceMetric(CumulativeIterationMetric):
    """Cumulative per-case lesion Dice (:func:`compute_dice`), reduced over cases by ``aggregate()``.

    The name avoids a clash with ``monai.metrics.DiceMetric``, which is per class and returns nan or 1 (by its
    ``ignore_empty``) where this one returns ``empty_value``.

    Args:
        empty_value: Dice of a case where prediction and reference are both empty (1.0, or nan to exclude it).
        threshold: the foreground threshold for single-channel predictions (0.5; 0.0 for logits).
        reduction: a ``monai.utils.MetricReduction`` over the ``(N, 1)`` per-case values; nan values are skipped.
        lesion_cases_only: score only cases whose reference has a lesion (the study's P, DESIGN.md section 4): a
            lesion-free case is nan whatever the prediction, so the mean is the Dice on lesion cases.
    """

    def __init__(
        self,
        empty_value: float = 1.0,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        lesion_cases_only: bool = False,
    ) -> None:
        super().__init__()
        try:
            self.reduction = MetricReduction(reduction)
        except ValueError as e:
            raise ValueError(
                f"unknown reduction {reduction!r}; use one of {[r.value for r in MetricReduction]}."
            ) from e
        self.empty_value = float(empty_value)
        self.threshold = float(threshold)
        self.lesion_cases_only = bool(lesion_cases_only)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, C, *spatial)`` prediction and reference -> ``(B, 1)`` Dice."""
        dice = compute_dice(y_pred, y, empty_value=self.empty_value, threshold=self.threshold)
        if self.lesion_cases_only:
            dice = torch.where(has_lesion(y).to(dice.device), dice, torch.full_like(dice, float("nan")))
        return dice[:, None]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The reduced Dice over all cases seen since the last ``reset()``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("BinaryDiceMetric has no data: call it on at least one batch first.")
        value, _ = do_metric_reduction(data.clone(), self.reduction)
        return value
