"""Bring your own foundation model (README, "Bring your own foundation model"): an FM registered from a module of
its own (examples/byo_fm/tinyfm.py, a small encoder from MONAI's network blocks) with its bundles outside
``bundles/`` gets the study's finetune, random-weight and scratch runs and the analysis through the study runner,
without any file of the repository edited."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "examples.byo_fm.tinyfm"


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_an_fm_of_your_own_runs_through_the_study_and_its_analysis(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from examples.byo_fm.tinyfm import TinyFMSegmenter

    torch.manual_seed(0)
    weights = tmp_path / "tinyfm_encoder.pt"
    torch.save(TinyFMSegmenter().encoder.state_dict(), weights)  # "pretrained" weights: the encoder alone
    before = _git_status()
    study = tmp_path / "study"
    env = {**os.environ, "VFM_FOUNDATION_MODELS": PLUGIN, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tools.study", "--profile", "smoke", "--study_dir", str(study), "--jobs", "2",
               "--only", "tinyfm_segmentation_*", "--weights", f"tinyfm={weights}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _git_status() == before  # nothing of the repository was edited or written

    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])
    tiny = {r.data.tags["regime"]: r for r in runs if r.data.tags.get("model") == "tinyfm"}
    assert set(tiny) == {"finetune", "random", "scratch"}
    assert all(r.info.status == "FINISHED" and "test_metric" in r.data.metrics for r in tiny.values())
    assert tiny["finetune"].data.tags["layer_kinds"]  # the representation contract of the FM's own network

    rows = list(csv.DictReader((study / "analysis" / "alignment.csv").open()))
    mine = [r for r in rows if r["fm"] == "tinyfm" and r["task"] == "segmentation"]
    assert {r["layer"] for r in mine} == {"head_input", "encoder"}
    for row in mine:
        assert row["p_finetune"] not in ("", "nan") and row["p_scratch"] not in ("", "nan")
        assert float(row["d2r"]) >= 0  # the distance between finetune and random-weight features on this layer
    encoder = next(r for r in mine if r["layer"] == "encoder")
    assert float(encoder["d2p"]) == 0.0  # frozen under its finetune protocol (registry: frozen_layers)
    report = (study / "analysis" / "report.html").read_text()
    assert "tinyfm" in report


def test_register_fm_checks_the_entry() -> None:
    from common.foundation_models import FOUNDATION_MODELS, FoundationModel, get_fm, register_fm

    entry = get_fm("profound")
    assert register_fm(entry) is entry  # the same entry again: a no-op
    with pytest.raises(ValueError, match="another foundation model is registered as 'profound'"):
        register_fm(FoundationModel(**{**entry.__dict__, "title": "something else"}))
    with pytest.raises(ValueError, match="lower-case letters and digits"):
        register_fm(FoundationModel(**{**entry.__dict__, "id": "my_fm"}))
    with pytest.raises(ValueError, match="expected a FoundationModel"):
        register_fm({"id": "x"})
    assert list(FOUNDATION_MODELS)[:2] == ["profound", "provicnet"]


def test_a_plugin_that_cannot_be_imported_is_named() -> None:
    env = {**os.environ, "VFM_FOUNDATION_MODELS": "no_such_module_here"}
    done = subprocess.run([sys.executable, "-c", "import common.foundation_models"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "VFM_FOUNDATION_MODELS='no_such_module_here': cannot import 'no_such_module_here'" in done.stderr
