"""The twenty downstream bundles and the five specialised bundles (issues 4 and 5) through the real entry points.

- every bundle trains at the smoke profile through ``python -m monai.bundle run`` with MLflow tracking, and its run
  carries the study's tags, per-epoch metrics, the test metric and the feature snapshots with consistent ids;
- the random-weight FM is the finetune bundle with ``--init random``;
- four bundles started at once against one new tracking store give four complete runs;
- ``evaluate.json`` reproduces the run's test metric from ``models/model.pt`` and ``inference.json`` writes the
  predictions;
- a run killed after its first checkpoint resumes into the same MLflow run;
- ``multi_gpu_train.json`` runs under ``torchrun`` with two CPU processes (gloo);
- every bundle's metadata validates against the 20240725 schema, ``verify_net_in_out`` passes, and ``ckpt_export``
  makes a TorchScript model that matches the eager network (except the two DDPM-conditioned FM bundles and the DDPM
  baseline, whose networks do not script; see their docs).

The cohort (24 smoke-grid cases) and the "pretrained" encoders are made once per test session and shared by the xdist
workers; the encoders are freshly initialised pretraining models saved by the pretraining bundles' own export
functions (that the pretraining bundles' outputs load is ``test_pretrain_bundles.py``'s).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.contract import LAYER_KINDS, METADATA_SCHEMA
from common.data.phantom import make_cohort
from common.foundation_models import FOUNDATION_MODELS
from common.tasks import TASKS, get_task

from .helpers import kill_after_first_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCHEMA = METADATA_SCHEMA
TRACKING = str(REPO / "mlflow_config" / "sqlite.json")
DOWNSTREAM = [f"{fm}_{task}_{regime}" for fm in FOUNDATION_MODELS for task in TASKS
              for regime in ("finetune", "scratch")]  # fmt: skip
SPECIALISED = {t.specialised_bundle: (t.specialised_model, t.id) for t in TASKS.values()}
ALL = DOWNSTREAM + list(SPECIALISED)
#: networks that take a timestep and do not compile with torch.jit.script (documented in their docs/README.md)
NOT_SCRIPTABLE = {"profound_modality_translation_finetune", "profound_modality_translation_scratch",
                  "provicnet_modality_translation_finetune", "provicnet_modality_translation_scratch",
                  "ddpm_modality_translation"}  # fmt: skip
#: started together against one new store (test_four_bundles_at_once_...); the others run one per test
CONCURRENT = ("profound_classification_finetune", "profound_distortion_correction_scratch", "resnet50_classification",
              "unet_segmentation")  # fmt: skip
EPOCHS = 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _identity(bundle: str) -> tuple[str, str, str]:
    """``(model, task, regime)`` of a bundle by its name."""
    if bundle in SPECIALISED:
        return (*SPECIALISED[bundle], "specialised")
    fm, rest = bundle.split("_", 1)
    task, regime = rest.rsplit("_", 1)
    return fm, task, regime


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cohort and the two encoders, made by the first xdist worker that gets here (the others wait)."""
    root = tmp_path_factory.getbasetemp().parent / "downstream-shared"
    root.mkdir(parents=True, exist_ok=True)
    paths = {"datalist": root / "cohort" / "datalist.json", "profound": root / "profound.pt",
             "provicnet": root / "provicnet.pt"}  # fmt: skip
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            from common.pretraining import FCMAEPretrainer, ProViCNetPretrainer
            from common.pretraining.dino import save_student_checkpoint
            from common.pretraining.fcmae import save_encoder_checkpoint

            make_cohort(root / "cohort", cases=24, seed=0, size=(32, 64, 64))
            torch.manual_seed(0)
            save_encoder_checkpoint(FCMAEPretrainer(encoder_size="atto", in_channels=3), paths["profound"])
            student = ProViCNetPretrainer(backbone_size="tiny", in_chans=3, out_dim=64, patch_out_dim=64)
            save_student_checkpoint(student, paths["provicnet"])
            (root / ".done").touch()
    return paths


def _command(bundle: str, study: Path, shared: dict[str, Path], *extra: str, overlay: str | None = None) -> list[str]:
    configs = REPO / "bundles" / bundle / "configs"
    config = str(configs / "train.json")
    if overlay:
        config = repr([config, str(configs / overlay)])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--study_dir", str(study),
               "--datalist", str(shared["datalist"]), "--epochs", str(EPOCHS)]  # fmt: skip
    model, _, regime = _identity(bundle)
    if regime == "finetune":
        command += ["--pretrained_ckpt", str(shared[model])]
    return command + list(extra)


def _run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _client(study: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))
    return client, client.get_experiment_by_name("vfm-study").experiment_id


