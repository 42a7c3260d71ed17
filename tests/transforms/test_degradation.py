from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.transforms.degradation import (
    RectalDistortion,
    RectalDistortiond,
    SliceDecimate,
    SliceDecimated,
    anterior_posterior_axis,
    rectal_displacement,
)


def _slices(depth: int = 8, spacing: float = 3.0, origin: float = 10.0) -> MetaTensor:
    affine = torch.diag(torch.tensor([1.0, 1.0, spacing, 1.0], dtype=torch.float64))
    affine[2, 3] = origin
    values = torch.arange(depth, dtype=torch.float32).expand(1, 2, 2, depth).clone()  # slice k holds k
    return MetaTensor(values, affine=affine)


@pytest.mark.parametrize(
    ("factor", "mode", "offset", "kept", "origin"),
    [
        (2, "skip", 0, [0, 2, 4, 6], 10.0),
        (2, "skip", 1, [1, 3, 5, 7], 13.0),
        (2, "average", 0, [0.5, 2.5, 4.5, 6.5], 11.5),
        (4, "average", 0, [1.5, 5.5], 14.5),
    ],
)
def test_slice_decimation_keeps_or_averages_the_right_slices(factor, mode, offset, kept, origin) -> None:
    out = SliceDecimate(factor=factor, mode=mode, offset=offset)(_slices())
    assert tuple(out.shape) == (1, 2, 2, 8 // factor)
    np.testing.assert_allclose(out[0, 1, 0].numpy(), kept)
    # slice spacing grows by the factor; the first slice centre moves to where the kept/averaged slices are
    assert float(out.affine[2, 2]) == pytest.approx(3.0 * factor)
    assert float(out.affine[2, 3]) == pytest.approx(origin)


def test_slice_decimated_writes_output_key_and_keeps_target() -> None:
    img = _slices(depth=96)
    out = SliceDecimated(keys="t2w", output_keys="image")({"t2w": img})
    assert tuple(out["image"].shape) == (1, 2, 2, 48) and out["t2w"] is img


@pytest.mark.parametrize("kwargs", [{"factor": 0}, {"mode": "nearest"}, {"factor": 2, "mode": "skip", "offset": 2}])
def test_slice_decimation_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SliceDecimate(**kwargs)


def test_slice_decimation_needs_a_multiple_of_the_factor() -> None:
    with pytest.raises(ValueError, match="D=7"):
        SliceDecimate(2)(torch.zeros(1, 2, 2, 7))


SHAPE = (40, 40, 6)
SPACING = (1.0, 1.0, 2.0)


def _case(ramp_axis: int = 1) -> tuple[MetaTensor, MetaTensor]:
    """Image = world coordinate in mm along ``ramp_axis``; rectum = a 4 x 4 column at i 18..21, j 5..8."""
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    coords = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)], indexing="ij")
    image = MetaTensor(torch.as_tensor(coords[ramp_axis], dtype=torch.float32)[None], affine=affine)
    rectum = torch.zeros(1, *SHAPE)
    rectum[0, 18:22, 5:9, :] = 1.0
    return image, MetaTensor(rectum, affine=affine)


def test_warp_of_a_ramp_recovers_the_field_largest_at_the_rectum_and_zero_far_away() -> None:
    # on a linear ramp I(x) = y_mm trilinear warping is exact: warped - image = u_mm(x)
    image, rectum = _case(ramp_axis=1)
    warped = RectalDistortion(decay_mm=5.0, smooth_mm=1.0)(image, rectum, amplitude_mm=4.0)
    diff = (warped - image)[0].numpy()
    assert 3.5 < diff[19, 6, 3] <= 4.0 + 1e-5  # inside the rectum: the full amplitude, a little smoothed
    assert diff.max() == pytest.approx(diff[18:22, 5:9].max())  # largest at the rectum
    far = np.zeros(SHAPE, bool)
    far[:, 36:, :] = True  # >= 27 mm from the rectum, more than 5 decay lengths
    assert np.abs(diff[far]).max() < 1e-4
    # 7 mm outside the rectum (j = 15 vs its edge at j = 8): 4 exp(-7^2 / (2 * 5^2)) = 1.501 before smoothing
    assert diff[19, 15, 3] == pytest.approx(4.0 * np.exp(-49 / 50), abs=0.05)


