"""Inference on plain images (common.bundle.plain): cases found in a folder, predictions back on each input's grid,
in the file's own axis order, with its affine."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from common.bundle.plain import plain_datalist, predict_plain_images
from common.data.phantom import make_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    make_cohort(root / "cohort", cases=3, seed=0, size=(32, 64, 64))
    return root / "cohort"


class Upsample(nn.Module):
    """Trilinear upsampling of the slice axis by 2: a super-resolution "network" whose output is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=(1, 1, 2), mode="trilinear", align_corners=False)


class TwoClass(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1] - 0.5, 0.5 - x[:, :1]], dim=1)


class Pooled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4)) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_cases_are_grouped_by_name_and_masks_are_not_inputs(cohort: Path) -> None:
    seg = plain_datalist(cohort, "segmentation")
    assert [c["id"] for c in seg] == ["case_0000", "case_0001", "case_0002"]
    assert set(seg[0]) == {"id", "t2w", "adc"}  # ADC preferred over DWI; lesion/prostate/rectum masks skipped
    assert set(plain_datalist(cohort, "classification")[0]) == {"id", "t2w"}
    one = plain_datalist([cohort / "case_0001" / "case_0001_t2w.nii.gz"], "super_resolution")
    assert one == [{"id": "case_0001", "t2w": str(cohort / "case_0001" / "case_0001_t2w.nii.gz")}]


def test_bad_folders_get_one_error_naming_the_case_or_path(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no NIfTI file"):
        plain_datalist(tmp_path, "classification")
    with pytest.raises(FileNotFoundError, match="no_such.nii.gz"):
        plain_datalist([tmp_path / "no_such.nii.gz"], "classification")
    lone = tmp_path / "only"
    lone.mkdir()
    (lone / "p7_t2w.nii.gz").write_bytes((cohort / "case_0000" / "case_0000_t2w.nii.gz").read_bytes())
    with pytest.raises(ValueError, match="case 'p7'.*only T2W"):
        plain_datalist(lone, "segmentation")
    (lone / "p8_adc.nii.gz").write_bytes((cohort / "case_0000" / "case_0000_adc.nii.gz").read_bytes())
    with pytest.raises(ValueError, match="case 'p8' has no T2W"):
        plain_datalist(lone, "modality_translation")


def test_a_same_grid_prediction_lands_on_the_input_grid_in_the_file_orientation(cohort: Path, tmp_path: Path) -> None:
    out = predict_plain_images(nn.Identity(), cohort, "distortion_correction", "smoke", tmp_path / "dc")
    for case in ("case_0000", "case_0002"):
        source = nib.load(cohort / case / f"{case}_t2w.nii.gz")
        pred = nib.load(out / f"{case}_pred.nii.gz")
        assert pred.shape == source.shape and pred.get_data_dtype() == np.float32
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)  # LPS file: reoriented back from RAS
        assert _corr(pred.get_fdata(), source.get_fdata()) > 0.95  # a flipped axis would not correlate


def test_super_resolution_writes_twice_the_slices_on_the_native_grid(cohort: Path, tmp_path: Path) -> None:
    """Average slice pairs of a native T2W into a thick-slice file (as the study degrades it); the prediction of
    a trilinear upsampler must come back on exactly the native grid and resemble the native volume."""
    native = nib.load(cohort / "case_0001" / "case_0001_t2w.nii.gz")
    data = native.get_fdata().astype(np.float32)
    thick = 0.5 * (data[..., 0::2] + data[..., 1::2])
    affine = native.affine.copy()
    affine[:3, 3] += 0.5 * affine[:3, 2]
    affine[:3, 2] *= 2
    folder = tmp_path / "thick"
    folder.mkdir()
    nib.save(nib.Nifti1Image(thick, affine), folder / "p1.nii.gz")
    out = predict_plain_images(Upsample(), folder, "super_resolution", "smoke", tmp_path / "sr")
    pred = nib.load(out / "p1_pred.nii.gz")
    assert pred.shape == native.shape
    np.testing.assert_allclose(pred.affine, native.affine, atol=1e-5)
    assert _corr(pred.get_fdata(), data) > 0.95


def test_segmentation_masks_and_classification_csv(cohort: Path, tmp_path: Path) -> None:
    out = predict_plain_images(TwoClass(), cohort, "segmentation", "smoke", tmp_path / "seg")
    mask = nib.load(out / "case_0000_lesion.nii.gz")
    source = nib.load(cohort / "case_0000" / "case_0000_t2w.nii.gz")
    assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    out = predict_plain_images(Pooled(), cohort, "classification", "smoke", tmp_path / "cls")
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["case_0000", "case_0001", "case_0002"]
    assert all(abs(sum(float(r[f"p{k}"]) for k in range(4)) - 1) < 1e-4 and r["class"] == "3" for r in rows)
