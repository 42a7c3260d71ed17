"""The runner (``python -m tools.study``) killed with its whole process group by SIGKILL mid-grid, then run again
(DESIGN.md section 10): its bundle ends with it (no orphan writes beside the rerun), and the rerun ends with exactly one
FINISHED MLflow run per grid cell, every metric step once, and no RUNNING run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.bundle.tracking import RunFolderBusy, hold_run_folder
from common.data.phantom import make_cohort

REPO = Path(__file__).resolve().parents[2]
BUNDLES = ("profound_classification_scratch", "provicnet_classification_scratch")


@pytest.mark.slow
def test_runner_killed_mid_grid_takes_its_bundles_and_the_rerun_finishes_each_run_once(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", cases=6, seed=0, size=(32, 64, 64))
    study = tmp_path / "study"
    command = [sys.executable, "-m", "tools.study", "--profile", "smoke", "--study_dir", str(study),
               "--datalist", str(datalist), "--jobs", "1", "--no_analysis", "--only", *BUNDLES,
               "--override", "*", "epochs=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    first = study / "runs" / BUNDLES[0] / "seed0"
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (first / "models" / "checkpoint_epoch=1.pt").exists():
        assert runner.poll() is None, "the runner ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.2)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner's group: its bundles run in their own
    runner.wait()

    deadline = time.monotonic() + 60  # the bundle got SIGTERM from the kernel: it marks its run and ends
    while True:
        try:
            hold_run_folder(first).close()
            break
        except RunFolderBusy:
            assert time.monotonic() < deadline, "the bundle outlived its runner"
            time.sleep(0.5)

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])
    assert Counter(r.data.tags["bundle"] for r in runs if r.info.status == "FINISHED") == Counter(BUNDLES)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for r in runs:
        for key in r.data.metrics:
            steps = Counter(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert all(n == 1 for n in steps.values()), (r.data.tags["bundle"], key, steps)
