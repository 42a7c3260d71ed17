"""The data overview (``python -m common.data.overview``) end to end on a small cohort, through its real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = ("classification", "segmentation", "super_resolution", "distortion_correction", "modality_translation")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "common.data.overview", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_overview_makes_cohort_runs_all_pipelines_and_reuses_the_cohort(tmp_path: Path) -> None:
    first = _run("--out", str(tmp_path), "--cases", "8", "--seed", "3")
    assert first.returncode == 0, first.stderr
    report = tmp_path / "overview-smoke"
    summary = json.loads((report / "summary.json").read_text())
    assert sum(summary["splits"].values()) == 8
    assert set(summary["tasks"]) == set(TASKS)
    for task in TASKS:
        assert (report / f"{task}.png").stat().st_size > 10_000
        assert task in first.stdout
    assert (report / "cohort.png").stat().st_size > 10_000
    tasks = summary["tasks"]
    assert tasks["classification"]["image_shape"] == [[1, 64, 64, 32]]
    assert sum(tasks["classification"]["label_balance"].values()) == 8
    assert tasks["segmentation"]["image_shape"] == [[2, 64, 64, 32]]
    assert tasks["super_resolution"]["image_shape"] == [[1, 64, 64, 16]]
    assert tasks["super_resolution"]["label_shape"] == [[1, 64, 64, 32]]
    assert tasks["distortion_correction"]["label_balance"]["max_abs_change_mean"] > 0

    second = _run("--out", str(tmp_path), "--cases", "8", "--seed", "3")
    assert second.returncode == 0, second.stderr
    assert "reusing 8 cases" in second.stdout


def test_overview_reports_a_bad_datalist_by_case_and_exits_2(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    entry = {"id": "case_x", "t2w": "missing_t2w.nii.gz", "pirads": 3}
    datalist.write_text(
        json.dumps({"training": [entry], "validation": [entry | {"id": "v"}], "test": [entry | {"id": "t"}]})
    )
    result = _run("--out", str(tmp_path / "out"), "--datalist", str(datalist))
    assert result.returncode == 2
    assert "case_x" in result.stderr and "missing_t2w.nii.gz" in result.stderr
