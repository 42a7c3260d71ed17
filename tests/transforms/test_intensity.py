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