def test_field_is_along_the_anterior_posterior_axis_only() -> None:
    image, rectum = _case(ramp_axis=0)  # a ramp along H (left-right) does not see an A-P shift
    warped = RectalDistortion(decay_mm=5.0)(image, rectum, amplitude_mm=4.0)
    np.testing.assert_allclose(warped.numpy(), image.numpy(), atol=1e-4)


def test_displacement_matches_the_formula_for_a_point_rectum() -> None:
    mask = np.zeros((15, 15, 5), bool)
    mask[7, 7, 2] = True
    spacing, decay, amplitude = (0.5, 0.5, 3.0), 2.0, 5.0
    field = rectal_displacement(torch.as_tensor(mask)[None], amplitude, spacing, decay, smooth_mm=0.0, axis=1)
    i, j, k = np.meshgrid(np.arange(15), np.arange(15), np.arange(5), indexing="ij")
    d2 = ((i - 7) * 0.5) ** 2 + ((j - 7) * 0.5) ** 2 + ((k - 2) * 3.0) ** 2
    expected = amplitude * np.exp(-d2 / (2 * decay**2)) / 0.5  # mm -> voxels along axis 1
    np.testing.assert_allclose(field[1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(field[1].max()) == pytest.approx(10.0)
    assert float(field[0].abs().max()) == 0.0 and float(field[2].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("affine", "axis"),
    [
        (np.diag([1.0, 1.0, 3.0, 1.0]), 1),
        (np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]], float), 0),
        (np.diag([-0.5, -0.5, 3.0, 1.0]), 1),  # LPS-like flips keep the axis
        (None, 1),
    ],
)
def test_anterior_posterior_axis(affine, axis: int) -> None:
    assert anterior_posterior_axis(affine) == axis


def _sample(case_id: str) -> dict:
    image, rectum = _case(ramp_axis=1)
    return {"id": case_id, "t2w": image, "rectum": rectum}


def _distort(seed: int = 3, deterministic: bool = True, **kwargs) -> RectalDistortiond:
    return RectalDistortiond(
        keys="t2w",
        target_keys="label",
        field_key="ddf",
        seed=seed,
        deterministic_per_case=deterministic,
        decay_mm=5.0,
        **kwargs,
    )


def test_deterministic_per_case_across_instances_and_orders() -> None:
    ids = ["case_0001", "case_0002", "case_0003", "case_0004"]
    first = {i: _distort()(_sample(i)) for i in ids}
    other = _distort()
    other.set_random_state(seed=999)  # the transform's own generator plays no part
    second = {i: other(_sample(i)) for i in reversed(ids)}
    for i in ids:
        np.testing.assert_array_equal(first[i]["t2w"].numpy(), second[i]["t2w"].numpy())
    peaks = {i: float(first[i]["ddf"][1].abs().max()) for i in ids}
    assert len({round(p, 6) for p in peaks.values()}) == len(ids)  # different cases, different fields
    assert all(3.0 * 0.8 < p <= 8.0 + 1e-5 for p in peaks.values())  # amplitude in (3, 8) mm, 1 mm voxels
    assert not np.allclose(first["case_0001"]["t2w"].numpy(), first["case_0002"]["t2w"].numpy())


def _amplitudes(transform: RectalDistortiond, n: int = 3) -> list[float]:
    draws = []
    for _ in range(n):
        transform(_sample("case_0001"))
        draws.append(transform.amplitude_mm)
    return draws


def test_training_mode_draws_fresh_fields_from_its_own_seeded_generator() -> None:
    draws = _amplitudes(_distort(deterministic=False))
    assert len(set(draws)) == 3  # the same case gets a new field every call
    assert all(3.0 <= abs(a) <= 8.0 for a in draws)
    assert _amplitudes(_distort(deterministic=False)) == draws  # the same seed repeats the sequence
    assert _amplitudes(_distort(seed=4, deterministic=False)) != draws


