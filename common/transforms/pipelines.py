"""The five downstream tasks' MONAI pipelines (paper section 3.1, DESIGN.md section 2).

``task_transforms(task)`` maps a datalist entry ``{"id", "t2w", "adc", "dwi", "prostate", "lesion", "rectum",
"pirads"}`` (file paths, PI-RADS int) to ``{"image", "label", "id", "padding", ...}``:

============================  ==========================================  =========================================
task                          image                                       label
============================  ==========================================  =========================================
``classification``            T2W ``(1, H, W, D)``                        PI-RADS class 0..3, 0-d int64
``segmentation``              [T2W, ADC or DWI] ``(2, H, W, D)``          lesion mask ``(1, H, W, D)`` {0, 1}
``super_resolution``          T2W, slices decimated ``(1, H, W, D/2)``    T2W ``(1, H, W, D)``
``distortion_correction``     T2W warped at the rectum ``(1, H, W, D)``   T2W ``(1, H, W, D)``
``modality_translation``      T2W (the condition) ``(1, H, W, D)``        high-b DWI ``(1, H, W, D)``
============================  ==========================================  =========================================

Volumes are float32 MetaTensors; images in ``[0, 1]`` (``NormalizeMRIntensityd``). ``(H, W, D)`` is the profile's
``padded_size``: every volume is reoriented to RAS, normalised on its own grid, resampled onto the T2W grid, resized
to ``Profile.spatial_size`` (trilinear with anti-aliasing for images, nearest for masks) and zero padded
symmetrically to ``Profile.divisible_by``; ``padding`` ``(3, 2)`` int64 records the ``(before, after)`` voxels
added per axis (on the label grid for super-resolution, whose image is decimated after padding). ``segmentation``
also returns ``diffusion`` (``"adc"`` or ``"dwi"``).

The deterministic steps come first, so ``monai.data.CacheDataset`` caches loading and resampling; the random steps
follow: left-right flips when training (``flip_prob``), the rectal distortion and the diffusion choice. With
``train=False`` there are no flips and the distortion and diffusion choice are drawn from ``(seed, case id)``, so
evaluation data are identical in every run and every order.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    ConcatItemsd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    Resized,
    SelectItemsd,
    Transform,
)
from monai.utils.module import locate

from common.contract import DIFFUSION_KEY
from common.profiles import Profile, get_profile
from common.tasks import get_task, task_ids
from common.transforms.channel import RandDiffusionChoiced
from common.transforms.degradation import RectalDistortiond, RectalWeightd, SliceDecimated
from common.transforms.intensity import NormalizeMRIntensityd
from common.transforms.label import PiradsToClassd
from common.transforms.spatial import AlignToReferenced, PadToDivisibled

__all__ = ["IMAGE_KEYS", "MASK_KEYS", "TASKS", "pretrain_transforms", "required_keys", "task_transforms"]

TASKS: tuple[str, ...] = task_ids()
IMAGE_KEYS: tuple[str, ...] = ("t2w", "adc", "dwi")
MASK_KEYS: tuple[str, ...] = ("prostate", "lesion", "rectum")

_TASK_VOLUMES: dict[str, tuple[str, ...]] = {task: get_task(task).volumes for task in TASKS}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def required_keys(task: str) -> tuple[str, ...]:
    """Datalist keys ``task`` reads: ``"id"``, its volumes, and ``"pirads"`` for classification."""
    _check_task(task)
    return get_task(task).required_keys


class _MoveItemsd(MapTransform):
    """``data[name] = data.pop(key)``: renames without copying (deterministic, cheap)."""

    def __init__(self, keys: Sequence[str], names: Sequence[str]) -> None:
        super().__init__(keys)
        self.names = tuple(names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, name in zip(self.keys, self.names, strict=True):
            d[name] = d.pop(key)
        return d


class _PerCase(Transform):
    """A random step that draws from ``(seed, case id)`` (``deterministic_per_case``, evaluation), wrapped so that it
    is no ``RandomizableTrait``: its output is the same every epoch, so ``CacheDataset`` caches it with the
    deterministic head instead of redoing it on every validation and test pass (``bench/preprocessing.py``)."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.transform(data)


class _RequireKeysd(MapTransform):
    """Raise ``ValueError`` naming the case and the task when a datalist entry lacks a key the task reads."""

    def __init__(self, keys: Sequence[str], task: str) -> None:
        super().__init__(keys)
        self.task = task

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        missing = [k for k in self.keys if data.get(k) is None]
        if missing:
            raise ValueError(
                f"case {str(data.get('id', '<no id>'))!r} lacks {missing}, which task {self.task!r} needs "
                f"(it has {sorted(data)})"
            )
        return dict(data)


