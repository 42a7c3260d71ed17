"""What every checkpoint loader shares: the safe file read, and the report of why a state dict does not fit."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

import torch


def load_weights(path_or_state: str | os.PathLike | Mapping[str, object]) -> Mapping[str, object]:
    """A checkpoint as a mapping: an in-memory one as it is, a file by ``torch.load(..., weights_only=True)``.

    The one non-tensor class allowed is ``argparse.Namespace``, which official ProFound checkpoints pickle beside the
    weights. Errors of ``torch.load`` (missing file, unsafe pickle) propagate; callers decide how to report them. A
    file that is no PyTorch checkpoint at all is a ``ValueError`` saying what it looks like (text, NumPy, ...).
    """
    if isinstance(path_or_state, Mapping):
        return path_or_state
    if not isinstance(path_or_state, str | os.PathLike):
        raise ValueError(f"expected a checkpoint path or a state dict, got {type(path_or_state).__name__}")
    path = os.fspath(path_or_state)
    kind = _foreign_kind(path)
    if kind is not None:
        raise ValueError(f"{path}: not a PyTorch checkpoint: {kind}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


#: keys under which training scripts nest a state dict (MONAI's CheckpointSaver, official scripts, ``torch.save`` of
#: a dict), tried in this order
WRAPPER_KEYS = ("network", "model", "state_dict", "model_state_dict")


def unwrap_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint, for every loader of the package.

    Descends :data:`WRAPPER_KEYS` while the mapping holds no tensor at its top level, keeps the tensor entries (an
    official ProFound checkpoint pickles its ``argparse.Namespace`` beside them) and strips DDP's ``module.`` prefix
    when every key has it. The input is not modified.

    Raises:
        ValueError: when ``checkpoint`` is no mapping, or no wrapper key leads to tensors (naming the keys it has).
    """
    while isinstance(checkpoint, Mapping) and not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        inner = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict in the checkpoint; its top-level keys are {sorted(checkpoint)[:10]}")
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a mapping of tensors, got {type(checkpoint).__name__}")
    state = {str(k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


#: leading bytes of formats that get passed as checkpoints by mistake
_MAGIC = {
    b"\x93NUMPY": "looks like a NumPy .npy array (load it with numpy and save a state dict with torch.save)",
    b"\x89HDF": "looks like an HDF5 file (e.g. Keras weights)",
    b"\x1f\x8b": "looks like a gzip archive (unpack it first)",
    b"\x89PNG": "looks like a PNG image",
    b"\xff\xd8\xff": "looks like a JPEG image",
    b"\x08\x01\x12": "looks like a protobuf / ONNX model",
}


def _foreign_kind(path: str) -> str | None:
    """What the file at ``path`` looks like when it is clearly no ``torch.save`` output (a zip archive or a legacy
    pickle), else None (missing files and PyTorch's own errors are left to ``torch.load``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip format, or a (legacy) pickle
        return None
    if not head:
        return "the file is empty"
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "looks like a safetensors file (load it with safetensors.torch.load_file)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary format (not a zip archive or pickle as torch.save writes)"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    kind = "HTML (a download page instead of the file?)" if first.lower().startswith(("<!doctype", "<html")) else "text"
    return f"looks like {kind}, starting {first!r}"


def state_dict_problems(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    strict: bool = True,
    scope: Iterable[str] | None = None,
    prefix: str = "",
) -> list[str]:
    """Lines naming what keeps ``state`` from loading into a network whose state dict is ``expected``; empty if it fits.

    Shape mismatches are always reported; missing keys (of ``scope``, default all of ``expected``) and unexpected
    keys (in ``state`` but not ``expected``) only when ``strict``. ``prefix`` is prepended to the names shown, for a
    submodule loaded on its own (e.g. ``"encoder."``).
    """
    wanted = list(expected) if scope is None else [k for k in expected if k in set(scope)]
    mismatched = [
        f"{prefix}{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != expected[k].shape
    ]
    lines = []
    missing = [prefix + k for k in wanted if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    if strict and missing:
        lines.append(f"missing keys ({len(missing)}): {missing}")
    if strict and unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    return lines
