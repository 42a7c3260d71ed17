"""common.bundle.snapshots: feature snapshots and test predictions, on a real MONAI trainer, a real StudyTracker on
a temporary SQLite store and tiny networks whose outputs the tests recompute independently in numpy / skimage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from mlflow import MlflowClient
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from skimage.metrics import structural_similarity
from torch import nn

from common.bundle import StudyTracker, sqlite_uri
from common.bundle.snapshots import FeatureSnapshots, TestPredictions

SHAPE = (12, 12, 8)  # (H, W, D)
IDS = ["case_c", "case_a", "case_d", "case_b", "case_e"]  # not sorted: the dataset order must be kept


class TinySegNet(nn.Module):
    """conv -> dropout -> conv -> 1x1x1 head; ``forward_representations`` pools the encoder and the head input."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.5))
        self.body = nn.Sequential(nn.Conv3d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.encoder(x)))

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = self.encoder(x)
        return {"head_input": self.body(enc).mean(dim=(2, 3, 4)), "encoder": enc.mean(dim=(2, 3, 4))}

    def representation_kinds(self) -> dict[str, str]:
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


def _items(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.rand(1, *SHAPE, generator=g)
        items.append({"image": MetaTensor(image), "label": (image > 0.7).float(), "id": IDS[i]})
    return items


def _loader(items: list[dict], batch_size: int = 2) -> DataLoader:
    return DataLoader(Dataset(items), batch_size=batch_size, shuffle=False, num_workers=0)


def _reference_features(net: nn.Module, items: list[dict]) -> dict[str, np.ndarray]:
    """The pooled representations, one image at a time, in eval mode: the test's own computation."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        reps = [net.forward_representations(item["image"].as_tensor()[None]) for item in items]
    return {k: np.concatenate([r[k].numpy() for r in reps]) for k in ("head_input", "encoder")}


def _trainer(net: nn.Module, items: list[dict], max_epochs: int) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=_loader(items),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.05),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-epoch MONAI training with snapshots (epochs=(1,)) and test predictions, tracked in a real SQLite store;
    the handlers are attached before the tracker, as a bundle's handler list does."""
    tmp = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = TinySegNet()
    untrained = copy.deepcopy(net)
    items = _items()
    tracker = StudyTracker(
        tracking_uri=sqlite_uri(tmp / "mlflow.db"),
        experiment_name="s",
        tags={"task": "segmentation", "regime": "finetune"},
        output_dir=tmp / "out",
    )
    trainer = _trainer(net, items, max_epochs=2)
    modes: list[bool] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: modes.append(net.training))
    snapshots = FeatureSnapshots(data_loader=_loader(items, 3), network=net, tracker=tracker, epochs=(1,))
    snapshots.attach(trainer)
    predictions = TestPredictions(data_loader=_loader(items), network=net, task="segmentation", tracker=tracker)
    predictions.attach(trainer)
    tracker.attach(trainer)
    trainer.run()
    return {"tmp": tmp, "net": net, "untrained": untrained, "items": items, "tracker": tracker, "modes": modes,
            "predictions": predictions}  # fmt: skip


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


SNAPSHOT_FILES = [f"{s}{suffix}.npz" for s in ("step0", "epoch_1", "final") for suffix in ("", "_encoder")]


@pytest.mark.parametrize("name", SNAPSHOT_FILES)
def test_snapshot_files_follow_the_contract(trained: dict, name: str) -> None:
    data = _load(trained["tmp"] / "out" / "features" / name)
    layer, width, kind = (
        ("encoder", 4, "encoder_pooled") if name.endswith("_encoder.npz") else ("head_input", 6, "decoder_features")
    )
    assert sorted(data) == ["features", "ids", "kind", "layer"]
    assert data["features"].dtype == np.float32 and data["features"].shape == (5, width)
    assert data["ids"].tolist() == IDS
    assert str(data["layer"]) == layer
    assert str(data["kind"]) == kind


@pytest.mark.parametrize("layer,suffix", [("head_input", ""), ("encoder", "_encoder")])
def test_step0_is_the_untrained_network_and_final_moved(trained: dict, layer: str, suffix: str) -> None:
    features = trained["tmp"] / "out" / "features"
    step0 = _load(features / f"step0{suffix}.npz")["features"]
    final = _load(features / f"final{suffix}.npz")["features"]
    np.testing.assert_allclose(step0, _reference_features(trained["untrained"], trained["items"])[layer], atol=1e-5)
    np.testing.assert_allclose(final, _reference_features(trained["net"], trained["items"])[layer], atol=1e-5)
    assert np.abs(final - step0).max() > 1e-3


