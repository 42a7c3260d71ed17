"""One checkpoint loader for every network of the study, whatever format the weights come in.

Formats (:data:`CHECKPOINT_FORMATS`), detected from the keys, never from the file name:

- ``profound_dense``: an official ProFound dense checkpoint (``ConvNeXtV2`` encoder, UperNet / UNETR / classifier
  model), or this project's ProFound weights (same names);
- ``profound_fcmae``: the official FCMAE pretraining checkpoint (MinkowskiEngine kernels under ``encoder.``);
- ``dinov2_hub``: a DINOv2 hub backbone (e.g. ``dinov2_vits14_reg4_pretrain.pth``);
- ``provicnet_official``: an official ProViCNet checkpoint, or this project's ProViCNet weights (same names);
- ``state_dict``: any other state dict (the specialised models), loaded by name.

Wrappers are unwrapped first: MONAI ``CheckpointSaver`` files (``{"network": ..., "optimizer": ...}``),
``{"model": ...}``, ``{"state_dict": ...}``, ``{"model_state_dict": ...}``, and DDP's ``module.`` prefix.
Files are read with ``torch.load(..., weights_only=True)`` only; the one non-tensor class allowed is
``argparse.Namespace``, which official ProFound checkpoints pickle beside the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ._state import load_weights, state_dict_problems, unwrap_state_dict
from .dinov2 import DinoVisionTransformer
from .profound import ProFoundEncoder, detect_profound_format, load_profound_checkpoint
from .provicnet import detect_provicnet_format, load_provicnet_checkpoint

__all__ = ["CHECKPOINT_FORMATS", "detect_checkpoint_format", "load_checkpoint", "read_checkpoint"]

CHECKPOINT_FORMATS = ("profound_dense", "profound_fcmae", "dinov2_hub", "provicnet_official", "state_dict")


def read_checkpoint(path_or_state: str | os.PathLike | Mapping[str, object]) -> Mapping[str, object]:
    """Read a checkpoint safely (``weights_only=True``); a missing or unreadable file, or one that holds no mapping,
    is a ``ValueError`` naming it. An in-memory mapping is returned as it is."""
    if isinstance(path_or_state, Mapping):
        return path_or_state
    path = os.fspath(path_or_state) if isinstance(path_or_state, str | os.PathLike) else None
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path!r}")
    try:
        checkpoint = load_weights(path_or_state)
    except ValueError:
        raise
    except Exception as err:  # pickle, zip and unsafe-global errors all mean: not a checkpoint we can trust
        raise ValueError(f"cannot read checkpoint {path!r} with weights_only=True: {err}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a mapping of weights")
    return checkpoint


def detect_checkpoint_format(checkpoint: Mapping[str, object]) -> str:
    """Return the format of a checkpoint (one of :data:`CHECKPOINT_FORMATS`) from its keys."""
    state = unwrap_state_dict(checkpoint)
    # DINOv2 first: a hub backbone has a top-level mask_token too, which ProFound's rule reads as FCMAE
    for detect, prefix in ((detect_provicnet_format, ""), (detect_profound_format, "profound_")):
        try:
            return prefix + detect(state)
        except ValueError:
            continue
    return "state_dict"


def _family(model: nn.Module) -> str:
    if isinstance(model, ProFoundEncoder) or isinstance(getattr(model, "encoder", None), ProFoundEncoder):
        return "profound"
    if isinstance(model, DinoVisionTransformer) or isinstance(getattr(model, "backbone", None), DinoVisionTransformer):
        return "provicnet"
    return "other"


def _load_by_name(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, encoder_only: bool = False) -> None:
    """Load by parameter name. With ``encoder_only`` (a foundation model of your own, README "Bring your own
    foundation model") only the model's ``encoder.*`` entries are expected, from a checkpoint of the whole model or of
    the encoder alone (keys without the ``encoder.`` prefix)."""
    expected = model.state_dict()
    if encoder_only and any(k.startswith("encoder.") for k in expected):
        expected = {k: v for k, v in expected.items() if k.startswith("encoder.")}
        if not any(k.startswith("encoder.") for k in state):
            state = {f"encoder.{k}": v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    problems = state_dict_problems(expected, state, strict)
    if problems:
        raise ValueError("\n".join([f"checkpoint does not fit {type(model).__name__}.", *problems]))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def load_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, object],
    strict: bool = True,
    encoder_only: bool = False,
    stem_channels: Sequence[int | None] | None = None,
) -> nn.Module:
    """Load weights of any supported format into ``model`` and return ``model``.

    ProFound formats go to :func:`~common.networks.profound.load_profound_checkpoint` (FCMAE conversion,
    encoder-only routing), DINOv2 / ProViCNet formats to :func:`~common.networks.provicnet.
    load_provicnet_checkpoint` (position-embedding resampling, modality channels); anything else loads by name.
    A checkpoint of one FM into the other FM's network is refused. Every failure is a ``ValueError`` that names the
    file (when given one), the format, and the missing / unexpected keys and shape mismatches.

    Input channels follow the network: a ProFound stem (dense or FCMAE) pretrained on other channels is adapted by
    :func:`~common.networks.profound.adapt_profound_stem` (each new channel gets the channel-mean kernel), a ProViCNet
    patch embedding is tiled over modalities; both keep the response to an image repeated on every channel.
    ``stem_channels`` instead gives each ProFound input channel the kernel of a pretrained channel (None: the
    channel-mean kernel), e.g. ``[0]`` for a T2W-only network and an official (T2W, DWI, ADC) stem: the official
    code's ``[T2W, 0, 0]`` input. It is refused for other FMs.

    ``encoder_only=True`` loads only the pretrained encoder (ProFound ``encoder.*``; ProViCNet ``backbone.*`` and the
    slice-position tokens) and leaves the task head as initialised: the finetune bundles' case, whose pretrained
    checkpoint has no head for their task. (A ProFound encoder-only file is routed to the encoder either way.)
    """
    source = os.fspath(path_or_state) if isinstance(path_or_state, str | os.PathLike) else "in-memory checkpoint"
    raw = read_checkpoint(path_or_state)
    try:
        state = unwrap_state_dict(raw)
        fmt = detect_checkpoint_format(state)
        family = _family(model)
        if (
            fmt.startswith("profound_")
            and family != "profound"
            or fmt in ("dinov2_hub", "provicnet_official")
            and (family != "provicnet")
        ):
            raise ValueError(f"a {fmt} checkpoint cannot be loaded into {type(model).__name__}")
        if stem_channels is not None and not (family == "profound" and fmt.startswith("profound_")):
            raise ValueError(f"stem_channels applies to ProFound checkpoints only, not to a {fmt} checkpoint.")
        if family == "profound" and fmt.startswith("profound_"):
            if encoder_only and fmt == "profound_dense" and any(k.startswith("encoder.") for k in state):
                state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
            load_profound_checkpoint(model, state, strict=strict, adapt_stem=True, stem_channels=stem_channels)
        elif family == "provicnet" and fmt in ("dinov2_hub", "provicnet_official"):
            load_provicnet_checkpoint(model, state, strict=strict, encoder_only=encoder_only)
        else:
            _load_by_name(model, state, strict, encoder_only)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    return model


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to a temporary file beside ``path``, renamed into place: a process killed while saving
    leaves the previous file intact (MONAI's ``CheckpointSaver`` writes in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or SIGTERM mid-write: leave no half file behind
        tmp.unlink(missing_ok=True)
        raise
