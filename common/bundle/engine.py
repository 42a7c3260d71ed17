"""Small pieces that let MONAI's own engines run the study's models (STYLE.md: configure MONAI/Ignite engines,
write custom ones only where a task needs it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["OutputLoss", "SaveOnCompleted"]


class OutputLoss(nn.Module):
    """Loss function for :class:`monai.engines.SupervisedTrainer` when the network computes its own objective
    (the pretraining models return ``{"loss": scalar, ...}``): returns ``prediction[key]``, ignoring the target."""

    def __init__(self, key: str = "loss") -> None:
        super().__init__()
        self.key = key

    def forward(self, prediction: Mapping[str, torch.Tensor], target: object = None) -> torch.Tensor:
        if not isinstance(prediction, Mapping) or self.key not in prediction:
            raise ValueError(f"OutputLoss: the network output has no {self.key!r} entry")
        return prediction[self.key]


class SaveOnCompleted:
    """Ignite handler: when the engine completes, call ``save(model, path)``, e.g. to export the pretrained
    encoder in the format the downstream bundles load. Attach it before the tracker, so the file exists when the
    tracker logs it as an artifact."""

    def __init__(self, save: Callable[[nn.Module, str], object], model: nn.Module, path: str | os.PathLike) -> None:
        self.save = save
        self.model = model
        self.path = os.fspath(path)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        model = self.model.module if hasattr(self.model, "module") else self.model  # unwrap DDP
        self.save(model, self.path)
