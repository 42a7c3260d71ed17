"""Tests for common.alignment.convergence.epochs_to_fraction (paper Fig. 3)."""

from __future__ import annotations

import pytest

from common.alignment import epochs_to_fraction


@pytest.mark.parametrize(
    ("curve", "fraction", "expected"),
    [
        ([0.1, 0.5, 0.8, 0.9, 1.0], 0.95, 5),
        ([0.1, 0.5, 0.8, 0.9, 1.0], 0.9, 4),
        ([0.1, 0.5, 0.8, 0.9, 1.0], 0.5, 2),
        ([0.2, 0.4, 0.61, 0.6], 1.0, 3),  # the final value was already exceeded at epoch 3
        ([0.2, 0.96, 0.5, 0.9, 1.0], 0.95, 2),  # non-monotone: the first crossing counts, the later dip does not
        ([0.7], 0.95, 1),
        ([0.0, 0.0, 0.0], 0.95, 1),  # threshold 0 is met at once
        ([-2.0, -1.5, -1.0], 0.95, None),  # negative final value: threshold -0.95 never reached
        ([-2.0, -0.9, -1.0], 0.95, 2),
    ],
)
def test_epochs(curve: list[float], fraction: float, expected: int | None) -> None:
    assert epochs_to_fraction(curve, fraction) == expected


def test_explicit_epoch_numbers() -> None:
    # validation every 5 epochs; 0.97 >= 0.95 * 1.0 first at the third validation, epoch 15
    assert epochs_to_fraction([0.1, 0.6, 0.97, 1.0], 0.95, epochs=[5, 10, 15, 20]) == 15


@pytest.mark.parametrize(
    ("curve", "kwargs", "match"),
    [
        ([], {}, "at least 1"),
        ([[0.1, 0.2]], {}, "1-D"),
        ([0.1, float("nan")], {}, "NaN"),
        ([0.1, 0.2], {"fraction": 0.0}, "fraction"),
        ([0.1, 0.2], {"fraction": 1.5}, "fraction"),
        ([0.1, 0.2], {"epochs": [1]}, "one per curve entry"),
        ([0.1, 0.2], {"epochs": [2, 2]}, "strictly increasing"),
        ([0.1, 0.2], {"epochs": [1.0, 2.0]}, "integers"),
    ],
)
def test_rejects_bad_input(curve: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        epochs_to_fraction(curve, **kwargs)
