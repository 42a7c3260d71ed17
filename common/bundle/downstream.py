"""What the downstream bundles share beyond the JSON workflow (``common/configs/downstream.json``): how a network is
initialised for its regime, the task's split, class weights, and the task's validation metric and post-processing.

The protocols are DESIGN.md section 3 (paper section 2.2):

- ``init="pretrained"`` (the finetune bundles): the FM's pretrained encoder is loaded (``encoder_only``; the task head
  stays as initialised) and the FM's freezing protocol is applied; tag ``regime=finetune``.
- ``init="random"`` (the finetune bundle with one override, ``--init random``): the same network and freezing
  protocol on a randomly initialised encoder, the paper's random-weight reference; tag ``regime=random``.
- ``init="scratch"`` (the scratch bundles and the specialised models): random initialisation, every parameter
  trained; tag ``regime=scratch`` (or ``specialised``).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from common.data.splits import split_ids
from common.metrics.handlers import BinaryDiceHandler, SpecificityAtSensitivityHandler, SSIM3DHandler
from common.networks import PriorOffset, load_checkpoint
from common.tasks import get_task
from common.transforms import task_transforms
from common.transforms.label import NUM_CLASSES, PiradsToClass

from .data import load_split, load_splits
from .engine import atomic_save

__all__ = [
    "INITS",
    "baseline_data",
    "class_weights",
    "init_network",
    "load_task_split",
    "regime_of",
    "save_state_dict",
    "snapshot_key",
    "test_postprocess",
    "test_transforms",
    "trainable_summary",
    "validation_metric",
]

logger = logging.getLogger(__name__)

#: init -> the MLflow ``regime`` tag of a finetune-protocol bundle run with it
INITS: dict[str, str] = {"pretrained": "finetune", "random": "random", "scratch": "scratch"}


def regime_of(init: str) -> str:
    """The ``regime`` tag of a run started with ``init`` (``pretrained`` -> ``finetune``)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return INITS[init]


def _inner(model: nn.Module) -> nn.Module:
    """The study network inside its wrappers (each keeps the network it wraps as ``network``: the residual
    restoration, the segmentation refinement, the DDPM timestep wrapper and the prior offset around that)."""
    while isinstance(getattr(model, "network", None), nn.Module):
        model = model.network
    return model


def trainable_summary(model: nn.Module) -> str:
    """``"<trainable> / <total> parameters trainable (<pct> %)"``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} / {total:,} parameters trainable ({100.0 * trainable / max(total, 1):.1f} %)"


def init_network(
    model: nn.Module,
    init: str,
    checkpoint: str | os.PathLike | None = None,
    freeze: Callable[[nn.Module], object] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Initialise ``model`` for its regime (module docstring) and move it to ``device``.

    Args:
        model: the bundle's network; a wrapper with a ``network`` attribute (the DDPM timestep wrapper) has the
            checkpoint and the freezing applied to that inner network.
        init: ``"pretrained"``, ``"random"`` or ``"scratch"``.
        checkpoint: the pretrained weights for ``"pretrained"``: this project's pretraining output, or an official
            ProFound / ProViCNet / DINOv2 file (format detected, read with ``weights_only=True``). Ignored otherwise.
        freeze: the FM's freezing protocol, applied for ``"pretrained"`` and ``"random"``; None trains everything.
        device: where the network goes. Default: stays where it is.
    """
    regime_of(init)
    inner = _inner(model)
    if init == "pretrained":
        if checkpoint is None or not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"init='pretrained' needs the pretrained weights, but pretrained_ckpt={os.fspath(checkpoint)!r} "
                "does not exist. Run the FM's pretraining bundle first (bundles/<fm>_pretrain, same --study_dir and "
                "--seed), pass official weights with --pretrained_ckpt PATH, or use --init random for the "
                "random-weight reference."
            )
        load_checkpoint(inner, checkpoint, strict=True, encoder_only=True)
        logger.info(f"loaded the pretrained encoder from {os.fspath(checkpoint)}")
    if init in ("pretrained", "random") and freeze is not None:
        freeze(inner)
    logger.info(f"init={init}: {trainable_summary(model)}")
    return model if device is None else model.to(device)