def _volume_keys(task: str, keys: Sequence[str] | None) -> tuple[str, ...]:
    needed = _TASK_VOLUMES[task]
    if keys is None:
        return needed
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    unknown = [k for k in keys if k not in IMAGE_KEYS + MASK_KEYS]
    if unknown:
        raise ValueError(f"unknown volume keys {unknown}; volumes are {IMAGE_KEYS + MASK_KEYS}")
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(f"task {task!r} needs the volumes {needed}; keys lacks {missing}")
    return needed + tuple(dict.fromkeys(k for k in keys if k not in needed))


def _preprocess_steps(volumes: Sequence[str], prof: Profile) -> list:
    """Load, reorient to RAS, normalise on the native grid, align to T2W, resize to the profile and pad."""
    images = [k for k in volumes if k in IMAGE_KEYS]
    is_mask = [k in MASK_KEYS for k in volumes]
    steps: list = [
        LoadImaged(keys=volumes, image_only=True, ensure_channel_first=True, dtype=np.float32),
        Orientationd(keys=volumes, axcodes="RAS", labels=None),
        NormalizeMRIntensityd(keys=images),
    ]
    others = [k for k in volumes if k != "t2w"]
    if others:
        steps.append(
            AlignToReferenced(
                keys=others, ref_key="t2w", mode=["nearest" if k in MASK_KEYS else "bilinear" for k in others]
            )
        )
    steps += [
        Resized(
            keys=volumes,
            spatial_size=prof.spatial_size,
            mode=["nearest" if m else "trilinear" for m in is_mask],
            anti_aliasing=[not m for m in is_mask],
        ),
        PadToDivisibled(keys=volumes, k=prof.divisible_by, method="symmetric", padding_key="padding"),
    ]
    return steps


def _resolve_profile(profile: str | Profile) -> Profile:
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if not isinstance(prof, Profile):
        raise ValueError(f"profile must be a profile name or a Profile, got {type(profile)}")
    return prof


def pretrain_transforms(
    profile: str | Profile = "smoke",
    seed: int = 0,
    train: bool = True,
    modalities: Sequence[str] = ("t2w", "dwi", "adc"),
    lesion: bool = False,
    flip_prob: float = 0.5,
) -> Compose:
    """The pretraining bundles' pipeline: unlabeled volumes -> ``{"image": (M, H, W, D), "id", "padding"}``, plus
    ``"lesion"`` ``(1, H, W, D)`` when ``lesion`` (ProViCNet's lesion-guided patch contrast needs it; ProFound's
    masked autoencoding reads no label). ``modalities`` are stacked in order as channels (ProFound's official input
    is T2W, DWI, ADC). Preprocessing is the tasks' (module docstring); training adds left-right flips.
    """
    prof = _resolve_profile(profile)
    unknown = [k for k in modalities if k not in IMAGE_KEYS]
    if not modalities or unknown:
        raise ValueError(f"modalities must be a non-empty subset of {IMAGE_KEYS}, got {tuple(modalities)}")
    volumes = tuple(dict.fromkeys(["t2w", *modalities])) + (("lesion",) if lesion else ())
    steps: list = [
        _RequireKeysd(["id", *volumes], "pretraining"),
        *_preprocess_steps(volumes, prof),
        ConcatItemsd(keys=list(modalities), name="image", dim=0),
    ]
    if train and flip_prob > 0:
        steps.append(RandFlipd(keys=["image", *(["lesion"] if lesion else [])], prob=flip_prob, spatial_axis=0))
    steps.append(SelectItemsd(keys=["image", "id", "padding", *(["lesion"] if lesion else [])]))
    pipeline = Compose(steps)
    pipeline.set_random_state(seed=seed)
    return pipeline


@dataclass(frozen=True)
class TaskSteps:
    """What one task adds to the shared preprocessing (:func:`task_transforms`): deterministic ``steps`` that make
    ``image`` and ``label``, the keys a training flip moves together, ``random_steps`` after the flips (cached
    datasets cache everything before them) and the extra keys it records."""

    steps: list
    flip_keys: tuple[str, ...]
    random_steps: list = field(default_factory=list)
    records: tuple[str, ...] = ()


def classification_steps(seed: int, deterministic: bool) -> TaskSteps:
    """T2W -> ``image``; PI-RADS -> class ``label`` 0..3."""
    return TaskSteps([PiradsToClassd(keys="pirads", output_keys="label"), _MoveItemsd(["t2w"], ["image"])], ("image",))


