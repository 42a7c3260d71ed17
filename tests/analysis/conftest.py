"""A small fake-but-structured study logged to a temporary SQLite MLflow store, following tools/docs/README.md.

Every run records two layers (``common.contract.LAYERS``): ``head_input`` of a different kind per task (so a
correlation on it mixes kinds) and ``encoder``, which ProFound's finetune leaves unchanged (its D2P is exactly 0)
and ProViCNet's moves. Every run logs ``baseline_metric`` (:data:`P_BASELINE`), so some runs do not beat it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

FMS = ("profound", "provicnet")
TASKS = ("classification", "segmentation", "super_resolution")
SPECIALISED = {"classification": "resnet50", "segmentation": "unet", "super_resolution": "transunet"}
METRIC = {"classification": "specificity_at_sensitivity_0.9", "segmentation": "dice", "super_resolution": "ssim"}
N_IMAGES, DIM, ENCODER_DIM = 12, 8, 6
# the task's trivial baseline P (same for every run of the task); the runs below it are listed in BELOW_BASELINE
P_BASELINE = {"classification": 0.0, "segmentation": 0.62, "super_resolution": 0.74}
BASELINE_NAME = {"classification": "constant_score", "segmentation": "empty_mask", "super_resolution": "trilinear"}
SECONDARY = {"classification": 0.7, "segmentation": 0.65}  # test_auc, test_dice_all of every run
# head_input differs in kind per task (as ProFound's MLP hidden layer vs decoder features); encoder is one kind per FM
HEAD_KIND = {"classification": "mlp_hidden", "segmentation": "decoder_features", "super_resolution": "backbone_tokens"}
ENCODER_KIND = {"profound": "encoder_pooled", "provicnet": "backbone_pooled"}

# test_metric per (fm, task) and regime, chosen so that every RPG is a round number (see EXPECTED_RPG)
P = {
    ("profound", "classification"): {"finetune": 0.75, "random": 0.5, "scratch": 0.25},
    ("profound", "segmentation"): {"finetune": 0.8, "random": 0.4, "scratch": 0.64},
    ("profound", "super_resolution"): {"finetune": 0.9, "random": 0.6, "scratch": 0.75},
    ("provicnet", "classification"): {"finetune": 0.5, "random": 0.25, "scratch": 0.75},
    ("provicnet", "segmentation"): {"finetune": 0.6, "random": 0.4, "scratch": 0.75},
    ("provicnet", "super_resolution"): {"finetune": 0.72, "random": 0.6, "scratch": 0.8},
}
NEAR_ZERO_P = 0.0008  # the messy study's profound/segmentation random P: its RPG is not computed
P_SPECIALISED = {"classification": 1.0, "segmentation": 0.5, "super_resolution": 0.9}
# (rpg_random, rpg_specialised, rpg_scratch) in percent, by hand from P and P_SPECIALISED
EXPECTED_RPG = {
    ("profound", "classification"): (50.0, -25.0, 200.0),
    ("profound", "segmentation"): (100.0, 60.0, 25.0),
    ("profound", "super_resolution"): (50.0, 0.0, 20.0),
    ("provicnet", "classification"): (100.0, -50.0, -100.0 / 3.0),
    ("provicnet", "segmentation"): (50.0, 20.0, -20.0),
    ("provicnet", "super_resolution"): (20.0, -20.0, -10.0),
}
# (model, task, regime) of the runs whose P does not beat P_BASELINE, by hand from P, P_SPECIALISED and P_BASELINE
BELOW_BASELINE = {
    ("profound", "segmentation", "random"), ("provicnet", "segmentation", "finetune"),
    ("provicnet", "segmentation", "random"), ("unet", "segmentation", "specialised"),
    ("profound", "super_resolution", "random"), ("provicnet", "super_resolution", "finetune"),
    ("provicnet", "super_resolution", "random"),
}  # fmt: skip
GPU_HOURS = {"classification": (0.5, 2.0), "segmentation": (0.3, 1.2), "super_resolution": (0.2, 0.25)}  # ft, sc
WALL_SECONDS = (1800.0, 7200.0)
# val curves: 95 % of the final value is first reached at epoch 3 (finetune: 0.76) and 5 (scratch: 0.608)
VAL_CURVE = {"finetune": [0.5, 0.7, 0.78, 0.8, 0.8], "scratch": [0.1, 0.3, 0.5, 0.6, 0.64]}
TRAIN_LOSS = {"finetune": [1.0, 0.6, 0.45, 0.4, 0.38], "scratch": [2.0, 1.5, 1.1, 0.9, 0.8]}


def image_ids(task: str) -> list[str]:
    prefix = "sr" if task == "super_resolution" else "case"
    return [f"{prefix}{i:03d}" for i in range(N_IMAGES)]


@dataclass
class FakeStudy:
    """What was logged: the store, the features per (run key, snapshot) in the canonical id order, the run ids."""

    uri: str
    experiment: str
    study: str
    features: dict[tuple[str, str, str, str], np.ndarray] = field(default_factory=dict)
    run_ids: dict[tuple[str, str, str], str] = field(default_factory=dict)
    extra_run_ids: dict[str, str] = field(default_factory=dict)


def _features(rng: np.random.Generator, shift: float, scale: float) -> np.ndarray:
    base = rng.normal(size=(N_IMAGES, DIM))
    direction = np.linspace(1.0, -1.0, DIM)
    return (scale * base + shift * direction + 0.5).astype(np.float32)


def _write_npz(path: Path, **arrays: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


class _Logger:
    def __init__(self, client, experiment_id: str, study: str, tmp: Path) -> None:
        self.client, self.experiment_id, self.study, self.tmp = client, experiment_id, study, tmp
        self.counter = 0

    def run(
        self,
        model: str,
        task: str,
        regime: str,
        seed: int = 0,
        status: str = "FINISHED",
        start_time: int | None = None,
        test_metric: float | None = None,
        snapshots: dict[str, np.ndarray] | None = None,
        predictions: dict[str, np.ndarray] | None = None,
        cost: tuple[float, float] | None = None,
        curves: tuple[list[float], list[float]] | None = None,
        permute: bool = False,
        baseline: float | None = None,
        kinds: dict[str, str] | None = None,
    ) -> str:
        """One run; ``snapshots`` maps ``<snapshot><suffix>`` (``final``, ``final_encoder``) to features, written
        with ``kind`` from ``kinds`` by layer (no ``kind`` key and no tag when ``kinds`` is None)."""
        from mlflow.entities import Metric

        self.counter += 1
        tags = {"model": model, "task": task, "regime": regime, "seed": str(seed), "profile": "smoke",
                "study": self.study, "bundle": f"{model}_{task}_{regime}", "bundle_version": "0.1.0",
                "git_commit": "abc1234", "metric_name": METRIC[task]}  # fmt: skip
        if baseline is not None:
            tags["baseline_name"] = BASELINE_NAME[task]
        if kinds is not None:
            tags["layer_kinds"] = json.dumps(kinds)
        run = self.client.create_run(
            self.experiment_id,
            start_time=start_time if start_time is not None else 1_700_000_000_000 + 1000 * self.counter,
            tags=tags,
            run_name=f"{model}-{task}-{regime}-{seed}-{self.counter}",
        )
        run_id = run.info.run_id
        folder = self.tmp / run_id
        folder.mkdir(parents=True)
        ids = np.array(image_ids(task))
        for name, feats in (snapshots or {}).items():
            order = np.arange(N_IMAGES)[::-1] if permute else np.arange(N_IMAGES)  # stored in another id order
            layer = "encoder" if name.endswith("_encoder") else "head_input"
            extra = {"kind": np.array(kinds[layer])} if kinds is not None else {}
            _write_npz(folder / "features" / f"{name}.npz", features=feats[order], ids=ids[order],
                       layer=np.array(layer), **extra)  # fmt: skip
        if predictions is not None:
            _write_npz(folder / "test" / "predictions.npz", ids=ids, **predictions)
        self.client.log_artifacts(run_id, str(folder))
        metrics = []
        if curves is not None:
            for epoch, (loss, val) in enumerate(zip(*curves, strict=True), start=1):
                metrics += [Metric("train_loss", loss, 0, epoch), Metric("val_metric", val, 0, epoch)]
        if test_metric is not None:
            metrics.append(Metric("test_metric", test_metric, 0, 0))
        if test_metric is not None and task == "classification":
            metrics.append(Metric("test_auc", SECONDARY[task], 0, 0))
        if test_metric is not None and task == "segmentation":
            metrics += [Metric("test_dice_all", SECONDARY[task], 0, 0), Metric("test_fp_volume_ml", 1.5, 0, 0)]
        if baseline is not None:
            metrics += [Metric("baseline_metric", baseline, 0, 0),
                        Metric(f"baseline_metric_{BASELINE_NAME[task]}", baseline, 0, 0)]  # fmt: skip
        if cost is not None:
            metrics += [Metric("gpu_hours", cost[0], 0, 0), Metric("wall_seconds", cost[1], 0, 0)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.set_terminated(run_id, status=status)
        return run_id


def _predictions(task: str, p: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image results whose P equals ``p``: per-image values with mean ``p``, or for classification 4 negatives
    and 8 positives where sensitivity >= 0.9 needs all 8 positives, so the specificity is the share of negatives
    scored below every positive (``p`` must be a multiple of 1/4); the baseline's arrays beside them
    (segmentation: lesion-free cases 0 and 1 are NaN in both, so P is the mean of the other ten)."""
    if task == "classification":
        labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
        below = round(4 * p)
        positive_score = np.concatenate([np.where(np.arange(4) < below, 0.1, 0.95), rng.uniform(0.5, 0.9, 8)])
        probs = np.stack([1 - positive_score] + [positive_score / 3] * 3, axis=1)
        constant = np.full_like(probs, 0.25)
        return {"scores": probs.astype(np.float32), "labels": labels, "baseline_scores": constant.astype(np.float32)}
    per_image = p + np.linspace(-0.05, 0.05, N_IMAGES)
    baseline = P_BASELINE[task] + np.linspace(0.02, -0.02, N_IMAGES)
    if task == "segmentation":
        per_image[:2] = baseline[:2] = np.nan
        per_image[2:] += p - per_image[2:].mean()
        baseline[2:] += P_BASELINE[task] - baseline[2:].mean()
    return {"per_image": per_image.astype(np.float64), "baseline_per_image": baseline.astype(np.float64)}


