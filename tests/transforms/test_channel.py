from __future__ import annotations

import pytest
import torch

from common.transforms.channel import RandDiffusionChoiced


def _sample(case_id: str) -> dict:
    return {
        "id": case_id,
        "t2w": torch.full((1, 3, 3, 2), 1.0),
        "adc": torch.full((1, 3, 3, 2), 2.0),
        "dwi": torch.full((1, 3, 3, 2), 3.0),
    }


IDS = [f"case_{i:04d}" for i in range(40)]


def _choices(transform: RandDiffusionChoiced, ids: list[str]) -> dict[str, str]:
    return {i: transform(_sample(i))["diffusion"] for i in ids}


def test_image_is_t2w_then_the_chosen_map() -> None:
    out = RandDiffusionChoiced(seed=0, deterministic_per_case=True)(_sample("case_0001"))
    assert tuple(out["image"].shape) == (2, 3, 3, 2)
    assert torch.equal(out["image"][0], out["t2w"][0])
    assert torch.equal(out["image"][1], out[out["diffusion"]][0])
    assert float(out["image"][1, 0, 0, 0]) == {"adc": 2.0, "dwi": 3.0}[out["diffusion"]]


def test_deterministic_per_case_both_branches_any_order() -> None:
    forward = _choices(RandDiffusionChoiced(seed=5, deterministic_per_case=True), IDS)
    backward = _choices(RandDiffusionChoiced(seed=5, deterministic_per_case=True), IDS[::-1])
    assert forward == backward
    assert 8 < sum(c == "adc" for c in forward.values()) < 32  # both occur, roughly half each
    other_seed = _choices(RandDiffusionChoiced(seed=6, deterministic_per_case=True), IDS)
    assert other_seed != forward


def test_training_mode_varies_for_the_same_case() -> None:
    transform = RandDiffusionChoiced(seed=1)
    draws = [transform(_sample("case_0001"))["diffusion"] for _ in range(40)]
    assert set(draws) == {"adc", "dwi"}
    again = RandDiffusionChoiced(seed=1)
    assert [again(_sample("case_0001"))["diffusion"] for _ in range(40)] == draws


def test_errors() -> None:
    sample = _sample("case_0001")
    del sample["dwi"]
    with pytest.raises(ValueError, match=r"\['dwi'\] are missing"):
        RandDiffusionChoiced()(sample)
    sample = _sample("case_0001")
    sample["adc"] = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="share a grid"):
        RandDiffusionChoiced(diffusion_keys=("adc",))(sample)
    with pytest.raises(ValueError, match="seed"):
        RandDiffusionChoiced(seed=-1)
