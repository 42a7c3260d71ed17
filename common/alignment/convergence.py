"""Convergence speed from a validation curve: epochs needed to reach a fraction of the final value (paper Fig. 3).

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888),
section 4.3 and Fig. 3 compare how fast fine-tuning and training from scratch converge; here that is summarised by
the first epoch at which the validation metric reaches a fixed fraction of its final value.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from common.alignment._validation import as_float64_vector

__all__ = ["epochs_to_fraction"]


def epochs_to_fraction(curve: ArrayLike, fraction: float = 0.95, epochs: Sequence[int] | None = None) -> int | None:
    """First epoch at which a higher-is-better validation curve reaches ``fraction x`` its final value.

    The threshold is ``fraction * curve[-1]``; the answer is the first entry ``>=`` it. For a non-monotone curve this
    is the first crossing, even if the curve dips below the threshold again later (a spike counts; smooth the curve
    first if that is not wanted). With ``fraction <= 1`` the last entry always qualifies when the final value is
    ``>= 0``, so ``None`` only happens for a negative final value (possible for SSIM).

    Args:
        curve: ``(E,)`` validation metric, one value per validation, oldest first.
        fraction: in ``(0, 1]``, default 0.95.
        epochs: ``(E,)`` strictly increasing epoch numbers of the entries (e.g. MLflow metric steps when validation
            runs every few epochs); default ``1, 2, ..., E``.

    Returns:
        The 1-based epoch number (or the matching entry of ``epochs``), or ``None`` if no entry reaches the threshold.

    Raises:
        ValueError: if ``curve`` is empty, not 1-D or not finite, ``fraction`` is outside ``(0, 1]``, or ``epochs``
            does not match ``curve`` or is not strictly increasing.
    """
    values = as_float64_vector(curve, "curve")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}.")
    if epochs is None:
        epoch_numbers = np.arange(1, values.size + 1)
    else:
        epoch_numbers = np.asarray(epochs)
        if epoch_numbers.shape != values.shape or not np.issubdtype(epoch_numbers.dtype, np.integer):
            raise ValueError(f"epochs must be {values.size} integers, one per curve entry, got {epoch_numbers!r}.")
        if np.any(np.diff(epoch_numbers) <= 0):
            raise ValueError(f"epochs must be strictly increasing, got {epoch_numbers.tolist()}.")
    reached = np.flatnonzero(values >= fraction * values[-1])
    return int(epoch_numbers[reached[0]]) if reached.size else None
