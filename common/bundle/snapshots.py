"""What a downstream run leaves for the analysis (DESIGN.md sections 4-5, ``tools/docs/README.md``): feature
snapshots of the test split and the test predictions with their task metric.

- :class:`FeatureSnapshots` records the model's pooled representations of the same test images, in the same order,
  before the first optimisation step (``step0``: Phi_pre of a finetune run, Phi_rand of a random-weight run), after
  chosen epochs (``epoch_<k>``) and at the end (``final``); the squared MMD of paper Eq. 1 is computed on them.
- :class:`TestPredictions` runs the test split once and records P, the task's test metric (paper section 3.1), that
  RPG (paper Eq. 2) compares across regimes.

Both are Ignite handlers built from keyword arguments, so a bundle config adds them with ``_target_``; both run
only on rank 0 of a distributed run, on the DDP-unwrapped network, in eval mode under ``torch.no_grad()``, and
restore every submodule's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.contract import (
    DIFFUSION_KEY,
    LAYERS,
    METRIC_BASELINE,
    METRIC_TEST,
    METRIC_TEST_AUC,
    METRIC_TEST_DICE_ALL,
    METRIC_TEST_DICE_ON,
    METRIC_TEST_FP_VOLUME,
    PREDICTIONS_ARTIFACT,
    TAG_BASELINE,
    TAG_LAYER_KINDS,
    baseline_metric_name,
    feature_file_name,
)
from common.metrics import (
    compute_auc,
    compute_dice,
    compute_specificity_at_sensitivity,
    compute_ssim_3d,
    foreground,
    has_lesion,
)
from common.metrics.baselines import TrivialBaselines
from common.tasks import get_task

from .engine import plain_tensor as _plain
from .engine import unwrap_model

__all__ = ["DICE_CONVENTIONS", "FeatureSnapshots", "TestPredictions", "collect_ids", "evaluating", "resolve_device"]

logger = logging.getLogger(__name__)

_METRIC_KWARGS: dict[str, frozenset[str]] = {
    "specificity_at_sensitivity": frozenset({"sensitivity", "positive_class"}),
    "dice": frozenset({"empty_value", "threshold"}),
    "ssim": frozenset({"data_range", "win_size", "sigma", "k1", "k2", "truncate", "compute_dtype"}),
}
#: segmentation P: Dice over the lesion cases only (lesion-free cases: NaN in ``per_image``, their false-positive
#: volume logged beside), or over all cases with an empty prediction of a lesion-free case scoring 1
DICE_CONVENTIONS: tuple[str, ...] = ("lesion_cases", "all_cases")


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``device``, or where ``model``'s first parameter lives (CPU for a model without parameters)."""
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module, device: torch.device, amp: bool) -> Iterator[None]:
    """Eval mode, ``no_grad`` and (``amp`` on CUDA) bf16 autocast; every submodule's mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    use_amp = amp and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        for module, training in modes:
            module.training = training


def collect_ids(batch: Mapping[str, object], id_key: str, n: int) -> list[str]:
    """The ``n`` image ids of a collated batch as strings.

    MONAI's default collate turns string ids into a list of str and integer ids into a ``(B,)`` tensor; both, and
    numpy arrays and tuples, are accepted.

    Raises:
        ValueError: when ``id_key`` is missing or its length is not the batch size ``n``.
    """
    if id_key not in batch:
        raise ValueError(f"the batch has no {id_key!r} entry (keys: {sorted(batch)}); every test item needs an id.")
    ids = batch[id_key]
    if isinstance(ids, torch.Tensor | np.ndarray):
        ids = ids.tolist() if ids.ndim > 0 else [ids.item()]
    elif isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        ids = [ids]
    out = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"batch has {n} images but {len(out)} ids under {id_key!r}.")
    return out


def _check_unique(ids: Sequence[str]) -> None:
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        shown = ", ".join(duplicates[:10]) + (" ..." if len(duplicates) > 10 else "")
        raise ValueError(f"image ids must be unique across the test split; duplicated: {shown}.")


def _resolve_output_dir(output_dir: str | os.PathLike | None, tracker: object | None, owner: str) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    if tracker is not None and getattr(tracker, "output_dir", None) is not None:
        return Path(tracker.output_dir)
    raise ValueError(f"{owner}: give output_dir (or a tracker whose output_dir is used).")


# ----------------------------------------------------------------------------------------------------------------
# Feature snapshots
# ----------------------------------------------------------------------------------------------------------------


class FeatureSnapshots:
    """Ignite handler for the trainer: snapshots of the test split's pooled representations (DESIGN.md section 4).

    Snapshots, each written as ``<output_dir>/features/<snapshot>.npz`` (layer ``head_input``, the input of the final
    prediction layer) and ``<output_dir>/features/<snapshot>_encoder.npz`` (layer ``encoder``), with the keys of the
    MLflow contract: ``features`` ``(N, d)`` float32, ``ids`` ``(N,)`` str in the data loader's order, ``layer`` str.

    - ``step0``: before the first optimisation step, only when the run starts at epoch 0. It is taken at the first
      ``EPOCH_STARTED`` rather than at ``STARTED`` so that it sees the state after every ``STARTED`` handler,
      whatever the attach order: a checkpoint loaded there makes the run a resumed one (step0 is then kept as it
      is), and the tracker has created its MLflow run.
    - ``epoch_<k>``: at ``EPOCH_COMPLETED`` of each epoch ``k`` in ``epochs``.
    - ``final``: at ``COMPLETED``. Attach this handler before the tracker so ``final`` is logged before the run is
      marked FINISHED.

    Each file also holds ``kind``, what sort of layer it is in this network (``representation_kinds()``, keys of
    :data:`common.contract.LAYER_KINDS`), and the run gets the tag ``layer_kinds``. Each file is logged to the
    tracker's run under ``features``; a file written while the tracker has no run yet is logged at the next
    snapshot. The network must have
    ``forward_representations(x) -> {"head_input": (B, d), "encoder": (B, e)}``; a DDP wrapper is unwrapped. Other
    ranks than 0 skip. ``data_loader`` must iterate the whole test split in a fixed order (no shuffling, no
    distributed sampler): the ids of every snapshot are checked to be the same.

    Args:
        data_loader: the test split, items with ``image_key`` ``(B, C, H, W, D)`` and ``id_key``.
        network: the trained network (or its DDP wrapper).
        tracker: a :class:`~common.bundle.tracking.StudyTracker`, or None to write files only. Default None.
        epochs: 1-based epochs after which ``epoch_<k>`` is taken. Default none.
        device: where the images go; None uses the network's device. Default None.
        amp: bf16 autocast on CUDA. Default False.
        image_key: the image entry of a batch. Default ``"image"``.
        id_key: the id entry of a batch. Default ``"id"``.
        output_dir: the run's output folder; None uses ``tracker.output_dir``. Default None.

    Raises:
        ValueError: on a network without ``forward_representations``, epochs < 1, no output folder, and (when a
            snapshot is taken) duplicated ids or ids that differ from the previous snapshot's.
    """

    def __init__(
        self,
        data_loader: Iterable[Mapping[str, object]],
        network: nn.Module,
        tracker: object | None = None,
        epochs: Sequence[int] = (),
        device: str | torch.device | None = None,
        amp: bool = False,
        image_key: str = "image",
        id_key: str = "id",
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        if not callable(getattr(unwrap_model(network), "forward_representations", None)):
            raise ValueError(
                f"FeatureSnapshots: {type(unwrap_model(network)).__name__} has no forward_representations(x) method."
            )
        epochs = [epochs] if isinstance(epochs, int) else list(epochs)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in epochs):
            raise ValueError(f"FeatureSnapshots: epochs must be integers >= 1, got {epochs!r}.")
        self.data_loader = data_loader
        self.network = network
        self.tracker = tracker
        self.epochs = frozenset(epochs)
        self.device = device
        self.amp = bool(amp)
        self.image_key = image_key
        self.id_key = id_key
        self.output_dir = _resolve_output_dir(output_dir, tracker, "FeatureSnapshots")
        self._first_epoch = False
        self._ids: list[str] | None = None
        self._pending: list[Path] = []
        self._kinds_tagged = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    @property
    def features_dir(self) -> Path:
        return self.output_dir / "features"

    def _started(self, engine) -> None:
        self._first_epoch = True

    def _epoch_started(self, engine) -> None:
        if not self._first_epoch:
            return
        self._first_epoch = False
        # Ignite counts the epoch before firing EPOCH_STARTED: epoch 1 with no iteration done is a fresh run
        if engine.state.epoch == 1 and engine.state.iteration == 0:
            self.snapshot("step0")
        else:
            logger.info(f"FeatureSnapshots: resumed at epoch {engine.state.epoch - 1}, step0 is kept as it is")

    def _epoch_completed(self, engine) -> None:
        if engine.state.epoch in self.epochs:
            self.snapshot(f"epoch_{engine.state.epoch}")

    def _completed(self, engine) -> None:
        self.snapshot("final")

    def compute(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Run the test split: ``(ids, {layer: (N, d) float32})`` in the data loader's order, on any rank."""
        model = unwrap_model(self.network)
        device = resolve_device(self.device, model)
        ids: list[str] = []
        chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in LAYERS}
        with evaluating(model, device, self.amp):
            for batch in self.data_loader:
                image = _plain(batch[self.image_key]).to(device)
                ids.extend(collect_ids(batch, self.id_key, image.shape[0]))
                out = model.forward_representations(image)
                for layer, values in chunks.items():
                    if layer not in out:
                        raise ValueError(f"forward_representations returned {sorted(out)}; it needs {layer!r}.")
                    rep = _plain(out[layer]).detach().float().cpu()
                    if rep.ndim != 2 or rep.shape[0] != image.shape[0]:
                        raise ValueError(f"{layer!r} must be (B, d) pooled features, got {tuple(rep.shape)}.")
                    values.append(rep.numpy())
        if not ids:
            raise ValueError("FeatureSnapshots: the test data loader is empty.")
        _check_unique(ids)
        return ids, {layer: np.concatenate(values).astype(np.float32) for layer, values in chunks.items()}

    def layer_kinds(self) -> dict[str, str]:
        """``{layer: kind}`` of the network (``representation_kinds()``; ``""`` where a network does not say)."""
        kinds = getattr(unwrap_model(self.network), "representation_kinds", None)
        known = dict(kinds()) if callable(kinds) else {}
        return {layer: str(known.get(layer, "")) for layer in LAYERS}

    def snapshot(self, name: str) -> list[Path]:
        """Compute and write snapshot ``name`` (every layer), log it to the tracker; the written paths (none off
        rank 0)."""
        if not _is_rank0():
            return []
        ids, features = self.compute()
        if self._ids is not None and ids != self._ids:
            raise ValueError(
                f"FeatureSnapshots: the ids of snapshot {name!r} differ from the previous snapshot's; the test data "
                "loader must iterate the same images in a fixed order (shuffle=False, no distributed sampler)."
            )
        self._ids = ids
        self.features_dir.mkdir(parents=True, exist_ok=True)
        kinds = self.layer_kinds()
        paths = []
        for layer in LAYERS:
            path = self.features_dir / feature_file_name(name, layer)
            np.savez(path, features=features[layer], ids=np.asarray(ids, dtype=str), layer=np.asarray(layer),
                     kind=np.asarray(kinds[layer]))  # fmt: skip
            paths.append(path)
        logger.info(f"FeatureSnapshots: {name} of {len(ids)} test images -> {self.features_dir}")
        self._pending.extend(paths)
        self._log_pending()
        return paths

    def _log_pending(self) -> None:
        tracker = self.tracker
        if tracker is None:
            self._pending = []
            return
        if not tracker.active:
            return  # the tracker has not started its run yet: logged with the next snapshot
        if not self._kinds_tagged:
            tracker.set_tag(TAG_LAYER_KINDS, json.dumps(self.layer_kinds(), sort_keys=True))
            self._kinds_tagged = True
        while self._pending:
            tracker.log_artifact(self._pending[0], "features")
            self._pending.pop(0)