def test_target_is_the_undistorted_input_and_field_is_stored() -> None:
    sample = _sample("case_0007")
    original = sample["t2w"].clone()
    out = _distort(random_sign=False, amplitude_range=(5.0, 5.0))(sample)
    np.testing.assert_array_equal(out["label"].numpy(), original.numpy())
    assert tuple(out["ddf"].shape) == (3, *SHAPE)
    assert 4.0 < float((out["t2w"] - out["label"]).max()) <= 5.0 + 1e-5  # a +5 mm shift at the rectum
    assert isinstance(out["t2w"], MetaTensor)
    np.testing.assert_allclose(np.asarray(out["t2w"].affine), np.asarray(original.affine))


def test_distortion_errors_name_the_problem() -> None:
    sample = _sample("case_0009")
    sample["rectum"] = sample["rectum"] * 0
    with pytest.raises(ValueError, match="case_0009.*empty"):
        _distort()(sample)
    with pytest.raises(ValueError, match="rectal mask under 'rectum'"):
        _distort()({"id": "case_0009", "t2w": sample["t2w"]})
    no_id = _sample("x")
    del no_id["id"]
    with pytest.raises(ValueError, match="case id under 'id'"):
        _distort()(no_id)
    with pytest.raises(ValueError, match="amplitude_range"):
        RectalDistortiond(amplitude_range=(5.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# the cached field shape and the one-axis warp (bench/preprocessing.py: 975 ms a case at the paper size before)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_axis_warp_equals_monai_warp_of_the_same_field(axis: int) -> None:
    from common.transforms.degradation import warp_along_axis

    gen = torch.Generator().manual_seed(axis)
    image = torch.rand((2, 9, 11, 7), generator=gen)
    shift = 6.0 * torch.rand((9, 11, 7), generator=gen) - 3.0  # beyond the borders too
    ddf = torch.zeros((3, 9, 11, 7))
    ddf[axis] = shift
    reference = RectalDistortion().warp(image, ddf)  # MONAI Warp, bilinear, border
    np.testing.assert_allclose(warp_along_axis(image, shift, axis).numpy(), reference.numpy(), atol=5e-5)


def test_a_cached_weight_gives_the_distortion_of_the_full_field() -> None:
    from common.transforms.degradation import RectalWeightd

    for case in ("case_0001", "case_0002"):

        def distort(**kwargs) -> RectalDistortiond:
            return RectalDistortiond(keys="t2w", target_keys="label", seed=3, deterministic_per_case=True,
                                     decay_mm=5.0, **kwargs)  # fmt: skip

        full = distort()(_sample(case))
        sample = RectalWeightd(rectum_key="rectum", weight_key="w", decay_mm=5.0)(_sample(case))
        assert tuple(sample["w"].shape) == (1, *sample["rectum"].shape[1:])
        cached = distort(weight_key="w")(sample)
        np.testing.assert_array_equal(cached["label"].numpy(), full["label"].numpy())
        np.testing.assert_allclose(cached["t2w"].numpy(), full["t2w"].numpy(), atol=5e-5)
        assert not np.allclose(cached["t2w"].numpy(), cached["label"].numpy(), atol=1e-3)  # it did distort


def test_the_training_pipeline_flips_the_cached_weight_with_the_volumes(tmp_path) -> None:
    """Same seed, same draws (flips and amplitudes) with the cached weight and with the field computed from the
    flipped mask every call: the same distorted images, epoch after epoch."""
    from common.data.datalist import load_datalist
    from common.data.phantom import make_cohort
    from common.transforms import task_transforms

    entries = load_datalist(make_cohort(tmp_path, cases=3, seed=0, size=(16, 32, 32)), ("t2w", "rectum"))["training"]
    cached = task_transforms("distortion_correction", "smoke", seed=5, train=True)
    computed = task_transforms("distortion_correction", "smoke", seed=5, train=True)
    next(t for t in computed.transforms if isinstance(t, RectalDistortiond)).weight_key = None
    for _ in range(4):
        for entry in entries:
            a, b = cached(dict(entry)), computed(dict(entry))
            np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
            np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), atol=5e-5)
    assert "rectal_weight" not in a  # the weight stays inside the pipeline
