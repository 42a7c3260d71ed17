"""A tiny synthetic prostate case written as NIfTI files: T2W, DWI, masks on a 32 x 32 x 16 grid, ADC on a
coarser 16 x 16 x 8 grid covering the same field of view (as in cohorts that store diffusion on its own grid)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (32, 32, 16)
SPACING = (1.0, 1.0, 2.0)


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    # world mm of voxel centres; both grids cover x, y in [-16, 16) and z in [-16, 16)
    return np.meshgrid(*[-16.0 + (np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-16.0 + s / 2 for s in spacing]
    return affine


def write_case(folder: Path, case_id: str, pirads: int = 4, seed: int = 0) -> dict:
    """Write one case into ``folder`` and return its datalist entry."""
    rng = np.random.default_rng(seed)
    x, y, z = _grid(SHAPE, SPACING)
    body = (x / 14) ** 2 + (y / 12) ** 2 < 1
    prostate = ((x / 6) ** 2 + (y / 5) ** 2 + (z / 8) ** 2 < 1).astype(np.uint8)
    prostate[prostate.astype(bool) & (y > 0)] = 2  # anterior part as transition zone
    lesion = ((x - 2) ** 2 + (y + 2) ** 2 + z**2 < 9).astype(np.uint8)
    rectum = ((x / 3) ** 2 + ((y + 9) / 3) ** 2 < 1).astype(np.uint8)  # posterior (y < 0 in RAS)
    t2w = np.where(body, 400.0 + 40.0 * np.sin(x / 2) * np.cos(y / 3), 5.0) + rng.normal(0, 5, SHAPE)
    t2w[rectum.astype(bool)] = 20.0
    dwi = np.where(body, 100.0, 2.0) + 300.0 * lesion + rng.normal(0, 2, SHAPE)
    xa, ya, za = _grid((16, 16, 8), (2.0, 2.0, 4.0))
    adc = np.where((xa / 14) ** 2 + (ya / 12) ** 2 < 1, 1600.0, 3000.0)
    adc[(xa - 2) ** 2 + (ya + 2) ** 2 + za**2 < 9] = 800.0
    entry: dict = {"id": case_id, "pirads": pirads}
    volumes = {"t2w": t2w, "dwi": dwi, "prostate": prostate, "lesion": lesion, "rectum": rectum}
    for key, array in volumes.items():
        path = folder / f"{case_id}_{key}.nii.gz"
        nib.save(
            nib.Nifti1Image(array.astype(np.float32 if array.dtype.kind == "f" else np.uint8), _affine(SPACING)), path
        )
        entry[key] = str(path)
    path = folder / f"{case_id}_adc.nii.gz"
    nib.save(nib.Nifti1Image(adc.astype(np.float32), _affine((2.0, 2.0, 4.0))), path)
    entry["adc"] = str(path)
    return entry


@pytest.fixture(scope="module")
def case_entries(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two cases with different ids and PI-RADS scores, written once per test module (read only)."""
    folder = tmp_path_factory.mktemp("cases")
    return [write_case(folder, "case_0001", pirads=2, seed=1), write_case(folder, "case_0002", pirads=5, seed=2)]
