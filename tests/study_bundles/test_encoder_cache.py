"""The frozen-encoder cache through the real bundle: a ProFound finetune (random-weight regime: frozen encoder,
no pretraining needed) trained twice with the same seed, with and without ``--encoder_cache``, logs the same losses
and metrics, and the cached run did reuse encoder outputs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.data.phantom import make_cohort

REPO = Path(__file__).resolve().parents[2]
BUNDLE = "profound_super_resolution_finetune"


def _run(tmp: Path, datalist: Path, mode: str) -> tuple[dict, str]:
    study = tmp / mode
    configs = REPO / "bundles" / BUNDLE / "configs"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json"),
               "--meta_file", str(configs / "metadata.json"), "--tracking", str(REPO / "mlflow_config" / "sqlite.json"),
               "--study_dir", str(study), "--datalist", str(datalist), "--init", "random",
               "--encoder_cache", mode]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    run = client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])[0]
    keys = ("train_loss", "val_metric")
    history = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)] for k in keys}
    return {**history, "test_metric": run.data.metrics["test_metric"]}, proc.stdout + proc.stderr


@pytest.mark.slow
def test_cached_and_uncached_runs_log_the_same_numbers(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", cases=10, seed=0, size=(32, 64, 64))
    cached, log = _run(tmp_path, datalist, "all")
    plain, plain_log = _run(tmp_path, datalist, "off")
    for key in ("train_loss", "val_metric"):
        assert len(cached[key]) == len(plain[key]) > 0
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(cached[key], plain[key], strict=True))
    assert math.isclose(cached["test_metric"], plain["test_metric"], rel_tol=1e-5)
    hits = re.search(r"encoder cache at exit: FeatureCache\((\d+) volumes.* (\d+) hits", log)
    assert hits and int(hits.group(1)) > 0 and int(hits.group(2)) > 0, log[-2000:]
    assert "encoder cache at exit" not in plain_log