def segmentation_steps(seed: int, deterministic: bool) -> TaskSteps:
    """Lesion -> ``label``; ``image`` = [T2W, ADC or DWI], the diffusion map drawn per case (recorded)."""
    choose = RandDiffusionChoiced(seed=seed, deterministic_per_case=deterministic)
    return TaskSteps([_MoveItemsd(["lesion"], ["label"])], ("t2w", "adc", "dwi", "label"), [choose], (DIFFUSION_KEY,))


def super_resolution_steps(seed: int, deterministic: bool) -> TaskSteps:
    """T2W with pairs of slices averaged -> ``image``; T2W -> ``label``."""
    return TaskSteps([SliceDecimated(keys="t2w", factor=2, mode="average", output_keys="image"),
                      _MoveItemsd(["t2w"], ["label"])], ("image", "label"))  # fmt: skip


def distortion_correction_steps(seed: int, deterministic: bool) -> TaskSteps:
    """T2W warped at the rectum (amplitude drawn per case, 3-8 mm) -> ``image``; T2W -> ``label``.

    The field has one polarity for every case (``random_sign=False``), as a protocol's phase-encoding direction and
    polarity are fixed: the amplitude varies between cases, the direction does not. With a random sign per case the
    direction of the correction cannot be told from the distorted image and the best correction on average is none
    (every demo model stayed at the distorted input's SSIM, 0.93194). With one polarity, warping the distorted image
    back by the mean amplitude (5.5 mm), knowing nothing of the case, raises SSIM from 0.928 to 0.982 (8 demo test
    cases): the correction can be learnt."""
    distort = RectalDistortiond(keys="image", rectum_key="rectum", target_keys="label", seed=seed, random_sign=False,
                                deterministic_per_case=deterministic, weight_key="rectal_weight")  # fmt: skip
    # the field's shape is the same every epoch: computed once (cached), only its amplitude is drawn per epoch
    weight = RectalWeightd(rectum_key="rectum", weight_key="rectal_weight")
    return TaskSteps([_MoveItemsd(["t2w"], ["image"]), weight], ("image", "rectum", "rectal_weight"), [distort])


def modality_translation_steps(seed: int, deterministic: bool) -> TaskSteps:
    """T2W -> ``image`` (the condition); high-b DWI -> ``label``."""
    return TaskSteps([_MoveItemsd(["t2w", "dwi"], ["image", "label"])], ("image", "label"))


def task_transforms(
    task: str,
    profile: str | Profile = "smoke",
    seed: int = 0,
    train: bool = True,
    keys: Sequence[str] | None = None,
    flip_prob: float = 0.5,
) -> Compose:
    """The pipeline of ``task``: datalist entry -> ``{"image", "label", "id", "padding", ...}`` (module docstring).

    Args:
        task: one of ``TASKS``.
        profile: a profile name or ``Profile``; sets ``spatial_size`` and ``divisible_by``.
        seed: seeds the random steps (per-case draws when ``train=False``, the transforms' generators otherwise).
        train: ``True`` draws fresh degradations and flips each epoch; ``False`` is deterministic per case.
        keys: volumes to load; default the task's own (``required_keys``). Extra volumes (e.g. ``"prostate"``)
            are resampled and padded like the others and returned under their own names.
        flip_prob: probability of a left-right flip of all volumes when training (default 0.5; 0 disables).
    """
    _check_task(task)
    prof = _resolve_profile(profile)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    volumes = _volume_keys(task, keys)
    extras = volumes[len(_TASK_VOLUMES[task]) :]

    needed = [k for k in required_keys(task) if k != "id" or not train] + list(extras)
    steps: list = [_RequireKeysd(needed, task), *_preprocess_steps(volumes, prof)]

    builder = locate(get_task(task).pipeline)
    task_steps = builder(seed=seed, deterministic=not train)
    steps += task_steps.steps
    flip_keys, random_steps, records = task_steps.flip_keys, task_steps.random_steps, task_steps.records

    if train and flip_prob > 0:
        steps.append(RandFlipd(keys=[*flip_keys, *extras], prob=flip_prob, spatial_axis=0))
    steps += random_steps if train else [_PerCase(t) for t in random_steps]
    steps.append(SelectItemsd(keys=["image", "label", "id", "padding", *records, *extras], allow_missing_keys=True))
    pipeline = Compose(steps)
    pipeline.set_random_state(seed=seed)
    return pipeline
