"""MONAI dictionary transforms and the five tasks' pipelines (DESIGN.md section 2, issue 2 item 5).

Families: ``spatial`` (alignment to the T2W grid, recorded divisibility padding), ``intensity`` (MR
normalisation), ``degradation`` (slice decimation, rectal distortion), ``channel`` (random diffusion channel),
``label`` (PI-RADS classes) and ``pipelines`` (``task_transforms`` per task).
"""

from __future__ import annotations

from common.transforms._random import case_rng
from common.transforms.channel import RandDiffusionChoiced
from common.transforms.degradation import (
    RectalDistortion,
    RectalDistortiond,
    RectalWeightd,
    SliceDecimate,
    SliceDecimated,
    anterior_posterior_axis,
    rectal_displacement,
    rectal_weight,
    warp_along_axis,
)
from common.transforms.intensity import NormalizeMRIntensity, NormalizeMRIntensityd, check_finite
from common.transforms.label import NUM_CLASSES, PIRADS_TO_CLASS, PiradsToClass, PiradsToClassd
from common.transforms.pipelines import (
    IMAGE_KEYS,
    MASK_KEYS,
    TASKS,
    pretrain_transforms,
    required_keys,
    task_transforms,
)
from common.transforms.spatial import AlignToReference, AlignToReferenced, PadToDivisibled, divisible_padding

__all__ = [
    "IMAGE_KEYS",
    "MASK_KEYS",
    "NUM_CLASSES",
    "PIRADS_TO_CLASS",
    "TASKS",
    "AlignToReference",
    "AlignToReferenced",
    "NormalizeMRIntensity",
    "NormalizeMRIntensityd",
    "PadToDivisibled",
    "PiradsToClass",
    "PiradsToClassd",
    "RandDiffusionChoiced",
    "RectalDistortion",
    "RectalDistortiond",
    "RectalWeightd",
    "SliceDecimate",
    "SliceDecimated",
    "anterior_posterior_axis",
    "case_rng",
    "check_finite",
    "divisible_padding",
    "rectal_displacement",
    "rectal_weight",
    "warp_along_axis",
    "required_keys",
    "pretrain_transforms",
    "task_transforms",
]
