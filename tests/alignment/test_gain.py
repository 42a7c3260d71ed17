"""Tests for common.alignment.gain.compute_rpg (paper Eq. 2)."""

from __future__ import annotations

import numpy as np
import pytest

from common.alignment import compute_rpg


@pytest.mark.parametrize(
    ("p_ft", "p_ref", "expected"),
    [
        (0.6, 0.5, 20.0),
        (0.45, 0.9, -50.0),
        (0.75, 0.6, 25.0),
        (0.8, 0.8, 0.0),
        (0.3, 0.12, 150.0),
        (np.float32(0.5), np.float64(0.4), 25.0),
    ],
)
def test_hand_values(p_ft: float, p_ref: float, expected: float) -> None:
    assert compute_rpg(p_ft, p_ref) == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    ("p_ft", "p_ref", "match"),
    [
        (0.5, 0.0, "p_ref must be > 0"),
        (0.5, -0.2, "p_ref must be > 0"),
        (float("nan"), 0.5, "p_ft"),
        (0.5, float("inf"), "p_ref"),
        (True, 0.5, "p_ft"),
        ("0.5", 0.5, "p_ft"),
    ],
)
def test_rejects_bad_values(p_ft: float, p_ref: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_rpg(p_ft, p_ref)


@pytest.mark.parametrize(
    ("p_ft", "p_ref", "min_reference", "higher_is_better", "expected"),
    [
        (0.021, 0.002, 1e-3, True, 950.0),  # 0.019 / 0.002
        (0.3, 0.4, 0.0, False, 25.0),  # an error that fell from 0.4 to 0.3: 25 % better
        (0.5, 0.4, 0.0, False, -25.0),
    ],
)
def test_min_reference_and_direction(
    p_ft: float, p_ref: float, min_reference: float, higher_is_better: bool, expected: float
) -> None:
    assert compute_rpg(p_ft, p_ref, min_reference, higher_is_better) == pytest.approx(expected, rel=1e-9)


def test_near_zero_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="too near zero"):
        compute_rpg(0.017, 0.0008, min_reference=1e-3)  # the smoke study's +2000 %