def test_training_mode_is_restored_after_each_snapshot(trained: dict) -> None:
    assert trained["modes"] == [True] * 6  # 3 iterations per epoch, 2 epochs, the snapshot of epoch 1 in between
    assert trained["net"].training  # after `final` and the test predictions, in the trainer's mode again


def test_artifacts_and_test_metric_are_in_the_mlflow_run(trained: dict) -> None:
    tracker = trained["tracker"]
    client = MlflowClient(tracker.tracking_uri)
    listed = sorted(Path(a.path).name for a in client.list_artifacts(tracker.run_id, "features"))
    assert listed == sorted(SNAPSHOT_FILES)
    assert [Path(a.path).name for a in client.list_artifacts(tracker.run_id, "test")] == ["predictions.npz"]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    data = _load(trained["tmp"] / "out" / "test" / "predictions.npz")
    assert data["ids"].tolist() == IDS
    assert run.data.metrics["test_metric"] == pytest.approx(float(np.nanmean(data["per_image"])), abs=1e-12)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "test_metric")] == [0]
    # every test image has a lesion, so the empty-mask baseline scores Dice 0 on each
    assert run.data.metrics["baseline_metric"] == 0.0 == run.data.metrics["baseline_metric_empty_mask"]
    assert run.data.tags["baseline_name"] == "empty_mask"
    assert json.loads(run.data.tags["layer_kinds"]) == {"encoder": "encoder_pooled", "head_input": "decoder_features"}
    np.testing.assert_array_equal(data["baseline_per_image"], np.zeros(5))


def test_resumed_run_keeps_step0_and_rewrites_the_rest(tmp_path: Path) -> None:
    items = _items()
    torch.manual_seed(1)
    first = TinySegNet()
    trainer = _trainer(first, items, max_epochs=1)
    FeatureSnapshots(data_loader=_loader(items), network=first, output_dir=tmp_path).attach(trainer)
    trainer.run()
    step0_before = (tmp_path / "features" / "step0.npz").read_bytes()

    torch.manual_seed(2)
    resumed = TinySegNet()
    trainer = _trainer(resumed, items, max_epochs=2)
    FeatureSnapshots(data_loader=_loader(items), network=resumed, epochs=[2], output_dir=tmp_path).attach(trainer)

    @trainer.on(Events.STARTED)
    def _load_checkpoint(engine) -> None:  # attached after the snapshots, as a late CheckpointLoader would be
        engine.state.epoch, engine.state.iteration = 1, 3

    trainer.run()
    assert (tmp_path / "features" / "step0.npz").read_bytes() == step0_before
    expected = _reference_features(resumed, items)
    for name in ("epoch_2", "final"):
        np.testing.assert_allclose(
            _load(tmp_path / "features" / f"{name}_encoder.npz")["features"], expected["encoder"], atol=1e-5
        )


def test_snapshot_unwraps_data_parallel_and_restores_each_submodule_mode(tmp_path: Path) -> None:
    items = _items(3)
    net = TinySegNet().train()
    net.encoder.eval()  # a frozen encoder that the model keeps in eval mode
    snapshots = FeatureSnapshots(data_loader=_loader(items), network=nn.DataParallel(net), output_dir=tmp_path)
    (path, encoder_path) = snapshots.snapshot("epoch_3")
    assert net.training and net.body.training and not net.encoder.training and not net.encoder[2].training
    assert path.name == "epoch_3.npz" and encoder_path.name == "epoch_3_encoder.npz"
    np.testing.assert_allclose(_load(path)["features"], _reference_features(net, items)["head_input"], atol=1e-5)


