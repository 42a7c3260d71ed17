from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data.phantom import (
    FOV_MM,
    IMAGE_KEYS,
    KEYS,
    MASK_KEYS,
    PIRADS_PROBABILITIES,
    PIRADS_TO_CLASS,
    make_case,
    make_cohort,
    preview_png,
    spacing_for,
)
from common.data.splits import split_counts
from common.profiles import PROFILES

REPO = Path(__file__).resolve().parents[2]
SMALL = (8, 40, 40)
STATS_SIZE = (20, 80, 80)
STATS_CASES = 30


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight cases at a small size, seed 7."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), 8, seed=7, size=SMALL)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    """Thirty in-memory cases, large enough to resolve 5 mm lesions (2.25 mm in-plane, 3.6 mm slices)."""
    return [make_case(k, seed=3, size=STATS_SIZE) for k in range(STATS_CASES)]


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- geometry -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "spacing"),
    [((24, 96, 96), (1.875, 1.875, 3.0)), ((8, 40, 60), (4.5, 3.0, 9.0)), ((96, 200, 200), (0.9, 0.9, 0.75))],
)
def test_spacing_is_fov_over_size(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    assert spacing_for(size) == pytest.approx(spacing)
    assert FOV_MM == (180.0, 180.0, 72.0)
    assert spacing_for((24, 96, 96))[2] / spacing_for((24, 96, 96))[0] == pytest.approx(1.6)


@pytest.mark.parametrize("size", [(8, 40, 40), (12, 48, 32)])
def test_case_shapes_dtypes_affine(size: tuple[int, int, int]) -> None:
    d, h, w = size
    case = make_case(2, seed=1, size=size)
    for key in IMAGE_KEYS:
        assert case[key].shape == (h, w, d) and case[key].dtype == np.float32
        assert np.isfinite(case[key]).all() and case[key].min() >= 0.0
    for key in MASK_KEYS:
        assert case[key].shape == (h, w, d) and case[key].dtype == np.uint8
    sx, sy, sz = 180.0 / h, 180.0 / w, 72.0 / d
    affine = case["affine"]
    np.testing.assert_allclose(affine[:3, :3], np.diag([-sx, -sy, sz]))
    # The volume centre (voxel ((h-1)/2, (w-1)/2, (d-1)/2)) sits at the world origin.
    np.testing.assert_allclose(affine @ [(h - 1) / 2, (w - 1) / 2, (d - 1) / 2, 1], [0, 0, 0, 1], atol=1e-9)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    assert sz > max(sx, sy)  # anisotropic: thick slices


def test_files_share_grid_and_have_headers(cohort: Path) -> None:
    entry = json.loads(cohort.read_text())["training"][0]
    images = {key: nib.load(cohort.parent / entry[key]) for key in KEYS}
    reference = images["t2w"]
    assert reference.shape == (SMALL[1], SMALL[2], SMALL[0])
    for key, image in images.items():
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine)
        np.testing.assert_allclose(image.get_qform(), reference.affine, atol=1e-5)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        assert image.get_data_dtype() == (np.float32 if key in IMAGE_KEYS else np.uint8)
    zooms = reference.header.get_zooms()
    assert zooms == pytest.approx((4.5, 4.5, 9.0))


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_cohort_has_native_slices_for_its_target(name: str) -> None:
    # DESIGN section 6: with fewer native slices than the target, the super-resolution target is an interpolation.
    profile = PROFILES[name]
    assert profile.cohort_size[0] >= profile.spatial_size[2]
    assert spacing_for(profile.cohort_size)[2] <= FOV_MM[2] / profile.spatial_size[2]


def _trilinear_from_thick_slices(volume: np.ndarray) -> np.ndarray:
    """Average slice pairs, then upsample linearly along D as ``F.interpolate(..., align_corners=False)`` does."""
    thick = volume.reshape(*volume.shape[:2], -1, 2).mean(-1)
    z = np.maximum((np.arange(volume.shape[2]) + 0.5) / 2 - 0.5, 0.0)
    below = np.floor(z).astype(int)
    above = np.minimum(below + 1, thick.shape[2] - 1)
    return thick[..., below] * (1 - (z - below)) + thick[..., above] * (z - below)


def test_interpolation_helper_is_exact_on_linear_ramps() -> None:
    ramp = np.broadcast_to(np.arange(8.0), (2, 2, 8))
    # Thick slices centred at 0.5, 2.5, 4.5, 6.5: exact in between, clamped beyond the outer centres.
    np.testing.assert_allclose(_trilinear_from_thick_slices(ramp)[0, 0], [0.5, 1, 2, 3, 4, 5, 6, 6.5])


def test_through_plane_detail_is_lost_in_thick_slices() -> None:
    # Septa, vessels, striations and nodule rims a few mm across: interpolating every slice pair misses them. The
    # urine (homogeneous fluid) gives the noise floor of the same error. Before they existed (organs, smooth texture
    # and noise only) the relative error was ~0.032 over the volume and ~0.055 in the gland; now ~0.077 and ~0.080.
    volume_errors, gland_errors = [], []
    for k in range(3):
        case = make_case(k, seed=0, size=(24, 48, 48))
        t2w = case["t2w"]
        error = np.abs(_trilinear_from_thick_slices(t2w) - t2w)
        gland = ndimage.binary_erosion(case["prostate"] > 0)
        urine = ndimage.binary_erosion(case["adc"] > 2400)
        gland_errors.append(error[gland].mean() / t2w[gland].mean())
        volume_errors.append(error.mean() / t2w.mean())
        assert urine.sum() > 100
        assert gland_errors[-1] > 3.0 * error[urine].mean() / t2w[urine].mean()
    assert np.mean(volume_errors) > 0.06
    assert np.mean(gland_errors) > 0.068


# ---- determinism ----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_case_independent_of_n(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", 4, seed=5, size=SMALL).parent
    b = make_cohort(tmp_path / "b", 4, seed=5, size=SMALL).parent
    c = make_cohort(tmp_path / "c", 3, seed=5, size=SMALL).parent
    d = make_cohort(tmp_path / "d", 4, seed=6, size=SMALL).parent
    files_a, files_b, files_c, files_d = (_file_bytes(x) for x in (a, b, c, d))
    assert files_a == files_b  # every NIfTI and the datalist, byte for byte
    for name, content in files_c.items():
        if name != "datalist.json":
            assert files_a[name] == content  # case k does not depend on the cohort size
    changed = [name for name in files_a if name != "datalist.json" and files_a[name] != files_d[name]]
    assert len(changed) == len(files_a) - 1  # another seed changes every file


def test_scalar_parameters_do_not_depend_on_grid() -> None:
    coarse = [make_case(k, seed=2, size=(6, 24, 24))["pirads"] for k in range(6)]
    fine = [make_case(k, seed=2, size=(12, 48, 48))["pirads"] for k in range(6)]
    assert coarse == fine and len(set(coarse)) > 1


def test_case_id_forms_agree() -> None:
    a, b = make_case(3, seed=1, size=SMALL), make_case("case_0003", seed=1, size=SMALL)
    np.testing.assert_array_equal(a["t2w"], b["t2w"])


# ---- datalist and CLI -----------------------------------------------------------------------------------------


def test_datalist_contract(cohort: Path) -> None:
    listing = json.loads(cohort.read_text())
    assert set(listing) == {
        "name",
        "description",
        "seed",
        "size",
        "spacing",
        "labels",
        "training",
        "validation",
        "test",
    }
    assert listing["seed"] == 7 and listing["size"] == list(SMALL)
    assert listing["spacing"] == pytest.approx([4.5, 4.5, 9.0])
    assert set(listing["labels"]["prostate"]) == {"0", "1", "2"}
    assert listing["labels"]["prostate"]["1"] == "peripheral zone"
    assert set(listing["labels"]["lesion"]) == set(listing["labels"]["rectum"]) == {"0", "1"}
    assert listing["labels"]["pirads_to_class"] == {"1": 0, "2": 0, "3": 1, "4": 2, "5": 3}
    parts = [listing[s] for s in ("training", "validation", "test")]
    # 6.0 / 0.4 / 1.6 -> 6, 0, 2 by largest remainder; validation takes one from training.
    assert [len(p) for p in parts] == split_counts(8) == [5, 1, 2]
    ids = [e["id"] for p in parts for e in p]
    assert sorted(ids) == [f"case_{k:04d}" for k in range(8)]
    for entry in (e for p in parts for e in p):
        assert set(entry) == {"id", *KEYS, "pirads"}
        assert isinstance(entry["pirads"], int) and 1 <= entry["pirads"] <= 5
        for key in KEYS:
            assert entry[key] == f"{entry['id']}/{entry['id']}_{key}.nii.gz"
            assert (cohort.parent / entry[key]).is_file()


def test_cohort_splits_stratified(tmp_path: Path) -> None:
    listing = json.loads(make_cohort(tmp_path, 24, seed=0, size=(4, 16, 16)).read_text())
    parts = [listing[s] for s in ("training", "validation", "test")]
    assert [len(p) for p in parts] == [18, 1, 5]
    classes = [PIRADS_TO_CLASS[e["pirads"]] for e in parts[0] + parts[1] + parts[2]]
    train = [PIRADS_TO_CLASS[e["pirads"]] for e in parts[0]]
    for c in set(classes):  # each class is 75 % training up to one case
        assert abs(train.count(c) - 0.75 * classes.count(c)) <= 1.0


@pytest.mark.slow
def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "common.data.phantom", "--out", str(out), "--cases", "3", "--seed", "7"]
    done = subprocess.run([*command, "--size", "8,40,40"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cases/s" in done.stdout
    listing = json.loads((out / "datalist.json").read_text())
    assert listing["size"] == [8, 40, 40]
    # The CLI writes what the library writes.
    library = make_cohort(tmp_path / "lib", 3, seed=7, size=SMALL).parent
    assert _file_bytes(out) == _file_bytes(library)
    bad = subprocess.run([*command, "--size", "8,40"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--size" in bad.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cases": 2}, "cases"),
        ({"cases": 3, "seed": -1}, "seed"),
        ({"cases": 3, "size": (8, 40)}, "size"),
        ({"cases": 3, "size": (2, 40, 40)}, "size"),
    ],
)
def test_make_cohort_rejects(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cohort(tmp_path, **kwargs)


@pytest.mark.parametrize("case_id", [-1, "case_x", "0003", 2.5, True])
def test_make_case_rejects_bad_id(case_id: object) -> None:
    with pytest.raises(ValueError, match="case_id"):
        make_case(case_id, size=SMALL)  # type: ignore[arg-type]


# ---- anatomy, lesions and contrast ----------------------------------------------------------------------------


def test_mask_labels_and_anatomy(cases: list[dict]) -> None:
    voxel_ml = float(np.prod(spacing_for(STATS_SIZE))) / 1000.0
    for case in cases:
        assert set(np.unique(case["prostate"])) == {0, 1, 2}
        assert set(np.unique(case["lesion"])) <= {0, 1}
        assert set(np.unique(case["rectum"])) == {0, 1}
        assert not np.any((case["prostate"] > 0) & (case["rectum"] > 0))
        assert 18.0 < (case["prostate"] > 0).sum() * voxel_ml < 75.0
        # The rectum lies posterior (larger j) to the prostate.
        j_prostate = np.nonzero(case["prostate"])[1].mean()
        assert np.nonzero(case["rectum"])[1].mean() > j_prostate


def test_lesion_mask_iff_pirads_3_to_5_and_inside_prostate(cases: list[dict]) -> None:
    grades = [case["pirads"] for case in cases]
    assert {1, 2, 3, 4, 5} <= set(grades)
    for case in cases:
        lesion = case["lesion"] > 0
        assert lesion.any() == (case["pirads"] >= 3)
        assert np.all(case["prostate"][lesion] > 0)


def test_lesion_zones(cases: list[dict]) -> None:
    zones = [np.bincount(c["prostate"][c["lesion"] > 0]).argmax() for c in cases if c["pirads"] >= 3]
    assert set(zones) == {1, 2}
    assert zones.count(1) > zones.count(2)  # about 70 % peripheral zone


def _lesion_and_zone(case: dict, key: str) -> tuple[float, float]:
    lesion = case["lesion"] > 0
    zone = np.bincount(case["prostate"][lesion]).argmax()
    normal = (case["prostate"] == zone) & ~lesion
    return float(case[key][lesion].mean()), float(case[key][normal].mean())


def test_lesion_adc_below_zone_and_falls_with_grade(cases: list[dict]) -> None:
    by_grade: dict[int, list[float]] = {3: [], 4: [], 5: []}
    for case in (c for c in cases if c["pirads"] >= 3):
        lesion_adc, zone_adc = _lesion_and_zone(case, "adc")
        assert lesion_adc < zone_adc, (case["pirads"], lesion_adc, zone_adc)
        if case["pirads"] >= 4:
            lesion_dwi, zone_dwi = _lesion_and_zone(case, "dwi")
            assert lesion_dwi > 1.3 * zone_dwi  # marked restriction is bright at high b
        by_grade[case["pirads"]].append(lesion_adc)
    means = [np.mean(by_grade[g]) for g in (3, 4, 5)]
    assert means[0] > means[1] > means[2]
    assert means[2] < 900.0


def test_normal_tissue_adc(cases: list[dict]) -> None:
    pz = np.median([np.median(c["adc"][(c["prostate"] == 1) & (c["lesion"] == 0)]) for c in cases])
    tz = np.median([np.median(c["adc"][(c["prostate"] == 2) & (c["lesion"] == 0)]) for c in cases])
    assert 1400.0 < pz < 1750.0
    assert 1100.0 < tz < 1350.0
    # Urine: the brightest large ADC region (~2800) is dark on DWI.
    case = cases[0]
    urine = case["adc"] > 2400
    assert urine.sum() > 200
    assert case["dwi"][urine].mean() < 0.6 * case["dwi"][case["prostate"] > 0].mean()


def test_rectal_air_varies(cases: list[dict]) -> None:
    fractions = []
    for case in cases:
        rectum = case["rectum"] > 0
        void = case["t2w"] < 0.15 * np.median(case["t2w"][case["prostate"] > 0])
        fractions.append((rectum & void).sum() / rectum.sum())
    assert min(fractions) < 0.01  # no air
    assert max(fractions) > 0.3  # a large air pocket
    assert sum(f < 0.01 for f in fractions) < 0.6 * len(fractions)  # ~30 % drawn without air, a few tiny pockets


def test_pirads_mix() -> None:
    grades = [make_case(k, seed=11, size=(4, 16, 16))["pirads"] for k in range(200)]
    for grade, p in PIRADS_PROBABILITIES.items():
        assert abs(grades.count(grade) / 200 - p) < 0.08


def test_t2w_to_dwi_is_consistent(cases: list[dict]) -> None:
    # High-b signal falls with ADC inside the gland (S = S0 exp(-b ADC)): negative correlation.
    case = next(c for c in cases if c["pirads"] == 5)
    gland = case["prostate"] > 0
    assert np.corrcoef(case["adc"][gland], case["dwi"][gland])[0, 1] < -0.3


# ---- preview --------------------------------------------------------------------------------------------------


def test_preview_png(cohort: Path, tmp_path: Path) -> None:
    entry = json.loads(cohort.read_text())["training"][0]
    from_dir = preview_png(cohort.parent / entry["id"], tmp_path / "dir.png")
    from_dict = preview_png(make_case(0, seed=7, size=SMALL), tmp_path / "dict.png")
    for path in (from_dir, from_dict):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="missing"):
        preview_png({"t2w": np.zeros((4, 4, 4))}, tmp_path / "bad.png")


@pytest.mark.parametrize("seed", [0, 5])
def test_every_block_of_twenty_cases_has_the_promis_like_pirads_mix(seed: int) -> None:
    from collections import Counter

    from common.data.phantom import pirads_of_case

    for block in range(3):
        grades = Counter(pirads_of_case(seed, 20 * block + k) for k in range(20))
        assert grades == {1: 3, 2: 3, 3: 5, 4: 5, 5: 4}
    assert [pirads_of_case(seed, k) for k in range(40)] != [pirads_of_case(seed + 1, k) for k in range(40)]