def log_study(root: Path, study: str, experiment: str, variant: str = "clean") -> FakeStudy:
    """Log the 2 FM x 3 task study; ``variant='messy'`` adds a FAILED run, an older duplicate, replaces
    provicnet/super_resolution scratch by a run without feature snapshots, gives profound/segmentation random the
    near-zero P :data:`NEAR_ZERO_P`, logs profound/classification scratch without ``test/predictions.npz`` and
    provicnet/super_resolution finetune without layer kinds (an older run)."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.search_experiments()  # creates the store once
    experiment_id = client.create_experiment(experiment, artifact_location=(root / f"artifacts_{experiment}").as_uri())
    log = _Logger(client, experiment_id, study, root / f"staging_{experiment}")
    fake = FakeStudy(uri=uri, experiment=experiment, study=study)
    rng = np.random.default_rng(7)
    for task in TASKS:
        pred = _predictions(task, P_SPECIALISED[task], rng)
        fake.run_ids[(SPECIALISED[task], task, "specialised")] = log.run(
            SPECIALISED[task], task, "specialised", test_metric=P_SPECIALISED[task], predictions=pred,
            baseline=P_BASELINE[task],
        )  # fmt: skip
    for fi, fm in enumerate(FMS):
        for ti, task in enumerate(TASKS):
            k = 1 + fi + 2 * ti  # distances differ between FMs and tasks
            step0 = _features(rng, 0.0, 1.0)
            snaps = {
                "finetune": {
                    "step0": step0,
                    "epoch_1": step0 + 0.2 * k * np.linspace(1.0, -1.0, DIM).astype(np.float32),
                    "epoch_2": _features(rng, 0.3 * k, 1.0),
                    "final": _features(rng, 0.4 * k, 0.8),
                },
                "random": {"step0": _features(rng, -0.5 * k, 1.2)},
                "scratch": {"step0": _features(rng, 1.0, 1.0), "final": _features(rng, -0.2 * k, 0.6)},
            }
            # the encoder: frozen under ProFound's finetune (every snapshot equals step 0), moving for ProViCNet
            enc0 = _features(rng, 0.0, 1.0)[:, :ENCODER_DIM]
            frozen = fm == "profound"
            for name in ("epoch_1", "epoch_2", "final"):
                moved = enc0 + 0.25 * k * (1 + int(name == "final")) * np.linspace(1.0, -1.0, ENCODER_DIM)
                snaps["finetune"][f"{name}_encoder"] = enc0 if frozen else moved.astype(np.float32)
            snaps["finetune"]["step0_encoder"] = enc0
            snaps["random"]["step0_encoder"] = _features(rng, -0.3 * k, 1.1)[:, :ENCODER_DIM]
            snaps["scratch"]["final_encoder"] = _features(rng, 0.1 * k, 0.7)[:, :ENCODER_DIM]
            for regime, by_snapshot in snaps.items():
                for name, feats in by_snapshot.items():
                    fake.features[(fm, task, regime, name)] = feats.astype(np.float64)
            kinds = {"head_input": HEAD_KIND[task], "encoder": ENCODER_KIND[fm]}
            gpu_ft, gpu_sc = GPU_HOURS[task]
            for regime in ("finetune", "random", "scratch"):
                p = P[(fm, task)][regime]
                snapshots = snaps[regime]
                predictions = _predictions(task, p, rng)
                run_kinds: dict[str, str] | None = kinds
                if variant == "messy":
                    if (fm, task, regime) == ("provicnet", "super_resolution", "scratch"):
                        snapshots = {}
                    if (fm, task, regime) == ("profound", "segmentation", "random"):
                        p = NEAR_ZERO_P
                        predictions = _predictions(task, p, rng)
                    if (fm, task, regime) == ("profound", "classification", "scratch"):
                        predictions = None
                    if (fm, task, regime) == ("provicnet", "super_resolution", "finetune"):
                        run_kinds = None
                train = regime in ("finetune", "scratch")
                fake.run_ids[(fm, task, regime)] = log.run(
                    fm,
                    task,
                    regime,
                    test_metric=p,
                    snapshots=snapshots,
                    predictions=predictions,
                    baseline=P_BASELINE[task],
                    kinds=run_kinds,
                    cost=((gpu_ft, WALL_SECONDS[0]) if regime == "finetune" else (gpu_sc, WALL_SECONDS[1]))
                    if train
                    else None,
                    curves=(TRAIN_LOSS[regime], VAL_CURVE[regime]) if train else None,
                    permute=(fm, task, regime) == ("profound", "segmentation", "scratch"),
                )
    if variant == "messy":
        fake.extra_run_ids["failed"] = log.run("profound", "classification", "finetune", status="FAILED")
        fake.extra_run_ids["older_duplicate"] = log.run(
            "profound",
            "segmentation",
            "finetune",
            start_time=1_600_000_000_000,
            test_metric=0.1,
            snapshots={s: _features(rng, 5.0, 1.0) for s in ("step0", "final")},
            predictions=_predictions("segmentation", 0.1, rng),
        )
        fake.extra_run_ids["no_snapshots"] = fake.run_ids[("provicnet", "super_resolution", "scratch")]
    return fake


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory: pytest.TempPathFactory) -> FakeStudy:
    return log_study(tmp_path_factory.mktemp("clean"), "study_a", "study_a")


@pytest.fixture(scope="module")
def messy_study(tmp_path_factory: pytest.TempPathFactory) -> FakeStudy:
    return log_study(tmp_path_factory.mktemp("messy"), "study_b", "experiment_b", variant="messy")
