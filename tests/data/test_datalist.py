"""Tests for common.data.datalist: a valid cohort passes, every kind of problem is named, all at once."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from common.data.datalist import MAX_LISTED, DatalistError, load_datalist, read_image

REPO = Path(__file__).resolve().parents[2]
SHAPE = (8, 8, 4)
AFFINE = np.array(
    [
        [0.5, 0.0, 0.0, -2.0],
        [0.0, 0.5, 0.0, 3.0],
        [0.0, 0.0, 3.0, 10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
ALL_KEYS = ("t2w", "adc", "dwi", "prostate", "lesion", "rectum", "pirads")
SPLIT_CASES = {"training": ["tr0", "tr1", "tr2"], "validation": ["va0"], "test": ["te0", "te1"]}
BAD_PIRADS = "training/tr2: pirads: must be an int in 1..5, got"
PIRADS = {"tr0": 1, "tr1": 3, "tr2": 5, "va0": 4, "te0": 2, "te1": 5}


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _volumes(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prostate = np.zeros(SHAPE, np.uint8)
    prostate[2:6, 2:6, 1:3] = 2
    prostate[2:6, 5:6, 1:3] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[3:5, 3:5, 2] = 1
    rectum = np.zeros(SHAPE, np.uint8)
    rectum[3:5, 6:8, :] = 1
    return {
        "t2w": rng.random(SHAPE, dtype=np.float32),
        "adc": rng.random(SHAPE, dtype=np.float32),
        "dwi": rng.random(SHAPE, dtype=np.float32),
        "prostate": prostate,
        "lesion": lesion,
        "rectum": rectum,
    }


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A valid 6-case datalist with relative paths, written to ``tmp_path/datalist.json``."""
    data: dict[str, Any] = {"name": "tiny", "description": "test cohort"}
    seed = 0
    for split, ids in SPLIT_CASES.items():
        entries = []
        for case_id in ids:
            case_dir = tmp_path / "cases" / case_id
            case_dir.mkdir(parents=True)
            entry: dict[str, Any] = {"id": case_id, "pirads": PIRADS[case_id]}
            for key, array in _volumes(seed).items():
                write_nifti(case_dir / f"{key}.nii.gz", array)
                entry[key] = f"cases/{case_id}/{key}.nii.gz"
            seed += 1
            entries.append(entry)
        data[split] = entries
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    return path, data


