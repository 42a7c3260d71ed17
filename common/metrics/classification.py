"""Classification test metrics: ROC AUC and specificity at a fixed sensitivity (paper section 3.1).

The classification task predicts a PI-RADS class, K = 4: ``{0: PI-RADS <= 2, 1: PI-RADS 3, 2: PI-RADS 4,
3: PI-RADS 5}``. It is scored as a binary decision: positive means class ``>= positive_class``. The default
``positive_class=1`` (PI-RADS >= 3) is the usual threshold at which a biopsy is considered (PI-RADS v2.1);
``positive_class=2`` (PI-RADS >= 4) is the stricter "clinically significant" cut. The binary score is the
predicted probability of the positive group, the sum of the softmax probabilities of classes
``positive_class, ..., K - 1``. The paper's metric is the specificity at sensitivity 0.9; AUC is reported too.

Both metrics depend only on the ranking of the scores, so the PI-RADS functions rank the log-odds of the
positive group, ``logsumexp(z_pos) - logsumexp(z_neg)``, a strictly increasing function of that probability that
keeps very confident predictions apart where the probability itself rounds to exactly 1.0 (or 0.0) in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

__all__ = [
    "AUCMetric",
    "SpecificityAtSensitivityMetric",
    "compute_auc",
    "compute_pirads_auc",
    "compute_pirads_positive_probability",
    "compute_pirads_specificity_at_sensitivity",
    "compute_specificity_at_sensitivity",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Any tensor (any device, bf16 included), array or sequence -> float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}.") from e


def _binary_inputs(y_score: ArrayLike, y_true: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Validate ``(N,)`` or ``(N, 1)`` scores and 0/1 labels; ``None`` (with a warning) when a class is absent."""
    s = _to_numpy(y_score, "y_score")
    y = _to_numpy(y_true, "y_true")
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim != 1 or y.ndim != 1 or s.shape[0] != y.shape[0]:
        raise ValueError(f"y_score and y_true must be (N,) or (N, 1) with the same N, got {s.shape} and {y.shape}.")
    if np.isnan(s).any():
        raise ValueError("y_score contains NaN.")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y_true must contain only 0 and 1, got values {np.unique(y).tolist()}.")
    positive = y == 1.0
    n_pos = int(positive.sum())
    missing = "positive (y_true == 1)" if n_pos == 0 else "negative (y_true == 0)" if n_pos == y.size else None
    if missing is not None:
        warnings.warn(f"no {missing} samples among {y.size}: the metric is undefined, returning nan.", stacklevel=3)
        return None
    return s, positive


