"""Pretraining objectives of the two foundation models (issue: pretraining bundles; DESIGN.md section 1).

- :mod:`.fcmae`: ProFound's fully convolutional masked autoencoding (ConvNeXt V2 FCMAE with dense masking).
- :mod:`.dino`: ProViCNet's DINOv2-style self-distillation with the lesion-guided patch contrast.
- :mod:`.engine`: glue that lets MONAI's ``SupervisedTrainer`` run them (slice stacks, EMA teacher).

Each pretrainer exports its encoder in the format the downstream bundles load with
``common.networks.load_checkpoint(..., encoder_only=True)``.
"""

from __future__ import annotations

import os

from torch import nn

from common.networks.checkpoint import load_checkpoint
from common.networks.provicnet import ProViCNetEncoder

from .dino import (
    DINOHead,
    ProViCNetPretrainer,
    cosine_momentum,
    dino_cls_loss,
    save_student_checkpoint,
    supcon_loss,
)
from .engine import SliceStackBatch, TeacherEMAHandler
from .fcmae import FCMAEPretrainer, save_encoder_checkpoint

__all__ = [
    "DINOHead",
    "FCMAEPretrainer",
    "ProViCNetPretrainer",
    "SliceStackBatch",
    "TeacherEMAHandler",
    "cosine_momentum",
    "dino_cls_loss",
    "init_encoder",
    "save_encoder_checkpoint",
    "save_student_checkpoint",
    "shared_encoder",
    "supcon_loss",
]


def shared_encoder(model: FCMAEPretrainer | ProViCNetPretrainer, slice_size: int | None = None) -> nn.Module:
    """The network a pretraining bundle trains and shares (its ``network_def``; DESIGN.md section 7), sharing
    ``model``'s parameters: ProFound's encoder, ``(B, C, H, W, D) -> (B, dims[3])`` pooled features; ProViCNet's
    student encoder as a :class:`~common.networks.ProViCNetEncoder`, ``(B, 1, H, W, D) -> (B, E)`` (slices resized
    to ``slice_size``). Its state dict is what the bundle writes to ``models/model.pt``."""
    if isinstance(model, FCMAEPretrainer):
        return model.encoder
    if isinstance(model, ProViCNetPretrainer):
        student = model.student
        encoder = ProViCNetEncoder(
            n_modalities=1,
            n_slices=student.backbone.patch_embed.in_chans,
            slice_size=slice_size,
            patch_size=student.patch_size,
            backbone=student.backbone,
        )
        encoder.axis_pos, encoder.axis_max = student.axis_pos, student.axis_max
        return encoder
    raise ValueError(f"shared_encoder: {type(model).__name__} is not a pretrainer of this project")


def init_encoder(model: FCMAEPretrainer | ProViCNetPretrainer, checkpoint: str | os.PathLike | None):
    """Start pretraining from official weights instead of random ones (``init_ckpt`` in the bundles): loads a
    DINOv2 hub / ProViCNet file into the ProViCNet student (then copies it to the teacher), or an official ProFound
    FCMAE / dense file into the ProFound encoder. ``None`` keeps the random initialisation. Returns ``model``."""
    if checkpoint is None:
        return model
    if isinstance(model, ProViCNetPretrainer):
        load_checkpoint(model.student, checkpoint, encoder_only=True)
        model.update_teacher(0.0)
    elif isinstance(model, FCMAEPretrainer):
        load_checkpoint(model.encoder, checkpoint)
    else:
        raise ValueError(f"init_encoder: {type(model).__name__} is not a pretrainer of this project")
    return model