def load_task_split(
    datalist: str | os.PathLike,
    split: str,
    keys: Sequence[str],
    proportions: Sequence[float] | None = None,
    seed: int = 0,
) -> list[dict]:
    """The entries of ``split`` for a task.

    With ``proportions`` None the datalist's own split is used. Otherwise every case of the datalist (all splits
    pooled, sorted by id) is divided again in ``proportions`` (training, validation, test) with ``split_ids`` and
    ``seed``: the distortion-correction task of the paper uses another cohort with the few-shot split 330/82/177,
    which the bundles reproduce on the study cohort this way. The split is the same in every run (the seed is the
    cohort's, not the run's).
    """
    names = ("training", "validation", "test")
    if split not in names:
        raise ValueError(f"split must be one of {names}, got {split!r}")
    if proportions is None:
        return load_split(datalist, split, keys)
    splits = load_splits(datalist, keys)
    entries = {e["id"]: e for name in names for e in splits.get(name, [])}
    if not entries:
        raise ValueError(f"datalist {os.fspath(datalist)!r} has no cases")
    parts = split_ids(sorted(entries), proportions, seed=seed)
    chosen = parts[names.index(split)]
    if not chosen:
        raise ValueError(
            f"the {split} split of {len(entries)} cases in proportions {tuple(proportions)} is empty; the cohort "
            f"{os.fspath(datalist)!r} is too small"
        )
    return [entries[i] for i in chosen]


