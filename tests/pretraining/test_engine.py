"""common.pretraining.engine: the slice stacks fed to the ProViCNet pretrainer match the downstream model's."""

from __future__ import annotations

import pytest
import torch

from common.networks import DinoVisionTransformer, ProViCNetDense
from common.pretraining import SliceStackBatch


def _volume(b: int = 2, m: int = 2, h: int = 28, w: int = 28, d: int = 6) -> torch.Tensor:
    return torch.arange(b * m * h * w * d, dtype=torch.float32).reshape(b, m, h, w, d)


def test_stacks_positions_and_channel_order_match_the_downstream_model() -> None:
    x = _volume()
    stacks, target, (pos,), kwargs = SliceStackBatch(n_slices=3, slices_per_volume=4, seed=1)({"image": x})
    assert stacks.shape == (8, 6, 28, 28) and target is None and kwargs == {}
    backbone = DinoVisionTransformer(img_size=28, in_chans=6, embed_dim=24, depth=1, num_heads=2)
    reference, reference_pos = ProViCNetDense(n_modalities=2, slice_size=28, backbone=backbone).slice_stack(x)
    for row, (k, depth) in enumerate(pos.tolist()):
        volume = row // 4
        assert depth == 6
        assert torch.equal(stacks[row], reference[volume * 6 + int(k)])
        assert reference_pos[volume * 6 + int(k)].tolist() == [k, 6]
    assert all(len(set(pos[v * 4 : (v + 1) * 4, 0].tolist())) == 4 for v in range(2))  # distinct slices per volume


def test_half_of_the_draws_come_from_lesion_slices_and_masks_follow() -> None:
    x = _volume(b=1, m=1, d=10)
    lesion = torch.zeros(1, 1, 28, 28, 10)
    lesion[..., 2:12, 2:12, 7] = 1  # only slice 7 has lesion
    batch = SliceStackBatch(slices_per_volume=4, lesion_slice_fraction=0.5, slice_size=14)
    for _ in range(5):
        stacks, _, (pos,), kwargs = batch({"image": x, "lesion": lesion})
        assert 7 in pos[:, 0].tolist()  # round(0.5 * 4) = 2 wanted, 1 available
        assert stacks.shape == (4, 3, 14, 14) and kwargs["lesion"].shape == (4, 1, 14, 14)
        rows = pos[:, 0] == 7
        assert kwargs["lesion"][rows].sum() > 0 and kwargs["lesion"][~rows].sum() == 0


@pytest.mark.parametrize("kwargs", [{"slices_per_volume": 0}, {"lesion_slice_fraction": 1.5}, {"n_slices": 2}])
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SliceStackBatch(**kwargs)