def test_duplicate_and_reordered_ids_are_errors(tmp_path: Path) -> None:
    items = _items(4)
    items[3]["id"] = items[1]["id"] = "dup"
    net = TinySegNet()
    with pytest.raises(ValueError, match="duplicated: dup"):
        FeatureSnapshots(data_loader=_loader(items), network=net, output_dir=tmp_path).snapshot("step0")
    with pytest.raises(ValueError, match="duplicated: dup"):
        TestPredictions(data_loader=_loader(items), network=net, task="segmentation", output_dir=tmp_path).run()
    items = _items(4)
    snapshots = FeatureSnapshots(data_loader=_loader(items), network=net, output_dir=tmp_path)
    snapshots.snapshot("step0")
    snapshots.data_loader = _loader(items[::-1])
    with pytest.raises(ValueError, match="differ from the previous snapshot"):
        snapshots.snapshot("final")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"network": nn.Conv3d(1, 1, 1)}, "no forward_representations"),
        ({"epochs": (0,)}, "epochs must be integers >= 1"),
        ({"output_dir": None}, "give output_dir"),
    ],
)
def test_feature_snapshots_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"data_loader": [], "network": TinySegNet(), "output_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        FeatureSnapshots(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task": "detection"}, "unknown task 'detection'"),
        ({"task": "segmentation", "win_size": 5}, r"\['win_size'\] are not options of the segmentation metric"),
        ({"task": "classification", "postprocess": 3}, "postprocess must be callable"),
    ],
)
def test_test_predictions_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TestPredictions(data_loader=[], network=TinySegNet(), output_dir=tmp_path, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# TestPredictions per task, against independent numpy / skimage computations
# ----------------------------------------------------------------------------------------------------------------


def _threshold_net(scale: float, shift: float) -> nn.Conv3d:
    """1x1x1 conv, 1 -> 2 channels, logit_1 - logit_0 = scale * x + shift."""
    net = nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, scale]).reshape(2, 1, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, shift]))
    return net


@pytest.mark.parametrize("convention", ["lesion_cases", "all_cases"])
def test_segmentation_dice_per_image_with_lesion_free_cases(tmp_path: Path, convention: str) -> None:
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(1, *SHAPE, generator=g)
    dark = torch.full((1, *SHAPE), 0.2)
    spot = torch.zeros(1, *SHAPE)
    spot[0, 2:4, 2:5, 1:3] = 1.0
    cases = [  # (image, label): partial overlap, both empty, missed lesion, false positive, partial overlap
        (noise, (noise > 0.6).float()),
        (dark, torch.zeros(1, *SHAPE)),
        (dark, spot),
        (torch.maximum(dark, spot), torch.zeros(1, *SHAPE)),
        (noise.flip(1), (noise > 0.3).float()),
    ]
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))  # 12 mm^3 voxels
    items = [{"image": MetaTensor(x), "label": MetaTensor(y, affine=affine), "id": f"p{i}"}
             for i, (x, y) in enumerate(cases)]  # fmt: skip
    predictions = TestPredictions(
        data_loader=_loader(items), network=_threshold_net(10.0, -5.0), task="segmentation", output_dir=tmp_path,
        dice_convention=convention,
    )  # fmt: skip
    value = predictions.run()

    dice_all, lesion = [], []
    for x, y in cases:
        a, b = x.numpy() * 10.0 - 5.0 > 0.0, y.numpy() > 0.5  # argmax of (0, 10 x - 5) is the lesion channel
        total = a.sum() + b.sum()
        dice_all.append(1.0 if total == 0 else 2.0 * (a & b).sum() / total)
        lesion.append(bool(b.any()))
    assert dice_all[1:4] == [1.0, 0.0, 0.0] and 0.2 < dice_all[0] < 0.9 and lesion == [True, False, True, False, True]
    expected = (
        dice_all if convention == "all_cases" else [d if k else np.nan for d, k in zip(dice_all, lesion, strict=True)]
    )
    data = _load(tmp_path / "test" / "predictions.npz")
    assert sorted(data) == ["baseline_per_image", "ids", "per_image"]
    assert data["ids"].tolist() == ["p0", "p1", "p2", "p3", "p4"]
    np.testing.assert_allclose(data["per_image"], expected, atol=1e-6)
    assert value == pytest.approx(np.nanmean(expected), abs=1e-6)
    assert predictions.metrics["test_dice_all"] == pytest.approx(np.mean(dice_all), abs=1e-6)
    # false positives on the two lesion-free cases: none on p1, the 2 x 3 x 2 spot on p3, at 12 mm^3 per voxel
    assert predictions.metrics["test_fp_volume_ml"] == pytest.approx((0.0 + 12 * 12e-3) / 2)
    # the empty mask: 1 on lesion-free cases (all_cases), 0 on lesion cases
    empty = [0.0 if k else (1.0 if convention == "all_cases" else np.nan) for k in lesion]
    np.testing.assert_allclose(data["baseline_per_image"], empty)
    assert predictions.baseline_values == {"empty_mask": pytest.approx(np.nanmean(empty))}
    assert predictions.beats_baseline == (value > np.nanmean(empty))


