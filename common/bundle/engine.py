"""Small pieces that let MONAI's own engines run the study's models (STYLE.md: configure MONAI/Ignite engines,
write custom ones only where a task needs it)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from common.contract import checkpoint_files, resume_checkpoint
from common.networks.checkpoint import atomic_save

__all__ = [
    "OutputLoss",
    "ResumeCheckpoint",
    "SaveCheckpoints",
    "SaveOnCompleted",
    "resume_checkpoint",
    "unwrap_model",
]


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


class ResumeCheckpoint:
    """Ignite handler that restores a run from ``checkpoint`` (network, optimiser, scheduler and the engine's own
    epoch / iteration) when the engine starts; a no-op when ``checkpoint`` is None.

    MONAI's ``CheckpointLoader`` needs the trainer in its ``load_dict``, which a bundle config cannot reference from
    the trainer's own handler list; this handler adds the engine when it is attached. Put it first in
    ``train#handlers``: handlers that look at ``engine.state.epoch`` at start (the MLflow tracker, the feature
    snapshots) then see the restored epoch.

    Args:
        objects: what the checkpoint holds besides the trainer, e.g. ``{"network", "optimizer", "lr_scheduler"}``.
        checkpoint: path of a ``CheckpointSaver`` file, or None. Read with ``weights_only=True``.
        map_location: device for the loaded tensors. Default ``"cpu"``.
    """

    def __init__(self, objects: Mapping[str, object], checkpoint: str | os.PathLike | None, map_location="cpu"):
        self.objects = dict(objects)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.map_location = map_location

    def attach(self, engine) -> None:
        if self.checkpoint is None:
            return
        from monai.handlers import CheckpointLoader

        from common.networks._state import load_weights, state_dict_problems

        saved = load_weights(self.checkpoint)
        for name, obj in self.objects.items():
            if isinstance(obj, nn.Module) and name in saved:
                problems = state_dict_problems(unwrap_model(obj).state_dict(), saved[name], strict=True)
                if problems:
                    raise ValueError(
                        f"cannot resume from {self.checkpoint}: its {name!r} is not this network (the config changed "
                        f"since it was written). Delete {Path(self.checkpoint).parent} to train anew, or pass another "
                        "--output_dir. Mismatches:\n  " + "\n  ".join(problems[:10])
                    )
        logging.getLogger(__name__).info(f"resuming from {self.checkpoint}")
        loader = CheckpointLoader(
            load_path=self.checkpoint, load_dict={**self.objects, "trainer": engine}, map_location=self.map_location
        )
        loader.attach(engine)


def unwrap_model(module: object) -> object:
    """The model inside a DDP / DataParallel wrapper; anything else unchanged."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel) else module


class SaveCheckpoints:
    """Ignite handler: at the end of every ``save_interval``-th epoch, write ``checkpoint_epoch=<k>.pt`` into
    ``save_dir`` atomically (a temporary file renamed into place), then delete all but the newest ``n_saved``.

    MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving leaves a truncated
    newest checkpoint and its restart fails; here a kill leaves the previous checkpoint intact. The file holds
    ``{name: obj.state_dict() for name in objects}`` plus ``"trainer"`` (the engine's epoch and iteration), the layout
    MONAI's ``CheckpointLoader`` and :class:`ResumeCheckpoint` read. Wrapped (DDP) networks are saved unwrapped; only
    rank 0 writes. Attach it after the MLflow tracker (``initialize`` in the bundles): an epoch is logged before it
    is checkpointed, and a resumed run skips epochs it already logged, so no epoch is lost or repeated.
    """

    def __init__(
        self, objects: Mapping[str, object], save_dir: str | os.PathLike, n_saved: int = 1, save_interval: int = 1
    ) -> None:
        if n_saved < 1 or save_interval < 1:
            raise ValueError(f"n_saved and save_interval must be >= 1, got {n_saved} and {save_interval}")
        self.objects = dict(objects)
        self.save_dir = Path(save_dir)
        self.n_saved = n_saved
        self.save_interval = save_interval

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def __call__(self, engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        state = {name: unwrap_model(obj).state_dict() for name, obj in self.objects.items()}
        state["trainer"] = engine.state_dict()
        atomic_save(state, self.save_dir / f"checkpoint_epoch={engine.state.epoch}.pt")
        for _, old in checkpoint_files(self.save_dir)[: -self.n_saved]:
            old.unlink(missing_ok=True)


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
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # rank 0 writes
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.save(unwrap_model(self.model), self.path)


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor -> a plain tensor (the engines and metrics need no metadata; plain tensors are faster)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def plain_prepare_batch(batchdata, device=None, non_blocking: bool = False, **kwargs):
    """MONAI's ``default_prepare_batch`` with the image and label as plain tensors: the networks do not need the
    MetaTensor metadata, and MetaTensor indexing of a batch with per-case metadata (e.g. the 2.5D slice stacks of
    ProViCNet) fails in MONAI. Returns ``(image, label)``."""
    from monai.engines import default_prepare_batch

    image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    return plain_tensor(image), plain_tensor(label)