def _save(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def _file(path: Path, case_id: str, key: str) -> Path:
    return path.parent / "cases" / case_id / f"{key}.nii.gz"


def _problems(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DatalistError) as info:
        load_datalist(path, **kwargs)
    return str(info.value)


def test_valid_datalist_passes_with_absolute_paths(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, _ = cohort
    out = load_datalist(path, required_keys=ALL_KEYS, workers=2)
    assert {k: [e["id"] for e in v] for k, v in out.items()} == SPLIT_CASES
    entry = out["validation"][0]
    assert entry["pirads"] == 4
    assert entry["lesion"] == str((path.parent / "cases" / "va0" / "lesion.nii.gz").resolve())
    for entries in out.values():
        for e in entries:
            assert all(Path(e[k]).is_absolute() and Path(e[k]).is_file() for k in ALL_KEYS[:-1])


def test_input_is_not_mutated_and_unrequired_keys_are_only_resolved(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, data = cohort
    _file(path, "tr0", "rectum").unlink()  # not required, so not checked
    out = load_datalist(path, required_keys=("t2w", "lesion"))
    assert out["training"][0]["rectum"] == str(_file(path, "tr0", "rectum").resolve())
    assert json.loads(path.read_text()) == data


def test_binary_whole_gland_prostate_is_valid(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, _ = cohort
    gland = np.zeros(SHAPE, np.uint8)
    gland[2:6, 2:6, :] = 1
    write_nifti(_file(path, "te1", "prostate"), gland)
    assert len(load_datalist(path, required_keys=("t2w", "prostate"))["test"]) == 2


def _delete(key: str) -> Callable[[Path, dict[str, Any]], None]:
    def mutate(path: Path, data: dict[str, Any]) -> None:
        _file(path, "tr1", key).unlink()

    return mutate


def _overwrite_random(path: Path, data: dict[str, Any]) -> None:
    _file(path, "tr1", "adc").write_bytes(np.random.default_rng(0).bytes(700))


def _truncate(path: Path, data: dict[str, Any]) -> None:
    target = _file(path, "tr1", "lesion")
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) // 2])


def _truncate_payload(path: Path, data: dict[str, Any]) -> None:
    # a valid gzip stream whose NIfTI payload stops inside the voxel data: the header reads, the voxels do not
    target = _file(path, "tr1", "t2w")
    payload = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(payload[: 352 + 100]))


def _drop_key(path: Path, data: dict[str, Any]) -> None:
    del data["training"][1]["adc"]
    _save(path, data)


def _rewrite(key: str, array: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Callable[..., None]:
    def mutate(path: Path, data: dict[str, Any]) -> None:
        values = _volumes(1)[key] if array is None else array
        write_nifti(_file(path, "tr1", key), values, affine)

    return mutate


def _with(key: str, index: tuple[int, int, int], value: float, dtype: type | None = None) -> np.ndarray:
    array = _volumes(1)[key].astype(dtype or _volumes(1)[key].dtype)
    array[index] = value
    return array


_SHIFTED = AFFINE.copy()
_SHIFTED[0, 3] += 0.01  # 10 micrometres, above the 1e-3 mm tolerance
_ROTATED = AFFINE.copy()
_ROTATED[:3, :3] = AFFINE[:3, :3] @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("mutate", "key", "names_file", "expected"),
    [
        (_delete("t2w"), "t2w", True, "file not found"),
        (_delete("lesion"), "lesion", True, "file not found"),
        (_overwrite_random, "adc", True, "cannot be read"),
        (_truncate, "lesion", True, "cannot be read"),
        (_truncate_payload, "t2w", True, "cannot be read"),
        (_drop_key, "adc", False, "required key missing"),
        (_rewrite("dwi", np.zeros((8, 8, 5), np.float32)), "dwi", True, "shape (8, 8, 5) differs from t2w (8, 8, 4)"),
        (_rewrite("adc", affine=_SHIFTED), "adc", True, "affine differs from t2w"),
        (_rewrite("prostate", affine=_ROTATED), "prostate", True, "affine differs from t2w"),
        (_rewrite("lesion", _with("lesion", (0, 0, 0), 2)), "lesion", True, "invalid label value(s) 2"),
        (_rewrite("prostate", _with("prostate", (0, 0, 0), 3)), "prostate", True, "invalid label value(s) 3"),
        (_rewrite("rectum", _with("rectum", (0, 0, 0), 255)), "rectum", True, "invalid label value(s) 255"),
        (_rewrite("lesion", _with("lesion", (0, 0, 0), 0.5, np.float32)), "lesion", True, "value(s) 0.5"),
        (_rewrite("t2w", _with("t2w", (1, 2, 3), np.nan)), "t2w", True, "(1 NaN, 0 Inf)"),
        (_rewrite("dwi", _with("dwi", (4, 4, 0), -np.inf)), "dwi", True, "(0 NaN, 1 Inf)"),
    ],
)
def test_file_problems_name_case_key_and_file(
    cohort: tuple[Path, dict[str, Any]], mutate: Callable[..., None], key: str, names_file: bool, expected: str
) -> None:
    path, data = cohort
    mutate(path, data)
    message = _problems(path, required_keys=ALL_KEYS)
    lines = message.splitlines()
    assert lines[0].startswith("1 problem(s)")
    assert lines[1].startswith(f"training/tr1: {key}")
    assert expected in lines[1]
    if names_file:
        assert str(_file(path, "tr1", key).resolve()) in lines[1]


def test_allow_resample_accepts_other_grids_with_a_warning(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, data = cohort
    write_nifti(_file(path, "tr1", "adc"), np.ones((6, 6, 3), np.float32), _SHIFTED)
    write_nifti(_file(path, "te0", "dwi"), np.ones(SHAPE, np.float32), _SHIFTED)
    with pytest.raises(DatalistError):
        load_datalist(path, required_keys=ALL_KEYS)
    with pytest.warns(UserWarning, match="2 image") as record:
        out = load_datalist(path, required_keys=ALL_KEYS, allow_resample=True)
    assert "training/tr1: adc" in str(record[0].message) and "test/te0: dwi" in str(record[0].message)
    assert len(out["training"]) == 3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.__setitem__("validation", []), "validation: split is empty"),
        (lambda d: d.pop("test"), "test: split missing"),
        (lambda d: d.__setitem__("test", {"id": "x"}), "test: must be a list of cases, got dict"),
        (lambda d: d["test"][1].__setitem__("id", "tr2"), "test/tr2: id: duplicate, already used in training"),
        (lambda d: d["validation"][0].pop("id"), "validation/#0: id: missing"),
        (lambda d: d["training"][2].pop("pirads"), "training/tr2: pirads: required key missing"),
        *[
            (lambda d, v=value: d["training"][2].__setitem__("pirads", v), f"{BAD_PIRADS} {value!r}")
            for value in (0, 6, -1, "3", 3.0, True, [4])
        ],
        (lambda d: d["training"][2].__setitem__("t2w", 7), "training/tr2: t2w: must be a file path string, got 7"),
    ],
)
def test_structural_problems(
    cohort: tuple[Path, dict[str, Any]], mutate: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    path, data = cohort
    mutate(data)
    _save(path, data)
    lines = _problems(path, required_keys=ALL_KEYS).splitlines()
    assert lines[0].startswith("1 problem(s)")
    assert lines[1].startswith(expected)


def test_several_problems_are_all_listed(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, data = cohort
    _file(path, "tr0", "t2w").unlink()
    write_nifti(_file(path, "va0", "lesion"), _with("lesion", (0, 0, 0), 3))
    write_nifti(_file(path, "te1", "adc"), _with("adc", (0, 0, 0), np.nan))
    data["test"][0]["pirads"] = 9
    data["training"][2]["id"] = "te1"
    _save(path, data)
    with pytest.raises(DatalistError) as info:
        load_datalist(path, required_keys=ALL_KEYS)
    problems = info.value.problems
    assert len(problems) == 5
    assert str(info.value).splitlines()[0] == f"5 problem(s) in datalist {path}:"
    for fragment in (
        "training/tr0: t2w",
        "validation/va0: lesion",
        "test/te1: adc",
        "test/te0: pirads",
        "test/te1: id: duplicate, already used in training",
    ):
        assert sum(fragment in p for p in problems) == 1, fragment


def test_long_problem_lists_are_cut_with_a_count(tmp_path: Path) -> None:
    n = MAX_LISTED + 7
    data = {"training": [{"id": f"c{i}", "t2w": f"c{i}.nii.gz"} for i in range(n)]}
    path = tmp_path / "d.json"
    _save(path, data)
    with pytest.raises(DatalistError) as info:
        load_datalist(path, required_keys=("t2w", "pirads"), splits=("training",), check_files=False)
    assert len(info.value.problems) == n
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + MAX_LISTED + 1
    assert lines[-1] == "... and 7 more"


def test_check_files_false_reads_nothing(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, _ = cohort
    _file(path, "tr0", "t2w").write_bytes(b"not an image")
    assert len(load_datalist(path, check_files=False)["test"]) == 2
    assert "tr0: t2w" in _problems(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "cannot be read as JSON"), ("[1, 2]", "top level must be a JSON object")],
)
def test_unreadable_json(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(content)
    assert expected in _problems(path)


def test_missing_datalist_file(tmp_path: Path) -> None:
    assert "datalist file not found" in _problems(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "kwargs", [{"workers": 0}, {"workers": 1.5}, {"required_keys": "t2w"}, {"splits": ()}, {"splits": "test"}]
)
def test_bad_arguments_raise_value_error(cohort: tuple[Path, dict[str, Any]], kwargs: dict[str, Any]) -> None:
    path, _ = cohort
    with pytest.raises(ValueError) as info:
        load_datalist(path, **kwargs)
    assert not isinstance(info.value, DatalistError)


def _write_mha(path: Path, array_ijk: np.ndarray, spacing: tuple, origin_lps: tuple, direction_lps: np.ndarray) -> None:
    import itk

    img = itk.image_from_array(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))  # itk arrays are (k, j, i)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin_lps])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction_lps, dtype=np.float64)))
    itk.imwrite(img, str(path))


@pytest.mark.parametrize(("origin_shift", "ok"), [(0.0, True), (0.5, False)])
def test_metaimage_grid_compares_with_nifti_in_ras(
    cohort: tuple[Path, dict[str, Any]], origin_shift: float, ok: bool
) -> None:
    """A .mha T2W on the NIfTI masks' grid: RAS affine diag(0.5, 0.5, 3), origin (-2, 3, 10) is, by hand, LPS
    direction diag(-1, -1, 1), spacing (0.5, 0.5, 3), origin (2, -3, 10)."""
    path, data = cohort
    t2w = _volumes(1)["t2w"]
    mha = path.parent / "cases" / "tr1" / "t2w.mha"
    _write_mha(mha, t2w, (0.5, 0.5, 3.0), (2.0 + origin_shift, -3.0, 10.0), np.diag([-1.0, -1.0, 1.0]))
    info = read_image(mha)
    assert info.shape == SHAPE
    np.testing.assert_allclose(info.affine[:3, 3], [-2.0 - origin_shift, 3.0, 10.0])
    data["training"][1]["t2w"] = "cases/tr1/t2w.mha"
    _save(path, data)
    if ok:
        load_datalist(path, required_keys=ALL_KEYS)
    else:
        message = _problems(path, required_keys=ALL_KEYS)
        assert f"training/tr1: adc {_file(path, 'tr1', 'adc').resolve()}: affine differs from t2w" in message
        assert "max |difference| 0.5 mm" in message


@pytest.mark.slow
def test_cli_summary_and_errors(cohort: tuple[Path, dict[str, Any]]) -> None:
    path, data = cohort
    cmd = [sys.executable, "-m", "common.data.datalist", str(path), "--require", "t2w,lesion,pirads"]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "training: 3 cases; PI-RADS 1: 1, 3: 1, 5: 1" in ok.stdout
    assert "test: 2 cases; PI-RADS 2: 1, 5: 1" in ok.stdout
    assert "total: 6 cases" in ok.stdout
    _file(path, "va0", "lesion").unlink()
    data["test"][1]["pirads"] = 7
    _save(path, data)
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "2 problem(s)" in bad.stderr
    assert f"validation/va0: lesion {_file(path, 'va0', 'lesion').resolve()}: file not found" in bad.stderr
    assert "test/te1: pirads: must be an int in 1..5, got 7" in bad.stderr


@pytest.mark.parametrize(("progress", "lines"), [(True, 6), (False, 0), (None, 0)])
def test_progress_lines_on_stderr(
    cohort: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str], progress: bool | None, lines: int
) -> None:
    path, _ = cohort
    load_datalist(path, progress=progress, workers=1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == lines
    if lines:
        assert err[-1] == "validated 6/6 cases"
