from __future__ import annotations

import pytest

from common.profiles import PROFILES, get_profile


@pytest.mark.parametrize(
    ("name", "padded"),
    [("smoke", (64, 64, 32)), ("gpu", (128, 128, 64)), ("paper", (224, 224, 96))],
)
def test_padded_size_is_the_next_multiple(name: str, padded: tuple[int, int, int]) -> None:
    assert get_profile(name).padded_size == padded


def test_paper_profile_has_the_paper_size() -> None:
    assert PROFILES["paper"].spatial_size == (200, 200, 96)


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="smoke"):
        get_profile("fast")