def class_weights(data: Sequence[Mapping[str, object]], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Inverse-frequency weights ``(K,)`` of the PI-RADS classes in ``data`` (datalist entries with ``"pirads"``),
    normalised to mean 1 over the classes present; an absent class gets weight 0 (it cannot be a target). The
    class-weighted cross-entropy of paper section 3.1."""
    to_class = PiradsToClass()
    counts = Counter(to_class(entry["pirads"]) for entry in data)
    if not counts:
        raise ValueError("class_weights: no training entries")
    weights = torch.zeros(num_classes)
    for k, n in counts.items():
        weights[k] = 1.0 / n
    present = weights > 0
    weights[present] *= present.sum() / weights[present].sum()
    return weights


def _pred_label(output: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> tuple:
    """``engine.state.output`` of a non-decollated evaluator -> ``(pred, label)`` batch tensors."""
    if isinstance(output, Mapping):
        return output["pred"], output["label"]
    return torch.stack([o["pred"] for o in output]), torch.stack([o["label"] for o in output])


def _argmax_mask(pred: torch.Tensor) -> torch.Tensor:
    """``(B, K, ...)`` logits -> ``(B, 1, ...)`` float class map (K = 2: the lesion mask)."""
    return pred.argmax(dim=1, keepdim=True).to(torch.float32)


def test_postprocess(task: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What :class:`~common.bundle.TestPredictions` applies to a prediction batch before the metric: the argmax
    mask for a Dice task (two-class logits), nothing otherwise (it clamps intensities to [0, 1] itself)."""
    return _argmax_mask if get_task(task).metric == "dice" else None


test_postprocess.__test__ = False  # a factory, not a pytest test


def _segmentation_output(output):
    pred, label = _pred_label(output)
    return _argmax_mask(pred), label


def _image_output(output):
    pred, label = _pred_label(output)
    return pred.float().clamp(0.0, 1.0), label.float()


#: the task metric -> (the Ignite handler of the validation evaluator, its output transform)
_VALIDATION_HANDLERS: dict[str, tuple[type, Callable, dict]] = {
    "specificity_at_sensitivity": (SpecificityAtSensitivityHandler, _pred_label, {}),
    "dice": (BinaryDiceHandler, _segmentation_output, {"save_details": False, "lesion_cases_only": True}),
    "ssim": (SSIM3DHandler, _image_output, {"save_details": False}),
}


def validation_metric(task: str, **kwargs: object):
    """The Ignite handler of ``task``'s metric for the validation evaluator (``decollate=False``), with the output
    transform that post-processes a batch: specificity at sensitivity 0.9 of the PI-RADS >= 3 cut (classification),
    Dice of the argmax mask on the lesion cases (segmentation, the convention of its test P), 3D SSIM of the output
    clamped to [0, 1] (the image tasks)."""
    handler, transform, defaults = _VALIDATION_HANDLERS[get_task(task).metric]
    return handler(output_transform=transform, **{**defaults, **kwargs})


#: where the modality-translation pipeline puts ``cat([DWI, T2W])`` for the feature snapshots
SNAPSHOT_INPUT = "snapshot_input"


def snapshot_key(task: str) -> str:
    """The batch entry the feature snapshots feed to ``forward_representations`` (:attr:`Task.snapshot_key`): the
    image, except for modality translation, whose DDPM networks see ``cat([DWI, T2W])`` (the clean target at
    timestep 0, the convention of :class:`~common.networks.ConditionalDiffusionUNet`), so that the FM and the
    specialised DDPM are compared on the same input."""
    return get_task(task).snapshot_key


def test_transforms(task: str, profile: str, seed: int):
    """The test-split pipeline: ``task_transforms(train=False)`` (degradations drawn per case from ``seed`` and the
    case id, identical in every run), plus the snapshot input of :func:`snapshot_key` when the task has one."""
    from monai.transforms import Compose, ConcatItemsd

    pipeline = task_transforms(task, profile, seed=seed, train=False)
    if snapshot_key(task) != SNAPSHOT_INPUT:
        return pipeline
    return Compose([pipeline, ConcatItemsd(keys=["label", "image"], name=SNAPSHOT_INPUT, dim=0)])


test_transforms.__test__ = False  # a factory, not a pytest test


def baseline_data(task: str, data: Sequence[Mapping[str, object]], profile: str, seed: int):
    """The training split as the test-mode pipeline gives it (no flips, deterministic degradations), for the
    baselines fitted on it (:class:`~common.metrics.baselines.TrivialBaselines`); None when the task has none.
    Items are loaded lazily, one at a time, when the test predictions run."""
    from monai.data import Dataset

    from common.metrics.baselines import TrivialBaselines

    if not TrivialBaselines(task).needs_fit:
        return None
    return Dataset(data, transform=task_transforms(task, profile, seed=seed, train=False))


def cache_frozen_encoder(model: nn.Module, mode: str = "all", max_gb: float = 4.0) -> nn.Module:
    """``model`` with its frozen ProFound encoder's outputs computed once per distinct input
    (:func:`common.networks.enable_feature_cache`): ``mode`` ``"all"``, ``"eval"`` (validation and test only) or
    ``"off"``; the task's default is ``common.tasks.Task.encoder_cache`` (bundle key ``encoder_cache``). At most
    ``max_gb`` GiB of maps are kept. A network without a frozen ProFound encoder is returned unchanged."""
    from common.networks import enable_feature_cache
    from common.tasks import ENCODER_CACHE_MODES

    if mode not in ENCODER_CACHE_MODES:
        raise ValueError(f"encoder_cache must be one of {ENCODER_CACHE_MODES}, got {mode!r}")
    if mode != "off" and enable_feature_cache(model, int(max_gb * 2**30), mode):
        logger.info(f"frozen encoder outputs are cached ({mode}, at most {max_gb:g} GiB)")
        caches = [m.feature_cache for m in model.modules() if getattr(m, "feature_cache", None) is not None]
        atexit.register(lambda: [logger.info(f"encoder cache at exit: {c}") for c in caches])
    return model


def fit_prior(model: nn.Module, task: str, data: Sequence[Mapping[str, object]], profile: str, seed: int):
    """``model`` with its prior set, when it is a :class:`~common.networks.PriorOffset` (the modality-translation
    denoisers): the mean target of the training split ``data`` as the test-mode pipeline gives it (the ``mean_dwi``
    baseline), loading every training case once, one at a time. Any other network is returned as it is. Every
    bundle's ``network`` (single- and multi-GPU) passes through here after :func:`init_network`."""
    from monai.data import Dataset

    if not isinstance(model, PriorOffset):
        return model
    items = Dataset(list(data), transform=task_transforms(task, profile, seed=seed, train=False))
    model.fit_mean(items[i] for i in range(len(items)))
    logger.info(f"prior: the mean target of {len(items)} training cases")
    return model


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` to ``path`` atomically (a temporary file renamed into place): the bundle's
    ``models/model.pt``, loadable into ``network_def`` by ``evaluate.json``, ``inference.json`` and ``ckpt_export``."""
    atomic_save(model.state_dict(), path)
