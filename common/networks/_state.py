"""What every checkpoint loader shares: the safe file read, and the report of why a state dict does not fit."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

import torch


def load_weights(path_or_state: str | os.PathLike | Mapping[str, object]) -> Mapping[str, object]:
    """A checkpoint as a mapping: an in-memory one as it is, a file by ``torch.load(..., weights_only=True)``.

    The one non-tensor class allowed is ``argparse.Namespace``, which official ProFound checkpoints pickle beside the
    weights. Errors of ``torch.load`` (missing file, unsafe pickle) propagate; callers decide how to report them.
    """
    if isinstance(path_or_state, Mapping):
        return path_or_state
    if not isinstance(path_or_state, str | os.PathLike):
        raise ValueError(f"expected a checkpoint path or a state dict, got {type(path_or_state).__name__}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(os.fspath(path_or_state), map_location="cpu", weights_only=True)


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
