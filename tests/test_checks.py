"""common.checks: the argument checks every constructor shares."""

from __future__ import annotations

import math

import pytest

from common.checks import check_float, check_int


def test_check_int() -> None:
    assert check_int(3, "depth") == 3 and check_int(0, "blocks", minimum=0) == 0
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"depth must be an int >= 1, got"):
            check_int(bad, "depth")


def test_check_float() -> None:
    assert check_float(0, "rate", 0.0) == 0.0 and check_float(1, "p", 0.0, 1.0) == 1.0
    assert isinstance(check_float(2, "x", 0.0), float)
    with pytest.raises(ValueError, match=r"rate must be a finite number > 0.0, got 0"):
        check_float(0, "rate", 0.0, open_low=True)
    with pytest.raises(ValueError, match=r"p must be a finite number >= 0.0 and <= 1.0, got 1.5"):
        check_float(1.5, "p", 0.0, 1.0)
    for bad in (math.nan, math.inf, True, "1", None):
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_float(bad, "x", 0.0)
