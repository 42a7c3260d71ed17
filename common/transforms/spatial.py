"""Grid alignment and explicit divisibility padding (DESIGN.md section 2: sizes the networks' strides accept).

Every volume of a case is first put on the T2W grid (real cohorts such as PI-CAI store ADC/DWI on their own grid),
then resized to the profile's ``spatial_size`` (MONAI ``Resized``, see ``common.transforms.pipelines``) and zero
padded up to ``divisible_by``. The padding is recorded in the sample so that predictions can be cropped back.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import DivisiblePad, MapTransform, ResampleToMatch, Transform
from monai.utils import ensure_tuple_rep

__all__ = ["AlignToReference", "AlignToReferenced", "PadToDivisibled", "divisible_padding"]

_PAD_METHODS = ("symmetric", "end")


def _affine(img: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(img, MetaTensor):
        raise ValueError(f"{what} must be a MetaTensor carrying its affine (load it with LoadImaged), got {type(img)}")
    return np.asarray(img.affine, dtype=np.float64)


class AlignToReference(Transform):
    """Resample a volume onto a reference grid only where the grids differ.

    ``(C, H', W', D')`` on its own grid -> ``(C, H, W, D)`` on the reference grid (MONAI ``ResampleToMatch``); the
    input is returned unchanged when shape and affine already match (within ``atol`` mm).

    Args:
        mode: interpolation, ``"bilinear"`` (trilinear in 3D, default) for images, ``"nearest"`` for label masks.
        padding_mode: value outside the source's field of view: ``"zeros"`` (default; no signal was acquired
            there), ``"border"`` or ``"reflection"``.
        atol: tolerance in mm (and for the direction cosines) under which two affines are the same grid.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", atol: float = 1e-3) -> None:
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}")
        if not atol >= 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.mode = mode
        self.padding_mode = padding_mode
        self.atol = float(atol)

    def needs_resampling(self, img: torch.Tensor, ref: torch.Tensor) -> bool:
        """Whether ``img``'s spatial shape or affine differs from ``ref``'s."""
        if tuple(img.shape[1:]) != tuple(ref.shape[1:]):
            return True
        return not np.allclose(_affine(img, "img"), _affine(ref, "ref"), atol=self.atol, rtol=0.0)

    def __call__(self, img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``(C, H', W', D')`` MetaTensor, reference ``(C_ref, H, W, D)`` MetaTensor -> ``(C, H, W, D)``."""
        if img.ndim != 4 or ref.ndim != 4:
            raise ValueError(
                f"expected channel-first 3D volumes (C, H, W, D), got {tuple(img.shape)} and {tuple(ref.shape)}"
            )
        if not self.needs_resampling(img, ref):
            return img
        out = ResampleToMatch(mode=self.mode, padding_mode=self.padding_mode)(img, img_dst=ref)
        return out.to(img.dtype)


class AlignToReferenced(MapTransform):
    """Dictionary wrapper of :class:`AlignToReference`: puts ``keys`` on the grid of ``data[ref_key]``.

    Args:
        keys: the volumes to align; ``ref_key`` among them is left as it is.
        ref_key: the reference volume (default ``"t2w"``).
        mode: one mode or one per key (``"bilinear"`` for images, ``"nearest"`` for masks).
        padding_mode: see :class:`AlignToReference`, default ``"zeros"``.
        atol: see :class:`AlignToReference`.
        allow_missing_keys: skip keys absent from the sample (e.g. a cohort without ``rectum``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "t2w",
        mode: Sequence[str] | str = "bilinear",
        padding_mode: str = "zeros",
        atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.aligners = {key: AlignToReference(m, padding_mode, atol) for key, m in zip(self.keys, modes, strict=True)}
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Each ``data[key]`` ``(C, H', W', D')`` -> ``(C, H, W, D)`` of ``data[ref_key]``."""
        d = dict(data)
        if self.ref_key not in d:
            raise ValueError(f"AlignToReferenced: reference key {self.ref_key!r} is missing; keys are {sorted(d)}")
        ref = d[self.ref_key]
        for key in self.key_iterator(d):
            if key != self.ref_key:
                d[key] = self.aligners[key](d[key], ref)
        return d


def divisible_padding(
    spatial_shape: Sequence[int], k: Sequence[int] | int, method: str = "symmetric"
) -> tuple[tuple[int, int], ...]:
    """Zero padding ``((before, after), ...)`` per spatial axis that makes every size a multiple of ``k``.

    ``symmetric`` puts ``total // 2`` before and the rest after (MONAI's ``DivisiblePad`` convention), ``end`` puts
    it all after. Example: shape ``(200, 200, 96)``, ``k=(32, 32, 16)`` -> ``((12, 12), (12, 12), (0, 0))``.
    """
    if method not in _PAD_METHODS:
        raise ValueError(f"method must be one of {_PAD_METHODS}, got {method!r}")
    ks = ensure_tuple_rep(k, len(spatial_shape))
    if any(int(v) < 1 for v in ks):
        raise ValueError(f"k must be >= 1 on every axis, got {k!r}")
    widths = []
    for size, div in zip(spatial_shape, ks, strict=True):
        total = -(-int(size) // int(div)) * int(div) - int(size)
        before = total // 2 if method == "symmetric" else 0
        widths.append((before, total - before))
    return tuple(widths)


class PadToDivisibled(MapTransform):
    """Zero pad ``keys`` to sizes divisible by ``k`` (MONAI ``DivisiblePad``) and record the padding added.

    ``(C, H, W, D)`` -> ``(C, H + ph, W + pw, D + pd)``; ``data[padding_key]`` becomes an int64 tensor ``(3, 2)``
    of ``(before, after)`` voxels per spatial axis (H, W, D), the same for every key, so a prediction is cropped
    back with ``pred[..., b0:H + b0, b1:W + b1, b2:D + b2]``.

    Args:
        keys: the volumes to pad; all must share one spatial shape.
        k: divisor per spatial axis (``Profile.divisible_by``) or one for all.
        method: ``"symmetric"`` (default) or ``"end"``; see :func:`divisible_padding`.
        padding_key: where the record is written (default ``"padding"``).
        allow_missing_keys: skip keys absent from the sample.
    """

    def __init__(
        self,
        keys: KeysCollection,
        k: Sequence[int] | int,
        method: str = "symmetric",
        padding_key: str = "padding",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        divisible_padding((1, 1, 1), k, method)  # validates k and method
        self.k = k
        self.method = method
        self.padding_key = padding_key
        self.padder = DivisiblePad(k=k, mode="constant", method=method)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Pads each ``data[key]`` and writes ``data[padding_key]``, ``(3, 2)`` int64."""
        d = dict(data)
        shapes = {key: tuple(d[key].shape[1:]) for key in self.key_iterator(d)}
        if not shapes:
            return d
        if len(set(shapes.values())) != 1:
            raise ValueError(f"PadToDivisibled: keys must share one spatial shape to share one padding, got {shapes}")
        widths = divisible_padding(next(iter(shapes.values())), self.k, self.method)
        for key in shapes:
            d[key] = self.padder(d[key])
        d[self.padding_key] = torch.tensor(widths, dtype=torch.int64)
        return d