def _features(client: MlflowClient, run_id: str, name: str, tmp: Path) -> dict[str, np.ndarray]:
    path = client.download_artifacts(run_id, f"features/{name}.npz", str(tmp))
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def check_run(client: MlflowClient, run, bundle: str, regime: str, tmp: Path, snapshot_epochs=()) -> None:
    """The MLflow contract of DESIGN.md section 5 / tools/docs/README.md for one finished downstream run."""
    model, task, _ = _identity(bundle)
    tags, run_id = run.data.tags, run.info.run_id
    assert run.info.status == "FINISHED", bundle
    assert (tags["model"], tags["task"], tags["regime"], tags["bundle"]) == (model, task, regime, bundle)
    assert (tags["seed"], tags["profile"], tags["study"]) == ("0", "smoke", "vfm-study")
    assert tags["bundle_version"] == "0.1.0"
    assert tags["metric_name"] == get_task(task).metric and tags["git_commit"]
    kinds = json.loads(tags["layer_kinds"])
    assert set(kinds) == {"head_input", "encoder"} and set(kinds.values()) <= set(LAYER_KINDS), (bundle, kinds)
    for key in ("train_loss", "val_metric", "lr"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (bundle, key)
    assert all(math.isfinite(m.value) for m in client.get_metric_history(run_id, "train_loss"))
    metrics = run.data.metrics
    assert math.isfinite(metrics["test_metric"]) and metrics["wall_seconds"] > 0 and metrics["gpu_hours"] == 0.0
    # the task's trivial baselines on the same test images, the best of them as baseline_metric
    baselines = {b: metrics[f"baseline_metric_{b}"] for b in get_task(task).baselines}
    assert tags["baseline_name"] in baselines and metrics["baseline_metric"] == baselines[tags["baseline_name"]]
    assert metrics["baseline_metric"] == max(baselines.values()), bundle
    if task != "classification":  # Dice and SSIM lie in [0, 1]; specificity too, but may be nan on 5 test cases
        assert 0.0 <= metrics["test_metric"] <= 1.0
    names = {a.path for a in client.list_artifacts(run_id, "features")}
    snapshots = ["step0", *(f"epoch_{k}" for k in snapshot_epochs), "final"]
    assert names == {f"features/{s}{suffix}.npz" for s in snapshots for suffix in ("", "_encoder")}, bundle
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    assert len(client.list_artifacts(run_id, "config")) == 1
    predictions = np.load(client.download_artifacts(run_id, "test/predictions.npz", str(tmp)))
    ids = None
    for name in snapshots:
        for suffix in ("", "_encoder"):
            saved = _features(client, run_id, name + suffix, tmp)
            assert saved["features"].dtype == np.float32 and saved["features"].ndim == 2
            assert np.isfinite(saved["features"]).all(), (bundle, name + suffix)
            assert str(saved["layer"]) == ("encoder" if suffix else "head_input")
            assert str(saved["kind"]) == kinds[str(saved["layer"])]
            ids = saved["ids"] if ids is None else ids
            assert list(saved["ids"]) == list(ids) == list(predictions["ids"]), (bundle, name)
    assert len(ids) >= 5  # the test split of 24 cases (5 in PROMIS proportions, 7 in the few-shot ones)
    if regime != "finetune" or model != "profound" or task == "classification":
        return
    # a frozen-encoder finetune: the encoder layer does not move, the head input does
    step0, final = (_features(client, run_id, f"{s}_encoder", tmp)["features"] for s in ("step0", "final"))
    assert np.allclose(step0, final, atol=1e-5), bundle


# ----------------------------------------------------------------------------------------------------------------
# Training through the real entry point
# ----------------------------------------------------------------------------------------------------------------

SOLO = [b for b in ALL if b not in CONCURRENT] + ["provicnet_classification_finetune:random"]
#: bundles whose test also runs evaluate.json and inference.json on the trained model
OVERLAYS = {"profound_segmentation_scratch", "provicnet_super_resolution_finetune", "vit_distortion_correction",
            "provicnet_modality_translation_scratch", "provicnet_classification_scratch"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", SOLO)
def test_bundle_trains_at_smoke_and_records_the_contract(case: str, shared: dict, tmp_path: Path) -> None:
    bundle, _, init = case.partition(":")
    study = tmp_path / "study"
    extra = ["--snapshot_epochs", "[1]", "--tracking", TRACKING] + (["--init", init] if init else [])
    result = _run(_command(bundle, study, shared, *extra))
    assert result.returncode == 0, f"{bundle} failed:\n{result.stdout[-2500:]}\n{result.stderr[-4000:]}"
    client, experiment = _client(study)
    (run,) = client.search_runs([experiment])
    regime = "random" if init == "random" else _identity(bundle)[2]
    check_run(client, run, bundle, regime, tmp_path, snapshot_epochs=(1,))
    output = study / "runs" / bundle / ("random" if init == "random" else "") / "seed0"
    assert (output / "models" / "model.pt").is_file() and (output / "test" / "predictions.npz").is_file()
    if bundle not in OVERLAYS:
        return

    evaluated = _run(_command(bundle, study, shared, overlay="evaluate.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    n_test = len(np.load(output / "test" / "predictions.npz")["ids"])
    assert metrics["task"] == _identity(bundle)[1] and metrics["n_images"] == n_test
    assert metrics["value"] == pytest.approx(run.data.metrics["test_metric"], abs=1e-4, nan_ok=True)

    inferred = _run(_command(bundle, study, shared, "--inference_split", "validation", overlay="inference.json"))
    assert inferred.returncode == 0, inferred.stderr[-4000:]
    written = sorted(p.name for p in (output / "predictions").iterdir())
    if _identity(bundle)[1] == "classification":
        assert written == ["predictions.csv"]
        lines = (output / "predictions" / "predictions.csv").read_text().splitlines()
        assert lines[0] == "id,p0,p1,p2,p3,class" and len(lines) >= 2
    else:
        assert written and all(n.endswith(".nii.gz") for n in written)
        import nibabel as nib

        volume = nib.load(output / "predictions" / written[0])
        assert volume.ndim == 3 and np.isfinite(volume.get_fdata()).all()


#: the super-resolution and distortion-correction bundles (a residual over the degraded input through a zero-initialised
#: last layer); a finetune bundle builds its scratch bundle's network (checked below), so each network runs once
RESIDUAL = [b for b in ALL if get_task(_identity(b)[1]).image_to_image and not b.endswith("_finetune")]


def test_finetune_and_scratch_bundles_build_the_same_residual_network() -> None:
    for bundle in (b for b in ALL if get_task(_identity(b)[1]).image_to_image and b.endswith("_finetune")):
        configs = [json.loads((REPO / "bundles" / b / "configs" / "train.json").read_text())["network_def"]
                   for b in (bundle, bundle.replace("_finetune", "_scratch"))]  # fmt: skip
        assert configs[0] == configs[1] and configs[0]["_target_"] == "common.networks.ResidualRestoration", bundle


@pytest.mark.parametrize("bundle", RESIDUAL)
def test_residual_model_at_step0_scores_exactly_its_baseline(
    bundle: str, shared: dict, tmp_path: Path, in_repo: Path
) -> None:
    """The network as the bundle builds it, before any optimisation step, scored by ``evaluate.json``: its test
    metric equals the trivial baseline's to the last bit (same images, same metric code, output = baseline + 0)."""
    _, net = _network(bundle)
    ckpt = tmp_path / "step0.pt"
    torch.save(net.state_dict(), ckpt)
    study = tmp_path / "study"
    result = _run(_command(bundle, study, shared, "--checkpoint", str(ckpt), overlay="evaluate.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((study / "runs" / bundle / "seed0" / "eval" / "metrics.json").read_text())
    (baseline,) = get_task(_identity(bundle)[1]).baselines
    assert 0.0 < metrics["value"] < 1.0 and metrics["value"] == metrics["baselines"][baseline]
    assert metrics["beats_baseline"] is False
    saved = np.load(study / "runs" / bundle / "seed0" / "eval" / "test" / "predictions.npz")
    np.testing.assert_array_equal(saved["per_image"], saved["baseline_per_image"])


@pytest.mark.slow
def test_four_bundles_at_once_against_one_new_store_give_four_complete_runs(shared: dict, tmp_path: Path) -> None:
    study = tmp_path / "study"  # no store yet: the tracker creates it under a file lock
    procs = {
        b: subprocess.Popen(
            _command(b, study, shared, "--tracking", TRACKING),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for b in CONCURRENT
    }
    logs = {b: p.communicate(timeout=1200)[0] for b, p in procs.items()}
    for bundle, proc in procs.items():
        assert proc.returncode == 0, f"{bundle} failed:\n{logs[bundle][-4000:]}"
    client, experiment = _client(study)
    runs = client.search_runs([experiment])
    assert len(runs) == 4 and len({r.info.run_id for r in runs}) == 4 and len({r.info.run_name for r in runs}) == 4
    by_bundle = {r.data.tags["bundle"]: r for r in runs}
    assert set(by_bundle) == set(CONCURRENT)
    for bundle, run in by_bundle.items():
        check_run(client, run, bundle, _identity(bundle)[2], tmp_path / bundle)


@pytest.mark.slow
def test_killed_downstream_run_resumes_into_the_same_mlflow_run(shared: dict, tmp_path: Path) -> None:
    bundle, epochs = "profound_super_resolution_scratch", 3
    study = tmp_path / "study"
    command = _command(bundle, study, shared, "--tracking", TRACKING, "--epochs", str(epochs))
    models = study / "runs" / bundle / "seed0" / "models"
    kill_after_first_checkpoint(command, models, ENV)
    client, experiment = _client(study)
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"
    assert 1 <= len(client.get_metric_history(killed.info.run_id, "train_loss")) < epochs

    second = _run(command)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stdout + second.stderr
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("train_loss", "val_metric"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, epochs + 1))
    # step0 is the untrained network of the first segment, not the restored one: the restart keeps it
    assert {a.path for a in client.list_artifacts(run.info.run_id, "features")} >= {"features/step0.npz",
                                                                                    "features/final.npz"}  # fmt: skip


@pytest.mark.slow
def test_multi_gpu_overlay_runs_two_gloo_processes(shared: dict, tmp_path: Path) -> None:
    bundle = "profound_classification_scratch"
    study = tmp_path / "study"
    configs = REPO / "bundles" / bundle / "configs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
               "--rdzv-endpoint=localhost:0", "-m", "monai.bundle", "run", "--config_file",
               repr([str(configs / "train.json"), str(configs / "multi_gpu_train.json")]), "--study_dir", str(study),
               "--datalist", str(shared["datalist"]), "--epochs", str(EPOCHS), "--tracking", TRACKING,
               "--batch_size", "8"]  # fmt: skip
    result = _run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    client, experiment = _client(study)
    (run,) = client.search_runs([experiment])  # only rank 0 tracks
    check_run(client, run, bundle, "scratch", tmp_path)
    # the sampler shards the 18 training volumes over the ranks: 9 per rank, one full batch of 8 (one process: 2)
    assert "Epoch: 1/2, Iter: 1/1 " in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Bundle files: metadata, network input/output, TorchScript, docs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bundles' macros name the shared fragment relative to the repository root."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.mark.parametrize("bundle", ALL)
def test_bundle_has_the_model_zoo_files_and_short_configs(bundle: str) -> None:
    root = REPO / "bundles" / bundle
    for name in ("configs/train.json", "configs/evaluate.json", "configs/inference.json",
                 "configs/multi_gpu_train.json", "configs/metadata.json", "configs/logging.conf", "docs/README.md",
                 "LICENSE"):  # fmt: skip
        assert (root / name).is_file(), f"{bundle} lacks {name}"
    train = json.loads((root / "configs" / "train.json").read_text())
    model, task, regime = _identity(bundle)
    assert (train["bundle_name"], train["model"], train["task"]) == (bundle, model, task)
    assert train["init"] == ("pretrained" if regime == "finetune" else "scratch")
    # the workflow is shared: the bundle's own config names what differs and takes the rest by macro
    assert train["train"] == "%common/configs/downstream.json#train"
    assert len((root / "configs" / "train.json").read_text().splitlines()) < 100
    docs = (root / "docs" / "README.md").read_text()
    for needle in ("--profile gpu", "--profile paper", "## Data", "Protocol" if regime != "specialised" else "protocol",
                   f"bundles/{bundle}/configs/train.json"):  # fmt: skip
        assert needle in docs, (bundle, needle)
    if regime == "finetune":
        assert "--init random" in docs and "--pretrained_ckpt" in docs


@pytest.mark.parametrize("bundle", ALL)
def test_metadata_validates_against_the_monai_schema(bundle: str) -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(REPO / "bundles" / bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


def _network(bundle: str):
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.read_meta(str(configs / "metadata.json"))
    return parser, parser.get_parsed_content("network_def")


def _forward_args(bundle: str) -> dict:
    return {"timesteps": torch.tensor([10])} if _identity(bundle)[1] == "modality_translation" else {}


@pytest.mark.parametrize("bundle", ALL)
def test_verify_net_in_out(bundle: str, in_repo: Path) -> None:
    from monai.bundle import verify_net_in_out

    configs = Path("bundles") / bundle / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "train.json"), n=2, device="cpu",
                      extra_forward_args=_forward_args(bundle))  # fmt: skip


@pytest.mark.parametrize("bundle", ALL)
def test_ckpt_export_makes_torchscript_that_matches_the_network(bundle: str, in_repo: Path, tmp_path: Path) -> None:
    from monai.bundle import ckpt_export

    configs = Path("bundles") / bundle / "configs"
    parser, net = _network(bundle)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    export = [("net_id", "network_def"), ("filepath", str(tmp_path / "model.ts")), ("ckpt_file", str(ckpt)),
              ("config_file", str(configs / "train.json")), ("meta_file", str(configs / "metadata.json"))]  # fmt: skip
    if bundle in NOT_SCRIPTABLE:
        with pytest.raises(Exception):  # noqa: B017  torch.jit raises several exception types
            ckpt_export(**dict(export))
        return
    ckpt_export(**dict(export))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    meta = json.loads((configs / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    shape = [int(s.replace("*n", "")) * 2 if isinstance(s, str) else s for s in meta["spatial_shape"]]
    x = torch.rand(1, meta["num_channels"], *shape)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-4)
