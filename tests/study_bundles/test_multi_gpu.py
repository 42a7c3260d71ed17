"""The pretraining bundles' ``multi_gpu_train.json`` overlays under ``torchrun`` with 2 CPU processes (gloo): one
MLflow run, rank 0's exports, and a data set split between the ranks (``DistributedSampler``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.data.phantom import make_cohort
from common.networks import ProFoundDense, ProViCNetDense, load_checkpoint
from common.profiles import get_profile

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
WORLD_SIZE = 2


def _torchrun(bundle: str, study_dir: Path, datalist: Path) -> subprocess.CompletedProcess:
    configs = REPO / "bundles" / bundle / "configs"
    files = f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']"
    extra = ["--out_dim", "64", "--patch_out_dim", "256"] if bundle == "provicnet_pretrain" else []
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",  # a free port chosen by the OS
               "-m", "monai.bundle", "run", "--config_file", files, "--meta_file", str(configs / "metadata.json"),
               "--tracking", str(REPO / "mlflow_config" / "sqlite.json"), "--study_dir", str(study_dir),
               "--datalist", str(datalist), "--epochs", str(EPOCHS),
               "--keep_checkpoints", "true",  # so that the checkpoints rank 0 wrote can be counted after the run
               *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("ddp_cohort"), cases=6, seed=0, size=(32, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["provicnet_pretrain", "profound_pretrain"])
def test_two_process_run_shards_data_and_only_rank0_writes(bundle: str, cohort: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    result = _torchrun(bundle, study, cohort)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("Engine run finished") == WORLD_SIZE  # both ranks trained to the end

    # one MLflow run (the tracker is disabled on rank 1), complete, rank 0's loss per epoch
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["bundle"] == bundle
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(m.value) for m in history)

    # rank 0 alone wrote the export and one checkpoint
    models = study / "runs" / bundle / "seed0" / "models"
    checkpoints = sorted(p.name for p in models.iterdir() if p.name != "model.pt")
    assert checkpoints == [f"checkpoint_epoch={EPOCHS}.pt"], checkpoints

    # DistributedSampler(even_divisible=True): each rank sees ceil(n / 2) of the n training volumes, so an epoch
    # has fewer iterations than a single process would need for the whole split
    n_train = len(json.loads(cohort.read_text())["training"])
    batch = get_profile("smoke").batch_size
    per_rank = math.ceil(math.ceil(n_train / WORLD_SIZE) / batch)
    single = math.ceil(n_train / batch)
    assert per_rank < single  # 4 volumes, batch 2: 1 iteration per rank and epoch instead of 2
    state = torch.load(models / checkpoints[0], map_location="cpu", mmap=True, weights_only=True)
    assert dict(state["trainer"]) == {"epoch_length": per_rank, "iteration": EPOCHS * per_rank, "max_epochs": EPOCHS}
    # the checkpoint holds the unwrapped network (no DDP "module." prefix)
    assert not any(k.startswith("module.") for k in state["network"])

    exported = models / "model.pt"
    if bundle == "provicnet_pretrain":
        dense = load_checkpoint(
            ProViCNetDense(out_channels=2, slice_size=56, backbone_size="tiny"), exported, encoder_only=True
        )
        saved = torch.load(exported, weights_only=True)
        assert torch.equal(dense.backbone.blocks[11].mlp.fc2.weight, saved["backbone.blocks.11.mlp.fc2.weight"])
        # the export is the trained student of the checkpoint's network
        student = state["network"]["student.backbone.blocks.11.mlp.fc2.weight"]
        assert torch.equal(student, saved["backbone.blocks.11.mlp.fc2.weight"])
    else:
        model = load_checkpoint(ProFoundDense(encoder_size="atto", in_channels=1, out_channels=2), exported)
        saved = torch.load(exported, weights_only=True)["network"]
        assert torch.equal(model.encoder.stages[3][0].dwconv.weight, saved["stages.3.0.dwconv.weight"])
        assert torch.equal(state["network"]["encoder.stages.3.0.dwconv.weight"], saved["stages.3.0.dwconv.weight"])
