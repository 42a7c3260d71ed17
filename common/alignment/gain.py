"""Relative performance gain (RPG) of a fine-tuned model over a reference model, paper Eq. 2.

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888),
section 3.3, Eq. 2: ``RPG = (P(ft) - P(ref)) / P(ref) x 100 %``, with ref the random-weight FM, the specialised task
model or the scratch model, and P the task's test metric.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["compute_rpg"]


def compute_rpg(p_ft: float, p_ref: float) -> float:
    """Relative performance gain in percent, paper Eq. 2: ``(p_ft - p_ref) / p_ref * 100``.

    The sign convention assumes a higher-is-better metric, as are all of this study's test metrics (specificity at
    sensitivity 0.9, AUC, Dice, SSIM): a positive RPG means the fine-tuned model is better. For a lower-is-better
    metric (an error or a distance) negate the result, so that a positive RPG still means better.

    Args:
        p_ft: test metric of the fine-tuned model.
        p_ref: test metric of the reference model; must be > 0.

    Returns:
        RPG in percent, e.g. ``compute_rpg(0.6, 0.5) == 20.0``.

    Raises:
        ValueError: if either value is not a finite real number, or ``p_ref <= 0``: a gain relative to zero is
            undefined, and relative to a negative value (possible for SSIM) its sign would invert, so no number is
            returned rather than a misleading ``inf`` or a flipped sign.
    """
    for name, value in (("p_ft", p_ft), ("p_ref", p_ref)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}.")
    if p_ref <= 0:
        raise ValueError(f"p_ref must be > 0 for a relative gain, got {p_ref!r}.")
    return (float(p_ft) - float(p_ref)) / float(p_ref) * 100.0
