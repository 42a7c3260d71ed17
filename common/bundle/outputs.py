"""What ``configs/evaluate.json``, ``configs/inference.json`` and ``configs/multi_gpu_train.json`` of the downstream
and specialised bundles call: a trained network from its ``models/model.pt``, the test metric written as JSON, the
predictions of a split written as NIfTI volumes / a CSV, and the process group of a ``torchrun`` launch."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.networks._state import load_weights, state_dict_problems
from common.tasks import get_task

from .engine import plain_tensor, unwrap_model
from .snapshots import TestPredictions, collect_ids, evaluating, resolve_device

__all__ = ["init_distributed", "load_trained", "report_evaluation", "write_predictions"]

logger = logging.getLogger(__name__)


def load_trained(
    model: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device | None = None
) -> nn.Module:
    """``model`` with the weights of a bundle's ``models/model.pt`` (a state dict of ``network_def``; also a training
    checkpoint ``checkpoint_epoch=<k>.pt``, whose ``"network"`` entry is used), read with ``weights_only=True``.
    Raises ``FileNotFoundError`` naming the file when it is missing and ``ValueError`` listing the mismatched keys."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {os.fspath(path)!r}: train the bundle first (configs/train.json, same "
            "--study_dir, --seed and --init), or pass --checkpoint PATH"
        )
    state = load_weights(path)
    if isinstance(state, Mapping) and "network" in state and isinstance(state["network"], Mapping):
        state = state["network"]
    problems = state_dict_problems(model.state_dict(), state, strict=True)
    if problems:
        raise ValueError(f"{os.fspath(path)!r} does not fit network_def:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
    logger.info(f"loaded the trained weights {os.fspath(path)}")
    return model if device is None else model.to(device)


def report_evaluation(predictions: TestPredictions, output_dir: str | os.PathLike) -> dict[str, object]:
    """Run ``predictions`` (the test split through the task's metric) and write ``<output_dir>/metrics.json``:
    ``{"task", "metric", "value", "n_images", "predictions"}``; the dict is also returned and logged."""
    value = predictions.run()
    with np.load(predictions.path) as saved:
        n = len(saved["ids"])
    metric = predictions.spec.metric
    result = {"task": predictions.task, "metric": metric, "value": value, "n_images": n,
              **{k: v for k, v in predictions.metrics.items() if k != "test_metric"},
              "baselines": predictions.baseline_values, "beats_baseline": predictions.beats_baseline,
              "predictions": os.fspath(predictions.path)}  # fmt: skip
    out = Path(output_dir) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info(f"{predictions.task}: {metric} = {value:.6g} over {n} test images -> {out}")
    return result


def _affine(batch: Mapping[str, object], keys: Iterable[str], index: int) -> np.ndarray:
    """The voxel-to-world matrix of item ``index`` from the first MetaTensor among ``keys`` (identity if none)."""
    for key in keys:
        value = batch.get(key)
        affine = getattr(value, "affine", None)
        if affine is not None:
            affine = torch.as_tensor(affine)
            return (affine[index] if affine.ndim == 3 else affine).double().cpu().numpy()
    return np.eye(4)


def write_predictions(
    network: nn.Module,
    data_loader: Iterable[Mapping[str, object]],
    task: str,
    output_dir: str | os.PathLike,
    inferer: Callable[..., torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> Path:
    """Predict every item of ``data_loader`` and write the predictions into ``output_dir``; returns the folder.

    - classification: ``predictions.csv`` with ``id``, the class probabilities ``p0..p{K-1}`` and the argmax class
      (0: PI-RADS 1-2, 1: PI-RADS 3, 2: 4, 3: 5);
    - segmentation: ``<id>_lesion.nii.gz``, the argmax mask (uint8);
    - super-resolution, distortion correction, modality translation: ``<id>_pred.nii.gz``, the output clamped to
      [0, 1] (float32).

    Volumes are written on the grid the network saw (after the task pipeline's resampling and padding; the
    reference grid of the label when there is one, e.g. the 96-slice grid of super-resolution), with that grid's
    affine, so they overlay the preprocessed inputs in any viewer.
    """
    import nibabel as nib
    from monai.inferers import SimpleInferer

    spec = get_task(task)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    infer = inferer if inferer is not None else SimpleInferer()
    model = unwrap_model(network)
    device = resolve_device(device, model)
    rows: list[list[object]] = []
    n = 0
    with evaluating(model, device, amp):
        for batch in data_loader:
            image = plain_tensor(batch["image"]).to(device)
            ids = collect_ids(batch, "id", image.shape[0])
            pred = plain_tensor(infer(image, model)).float().cpu()
            for i, case in enumerate(ids):
                if spec.classification:
                    probs = torch.softmax(pred[i], dim=0).tolist()
                    rows.append([case, *(f"{p:.6f}" for p in probs), int(np.argmax(probs))])
                    continue
                if spec.metric == "dice":
                    volume, name = pred[i].argmax(dim=0).numpy().astype(np.uint8), f"{case}_lesion.nii.gz"
                else:
                    volume, name = pred[i, 0].clamp(0.0, 1.0).numpy().astype(np.float32), f"{case}_pred.nii.gz"
                nib.save(nib.Nifti1Image(volume, _affine(batch, ("label", "image"), i)), out / name)
            n += len(ids)
    if n == 0:
        raise ValueError("write_predictions: the data loader is empty")
    if spec.classification:
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", *(f"p{k}" for k in range(len(rows[0]) - 2)), "class"])
            writer.writerows(rows)
    logger.info(f"{task}: wrote the predictions of {n} images to {out}")
    return out


def init_distributed() -> None:
    """Start the process group of a ``torchrun`` launch: nccl on CUDA (one GPU per ``LOCAL_RANK``), gloo on CPU; then
    sync ignite's distributed context on every rank (its first use runs collectives, which deadlock if only rank 0
    reaches them)."""
    import ignite.distributed as idist

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    idist.sync()
