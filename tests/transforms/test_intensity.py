from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.transforms.intensity import NormalizeMRIntensity, NormalizeMRIntensityd


def _body_and_background(n_background: int) -> torch.Tensor:
    # body: the 1000 values 1000..1999; background: zeros
    values = np.concatenate([np.arange(1000, 2000, dtype=np.float32), np.zeros(n_background, np.float32)])
    return torch.as_tensor(values).reshape(1, 1, 1, -1)


@pytest.mark.parametrize("n_background", [500, 3000])
def test_percentiles_are_taken_inside_the_body(n_background: int) -> None:
    img = _body_and_background(n_background)
    out = NormalizeMRIntensity()(img)[0, 0, 0].numpy()
    body = out[:1000]
    # numpy's linear percentile of 1000..1999: 0.5 % -> 1004.995, 99.5 % -> 1994.005
    low, high = 1004.995, 1994.005
    np.testing.assert_allclose(body, np.clip((np.arange(1000, 2000) - low) / (high - low), 0, 1), atol=1e-6)
    assert (body == 0).sum() == 5 and (body == 1).sum() == 5  # 1000..1004 and 1995..1999 are clipped
    assert (out[1000:] == 0).all()
    assert out.dtype == np.float32


def test_whole_volume_percentiles_differ_when_background_dominates() -> None:
    img = _body_and_background(3000)
    # over all 4000 sorted voxels (3000 zeros, then 1000..1999) the 0.5 % percentile is 0 and the 99.5 % one sits
    # at index 0.995 * 3999 = 3979.005, i.e. 1979.005, so the body's lowest value 1000 is no longer clipped to 0
    out = NormalizeMRIntensity(body_threshold=None)(img)[0, 0, 0].numpy()
    assert out[0] == pytest.approx(1000 / 1979.005, rel=1e-6)


@pytest.mark.parametrize(
    ("adc", "expected"), [(-10.0, 0.0), (0.0, 0.0), (750.0, 0.25), (1500.0, 0.5), (3000.0, 1.0), (4500.0, 1.0)]
)
def test_adc_fixed_window(adc: float, expected: float) -> None:
    d = {"adc": torch.full((1, 2, 2, 2), adc), "t2w": torch.rand(1, 4, 4, 4) * 100 + 1}
    out = NormalizeMRIntensityd(keys=["adc", "t2w"])(d)
    np.testing.assert_allclose(out["adc"].numpy(), expected, atol=1e-7)
    assert 0.0 <= float(out["t2w"].min()) and float(out["t2w"].max()) <= 1.0
    assert float(out["t2w"].max()) == 1.0


def test_metatensor_meta_is_kept() -> None:
    img = MetaTensor(torch.rand(1, 4, 4, 4) * 10, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = NormalizeMRIntensity()(img)
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(np.asarray(out.affine), np.diag([2.0, 2.0, 3.0, 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_names_key_case_and_file(bad: float) -> None:
    adc = torch.ones(1, 3, 3, 3)
    adc[0, 1, 1, 1] = bad
    img = MetaTensor(adc, meta={"filename_or_obj": "/data/case_0003_adc.nii.gz"})
    d = {"id": "case_0003", "adc": img, "t2w": torch.ones(1, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"'adc' of case 'case_0003' \(/data/case_0003_adc\.nii\.gz\)") as err:
        NormalizeMRIntensityd(keys=["t2w", "adc"])(d)
    assert "non-finite" in str(err.value)


def test_constant_volume_maps_to_zeros() -> None:
    np.testing.assert_array_equal(NormalizeMRIntensity()(torch.full((1, 2, 2, 2), 7.0)).numpy(), 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"fixed_range": (3000, 0)}, {"lower": 99.5, "upper": 0.5}, {"upper": 101.0}, {"body_threshold": 1.5}],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        NormalizeMRIntensity(**kwargs)


def _gland_with_lesion() -> torch.Tensor:
    # a high-b image: 10000 body voxels at 100, a "gland" of 200 voxels at 300, a "lesion" of 5 voxels at 600 and
    # 5000 voxels of air (0, outside the body)
    values = np.zeros(15205, np.float32)
    values[:10000] = 100.0
    values[10000:10200] = 300.0
    values[10200:10205] = 600.0
    return torch.as_tensor(values).reshape(1, 1, 1, -1)


def test_dwi_keeps_its_lesion_above_the_gland() -> None:
    img = _gland_with_lesion()
    out = NormalizeMRIntensityd(keys=["dwi", "t2w"])({"dwi": img, "t2w": img.clone()})
    dwi, t2w = out["dwi"][0, 0, 0].numpy(), out["t2w"][0, 0, 0].numpy()
    # 99.99 % of 10205 sorted values sits among the 5 lesion voxels: the gland stays below it, the lesion brighter
    high = np.percentile(img.numpy().ravel()[:10205], 99.99)
    np.testing.assert_allclose(dwi[10000], (300.0 - 100.0) / (high - 100.0), rtol=1e-6)
    assert dwi[10000] < 0.5 < dwi[10200]
    # the 99.5 % percentile of T2W lies inside the gland: gland and lesion are both clipped to 1
    assert t2w[10000] == t2w[10200] == 1.0


def test_upper_percentile_per_key_or_for_all() -> None:
    img = _gland_with_lesion()
    same = NormalizeMRIntensityd(keys=["dwi"], upper=99.5)({"dwi": img})["dwi"][0, 0, 0].numpy()
    assert same[10000] == same[10200] == 1.0
    mapped = NormalizeMRIntensityd(keys=["t2w"], upper={"t2w": 99.99})({"t2w": img})["t2w"][0, 0, 0].numpy()
    assert mapped[10000] < 0.5
