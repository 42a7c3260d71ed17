"""Tests for common.data.picai on a tiny fake PI-CAI tree (6 studies of 5 patients)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import DatalistError, load_datalist
from common.data.picai import build_picai_datalist, case_pirads

REPO = Path(__file__).resolve().parents[2]
T2W_SIZE = (8, 8, 4)  # (i, j, k)
# T2W: LPS direction I, spacing (0.5, 0.5, 3), origin 0 -> RAS affine diag(-0.5, -0.5, 3), origin 0.
T2W_RAS = np.diag([-0.5, -0.5, 3.0, 1.0])
# (patient, study, lesion_PIRADS, case_ISUP, case_csPCa, fold folder or "")
STUDIES = [
    ("10000", "1000000", "3,4", "2", "YES", ""),
    ("10001", "1000001", "N/A", "0", "NO", ""),
    ("10002", "1000002", "", "0", "NO", "fold1"),  # empty cell, and images kept in a fold folder
    ("10003", "1000003", "5", "3", "YES", ""),
    ("10003", "1000004", "N/A,2", "0", "NO", ""),  # the same patient's second study
    ("10004", "1000005", " 4 , 2 ", "1", "NO", ""),
]
EXPECTED_PIRADS = {
    "10000_1000000": 4,
    "10001_1000001": 1,
    "10002_1000002": 1,
    "10003_1000003": 5,
    "10003_1000004": 2,
    "10004_1000005": 4,
}
HUMAN_LESION = {"10000_1000000": 2, "10003_1000003": 4, "10001_1000001": 0, "10003_1000004": 0, "10002_1000002": 1}
AI_ONLY = "10004_1000005"  # no expert label: falls back to AI/Bosma22a
WITH_GLAND = ("10000_1000000", "10003_1000003", "10004_1000005")
PROPORTIONS = (3, 1, 1)


def _write_mha(path: Path, size_ijk: tuple[int, int, int], spacing: tuple[float, ...], value: float) -> None:
    import itk

    array = np.full(size_ijk[::-1], value, np.float32)  # itk arrays are (k, j, i)
    array[0, 0, 0] = value + 1.0
    img = itk.image_from_array(array)
    img.SetSpacing(list(spacing))
    itk.imwrite(img, str(path))


def _write_mask(path: Path, top: int) -> None:
    mask = np.zeros(T2W_SIZE, np.uint8)
    if top:
        mask[2:5, 3:6, 1:3] = top
        mask[2, 3, 1] = 1 if top > 1 else top
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, T2W_RAS), str(path))


@pytest.fixture
def picai(tmp_path: Path) -> tuple[Path, Path]:
    """``(images_dir, labels_dir)`` of a fake PI-CAI tree; ADC and hbv on a coarser grid than T2W."""
    images, labels = tmp_path / "images", tmp_path / "picai_labels"
    for patient, study, *_, fold in STUDIES:
        folder = images / fold / patient if fold else images / patient
        folder.mkdir(parents=True, exist_ok=True)
        case = f"{patient}_{study}"
        _write_mha(folder / f"{case}_t2w.mha", T2W_SIZE, (0.5, 0.5, 3.0), 100.0)
        _write_mha(folder / f"{case}_adc.mha", (4, 4, 4), (1.0, 1.0, 3.0), 1000.0)
        _write_mha(folder / f"{case}_hbv.mha", (4, 4, 4), (1.0, 1.0, 3.0), 10.0)
        (folder / f"{case}_sag.mha").write_bytes(b"unused sagittal scan")
    for case, top in HUMAN_LESION.items():
        _write_mask(labels / "csPCa_lesion_delineations/human_expert/resampled" / f"{case}.nii.gz", top)
    for case in EXPECTED_PIRADS:  # AI masks exist for all: expert ones must win where present
        _write_mask(labels / "csPCa_lesion_delineations/AI/Bosma22a" / f"{case}.nii.gz", 1)
    for case in WITH_GLAND:
        _write_mask(labels / "anatomical_delineations/whole_gland/AI/Bosma22b" / f"{case}.nii.gz", 1)
    sheet = labels / "clinical_information" / "marksheet.csv"
    sheet.parent.mkdir(parents=True)
    with sheet.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "study_id", "mri_date", "case_ISUP", "case_csPCa", "center", "lesion_PIRADS"])
        for patient, study, pirads, isup, cspca, _ in STUDIES:
            writer.writerow([patient, study, "2020-01-01", isup, cspca, "RUMC", pirads])
        writer.writerow(["19999", "1999999", "2020-01-01", "0", "NO", "RUMC", "N/A"])  # a study without images
    return images, labels


def _build(picai: tuple[Path, Path], out: Path, **kwargs: Any) -> dict[str, Any]:
    images, labels = picai
    kwargs.setdefault("proportions", PROPORTIONS)
    assert build_picai_datalist(images, labels, out, **kwargs) == out
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("3,4", 4), ("N/A", 1), ("", 1), (None, 1), (math.nan, 1), ("N/A,5", 5), ("2", 2), (" 4 , 2 ", 4), ("3;5", 5)],
)
def test_case_pirads(cell: Any, expected: int) -> None:
    assert case_pirads(cell) == expected


@pytest.mark.parametrize("cell", ["6", "0", "3.5", "abc", "3,x"])
def test_case_pirads_rejects_bad_scores(cell: str) -> None:
    with pytest.raises(ValueError, match="PI-RADS score"):
        case_pirads(cell)


def test_build_keys_pirads_labels_and_splits(picai: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "datalist.json"
    data = _build(picai, out)
    entries = {e["id"]: (split, e) for split in ("training", "validation", "test") for e in data[split]}
    assert sorted(entries) == sorted(EXPECTED_PIRADS)
    assert {case: e["pirads"] for case, (_, e) in entries.items()} == EXPECTED_PIRADS
    # splits: counts 3/1/1 over 5 patients, a patient's two studies together
    patients = {split: {e["patient_id"] for e in data[split]} for split in ("training", "validation", "test")}
    assert [len(patients[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    assert entries["10003_1000003"][0] == entries["10003_1000004"][0]
    for case, (_, e) in entries.items():
        assert {"t2w", "adc", "dwi", "lesion", "pirads"} <= set(e)
        assert "rectum" not in e
        assert ("prostate" in e) == (case in WITH_GLAND)
        assert e["t2w"].endswith(f"{case}_t2w.mha") and e["dwi"].endswith(f"{case}_hbv.mha")
    assert entries["10000_1000000"][1]["case_csPCa"] is True and entries["10000_1000000"][1]["case_ISUP"] == 2
    # graded expert masks (max 2 and 4) are binarised into copies beside the datalist; binary ones are kept
    assert data["build"]["lesions_binarised"] == 2
    assert data["build"]["lesion_sources"] == {"human_expert": 5, "AI/Bosma22a": 1}
    assert entries[AI_ONLY][1]["lesion_source"] == "AI/Bosma22a"
    for case in ("10000_1000000", "10003_1000003"):
        lesion = entries[case][1]["lesion"]
        assert lesion == f"picai_lesions_binary/{case}.nii.gz"
        assert set(np.unique(nib.load(str(out.parent / lesion)).get_fdata())) == {0.0, 1.0}
    assert "human_expert/resampled/10002_1000002.nii.gz" in entries["10002_1000002"][1]["lesion"]
    assert data["resample_to"] == "t2w"
    assert data["build"]["marksheet_studies_without_images"] == 1


def test_split_is_seeded(picai: tuple[Path, Path], tmp_path: Path) -> None:
    def splits(seed: int, name: str) -> list[list[str]]:
        data = _build(picai, tmp_path / name / "d.json", seed=seed)
        return [[e["id"] for e in data[s]] for s in ("training", "validation", "test")]

    first = splits(0, "a")
    assert splits(0, "b") == first
    assert any(splits(seed, f"s{seed}") != first for seed in (1, 2, 3))


def test_built_datalist_validates_only_with_resampling(picai: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "datalist.json"
    _build(picai, out)
    keys = ("t2w", "adc", "dwi", "lesion", "pirads")
    with pytest.warns(UserWarning, match="12 image"):  # adc and dwi of 6 studies
        loaded = load_datalist(out, required_keys=keys, allow_resample=True, workers=2)
    assert sum(len(v) for v in loaded.values()) == 6
    assert all(Path(e["lesion"]).is_absolute() for v in loaded.values() for e in v)
    with pytest.raises(DatalistError) as info:
        load_datalist(out, required_keys=keys)
    assert len(info.value.problems) == 12
    assert "adc" in info.value.problems[0] and "shape (4, 4, 4) differs from t2w (8, 8, 4)" in info.value.problems[0]
    # masks share the T2W grid exactly, including the LPS -> RAS conversion of the .mha T2W
    load_datalist(out, required_keys=("t2w", "lesion"))


def _break(picai: tuple[Path, Path], hbv: bool = True) -> None:
    images, labels = picai
    (images / "10001" / "10001_1000001_adc.mha").unlink()
    if hbv:
        (images / "fold1" / "10002" / "10002_1000002_hbv.mha").unlink()
    (labels / "csPCa_lesion_delineations/human_expert/resampled" / f"{AI_ONLY}.nii.gz").unlink(missing_ok=True)
    (labels / "csPCa_lesion_delineations/AI/Bosma22a" / f"{AI_ONLY}.nii.gz").unlink()


def test_incomplete_studies_are_listed_in_one_error(picai: tuple[Path, Path], tmp_path: Path) -> None:
    _break(picai)
    with pytest.raises(DatalistError) as info:
        _build(picai, tmp_path / "d.json")
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("10001_1000001: adc (10001_1000001_adc.mha): not found under")
    assert problems[1].startswith("10002_1000002: dwi (10002_1000002_hbv.mha): not found under")
    assert problems[2].startswith(f"{AI_ONLY}: lesion ({AI_ONLY}.nii.gz): not found in")
    assert not (tmp_path / "d.json").exists()


def test_skip_incomplete_reports_what_was_skipped(picai: tuple[Path, Path], tmp_path: Path) -> None:
    _break(picai, hbv=False)
    with pytest.warns(UserWarning, match="skipped 2 incomplete"):
        data = _build(picai, tmp_path / "d.json", skip_incomplete=True, proportions=(1, 1, 1))
    kept = sorted(e["id"] for s in ("training", "validation", "test") for e in data[s])
    assert kept == ["10000_1000000", "10002_1000002", "10003_1000003", "10003_1000004"]
    assert sorted(data["build"]["skipped"]) == ["10001_1000001", AI_ONLY]
    assert data["build"]["skipped"]["10001_1000001"].startswith("adc (10001_1000001_adc.mha): not found under")


def test_too_few_patients_for_three_splits(picai: tuple[Path, Path], tmp_path: Path) -> None:
    _break(picai)
    with pytest.raises(ValueError, match="2 patients"), pytest.warns(UserWarning, match="skipped 3"):
        _build(picai, tmp_path / "d.json", skip_incomplete=True)


def test_study_missing_from_marksheet_and_bad_score(picai: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = picai
    sheet = labels / "clinical_information" / "marksheet.csv"
    lines = sheet.read_text().splitlines()
    lines = [line for line in lines if not line.startswith("10001,")]
    lines = [line.replace('"3,4"', '"3,7"') for line in lines]
    custom = tmp_path / "custom.csv"
    custom.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatalistError) as info:
        build_picai_datalist(images, labels, tmp_path / "d.json", marksheet=custom, proportions=PROPORTIONS)
    assert info.value.problems == [
        f"10000_1000000: pirads: PI-RADS score '7' in '3,7' is not an integer in 1..5 (marksheet {custom})",
        f"10001_1000001: pirads: study not in marksheet {custom}",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proportions": (1, 1)}, "proportions must be 3 positive numbers"),
        ({"proportions": (1, 0, 1)}, "proportions must be 3 positive numbers"),
        ({"marksheet": "nowhere.csv"}, "marksheet nowhere.csv not found"),
        ({"prostate_dir": "nowhere"}, "prostate_dir nowhere is not a folder"),
        ({"workers": 0}, "workers must be a positive int"),
    ],
)
def test_bad_arguments(picai: tuple[Path, Path], tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    images, labels = picai
    with pytest.raises(ValueError, match=match):
        build_picai_datalist(images, labels, tmp_path / "d.json", **kwargs)


def test_no_images_found(picai: tuple[Path, Path], tmp_path: Path) -> None:
    _, labels = picai
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PI-CAI images"):
        build_picai_datalist(tmp_path / "empty", labels, tmp_path / "d.json")


@pytest.mark.slow
def test_cli_builds_validates_and_reports(picai: tuple[Path, Path], tmp_path: Path) -> None:
    images, labels = picai
    out = tmp_path / "cli" / "datalist.json"
    cmd = [sys.executable, "-m", "common.data.picai", "--images", str(images), "--labels", str(labels)]
    cmd += ["--out", str(out), "--proportions", "3,1,1", "--validate"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "training: 4 studies" in ok.stdout or "training: 3 studies" in ok.stdout
    assert "binarised copies: 2" in ok.stdout and "validated" in ok.stdout
    assert json.loads(out.read_text())["name"] == "PI-CAI"
    _break(picai)
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "3 problem(s) in PI-CAI layout under" in bad.stderr and "10001_1000001: adc" in bad.stderr


def test_corrupt_lesion_mask_is_reported(picai: tuple[Path, Path], tmp_path: Path) -> None:
    _, labels = picai
    bad = labels / "csPCa_lesion_delineations/human_expert/resampled/10003_1000003.nii.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DatalistError) as info:
        _build(picai, tmp_path / "d.json")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"10003_1000003: lesion {bad}: cannot be read, the file is corrupt")
