"""Pretraining objectives of the two foundation models (issue: pretraining bundles; DESIGN.md section 1).

- :mod:`.fcmae`: ProFound's fully convolutional masked autoencoding (ConvNeXt V2 FCMAE with dense masking).
- :mod:`.dino`: ProViCNet's DINOv2-style self-distillation with the lesion-guided patch contrast.
- :mod:`.engine`: glue that lets MONAI's ``SupervisedTrainer`` run them (slice stacks, EMA teacher).

Each pretrainer exports its encoder in the format the downstream bundles load with
``common.networks.load_checkpoint(..., encoder_only=True)``.
"""

from __future__ import annotations

import os

from common.networks.checkpoint import load_checkpoint

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
    "supcon_loss",
]


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
