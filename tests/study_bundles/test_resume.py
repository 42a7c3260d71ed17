"""A pretraining bundle killed after its first checkpoint and started again with the same command continues into
the same MLflow run: no epoch repeated or lost in its metric history."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.data.phantom import make_cohort

from .helpers import kill_after_first_checkpoint

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3


@pytest.mark.slow
def test_killed_run_resumes_into_the_same_mlflow_run(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", cases=6, seed=0, size=(32, 64, 64))
    study = tmp_path / "study"
    command = [sys.executable, "-m", "monai.bundle", "run",
               "--config_file", str(REPO / "bundles" / "provicnet_pretrain" / "configs" / "train.json"),
               "--tracking", str(REPO / "mlflow_config" / "sqlite.json"), "--study_dir", str(study),
               "--datalist", str(datalist), "--epochs", str(EPOCHS),
               "--out_dim", "64", "--patch_out_dim", "256"]  # fmt: skip
    models = study / "runs" / "provicnet_pretrain" / "seed0" / "models"

    kill_after_first_checkpoint(command, models)
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    experiment = client.get_experiment_by_name("vfm-study").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"  # a killed process marks nothing
    done_before = len(client.get_metric_history(killed.info.run_id, "train_loss"))
    assert 1 <= done_before < EPOCHS

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, EPOCHS + 1))
    # finished: the weights stay, the resumable training state is dropped (keep_checkpoints false)
    assert sorted(p.name for p in models.iterdir()) == ["model.pt"]
