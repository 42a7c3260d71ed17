"""The two pretraining bundles end to end through ``python -m monai.bundle run`` at the smoke profile: started at
once against one new MLflow store, on a small synthetic cohort; their exported encoders load downstream."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.contract import METADATA_SCHEMA
from common.data.phantom import make_cohort
from common.networks import ProFoundDense, ProViCNetDense, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCHEMA = METADATA_SCHEMA
BUNDLES = ("profound_pretrain", "provicnet_pretrain")
EPOCHS = 3


def _command(bundle: str, study_dir: Path, datalist: Path, *extra: str) -> list[str]:
    configs = REPO / "bundles" / bundle / "configs"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json"),
            "--meta_file", str(configs / "metadata.json"), "--tracking", str(REPO / "mlflow_config" / "sqlite.json"),
            "--study_dir", str(study_dir), "--datalist", str(datalist), "--epochs", str(EPOCHS), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pretrain")
    datalist = make_cohort(root / "cohort", cases=10, seed=0, size=(32, 64, 64))  # the smoke grid
    study = root / "study"
    plain_output = root / "plain_output"  # given without '$': the executed config must still be logged
    extra = {"profound_pretrain": (), "provicnet_pretrain": ("--out_dim", "64", "--patch_out_dim", "256",
                                                            "--output_dir", str(plain_output))}  # fmt: skip
    procs = {b: subprocess.Popen(_command(b, study, datalist, *extra[b]), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for b in BUNDLES}  # fmt: skip
    logs = {b: p.communicate(timeout=900)[0] for b, p in procs.items()}
    for bundle, proc in procs.items():
        assert proc.returncode == 0, f"{bundle} failed:\n{logs[bundle][-3000:]}"
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])
    outputs = {"profound_pretrain": study / "runs" / "profound_pretrain" / "seed0",
               "provicnet_pretrain": plain_output}  # fmt: skip
    return {"client": client, "runs": {r.data.tags["bundle"]: r for r in runs}, "n_runs": len(runs),
            "outputs": outputs}  # fmt: skip


@pytest.mark.slow
def test_two_bundles_at_once_give_two_complete_pretrain_runs(pretrained: dict) -> None:
    assert pretrained["n_runs"] == 2
    for bundle in BUNDLES:
        run = pretrained["runs"][bundle]
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["regime"] == "pretrain" and tags["task"] == "pretrain"
        assert tags["model"] == bundle.split("_")[0]
        assert (tags["profile"], tags["seed"], tags["bundle_version"]) == ("smoke", "0", "0.1.0")
        assert tags["git_commit"] and tags["study"] == "vfm-study"
        client = pretrained["client"]
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))
        assert all(math.isfinite(m.value) for m in history)
        assert run.data.metrics["wall_seconds"] > 0
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
        assert len(client.list_artifacts(run.info.run_id, "config")) == 1  # also with a plain --output_dir


@pytest.mark.slow
def test_masked_autoencoding_loss_falls(pretrained: dict) -> None:
    run = pretrained["runs"]["profound_pretrain"]
    losses = [m.value for m in pretrained["client"].get_metric_history(run.info.run_id, "train_loss")]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow
def test_distillation_gap_falls_and_lesion_guided_contrast_is_active(pretrained: dict) -> None:
    run = pretrained["runs"]["provicnet_pretrain"]
    client = pretrained["client"]

    def history(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    dino, entropy, kl, patch = (
        history(f"train_{k}") for k in ("dino_loss", "teacher_entropy", "dino_kl", "patch_loss")
    )
    assert len(dino) == len(patch) == EPOCHS
    # the DINO cross-entropy is the teacher's entropy (rising while the centre adapts) plus KL(teacher || student)
    assert all(abs(d - (e + k)) < 1e-4 for d, e, k in zip(dino, entropy, kl, strict=True))
    assert kl[-1] < kl[0], kl
    # lesion patches are found in every epoch at the smoke resolution (the profile's lesion_patch_fraction); that the
    # term falls on a fixed batch is tests/pretraining/test_dino.py's (a 4-iteration epoch mean is too noisy for it)
    assert all(0 < p < 2 for p in patch), patch


@pytest.mark.slow
def test_exported_encoders_load_into_the_downstream_networks(pretrained: dict) -> None:
    profound_file = pretrained["outputs"]["profound_pretrain"] / "models" / "model.pt"
    model = load_checkpoint(ProFoundDense(encoder_size="atto", in_channels=1, out_channels=2), profound_file)
    saved = torch.load(profound_file, weights_only=True)["network"]
    stem = saved["downsample_layers.0.0.weight"]
    # pretrained on T2W, DWI, ADC; one input channel gets the channel-summed kernel divided by 1
    assert torch.allclose(model.encoder.downsample_layers[0][0].weight, stem.sum(dim=1, keepdim=True))
    assert torch.equal(model.encoder.stages[3][0].dwconv.weight, saved["stages.3.0.dwconv.weight"])

    provicnet_file = pretrained["outputs"]["provicnet_pretrain"] / "models" / "model.pt"
    dense = load_checkpoint(
        ProViCNetDense(out_channels=2, slice_size=56, backbone_size="tiny"), provicnet_file, encoder_only=True
    )
    saved = torch.load(provicnet_file, weights_only=True)
    assert torch.equal(dense.backbone.blocks[11].mlp.fc2.weight, saved["backbone.blocks.11.mlp.fc2.weight"])
    assert torch.equal(dense.axis_pos.weight, saved["axis_pos.weight"])


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_validates_against_the_monai_schema(bundle: str) -> None:
    meta = REPO / "bundles" / bundle / "configs" / "metadata.json"
    command = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta), "--filepath",
               str(SCHEMA)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("n", [1, 2])
def test_verify_net_in_out(bundle: str, n: int) -> None:
    """The zoo's check on ``network_def``, the encoder the bundle shares: one image input, one tensor output (at n=1
    ProFound reads a single 16-voxel patch, which the FCMAE model would mask whole; the encoder does not mask)."""
    from monai.bundle import verify_net_in_out

    configs = REPO / "bundles" / bundle / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "train.json"), bundle_root=str(REPO / "bundles" / bundle), n=n,
                      device="cpu")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_written_encoder_loads_strictly_into_network_def(pretrained: dict, bundle: str) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    net = parser.get_parsed_content("network_def")
    saved = torch.load(pretrained["outputs"][bundle] / "models" / "model.pt", weights_only=True)
    saved = saved.get("network", saved)  # ProFound's file wraps its state dict as MONAI's CheckpointSaver does
    net.load_state_dict(saved, strict=True)
    assert set(net.state_dict()) == set(saved)
