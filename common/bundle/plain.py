"""Inference on plain images: a folder (or a list) of NIfTI files, no datalist, no labels, predictions written on
the input's own grid with the input's affine (README, "Share a bundle"; the exported bundles' ``inference.json``).

A case is one input image per volume the task reads (``common.tasks.Task.network_inputs``): a file
``<case>_<volume>.nii[.gz]`` (e.g. ``p001_t2w.nii.gz`` and ``p001_adc.nii.gz`` for segmentation), or, for a task
that reads only T2W, any NIfTI file, whose name without its extension is the case id. Segmentation reads T2W and one
diffusion volume: ADC when the case has one, else the high-b DWI (the study draws one of the two per case, DESIGN.md
section 2).

Each input goes through the study's preprocessing (RAS orientation, intensity normalisation, diffusion volume
aligned to T2W, resized to the profile's grid and padded, :func:`common.transforms.pipelines.task_transforms`);
the prediction is cropped, resized back to the input's voxel grid (nearest for masks) and reoriented to the file's
own axis order, and written with the file's affine. Super-resolution's input is the thick-slice volume itself, and
its output has twice the slices over the same extent (affine: half the slice step, origin moved by a quarter of
the thick slice, so that each pair of output slices averages to the input slice's position, as in the study's
slice averaging).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.profiles import Profile, get_profile
from common.tasks import get_task

from .engine import plain_tensor, unwrap_model
from .snapshots import evaluating, resolve_device

__all__ = ["PlainPredictionWriter", "plain_datalist", "plain_transforms", "predict_plain_images"]

logger = logging.getLogger(__name__)

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
_VOLUME = re.compile(r"^(?P<case>.+)_(?P<volume>t2w|adc|dwi|prostate|lesion|rectum)$", re.IGNORECASE)


def _files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _NIFTI.match(p.name))
            if not files:
                raise ValueError(f"dataset_dir {os.fspath(path)!r} holds no NIfTI file (*.nii or *.nii.gz)")
            return files
        paths = [path]
    else:
        paths = [Path(p) for p in source]
    missing = [os.fspath(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"dataset_dir: no such file or folder: {', '.join(missing)}")
    bad = [os.fspath(p) for p in paths if not _NIFTI.match(p.name)]
    if bad:
        raise ValueError(f"dataset_dir: not a NIfTI file (*.nii or *.nii.gz): {', '.join(bad)}")
    return paths


def plain_datalist(source: str | os.PathLike | Sequence[str | os.PathLike], task: str) -> list[dict[str, str]]:
    """The cases of ``source`` (a folder, searched recursively, one NIfTI file or a list of them) as datalist items
    ``{"id", <volume>: path, ...}`` with the volumes ``task`` reads (module docstring). Raises ``ValueError`` naming
    the case and the volume it lacks, and ``FileNotFoundError`` naming a missing path."""
    spec = get_task(task)
    wanted = spec.network_inputs
    cases: dict[str, dict[str, str]] = {}
    for path in _files(source):
        stem = _NIFTI.match(path.name)["stem"]
        named = _VOLUME.match(stem)
        case, volume = (named["case"], named["volume"].lower()) if named else (stem, "t2w")
        if volume not in ("t2w", "adc", "dwi"):
            continue  # masks are not inputs
        entry = cases.setdefault(case, {"id": case})
        if volume in entry:
            raise ValueError(f"case {case!r} has two {volume} files: {entry[volume]} and {os.fspath(path)}")
        entry[volume] = os.fspath(path)
    items = []
    for case, entry in sorted(cases.items()):
        if "t2w" not in entry:
            raise ValueError(f"case {case!r} has no T2W image (<case>_t2w.nii.gz); it has {sorted(entry)[:-1]}")
        item = {"id": case, "t2w": entry["t2w"]}
        if "adc" in wanted:
            diffusion = entry.get("adc") or entry.get("dwi")
            if diffusion is None:
                raise ValueError(f"case {case!r}: task {spec.id!r} reads T2W and ADC (or DWI), but only T2W was found")
            item["adc" if "adc" in entry else "dwi"] = diffusion
        items.append(item)
    return items


def plain_transforms(task: str, profile: str | Profile):
    """The study's preprocessing of ``task`` for plain images: ``{"id", "t2w"[, "adc" or "dwi"]}`` -> ``{"id",
    "image" (C, H', W', D'), "padding" (3, 2), "source"}``, ``source`` being the RAS-oriented T2W on its own grid
    (its affine and shape are where the prediction goes back to)."""
    from monai.transforms import Compose, ConcatItemsd, CopyItemsd, LoadImaged, Orientationd, Resized, SelectItemsd

    from common.transforms.intensity import NormalizeMRIntensityd
    from common.transforms.spatial import AlignToReferenced, PadToDivisibled

    spec = get_task(task)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    volumes = ["t2w", "adc", "dwi"]  # a case has T2W and at most one of ADC and DWI (plain_datalist)
    size, divisor = list(prof.spatial_size), list(prof.divisible_by)
    if spec.upsample != (1, 1, 1):  # the thick-slice input of super-resolution: the target grid divided per axis
        size = [max(1, s // f) for s, f in zip(size, spec.upsample, strict=True)]
        divisor = [max(1, k // f) for k, f in zip(divisor, spec.upsample, strict=True)]
    optional = {"allow_missing_keys": True}
    return Compose([
        LoadImaged(keys=volumes, image_only=True, ensure_channel_first=True, dtype=np.float32, **optional),
        Orientationd(keys=volumes, axcodes="RAS", labels=None, **optional),
        CopyItemsd(keys="t2w", names="source"),
        NormalizeMRIntensityd(keys=volumes, **optional),
        AlignToReferenced(keys=["adc", "dwi"], ref_key="t2w", mode="bilinear", **optional),
        Resized(keys=volumes, spatial_size=size, mode="trilinear", anti_aliasing=True, **optional),
        PadToDivisibled(keys=volumes, k=divisor, method="symmetric", padding_key="padding", **optional),
        ConcatItemsd(keys=volumes, name="image", dim=0, **optional),
        SelectItemsd(keys=["id", "image", "padding", "source"]),
    ])  # fmt: skip


def _output_grid(source, upsample: Sequence[int]) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Shape and RAS affine of the prediction of ``source`` (a RAS-oriented MetaTensor ``(1, H, W, D)``), and the
    affine of the file it was read from. An axis upsampled by ``f`` has ``f`` times the voxels over the same extent:
    its step divided by ``f`` and its first centre moved back by ``(f - 1) / (2 f)`` of the input step."""
    affine = np.asarray(torch.as_tensor(source.affine).double().cpu().numpy())
    original = np.asarray(torch.as_tensor(source.meta.get("original_affine", affine)).double().cpu().numpy())
    shape = tuple(int(n) * int(f) for n, f in zip(source.shape[1:], upsample, strict=True))
    out = affine.copy()
    for axis, f in enumerate(upsample):
        if f != 1:
            out[:3, 3] -= affine[:3, axis] * (f - 1) / (2 * f)
            out[:3, axis] = affine[:3, axis] / f
    return shape, out, original


def _to_file_orientation(volume: np.ndarray, ras_affine: np.ndarray, original: np.ndarray):
    """A NIfTI image of ``volume`` (RAS array, ``ras_affine``) in the axis order and directions of the input file."""
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    image = nib.Nifti1Image(volume, ras_affine)
    return image.as_reoriented(ornt_transform(io_orientation(ras_affine), io_orientation(original)))


class PlainPredictionWriter:
    """Writes each prediction of plain images on its input's grid (module docstring): an Ignite handler for the
    ``SupervisedEvaluator`` of an exported bundle's ``inference.json`` (batches of one case, ``decollate=False``),
    also called directly by :func:`predict_plain_images`.

    Outputs in ``output_dir``: classification ``predictions.csv`` (``id``, class probabilities ``p0..p{K-1}``, the
    argmax class: 0 PI-RADS 1-2, 1 PI-RADS 3, 2 PI-RADS 4, 3 PI-RADS 5); segmentation ``<id>_lesion.nii.gz`` (uint8);
    the image-to-image tasks ``<id>_pred.nii.gz`` (float32, normalised intensities in [0, 1]; super-resolution's
    with twice the input's slices)."""

    def __init__(self, task: str, output_dir: str | os.PathLike) -> None:
        self.spec = get_task(task)
        self.output_dir = Path(output_dir)
        self.rows: list[list[object]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.finish())

    def _iteration(self, engine) -> None:
        batch, pred = engine.state.batch, engine.state.output["pred"]
        ids = batch["id"]
        for i, case in enumerate([ids] if isinstance(ids, str) else ids):
            self.write(case, plain_tensor(pred[i]), batch["padding"][i], batch["source"][i])

    def write(self, case: str, pred: torch.Tensor, padding: torch.Tensor, source) -> None:
        """Write the prediction ``pred`` ``(C, H', W', D')`` (``(K,)`` logits for classification) of ``case``, whose
        input was padded by ``padding`` ``(3, 2)`` and read as ``source`` (RAS MetaTensor ``(1, H, W, D)``)."""
        import nibabel as nib

        self.output_dir.mkdir(parents=True, exist_ok=True)
        pred = pred.detach().float().cpu()
        if self.spec.classification:
            probs = torch.softmax(pred, dim=0).tolist()
            self.rows.append([case, *(f"{p:.6f}" for p in probs), int(np.argmax(probs))])
            return
        pad = torch.as_tensor(padding).long().cpu() * torch.tensor(self.spec.upsample).long()[:, None]
        crop = tuple(slice(int(b), n - int(a)) for (b, a), n in zip(pad.tolist(), pred.shape[1:], strict=True))
        pred = pred[(slice(None), *crop)]
        shape, ras_affine, original = _output_grid(source, self.spec.upsample)
        mask = self.spec.metric == "dice"
        if mask:
            pred = pred.argmax(dim=0, keepdim=True).float()
        resized = torch.nn.functional.interpolate(
            pred[None],
            size=shape,
            mode="nearest" if mask else "trilinear",
            **({} if mask else {"align_corners": False}),
        )[0, 0]
        volume = resized.round().to(torch.uint8) if mask else resized.clamp(0.0, 1.0)
        name = f"{case}_lesion.nii.gz" if mask else f"{case}_pred.nii.gz"
        nib.save(_to_file_orientation(volume.numpy(), ras_affine, original), self.output_dir / name)
        logger.info(f"{self.spec.id}: {case} -> {self.output_dir / name}")

    def finish(self) -> Path:
        """Write the classification CSV (nothing to add for the volume tasks); returns the output folder."""
        if self.spec.classification and self.rows:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "predictions.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", *(f"p{k}" for k in range(len(self.rows[0]) - 2)), "class"])
                writer.writerows(self.rows)
            logger.info(f"{self.spec.id}: {len(self.rows)} predictions -> {self.output_dir / 'predictions.csv'}")
        return self.output_dir


def predict_plain_images(
    network: nn.Module,
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike],
    task: str,
    profile: str | Profile,
    output_dir: str | os.PathLike,
    inferer: Callable[..., torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> Path:
    """Predict every case of ``dataset_dir`` (:func:`plain_datalist`) with ``network`` and write the predictions
    into ``output_dir`` on each input's own grid, with its affine (:class:`PlainPredictionWriter`); returns the
    folder."""
    from monai.inferers import SimpleInferer

    spec = get_task(task)
    items = plain_datalist(dataset_dir, spec.id)
    transform = plain_transforms(spec.id, profile)
    writer = PlainPredictionWriter(spec.id, output_dir)
    infer = inferer if inferer is not None else SimpleInferer()
    model = unwrap_model(network)
    device = resolve_device(device, model)
    with evaluating(model, device, amp):
        for item in items:
            data = transform(item)
            image = plain_tensor(data["image"]).unsqueeze(0).to(device)
            writer.write(item["id"], plain_tensor(infer(image, model))[0], data["padding"], data["source"])
    return writer.finish()
