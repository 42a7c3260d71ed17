"""Pairing two feature snapshots by image id (DESIGN.md section 4: the same test images, in the same order).

Every snapshot artifact stores its features with the ids of the images they came from. Two snapshots are compared
only on the same set of images; if one run wrote them in another order they are reordered here, and if the sets
differ the comparison is refused rather than silently done on the intersection.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["pair_by_ids"]

_SHOWN = 5  # offending ids named in an error message


def _as_rows(feat: ArrayLike | torch.Tensor, name: str) -> np.ndarray:
    """``feat`` as a 2-D numpy array ``(N, d)`` (a torch tensor is detached and moved to the CPU)."""
    a = feat.detach().cpu().numpy() if isinstance(feat, torch.Tensor) else np.asarray(feat)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) array of feature rows, got shape {a.shape}.")
    return a


def _as_ids(ids: Sequence[str], n_rows: int, name: str) -> list[str]:
    """``ids`` as a list of str with one entry per feature row and no duplicates."""
    if isinstance(ids, str):
        raise ValueError(f"{name} must be a sequence of image ids, not a single string.")
    out = [str(i) for i in ids]
    if len(out) != n_rows:
        raise ValueError(f"{name} has {len(out)} ids for {n_rows} feature rows.")
    duplicates = sorted(i for i, c in Counter(out).items() if c > 1)
    if duplicates:
        raise ValueError(f"{name} has duplicate image ids ({len(duplicates)}), e.g. {duplicates[:_SHOWN]}.")
    return out


def pair_by_ids(
    feat_a: ArrayLike | torch.Tensor,
    ids_a: Sequence[str],
    feat_b: ArrayLike | torch.Tensor,
    ids_b: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Align two snapshots of the same test images row by row, in the order of ``ids_a``.

    Ids are compared as strings (``str(id)``). The feature widths may differ (CKA compares layers of different size).

    Args:
        feat_a: ``(N, d_a)`` features, row ``i`` belonging to image ``ids_a[i]``.
        ids_a: ``N`` unique image ids.
        feat_b: ``(N, d_b)`` features, row ``j`` belonging to image ``ids_b[j]``.
        ids_b: the same ``N`` image ids as ``ids_a``, in any order.

    Returns:
        ``(a, b, ids)``: ``a`` is ``feat_a`` as a numpy array, ``b`` is ``feat_b`` reordered so that ``b[i]`` belongs
        to ``ids[i]``, and ``ids`` is ``ids_a`` as a list of str. The inputs are not modified.

    Raises:
        ValueError: if a features array is not 2-D, an id list does not match its row count or has duplicates, or
            the two id sets differ (the message names up to five ids missing on each side).
    """
    a = _as_rows(feat_a, "feat_a")
    b = _as_rows(feat_b, "feat_b")
    ids = _as_ids(ids_a, a.shape[0], "ids_a")
    other = _as_ids(ids_b, b.shape[0], "ids_b")
    set_a, set_b = set(ids), set(other)
    if set_a != set_b:
        only_a = sorted(set_a - set_b)
        only_b = sorted(set_b - set_a)
        raise ValueError(
            f"the two snapshots cover different images: {len(only_a)} only in ids_a (e.g. {only_a[:_SHOWN]}), "
            f"{len(only_b)} only in ids_b (e.g. {only_b[:_SHOWN]})."
        )
    position = {image_id: j for j, image_id in enumerate(other)}
    order = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
    return a.copy(), b[order], ids
