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
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.metrics import compute_dice, compute_specificity_at_sensitivity, compute_ssim_3d

from .engine import plain_tensor as _plain
from .engine import unwrap_model
from .tracking import _retry

__all__ = ["LAYERS", "TASKS", "FeatureSnapshots", "TestPredictions", "collect_ids"]

logger = logging.getLogger(__name__)

#: the layers of ``forward_representations`` that are saved, and the file suffix of each
LAYERS: dict[str, str] = {"head_input": "", "encoder": "_encoder"}
#: task id -> the metric whose per-image values (or scores) ``test/predictions.npz`` holds
TASKS: dict[str, str] = {
    "classification": "specificity_at_sensitivity",
    "segmentation": "dice",
    "super_resolution": "ssim",
    "distortion_correction": "ssim",
    "modality_translation": "ssim",
}
_METRIC_KWARGS: dict[str, frozenset[str]] = {
    "specificity_at_sensitivity": frozenset({"sensitivity", "positive_class"}),
    "dice": frozenset({"empty_value", "threshold"}),
    "ssim": frozenset({"data_range", "win_size", "sigma", "k1", "k2", "truncate", "compute_dtype"}),
}


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def _evaluating(model: nn.Module, device: torch.device, amp: bool) -> Iterator[None]:
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

    Each file is logged to the tracker's run under ``features`` (``tracker._client.log_artifact``); a file written
    while the tracker has no run yet is logged at the next snapshot. The network must have
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
        device = _resolve_device(self.device, model)
        ids: list[str] = []
        chunks: dict[str, list[np.ndarray]] = {layer: [] for layer in LAYERS}
        with _evaluating(model, device, self.amp):
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

    def snapshot(self, name: str) -> list[Path]:
        """Compute and write snapshot ``name`` (both layers), log it to the tracker; the written paths (none off
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
        paths = []
        for layer, suffix in LAYERS.items():
            path = self.features_dir / f"{name}{suffix}.npz"
            np.savez(path, features=features[layer], ids=np.asarray(ids, dtype=str), layer=np.asarray(layer))
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
        client, run_id = getattr(tracker, "_client", None), getattr(tracker, "run_id", None)
        if client is None or run_id is None:
            return  # the tracker has not started its run yet: logged with the next snapshot
        while self._pending:
            _retry(client.log_artifact, run_id, str(self._pending[0]), "features")
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
    """Run the test split once: write ``test/predictions.npz``, log P as ``test_metric`` (paper section 3.1).

    The prediction of a batch is ``postprocess(inferer(image, network))`` (``postprocess`` optional). Per task:

    - ``segmentation``: ``(B, C, H, W, D)`` logits (C >= 2: argmax != 0 is lesion; C = 1: ``> threshold``) vs the
      ``(B, 1, H, W, D)`` lesion mask, Dice per image by :func:`~common.metrics.compute_dice` (both empty -> 1.0);
      the npz holds ``per_image`` ``(N,)`` and P is its mean.
    - ``super_resolution``, ``distortion_correction``, ``modality_translation``: the ``(B, C, H, W, D)`` image
      clipped to [0, 1] vs the target image, SSIM per image by :func:`~common.metrics.compute_ssim_3d`;
      ``per_image`` and its mean as above.
    - ``classification``: ``(B, K)`` logits -> ``scores`` ``(N, K)`` softmax probabilities and ``labels`` ``(N,)``;
      P is the specificity at sensitivity 0.9 of the cut ``class >= 1`` scored by ``sum(scores[:, 1:])``
      (:func:`~common.metrics.compute_specificity_at_sensitivity`), recomputed from the saved arrays exactly as the
      analysis does.

    ``ids`` ``(N,)`` str are saved too. Rank 0 only (other ranks return nan); the network is DDP-unwrapped and put
    in eval mode. As a handler (``attach``) it runs at the engine's ``COMPLETED``: attach it before the tracker so
    ``test_metric`` is in the run before it is marked FINISHED.

    Args:
        data_loader: the test split, items with ``image_key``, ``label_key`` and ``id_key``.
        network: the trained network (or its DDP wrapper).
        task: a key of :data:`TASKS`.
        tracker: a :class:`~common.bundle.tracking.StudyTracker` with a started run, or None. Default None.
        inferer: ``inferer(image, network) -> prediction``; None is ``monai.inferers.SimpleInferer()``. The
            diffusion sampler of modality translation plugs in here. Default None.
        device: where the images go; None uses the network's device. Default None.
        amp: bf16 autocast on CUDA. Default False.
        output_dir: the run's output folder; None uses ``tracker.output_dir``. Default None.
        postprocess: callable applied to each batch's prediction before the metric. Default None.
        image_key, label_key, id_key: batch entries. Defaults ``"image"``, ``"label"``, ``"id"``.
        **metric_kwargs: passed to the task metric: ``sensitivity``, ``positive_class`` (classification; the
            contract's values 0.9 and 1 are the defaults), ``empty_value``, ``threshold`` (Dice), ``data_range``,
            ``win_size``, ``sigma``, ``k1``, ``k2``, ``truncate``, ``compute_dtype`` (SSIM).

    Raises:
        ValueError: on an unknown task or metric keyword, no output folder, a non-callable postprocess, and (when
            run) duplicated ids or predictions of the wrong shape.
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
        **metric_kwargs: object,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"TestPredictions: unknown task {task!r}; choose one of {list(TASKS)}.")
        allowed = _METRIC_KWARGS[TASKS[task]]
        unknown = sorted(set(metric_kwargs) - allowed)
        if unknown:
            raise ValueError(f"TestPredictions: {unknown} are not options of the {task} metric; use {sorted(allowed)}.")
        if postprocess is not None and not callable(postprocess):
            raise ValueError("TestPredictions: postprocess must be callable.")
        if inferer is None:
            from monai.inferers import SimpleInferer

            inferer = SimpleInferer()
        self.data_loader = data_loader
        self.network = network
        self.task = task
        self.tracker = tracker
        self.inferer = inferer
        self.device = device
        self.amp = bool(amp)
        self.output_dir = _resolve_output_dir(output_dir, tracker, "TestPredictions")
        self.postprocess = postprocess
        self.image_key = image_key
        self.label_key = label_key
        self.id_key = id_key
        self.metric_kwargs = dict(metric_kwargs)
        self.value: float | None = None

    @property
    def path(self) -> Path:
        return self.output_dir / "test" / "predictions.npz"

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        self.run()

    def _batch_values(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dense tasks: ``(B, C, H, W, D)`` prediction and target -> ``(B,)`` per-image metric."""
        if pred.ndim != 5:
            raise ValueError(f"{self.task}: the prediction must be (B, C, H, W, D), got {tuple(pred.shape)}.")
        if TASKS[self.task] == "dice":
            return compute_dice(pred, label, **self.metric_kwargs)
        return compute_ssim_3d(pred.float().clamp(0.0, 1.0), label.float(), **self.metric_kwargs)

    def run(self) -> float:
        """Predict the test split, write ``test/predictions.npz``, log ``test_metric`` and the file; return P."""
        if not _is_rank0():
            return float("nan")
        tracker = self.tracker
        if tracker is not None and (getattr(tracker, "_client", None) is None or tracker.run_id is None):
            raise RuntimeError(
                "TestPredictions: the tracker has no MLflow run yet; run it after the tracker's engine started."
            )
        model = unwrap_model(self.network)
        device = _resolve_device(self.device, model)
        ids: list[str] = []
        values: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        with _evaluating(model, device, self.amp):
            for batch in self.data_loader:
                image = _plain(batch[self.image_key]).to(device)
                ids.extend(collect_ids(batch, self.id_key, image.shape[0]))
                pred = self.inferer(image, model)
                if self.postprocess is not None:
                    pred = self.postprocess(pred)
                pred = _plain(pred)
                if self.label_key not in batch:
                    raise ValueError(f"TestPredictions: the batch has no {self.label_key!r} entry.")
                label = _plain(batch[self.label_key])
                if self.task == "classification":
                    if pred.ndim != 2 or pred.shape[0] != image.shape[0] or pred.shape[1] < 2:
                        raise ValueError(f"classification: the prediction must be (B, K) logits, got {pred.shape}.")
                    values.append(torch.softmax(pred.detach().double(), dim=1).cpu().numpy())
                    labels.append(_class_labels(label, pred.shape[0], pred.shape[1]))
                else:
                    values.append(self._batch_values(pred, label.to(device)).detach().double().cpu().numpy())
        if not ids:
            raise ValueError("TestPredictions: the test data loader is empty.")
        _check_unique(ids)
        arrays: dict[str, np.ndarray] = {"ids": np.asarray(ids, dtype=str)}
        if self.task == "classification":
            arrays["scores"] = np.concatenate(values)
            arrays["labels"] = np.concatenate(labels)
            self.value = self._specificity(arrays["scores"], arrays["labels"])
        else:
            arrays["per_image"] = np.concatenate(values)
            self.value = float(arrays["per_image"].mean())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(self.path, **arrays)
        logger.info(f"TestPredictions: {self.task} P = {self.value:.6g} over {len(ids)} test images -> {self.path}")
        if tracker is not None:
            _retry(tracker._client.log_metric, tracker.run_id, "test_metric", self.value, step=0)
            _retry(tracker._client.log_artifact, tracker.run_id, str(self.path), "test")
        return self.value

    def _specificity(self, scores: np.ndarray, labels: np.ndarray) -> float:
        positive_class = int(self.metric_kwargs.get("positive_class", 1))
        if not 1 <= positive_class < scores.shape[1]:
            raise ValueError(f"positive_class must be in [1, {scores.shape[1] - 1}], got {positive_class}.")
        return compute_specificity_at_sensitivity(
            scores[:, positive_class:].sum(axis=1),
            (labels >= positive_class).astype(np.float64),
            float(self.metric_kwargs.get("sensitivity", 0.9)),
        )
