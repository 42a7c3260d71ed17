"""bench/gpu_check.py on a CPU: the dry run plans every bundle and times the train-step benchmark at small shapes;
with --allow_cpu the real check runs one bundle and reads its MLflow run back (status, finite loss, artifacts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out),
                           "--study_dir", str(tmp_path / "study"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    written = sorted(out.glob("gpu_check_*.json"))
    assert len(written) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(written[0].read_text())


def test_without_cuda_it_refuses_unless_asked(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device: this is the GPU check" in proc.stderr


@pytest.mark.slow
def test_dry_run_plans_every_bundle_at_the_gpu_profile(tmp_path: Path) -> None:
    proc, result = _check(tmp_path, "--dry_run")
    assert proc.returncode == 0 and result["ok"] and result["dry_run"], proc.stdout[-3000:]
    planned = " ".join(result["study"]["planned"])
    for bundle in BUNDLES:
        assert f"bundles/{bundle}/configs/train.json" in planned, bundle
    assert "tools/configs/analyze.json" in planned and "--profile gpu" in planned and "--epochs 1" in planned
    assert {r["model"] for r in result["train_step"]["rows"]} == {"profound", "provicnet"}
    assert not (tmp_path / "study" / "mlflow.db").exists()  # nothing ran


def test_official_goes_to_the_benchmark_and_a_wrong_checkout_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "not-official").mkdir()
    only = ("--only", "unet_segmentation")  # one bundle's plan: the benchmark is what this test is about
    proc, result = _check(tmp_path, "--dry_run", *only, "--official", str(tmp_path / "not-official"))
    bench = result["train_step"]
    assert bench["command"][-2:] == ["--official", str(tmp_path / "not-official")]
    assert bench["returncode"] != 0 and "is not a checkout of the official code" in bench["stderr_tail"]
    assert proc.returncode == 1 and not result["ok"]


@pytest.mark.slow
def test_a_real_check_reads_each_run_back(tmp_path: Path) -> None:
    proc, result = _check(tmp_path, "--allow_cpu", "--profile", "smoke", "--only", "unet_segmentation", "--no_bench")
    assert proc.returncode == 0 and result["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [r for r in result["runs"] if r["bundle"] == "unet_segmentation"]
    assert run["status"] == "FINISHED" and run["epochs"] == 1 and run["finite_loss"] and not run["missing_artifacts"]
    assert run["test_metric"] is not None and run["baseline_metric"] is not None