class _ScaleNet(nn.Module):
    """``y = 1.3 x - 0.1`` (partly outside [0, 1]), repeated ``repeat`` times along D; returns ``(y, aux)``."""

    def __init__(self, repeat: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        self.repeat = repeat
        with torch.no_grad():
            self.conv.weight.fill_(1.3)
            self.conv.bias.fill_(-0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x).repeat_interleave(self.repeat, dim=4)
        return y, torch.zeros(1)


@pytest.mark.parametrize(
    "task,repeat", [("super_resolution", 2), ("distortion_correction", 1), ("modality_translation", 1)]
)
def test_image_tasks_ssim_of_the_clipped_prediction(tmp_path: Path, task: str, repeat: int) -> None:
    g = torch.Generator().manual_seed(4)
    items = []
    for i in range(3):
        x = torch.rand(1, SHAPE[0], SHAPE[1], SHAPE[2] // repeat, generator=g)
        target = (x.repeat_interleave(repeat, dim=3) + 0.1 * torch.rand(1, *SHAPE, generator=g)).clamp(0, 1)
        items.append({"image": MetaTensor(x), "label": target, "id": f"s{i}"})
    predictions = TestPredictions(
        data_loader=_loader(items), network=_ScaleNet(repeat), task=task, output_dir=tmp_path,
        postprocess=lambda out: out[0], win_size=7, baseline_data=_loader(items[:2]),
    )  # fmt: skip
    value = predictions.run()

    def ssim(pred: np.ndarray, target: np.ndarray) -> float:
        return structural_similarity(np.clip(pred, 0.0, 1.0), target, data_range=1.0, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, win_size=7)  # fmt: skip

    images = [item["image"].numpy()[0] for item in items]
    targets = [item["label"].numpy()[0] for item in items]
    expected = [ssim(1.3 * np.repeat(x, repeat, axis=2) - 0.1, y) for x, y in zip(images, targets, strict=True)]
    data = _load(tmp_path / "test" / "predictions.npz")
    np.testing.assert_allclose(data["per_image"], expected, atol=1e-5)
    assert value == pytest.approx(np.mean(expected), abs=1e-5)
    assert 0.3 < value < 0.99

    # the trivial baselines, computed here independently of common.metrics.baselines
    if task == "super_resolution":  # linear interpolation between slice centres, (j + 0.5) / 2 - 0.5, edges held
        n = images[0].shape[2]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi, frac = np.minimum(lo + 1, n - 1), src - lo
        guesses = {"trilinear": [x[..., lo] * (1 - frac) + x[..., hi] * frac for x in images]}
    elif task == "distortion_correction":
        guesses = {"distorted_input": images}
    else:  # fitted on the first two items
        a, b = np.polyfit(np.concatenate([x.ravel() for x in images[:2]]), np.concatenate([y.ravel() for y in
                          targets[:2]]), 1)  # fmt: skip
        guesses = {"mean_dwi": [np.mean(targets[:2], axis=0)] * 3, "linear_map": [a * x + b for x in images]}
    scores = {name: [ssim(g, y) for g, y in zip(pred, targets, strict=True)] for name, pred in guesses.items()}
    assert predictions.baseline_values == pytest.approx({name: np.mean(v) for name, v in scores.items()}, abs=1e-5)
    best = max(scores, key=lambda name: np.mean(scores[name]))
    np.testing.assert_allclose(data["baseline_per_image"], scores[best], atol=1e-5)
    assert predictions.metrics == pytest.approx({"test_metric": value, "baseline_metric": np.mean(scores[best])})


W = np.array([[-4.0, 0.0], [0.0, 3.0], [1.0, 0.0], [2.0, -1.0]])  # (K, 2): the classes weigh the two slices apart
B = np.array([2.0, -1.0, 0.0, -0.5])


class _SliceClassifier(nn.Module):
    """``(B, 1, H, W, 2) -> (B, 4)`` logits ``W @ (mean of slice 0, mean of slice 1) + B``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(W))
            self.linear.bias.copy_(torch.from_numpy(B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(1, 2, 3)))


def _specificity_brute_force(score: np.ndarray, positive: np.ndarray, sensitivity: float) -> float:
    """Largest specificity over all thresholds ``score >= t`` whose sensitivity is at least ``sensitivity``."""
    best = 0.0
    for t in [*np.unique(score), np.inf]:
        if (score[positive] >= t).mean() >= sensitivity:
            best = max(best, (score[~positive] < t).mean())
    return best


def test_classification_scores_labels_and_specificity(tmp_path: Path) -> None:
    g = np.random.default_rng(5)
    slices = g.uniform(0.0, 1.0, size=(16, 2))
    classes = [0, 1, 0, 3, 0, 2, 0, 1, 2, 0, 3, 0, 1, 0, 0, 2]
    items = []
    for i, ((a, b), c) in enumerate(zip(slices, classes, strict=True)):
        image = torch.stack([torch.full((4, 4), a), torch.full((4, 4), b)], dim=-1)[None].float()
        items.append({"image": MetaTensor(image), "label": torch.tensor([c]), "id": f"c{i}"})  # (B, 1) labels
    predictions = TestPredictions(
        data_loader=_loader(items, 4), network=_SliceClassifier(), task="classification", output_dir=tmp_path
    )
    value = predictions.run()

    logits = slices.astype(np.float32).astype(np.float64) @ W.T + B
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    data = _load(tmp_path / "test" / "predictions.npz")
    assert sorted(data) == ["baseline_scores", "ids", "labels", "scores"]
    np.testing.assert_array_equal(data["baseline_scores"], np.full((16, 4), 0.25))
    assert predictions.baseline_values == {"constant_score": 0.0}  # ties: every image called positive together
    np.testing.assert_allclose(data["scores"], probs, atol=1e-6)
    assert data["labels"].tolist() == classes
    positive = np.array(classes) >= 1
    expected = _specificity_brute_force(1.0 - probs[:, 0], positive, 0.9)
    assert 0.0 < expected < 1.0
    assert expected != _specificity_brute_force(probs[:, 3], positive, 0.9)  # the cut sums classes 1..3
    assert value == pytest.approx(expected)
    score = 1.0 - probs[:, 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in score[positive] for n in score[~positive]]
    assert predictions.metrics["test_auc"] == pytest.approx(np.mean(pairs))
    assert predictions.beats_baseline == (expected > 0.0)


def test_segmentation_dice_per_diffusion_map(tmp_path: Path) -> None:
    # the same three lesion cases and one lesion-free case, each recorded with the diffusion map it was given
    spot = torch.zeros(1, *SHAPE)
    spot[0, 2:4, 2:5, 1:3] = 1.0
    found, missed = spot.clone(), torch.zeros(1, *SHAPE)
    cases = [(found, spot, "dwi"), (missed, spot, "adc"), (found, spot, "adc"), (missed, torch.zeros(1, *SHAPE), "adc")]
    items = [{"image": MetaTensor(x), "label": MetaTensor(y), "id": f"p{i}", "diffusion": m}
             for i, (x, y, m) in enumerate(cases)]  # fmt: skip
    predictions = TestPredictions(
        data_loader=_loader(items), network=_threshold_net(10.0, -5.0), task="segmentation", output_dir=tmp_path
    )
    value = predictions.run()
    assert value == pytest.approx(2 / 3)  # Dice 1, 0, 1 on the lesion cases
    assert predictions.metrics["test_dice_dwi"] == pytest.approx(1.0)
    assert predictions.metrics["test_dice_adc"] == pytest.approx(0.5)  # the lesion-free ADC case does not count
    assert _load(tmp_path / "test" / "predictions.npz")["diffusion"].tolist() == ["dwi", "adc", "adc", "adc"]

    only_adc = TestPredictions(
        data_loader=_loader(items[1:]), network=_threshold_net(10.0, -5.0), task="segmentation",
        output_dir=tmp_path / "adc",
    )  # fmt: skip
    only_adc.run()
    assert "test_dice_dwi" not in only_adc.metrics and only_adc.metrics["test_dice_adc"] == pytest.approx(0.5)
