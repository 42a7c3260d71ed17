from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import DivisiblePad

from common.transforms.spatial import AlignToReference, AlignToReferenced, PadToDivisibled, divisible_padding


def _volume(shape: tuple[int, int, int], affine: np.ndarray, values: np.ndarray | None = None) -> MetaTensor:
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) if values is None else values
    return MetaTensor(torch.as_tensor(data, dtype=torch.float32)[None], affine=torch.as_tensor(affine))


def test_align_is_a_noop_on_the_same_grid() -> None:
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    ref, img = _volume((6, 5, 4), affine), _volume((6, 5, 4), affine + 1e-5)  # within atol
    out = AlignToReference()(img, ref)
    assert out is img


def test_align_resamples_a_shifted_grid_by_one_voxel() -> None:
    # img's voxel i sits where ref's voxel i + 1 sits (origin one voxel further along H), so
    # the resampled value at ref voxel i is img's value at i - 1
    ref_affine = np.eye(4)
    img_affine = np.eye(4)
    img_affine[0, 3] = 1.0
    values = np.zeros((6, 4, 3), dtype=np.float32)
    values += np.arange(6, dtype=np.float32)[:, None, None] * 10
    ref, img = _volume((6, 4, 3), ref_affine), _volume((6, 4, 3), img_affine, values)
    out = AlignToReference(mode="bilinear", padding_mode="zeros")(img, ref)
    np.testing.assert_allclose(np.asarray(out.affine), ref_affine)
    np.testing.assert_allclose(out[0, :, 1, 1].numpy(), [0.0, 0.0, 10.0, 20.0, 30.0, 40.0], atol=1e-4)


def test_align_resamples_a_coarser_grid_onto_the_reference_shape() -> None:
    # a 2-voxel-spacing label map covering the same field of view as the 1-voxel reference
    ref_affine = np.eye(4)
    ref_affine[:3, 3] = 0.5
    img_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img_affine[:3, 3] = 1.0
    labels = np.zeros((4, 4, 2), dtype=np.float32)
    labels[1:3, 1:3, :] = 2.0
    ref = _volume((8, 8, 4), ref_affine)
    d = {"t2w": ref, "prostate": _volume((4, 4, 2), img_affine, labels)}
    out = AlignToReferenced(keys=["t2w", "prostate"], ref_key="t2w", mode="nearest")(d)
    assert out["t2w"] is ref
    assert tuple(out["prostate"].shape) == (1, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(out["prostate"].affine), ref_affine)
    assert set(np.unique(out["prostate"].numpy())) == {0.0, 2.0}
    # nearest neighbour on an exact 2x grid: each coarse voxel becomes a 2 x 2 x 2 block
    np.testing.assert_array_equal(out["prostate"][0].numpy(), labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_align_needs_metatensors_and_the_reference() -> None:
    with pytest.raises(ValueError, match="MetaTensor"):
        AlignToReference()(torch.zeros(1, 2, 2, 2), _volume((2, 2, 2), np.eye(4)))
    with pytest.raises(ValueError, match="reference key 't2w'"):
        AlignToReferenced(keys="adc")({"adc": _volume((2, 2, 2), np.eye(4))})
    with pytest.raises(ValueError, match="mode"):
        AlignToReference(mode="cubic")


@pytest.mark.parametrize(
    ("shape", "k", "method", "expected"),
    [
        ((200, 200, 96), (32, 32, 16), "symmetric", ((12, 12), (12, 12), (0, 0))),
        ((50, 64, 33), (32, 32, 16), "symmetric", ((7, 7), (0, 0), (7, 8))),
        ((50, 64, 33), (32, 32, 16), "end", ((0, 14), (0, 0), (0, 15))),
        ((5, 6, 7), 4, "symmetric", ((1, 2), (1, 1), (0, 1))),
    ],
)
def test_divisible_padding_hand_values(shape, k, method, expected) -> None:
    assert divisible_padding(shape, k, method) == expected


@pytest.mark.parametrize("method", ["symmetric", "end"])
def test_pad_record_matches_monai_divisible_pad(method: str) -> None:
    shape = (5, 6, 7)
    img = _volume(shape, np.eye(4)) + 1.0  # every voxel non-zero, so the padding is where the zeros are
    out = PadToDivisibled(keys=["t2w", "lesion"], k=4, method=method)({"t2w": img, "lesion": img.clone()})
    reference = DivisiblePad(k=4, method=method)(img.clone())
    assert tuple(out["t2w"].shape) == tuple(reference.shape) == (1, 8, 8, 8)
    np.testing.assert_array_equal(out["t2w"].numpy(), reference.numpy())
    record = out["padding"]
    assert record.dtype == torch.int64 and tuple(record.shape) == (3, 2)
    (b0, _), (b1, _), (b2, _) = record.tolist()
    np.testing.assert_array_equal(out["lesion"][:, b0 : b0 + 5, b1 : b1 + 6, b2 : b2 + 7].numpy(), img.numpy())
    assert float(out["lesion"].sum()) == pytest.approx(float(img.sum()))


def test_pad_rejects_mixed_shapes_and_bad_args() -> None:
    d = {"a": torch.ones(1, 4, 4, 4), "b": torch.ones(1, 4, 4, 5)}
    with pytest.raises(ValueError, match="share one spatial shape"):
        PadToDivisibled(keys=["a", "b"], k=4)(d)
    with pytest.raises(ValueError, match="k must be >= 1"):
        PadToDivisibled(keys="a", k=0)
    with pytest.raises(ValueError, match="method"):
        divisible_padding((4, 4, 4), 4, "middle")