# ----------------------------------------------------------------------------------------------------------------
# Test predictions
# ----------------------------------------------------------------------------------------------------------------


def _class_labels(label: torch.Tensor, n: int, k: int) -> np.ndarray:
    """``(B,)``, ``(B, 1)`` class indices or ``(B, K)`` one-hot -> ``(B,)`` int64."""
    y = _plain(label).detach().cpu()
    if y.ndim == 2 and y.shape[1] == k and k > 1:
        y = y.argmax(dim=1)
    y = y.reshape(-1).to(torch.float64)
    if y.shape[0] != n or not ((y == y.round()) & (y >= 0) & (y < k)).all():
        raise ValueError(
            f"classification labels must be {n} integer classes in [0, {k - 1}] ((B,), (B, 1) or one-hot), got "
            f"shape {tuple(label.shape)}."
        )
    return y.to(torch.int64).numpy()


class TestPredictions:
    """Run the test split once: write ``test/predictions.npz``, log P as ``test_metric`` beside the task's trivial
    baselines (paper section 3.1, DESIGN.md section 2).

    The prediction of a batch is ``postprocess(inferer(image, network))`` (``postprocess`` optional). The task's
    metric (:mod:`common.tasks`):

    - ``dice`` (segmentation): ``(B, C, H, W, D)`` logits (C >= 2: argmax != 0 is lesion; C = 1: ``> threshold``)
      vs the ``(B, 1, H, W, D)`` lesion mask, Dice per image by :func:`~common.metrics.compute_dice`. With
      ``dice_convention="lesion_cases"`` (default) P is the mean over the cases that have a lesion (``per_image`` is
      NaN for the others) and the predicted lesion volume on the lesion-free cases is logged beside it
      (``test_fp_volume_ml``); ``"all_cases"`` scores an empty prediction of a lesion-free case 1 and averages
      over all cases (``test_dice_all``, logged under either convention). Where the batches record the diffusion
      map each case was given (``diffusion``, the segmentation pipeline's draw), P over each map's cases is logged
      too (``test_dice_adc``, ``test_dice_dwi``) and the map of every case is saved as ``diffusion``.
    - ``ssim`` (the image tasks): the ``(B, C, H, W, D)`` image clipped to [0, 1] vs the target image, SSIM per
      image by :func:`~common.metrics.compute_ssim_3d`; ``per_image`` and its mean.
    - ``specificity_at_sensitivity`` (classification): ``(B, K)`` logits -> ``scores`` ``(N, K)`` softmax
      probabilities and ``labels`` ``(N,)``; P is the specificity at sensitivity 0.9 of the cut ``class >= 1`` scored
      by ``sum(scores[:, 1:])`` (:func:`~common.metrics.compute_specificity_at_sensitivity`); its AUC is logged as
      ``test_auc``.

    Each of the task's trivial baselines (:class:`~common.metrics.baselines.TrivialBaselines`) is scored on the same
    batches with the same metric code and post-processing: ``baseline_metric_<name>`` for each, ``baseline_metric``
    and tag ``baseline_name`` for the best, and its per-image values (``baseline_per_image``) or scores
    (``baseline_scores``) in the npz. Baselines fitted on the training split (modality translation) need
    ``baseline_data``.

    ``ids`` ``(N,)`` str are saved too. Rank 0 only (other ranks return nan); the network is DDP-unwrapped and put
    in eval mode. As a handler (``attach``) it runs at the engine's ``COMPLETED``: attach it before the tracker so
    ``test_metric`` is in the run before it is marked FINISHED.

    Args:
        data_loader: the test split, items with ``image_key``, ``label_key`` and ``id_key``.
        network: the trained network (or its DDP wrapper).
        task: a registered task id (:data:`common.tasks.TASKS`).
        tracker: a :class:`~common.bundle.tracking.StudyTracker` with a started run, or None. Default None.
        inferer: ``inferer(image, network) -> prediction``; None is ``monai.inferers.SimpleInferer()``. The
            diffusion sampler of modality translation plugs in here. Default None.
        device: where the images go; None uses the network's device. Default None.
        amp: bf16 autocast on CUDA. Default False.
        output_dir: the run's output folder; None uses ``tracker.output_dir``. Default None.
        postprocess: callable applied to each batch's prediction before the metric. Default None.
        image_key, label_key, id_key: batch entries. Defaults ``"image"``, ``"label"``, ``"id"``.
        baseline_data: training items (or batches) ``{image_key, label_key}`` as the test-mode pipeline gives them,
            to fit the baselines that need the training split; None skips those baselines. Default None.
        baselines: False scores no baseline. Default True.
        dice_convention: one of :data:`DICE_CONVENTIONS`. Default ``"lesion_cases"``.
        **metric_kwargs: passed to the task metric: ``sensitivity``, ``positive_class`` (classification; the
            contract's values 0.9 and 1 are the defaults), ``empty_value``, ``threshold`` (Dice), ``data_range``,
            ``win_size``, ``sigma``, ``k1``, ``k2``, ``truncate``, ``compute_dtype`` (SSIM).

    Raises:
        ValueError: on an unknown task, metric keyword or Dice convention, no output folder, a non-callable
            postprocess, and (when run) duplicated ids or predictions of the wrong shape.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        data_loader: Iterable[Mapping[str, object]],
        network: nn.Module,
        task: str,
        tracker: object | None = None,
        inferer: Callable[..., torch.Tensor] | None = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        output_dir: str | os.PathLike | None = None,
        postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        id_key: str = "id",
        baseline_data: Iterable[Mapping[str, object]] | None = None,
        baselines: bool = True,
        dice_convention: str = "lesion_cases",
        **metric_kwargs: object,
    ) -> None:
        try:
            spec = get_task(task)
        except ValueError as err:
            raise ValueError(f"TestPredictions: {err}.") from None
        allowed = _METRIC_KWARGS[spec.metric]
        unknown = sorted(set(metric_kwargs) - allowed)
        if unknown:
            raise ValueError(f"TestPredictions: {unknown} are not options of the {task} metric; use {sorted(allowed)}.")
        if postprocess is not None and not callable(postprocess):
            raise ValueError("TestPredictions: postprocess must be callable.")
        if dice_convention not in DICE_CONVENTIONS:
            raise ValueError(
                f"TestPredictions: dice_convention must be one of {DICE_CONVENTIONS}, not {dice_convention!r}."
            )
        if inferer is None:
            from monai.inferers import SimpleInferer

            inferer = SimpleInferer()
        self.data_loader = data_loader
        self.network = network
        self.task = spec.id
        self.spec = spec
        self.tracker = tracker
        self.inferer = inferer
        self.device = device
        self.amp = bool(amp)
        self.output_dir = _resolve_output_dir(output_dir, tracker, "TestPredictions")
        self.postprocess = postprocess
        self.image_key = image_key
        self.label_key = label_key
        self.id_key = id_key
        self.baseline_data = baseline_data
        self.use_baselines = bool(baselines)
        self.dice_convention = dice_convention
        self.metric_kwargs = dict(metric_kwargs)
        self.value: float | None = None
        self.metrics: dict[str, float] = {}
        self.baseline_values: dict[str, float] = {}

    @property
    def path(self) -> Path:
        return self.output_dir / PREDICTIONS_ARTIFACT

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        self.run()

    def _batch_values(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense tasks: ``(B, C, H, W, D)`` prediction and target -> ``{"per_image": (B,), ...}`` per-image values
        (segmentation adds ``dice_all`` and ``fp_voxels``)."""
        if pred.ndim != 5:
            raise ValueError(f"{self.task}: the prediction must be (B, C, H, W, D), got {tuple(pred.shape)}.")
        if self.spec.metric != "dice":
            return {"per_image": compute_ssim_3d(pred.float().clamp(0.0, 1.0), label.float(), **self.metric_kwargs)}
        dice_all = compute_dice(pred, label, **self.metric_kwargs)
        predicted = foreground(pred, self.metric_kwargs.get("threshold", 0.5))
        lesion = has_lesion(label)
        per_image = dice_all if self.dice_convention == "all_cases" else torch.where(lesion, dice_all, math.nan)
        fp = torch.where(lesion, 0.0, predicted.reshape(pred.shape[0], -1).sum(dim=1).double())
        return {"per_image": per_image, "dice_all": dice_all, "fp_voxels": torch.where(lesion, math.nan, fp)}

    def _baselines(self) -> TrivialBaselines | None:
        if not self.use_baselines:
            return None
        baselines = TrivialBaselines(self.spec)
        if baselines.needs_fit:
            if self.baseline_data is None:
                logger.warning(f"TestPredictions: no baseline_data, so the {self.task} baselines are not scored")
                return None
            baselines.fit(self.baseline_data, self.image_key, self.label_key)
        return baselines

    def run(self) -> float:
        """Predict the test split, write ``test/predictions.npz``, log ``test_metric``, the baselines and the file;
        return P."""
        if not _is_rank0():
            return float("nan")
        tracker = self.tracker
        if tracker is not None and not tracker.active:
            raise RuntimeError(
                "TestPredictions: the tracker has no MLflow run yet; run it after the tracker's engine started."
            )
        model = unwrap_model(self.network)
        device = resolve_device(self.device, model)
        baselines = self._baselines()
        names = baselines.names if baselines is not None else ()
        ids: list[str] = []
        maps: list[str] = []  # the diffusion map each image was given, where the batches record it
        values: dict[str, list[np.ndarray]] = {}
        voxel_ml: list[float] = []
        with evaluating(model, device, self.amp):
            for batch in self.data_loader:
                image = _plain(batch[self.image_key]).to(device)
                ids.extend(collect_ids(batch, self.id_key, image.shape[0]))
                maps.extend(str(m) for m in batch.get(DIFFUSION_KEY, [""] * image.shape[0]))
                if self.label_key not in batch:
                    raise ValueError(f"TestPredictions: the batch has no {self.label_key!r} entry.")
                label = batch[self.label_key]
                voxel_ml += [_voxel_ml(label, i) for i in range(image.shape[0])]
                label = _plain(label)
                preds = {"": self.inferer(image, model)}
                for name in names:
                    preds[name] = baselines.predict(name, image, target_shape=label.shape[2:])
                for name, pred in preds.items():
                    if self.postprocess is not None and not name:  # baselines come ready for the metric
                        pred = self.postprocess(pred)
                    prefix = f"baseline_{name}_" if name else ""
                    for key, value in self._values(_plain(pred), label, device).items():
                        values.setdefault(prefix + key, []).append(value)
        if not ids:
            raise ValueError("TestPredictions: the test data loader is empty.")
        _check_unique(ids)
        arrays = {"ids": np.asarray(ids, dtype=str), **{k: np.concatenate(v) for k, v in values.items()}}
        self.value = self._performance(arrays, "")
        self.metrics = {METRIC_TEST: self.value}
        if self.spec.classification:
            self.metrics[METRIC_TEST_AUC] = self._auc(arrays["scores"], arrays["labels"])
        if self.spec.metric == "dice":
            self.metrics[METRIC_TEST_DICE_ALL] = float(arrays.pop("dice_all").mean())
            fp_ml = arrays.pop("fp_voxels") * np.asarray(voxel_ml)
            self.metrics[METRIC_TEST_FP_VOLUME] = float(np.nanmean(fp_ml)) if np.isfinite(fp_ml).any() else math.nan
            if any(maps):
                arrays[DIFFUSION_KEY] = np.asarray(maps, dtype=str)
                for name, key in METRIC_TEST_DICE_ON.items():
                    own = arrays["per_image"][arrays[DIFFUSION_KEY] == name]
                    if np.isfinite(own).any():
                        self.metrics[key] = float(np.nanmean(own))
        self.baseline_values = {name: self._performance(arrays, f"baseline_{name}_") for name in names}
        best = self._best_baseline()
        if best is not None:
            key = "scores" if self.spec.classification else "per_image"
            arrays[f"baseline_{key}"] = arrays[f"baseline_{best}_{key}"]
            self.metrics[METRIC_BASELINE] = self.baseline_values[best]
        for name in names:  # only the best baseline's arrays are kept
            for key in [k for k in arrays if k.startswith(f"baseline_{name}_")]:
                del arrays[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(self.path, **arrays)
        shown = f", baseline {best} = {self.baseline_values[best]:.6g}" if best is not None else ""
        logger.info(f"TestPredictions: {self.task} P = {self.value:.6g}{shown} over {len(ids)} images -> {self.path}")
        if best is not None and not self.beats_baseline:
            logger.warning(f"TestPredictions: {self.task} P = {self.value:.6g} does not beat the trivial baseline")
        if tracker is not None:
            for key, value in self.metrics.items():
                tracker.log_metric(key, value)
            for name, value in self.baseline_values.items():
                tracker.log_metric(baseline_metric_name(name), value)
            if best is not None:
                tracker.set_tag(TAG_BASELINE, best)
            tracker.log_artifact(self.path, "test")
        return self.value

    def _values(self, pred: torch.Tensor, label: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
        """One batch's arrays: ``scores`` and ``labels`` (classification) or the per-image values."""
        if self.spec.classification:
            if pred.ndim != 2 or pred.shape[0] != label.shape[0] or pred.shape[1] < 2:
                raise ValueError(f"classification: the prediction must be (B, K) logits, got {tuple(pred.shape)}.")
            return {"scores": torch.softmax(pred.detach().double(), dim=1).cpu().numpy(),
                    "labels": _class_labels(label, pred.shape[0], pred.shape[1])}  # fmt: skip
        out = self._batch_values(pred, label.to(device))
        return {k: v.detach().double().cpu().numpy() for k, v in out.items()}

    def _performance(self, arrays: Mapping[str, np.ndarray], prefix: str) -> float:
        """P from the arrays under ``prefix``: the classification metric of the scores, or the mean of the counted
        images (NaN when none counts)."""
        if self.spec.classification:
            return self._specificity(arrays[f"{prefix}scores"], arrays["labels"])
        per_image = arrays[f"{prefix}per_image"]
        return float(np.nanmean(per_image)) if np.isfinite(per_image).any() else math.nan

    def _best_baseline(self) -> str | None:
        finite = {k: v for k, v in self.baseline_values.items() if math.isfinite(v)}
        if not finite:
            return None
        pick = max if self.spec.higher_is_better else min
        return pick(finite, key=finite.get)

    @property
    def beats_baseline(self) -> bool:
        """True when P is strictly better than the best trivial baseline (after :meth:`run`)."""
        best = self._best_baseline()
        if best is None or self.value is None or not math.isfinite(self.value):
            return False
        margin = self.value - self.baseline_values[best]
        return margin > 0 if self.spec.higher_is_better else margin < 0

    def _positive(self, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positive_class = int(self.metric_kwargs.get("positive_class", 1))
        if not 1 <= positive_class < scores.shape[1]:
            raise ValueError(f"positive_class must be in [1, {scores.shape[1] - 1}], got {positive_class}.")
        return scores[:, positive_class:].sum(axis=1), (labels >= positive_class).astype(np.float64)

    def _specificity(self, scores: np.ndarray, labels: np.ndarray) -> float:
        score, positive = self._positive(scores, labels)
        return compute_specificity_at_sensitivity(score, positive, float(self.metric_kwargs.get("sensitivity", 0.9)))

    def _auc(self, scores: np.ndarray, labels: np.ndarray) -> float:
        return compute_auc(*self._positive(scores, labels))


def _voxel_ml(label: object, index: int) -> float:
    """Volume of one voxel of item ``index`` in ml, from the label's affine (1 mm^3 when it has none)."""
    affine = getattr(label, "affine", None)
    if affine is None:
        return 1e-3
    affine = torch.as_tensor(affine).double()
    affine = affine[index] if affine.ndim == 3 else affine
    return float(torch.linalg.det(affine[:3, :3]).abs()) * 1e-3