def compute_auc(y_score: ArrayLike, y_true: ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted 1/2.

    ``AUC = (#{(i, j): s_i > s_j} + 0.5 #{(i, j): s_i == s_j}) / (P N)`` over all pairs of a positive ``i`` and a
    negative ``j``; computed with mid-ranks in O(N log N). It equals the trapezoidal area under the empirical ROC.

    Args:
        y_score: ``(N,)`` or ``(N, 1)`` scores, larger means more likely positive; +-inf allowed, NaN is not.
        y_true: ``(N,)`` or ``(N, 1)`` labels in {0, 1}.

    Returns:
        The AUC in [0, 1]; ``nan`` with a ``UserWarning`` naming the missing class when all labels are equal.

    Raises:
        ValueError: on mismatched shapes, NaN scores or labels other than 0 and 1.
    """
    checked = _binary_inputs(y_score, y_true)
    if checked is None:
        return float("nan")
    s, positive = checked
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    ranks = (starts + (counts + 1) / 2.0)[inverse]  # 1-based mid-ranks: a tie group shares its mean rank
    n_pos = int(positive.sum())
    n_neg = s.size - n_pos
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def compute_specificity_at_sensitivity(y_score: ArrayLike, y_true: ArrayLike, sensitivity: float = 0.9) -> float:
    """Specificity at a minimum sensitivity, read off the empirical ROC (the paper's classification metric).

    Operating points: one per distinct score ``t`` (sample called positive when ``score >= t``, so all samples
    with tied scores are called positive together), plus the point that calls nothing positive. The result is
    the largest specificity ``TN / N`` among the operating points whose sensitivity ``TP / P >= sensitivity``; no
    interpolation between points. Since the lowest threshold has sensitivity 1, this is always defined when both
    classes are present.

    Args:
        y_score: ``(N,)`` or ``(N, 1)`` scores, larger means more likely positive; +-inf allowed, NaN is not.
        y_true: ``(N,)`` or ``(N, 1)`` labels in {0, 1}.
        sensitivity: the minimum sensitivity in [0, 1]; 0.9 in the paper.

    Returns:
        The specificity in [0, 1]; ``nan`` with a ``UserWarning`` naming the missing class when all labels are equal.

    Raises:
        ValueError: on a sensitivity outside [0, 1], mismatched shapes, NaN scores or labels other than 0 and 1.
    """
    if not 0.0 <= sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity}.")
    checked = _binary_inputs(y_score, y_true)
    if checked is None:
        return float("nan")
    s, positive = checked
    order = np.argsort(-s, kind="stable")
    s_sorted, pos_sorted = s[order], positive[order]
    # the last sample of each tie group closes one operating point (comparison, not diff: inf - inf is nan)
    last = np.append(np.nonzero(s_sorted[1:] != s_sorted[:-1])[0], s.size - 1)
    tp = np.concatenate(([0], np.cumsum(pos_sorted)[last]))
    fp = np.concatenate(([0], np.cumsum(~pos_sorted)[last]))
    n_pos = int(positive.sum())
    n_neg = s.size - n_pos
    ok = tp / n_pos >= sensitivity
    return float((n_neg - fp[ok].min()) / n_neg)


def _positive_log_odds(y_pred: torch.Tensor, positive_class: int, logits: bool) -> torch.Tensor:
    """``(B, K)`` logits or probabilities -> ``(B,)`` float64 log-odds of the classes ``>= positive_class``."""
    if not isinstance(y_pred, torch.Tensor):
        raise ValueError(f"y_pred must be a torch tensor, got {type(y_pred).__name__}.")
    if y_pred.ndim != 2 or y_pred.shape[1] < 2:
        raise ValueError(f"y_pred must be (B, K) class scores with K >= 2, got shape {tuple(y_pred.shape)}.")
    k = y_pred.shape[1]
    if not 1 <= positive_class <= k - 1:
        raise ValueError(f"positive_class must be in [1, K - 1] = [1, {k - 1}], got {positive_class}.")
    z = y_pred.detach().to(device="cpu", dtype=torch.float64)
    if logits:
        return torch.logsumexp(z[:, positive_class:], dim=1) - torch.logsumexp(z[:, :positive_class], dim=1)
    if (z < -1e-6).any() or not torch.allclose(z.sum(dim=1), torch.ones_like(z[:, 0]), atol=1e-3):
        raise ValueError("with logits=False, y_pred rows must be probabilities summing to 1; use logits=True.")
    z = z.clamp_min(0.0)
    return torch.log(z[:, positive_class:].sum(dim=1)) - torch.log(z[:, :positive_class].sum(dim=1))


def _class_indices(y: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``(B,)``/``(B, 1)`` class indices or ``(B, K)`` one-hot -> ``(B,)`` float64 class indices."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch tensor, got {type(y).__name__}.")
    labels = y.detach().to(device="cpu", dtype=torch.float64)
    if labels.ndim == 2 and labels.shape[1] == k:
        labels = labels.argmax(dim=1).to(torch.float64)
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,):
        raise ValueError(
            f"y must be (B,), (B, 1) class indices or (B, K) one-hot for B={n}, K={k}; got {tuple(y.shape)}."
        )
    if not ((labels == labels.round()) & (labels >= 0) & (labels <= k - 1)).all():
        raise ValueError(f"y must hold integer class indices in [0, {k - 1}].")
    return labels


def _pirads_scores_labels(
    y_pred: torch.Tensor, y: torch.Tensor, positive_class: int, logits: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` class scores and labels -> ``(B,)`` float64 log-odds and ``(B,)`` 0/1 labels."""
    log_odds = _positive_log_odds(y_pred, positive_class, logits)
    labels = _class_indices(y, y_pred.shape[0], y_pred.shape[1])
    return log_odds, (labels >= positive_class).to(torch.float64)


def compute_pirads_positive_probability(
    y_pred: torch.Tensor, positive_class: int = 1, logits: bool = True
) -> torch.Tensor:
    """Probability of the positive group, ``sum_{k >= positive_class} softmax(y_pred)_k`` (module docstring).

    Args:
        y_pred: ``(B, K)`` logits (``logits=True``: softmax over dim 1 is applied) or probabilities whose rows sum
            to 1 (``logits=False``: used as given).
        positive_class: the first class counted as positive, in [1, K - 1]; 1 means PI-RADS >= 3.
        logits: whether ``y_pred`` holds logits rather than probabilities.

    Returns:
        ``(B,)`` float64 probabilities on the CPU.
    """
    return torch.sigmoid(_positive_log_odds(y_pred, positive_class, logits))


def compute_pirads_auc(y_pred: torch.Tensor, y: torch.Tensor, positive_class: int = 1, logits: bool = True) -> float:
    """AUC of the binary PI-RADS decision ``class >= positive_class`` (see :func:`compute_auc`).

    Args:
        y_pred: ``(B, K)`` logits or probabilities (``logits``), as in :func:`compute_pirads_positive_probability`.
        y: ``(B,)`` or ``(B, 1)`` class indices in [0, K - 1], or ``(B, K)`` one-hot.
        positive_class: the first positive class; 1 (PI-RADS >= 3) by default.
        logits: whether ``y_pred`` holds logits rather than probabilities.
    """
    scores, labels = _pirads_scores_labels(y_pred, y, positive_class, logits)
    return compute_auc(scores, labels)


def compute_pirads_specificity_at_sensitivity(
    y_pred: torch.Tensor, y: torch.Tensor, sensitivity: float = 0.9, positive_class: int = 1, logits: bool = True
) -> float:
    """Specificity at ``sensitivity`` of the binary PI-RADS decision (see :func:`compute_specificity_at_sensitivity`).

    Args:
        y_pred: ``(B, K)`` logits or probabilities (``logits``), as in :func:`compute_pirads_positive_probability`.
        y: ``(B,)`` or ``(B, 1)`` class indices in [0, K - 1], or ``(B, K)`` one-hot.
        sensitivity: the minimum sensitivity; 0.9 in the paper.
        positive_class: the first positive class; 1 (PI-RADS >= 3) by default.
        logits: whether ``y_pred`` holds logits rather than probabilities.
    """
    scores, labels = _pirads_scores_labels(y_pred, y, positive_class, logits)
    return compute_specificity_at_sensitivity(scores, labels, sensitivity)


class _PIRADSBinaryMetric(CumulativeIterationMetric):
    """Accumulates the per-sample positive log-odds and binary labels over batches."""

    def __init__(self, positive_class: int = 1, logits: bool = True) -> None:
        super().__init__()
        if not isinstance(positive_class, int) or positive_class < 1:
            raise ValueError(f"positive_class must be an integer >= 1, got {positive_class!r}.")
        self.positive_class = positive_class
        self.logits = bool(logits)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K)`` scores and ``(B,)``/``(B, 1)``/``(B, K)`` labels -> ``(B,)`` log-odds and ``(B,)`` 0/1 labels."""
        return _pirads_scores_labels(y_pred, y, self.positive_class, self.logits)

    def _scores_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self.get_buffer()
        if buffers is None or not isinstance(buffers[0], torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no data: call it on at least one batch first.")
        return buffers[0], buffers[1]


class AUCMetric(_PIRADSBinaryMetric):
    """Cumulative AUC of the binary PI-RADS decision ``class >= positive_class`` (paper section 3.1).

    Called per batch with ``y_pred`` ``(B, K)`` logits or probabilities and ``y`` ``(B,)``/``(B, 1)`` class
    indices or ``(B, K)`` one-hot (or lists of channel-first items); ``aggregate()`` returns
    :func:`compute_auc` over all accumulated samples.

    Args:
        positive_class: the first class counted as positive; 1 (PI-RADS >= 3) by default.
        logits: ``True`` when ``y_pred`` are logits (softmax applied), ``False`` for probabilities.
    """

    def aggregate(self) -> float:  # type: ignore[override]
        """AUC over all samples seen since the last ``reset()``; nan when one class is absent."""
        scores, labels = self._scores_labels()
        return compute_auc(scores, labels)


class SpecificityAtSensitivityMetric(_PIRADSBinaryMetric):
    """Cumulative specificity at ``sensitivity`` of the binary PI-RADS decision (the paper's metric, section 3.1).

    Called per batch like :class:`AUCMetric`; ``aggregate()`` returns :func:`compute_specificity_at_sensitivity`
    over all accumulated samples.

    Args:
        sensitivity: the minimum sensitivity in [0, 1]; 0.9 in the paper.
        positive_class: the first class counted as positive; 1 (PI-RADS >= 3) by default.
        logits: ``True`` when ``y_pred`` are logits (softmax applied), ``False`` for probabilities.
    """

    def __init__(self, sensitivity: float = 0.9, positive_class: int = 1, logits: bool = True) -> None:
        super().__init__(positive_class=positive_class, logits=logits)
        if not 0.0 <= sensitivity <= 1.0:
            raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity}.")
        self.sensitivity = float(sensitivity)

    def aggregate(self) -> float:  # type: ignore[override]
        """Specificity over all samples seen since the last ``reset()``; nan when one class is absent."""
        scores, labels = self._scores_labels()
        return compute_specificity_at_sensitivity(scores, labels, self.sensitivity)
