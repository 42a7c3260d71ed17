"""The two synthetic degradations of the study's image-to-image tasks (paper section 3.1, DESIGN.md section 2).

- Super-resolution: through-plane slice decimation, 96 -> 48 slices in the paper profile (factor 2 along D).
- Distortion correction: a smooth displacement field that is largest at the rectum and decays with distance from
  it, like the susceptibility distortion that rectal air causes in EPI along the phase-encoding direction, which in
  axial prostate MRI is the anterior-posterior (AP) axis.

Both are seeded; the distortion draws its amplitude per sample, either from its own generator (training
augmentation) or from ``(seed, case id)`` (``deterministic_per_case=True``) so that evaluation data are the same in
every run and every order.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import ensure_tuple
from scipy import ndimage

from common.transforms._random import case_id_of, case_rng, describe_case

__all__ = [
    "RectalDistortion",
    "RectalDistortiond",
    "SliceDecimate",
    "SliceDecimated",
    "anterior_posterior_axis",
    "RectalWeightd",
    "rectal_displacement",
    "rectal_weight",
    "warp_along_axis",
]

_DECIMATION_MODES = ("average", "skip")


class SliceDecimate(Transform):
    """Keep one slice in ``factor`` along D, or average each run of ``factor`` slices into one thick slice.

    ``(C, H, W, D)`` -> ``(C, H, W, D // factor)``; D must be a multiple of ``factor``. A MetaTensor's affine is
    updated: the slice spacing grows by ``factor`` and the first slice centre moves to slice ``offset`` (``skip``)
    or to the centre of the first averaged run, ``(factor - 1) / 2`` (``average``).

    Args:
        factor: decimation factor (default 2, 96 -> 48 slices in the paper profile).
        mode: ``"average"`` (default): the mean of ``factor`` consecutive slices, a thick slice of ``factor``
            times the thickness with the same coverage, as a thick-slice acquisition would give (its slice profile
            integrates over the thickness); ``"skip"``: slices ``offset, offset + factor, ...``, thin slices with gaps.
        offset: first kept slice in ``skip`` mode, ``0 <= offset < factor`` (default 0).
    """

    def __init__(self, factor: int = 2, mode: str = "average", offset: int = 0) -> None:
        if not isinstance(factor, int | np.integer) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        if mode not in _DECIMATION_MODES:
            raise ValueError(f"mode must be one of {_DECIMATION_MODES}, got {mode!r}")
        if not 0 <= offset < factor:
            raise ValueError(f"offset must satisfy 0 <= offset < factor={factor}, got {offset}")
        if mode == "average" and offset != 0:
            raise ValueError("offset applies to mode='skip' only")
        self.factor = int(factor)
        self.mode = mode
        self.offset = int(offset)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``(C, H, W, D)`` -> ``(C, H, W, D // factor)``."""
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first volume (C, H, W, D), got shape {tuple(img.shape)}")
        depth = img.shape[-1]
        if depth % self.factor:
            raise ValueError(f"D={depth} slices is not a multiple of the decimation factor {self.factor}")
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if self.mode == "skip":
            out = x[..., self.offset :: self.factor].clone()
            shift = float(self.offset)
        else:
            out = x.reshape(*x.shape[:-1], depth // self.factor, self.factor).float().mean(-1).to(x.dtype)
            shift = (self.factor - 1) / 2.0
        if not isinstance(img, MetaTensor):
            return out
        affine = img.affine.clone().double()
        affine[:3, 3] += shift * affine[:3, 2]
        affine[:3, 2] *= self.factor
        result = MetaTensor(out, meta=dict(img.meta))
        result.affine = affine.to(img.affine.dtype)
        return result


class SliceDecimated(MapTransform):
    """Dictionary wrapper of :class:`SliceDecimate`.

    Args:
        keys: volumes to decimate.
        factor, mode, offset: see :class:`SliceDecimate` (default factor 2, ``"average"``).
        output_keys: where the decimated volumes go, one per key; ``None`` (default) replaces the inputs.
        allow_missing_keys: skip keys absent from the sample.
    """

    def __init__(
        self,
        keys: KeysCollection,
        factor: int = 2,
        mode: str = "average",
        offset: int = 0,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.decimate = SliceDecimate(factor, mode, offset)
        self.output_keys = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"need one output key per key, got keys={self.keys}, output_keys={self.output_keys}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """``data[key]`` ``(C, H, W, D)`` -> ``data[output_key]`` ``(C, H, W, D // factor)``."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.decimate(d[key])
        return d


def anterior_posterior_axis(affine: np.ndarray | torch.Tensor | None) -> int:
    """The in-plane voxel axis (0 = H or 1 = W) most aligned with the world anterior-posterior axis.

    MONAI affines map voxels to RAS+ world coordinates, whose second row is A-P; ``None`` gives 1 (the W axis of
    an axial RAS volume).
    """
    if affine is None:
        return 1
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(a[1, :2]) / np.maximum(np.linalg.norm(a[:, :2], axis=0), 1e-12)
    return int(np.argmax(cosines))


def _rectal_weight64(rectum: np.ndarray | torch.Tensor, spacing: Sequence[float], decay_mm: float,
                     smooth_mm: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(weight (H, W, D) float64 in [0, 1], spacing (3,))``, see :func:`rectal_weight`."""
    mask = np.asarray(torch.as_tensor(rectum).detach().cpu().numpy()) > 0.5
    if mask.ndim == 4:
        if mask.shape[0] != 1:
            raise ValueError(f"the rectal mask must have one channel, got shape {mask.shape}")
        mask = mask[0]
    if mask.ndim != 3:
        raise ValueError(f"the rectal mask must be (1, H, W, D) or (H, W, D), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the rectal mask is empty, so there is nowhere to centre the distortion")
    spacing = np.asarray([float(s) for s in spacing], dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise ValueError(f"spacing must be three positive values in mm, got {spacing.tolist()}")
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    weight = np.exp(-(distance**2) / (2.0 * decay_mm**2))
    if smooth_mm > 0:
        weight = ndimage.gaussian_filter(weight, sigma=smooth_mm / spacing, mode="nearest")
    return weight, spacing


def voxel_spacing(img: torch.Tensor) -> tuple[float, float, float]:
    """The voxel spacing in mm of a MetaTensor's affine; ``(1, 1, 1)`` for a plain tensor."""
    if not isinstance(img, MetaTensor):
        return (1.0, 1.0, 1.0)
    return tuple(float(s) for s in affine_to_spacing(img.affine, r=3))


def rectal_weight(
    rectum: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    decay_mm: float = 10.0,
    smooth_mm: float = 2.0,
) -> torch.Tensor:
    """The shape of the rectal field, without its amplitude: ``(1, H, W, D)`` or ``(H, W, D)`` mask ->
    ``(H, W, D)`` float32 ``G_s * exp(-d(x)^2 / (2 decay_mm^2))`` in [0, 1] (see :func:`rectal_displacement`).
    It is the same every epoch for a case (only the amplitude is drawn), so the training pipeline computes it once
    and caches it (:class:`RectalWeightd`)."""
    return torch.from_numpy(_rectal_weight64(rectum, spacing, decay_mm, smooth_mm)[0].astype(np.float32))


def rectal_displacement(
    rectum: np.ndarray | torch.Tensor,
    amplitude_mm: float,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    decay_mm: float = 10.0,
    smooth_mm: float = 2.0,
    axis: int = 1,
) -> torch.Tensor:
    """Dense displacement field in voxels, largest at the rectum and decaying away from it.

    ``(1, H, W, D)`` or ``(H, W, D)`` rectal mask -> ``(3, H, W, D)`` float32 field (MONAI ``Warp`` convention: the
    output voxel x samples the input at x + u(x)). Only component ``axis`` is non-zero:
    ``u_mm(x) = amplitude_mm * G_s * exp(-d(x)^2 / (2 decay_mm^2))``, d the Euclidean distance in mm from the
    rectum (0 inside), ``G_s`` a Gaussian smoothing of ``smooth_mm`` mm; ``u`` is divided by the voxel spacing
    along ``axis`` to give voxels.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    weight, spacing = _rectal_weight64(rectum, spacing, decay_mm, smooth_mm)
    field = np.zeros((3, *weight.shape), dtype=np.float32)
    field[axis] = amplitude_mm * weight / spacing[axis]
    return torch.from_numpy(field)


def warp_along_axis(img: torch.Tensor, shift: torch.Tensor, axis: int) -> torch.Tensor:
    """Warp along one voxel axis: ``(C, H, W, D)`` image, ``(H, W, D)`` shift in voxels -> ``(C, H, W, D)`` with
    ``out[c, x] = img[c, x + shift(x) e_axis]``, linear interpolation along ``axis``, border padding. The same as MONAI
    ``Warp`` (bilinear, border) of the field that is ``shift`` on ``axis`` and 0 elsewhere (to 2e-5: that one
    normalises coordinates to [-1, 1] and back), at a third to a quarter of its time: a gather along one axis instead
    of trilinear sampling."""
    if img.ndim != 4 or tuple(shift.shape) != tuple(img.shape[1:]) or axis not in (0, 1, 2):
        raise ValueError(f"need a (C, H, W, D) image, an (H, W, D) shift and axis 0-2, got {tuple(img.shape)}, "
                         f"{tuple(shift.shape)}, {axis}")  # fmt: skip
    n = img.shape[axis + 1]
    view = [1, 1, 1]
    view[axis] = n
    position = (torch.arange(n, dtype=torch.float32, device=img.device).reshape(view) + shift.float()).clamp_(0, n - 1)
    low = position.floor().clamp_(max=max(n - 2, 0))
    frac = (position - low)[None]
    index = low.long()[None].expand(img.shape)
    x = img.float()
    below = torch.gather(x, axis + 1, index)
    above = torch.gather(x, axis + 1, (index + 1).clamp_(max=n - 1))
    return (below + frac * (above - below)).to(img.dtype)


class RectalDistortion(Transform):
    """Warp an image by :func:`rectal_displacement` of its rectal mask (trilinear, MONAI ``Warp``).

    ``(C, H, W, D)`` image + ``(1, H, W, D)`` rectal mask -> ``(C, H, W, D)`` warped image.

    Args:
        decay_mm: lambda, the distance in mm over which the field decays as ``exp(-d^2 / (2 lambda^2))`` (10).
        smooth_mm: Gaussian smoothing of the field in mm (2); 0 disables it.
        axis: displacement axis (0, 1 or 2); ``None`` (default) takes the in-plane anterior-posterior axis from
            the image affine (:func:`anterior_posterior_axis`).
        padding_mode: ``Warp`` padding outside the volume, ``"border"`` (default), ``"zeros"`` or ``"reflection"``.
    """

    def __init__(
        self, decay_mm: float = 10.0, smooth_mm: float = 2.0, axis: int | None = None, padding_mode: str = "border"
    ) -> None:
        if not decay_mm > 0:
            raise ValueError(f"decay_mm must be > 0, got {decay_mm}")
        if not smooth_mm >= 0:
            raise ValueError(f"smooth_mm must be >= 0, got {smooth_mm}")
        if axis is not None and axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1, 2 or None, got {axis}")
        if padding_mode not in ("border", "zeros", "reflection"):
            raise ValueError(f"padding_mode must be 'border', 'zeros' or 'reflection', got {padding_mode!r}")
        self.decay_mm = float(decay_mm)
        self.smooth_mm = float(smooth_mm)
        self.axis = axis
        self.padding_mode = padding_mode
        with warnings.catch_warnings():  # MONAI warns that it uses torch's grid_sample, which is what we want
            warnings.simplefilter("ignore")
            self._warp = Warp(mode="bilinear", padding_mode=padding_mode)

    def field(self, img: torch.Tensor, rectum: torch.Tensor, amplitude_mm: float) -> torch.Tensor:
        """The ``(3, H, W, D)`` voxel displacement for ``img`` (its affine gives spacing and AP axis)."""
        if img.ndim != 4 or tuple(img.shape[1:]) != tuple(rectum.shape[-3:]):
            raise ValueError(
                f"image (C, H, W, D) and rectal mask must share a grid, got {tuple(img.shape)} and "
                f"{tuple(rectum.shape)}"
            )
        spacing, axis = self.spacing_and_axis(img)
        return rectal_displacement(rectum, amplitude_mm, spacing, self.decay_mm, self.smooth_mm, axis)

    def spacing_and_axis(self, img: torch.Tensor) -> tuple[tuple[float, float, float], int]:
        """The voxel spacing (mm) and displacement axis of ``img`` (from its affine; unit spacing without one)."""
        affine = img.affine if isinstance(img, MetaTensor) else None
        return voxel_spacing(img), anterior_posterior_axis(affine) if self.axis is None else self.axis

    def warp_weighted(self, img: torch.Tensor, weight: torch.Tensor, amplitude_mm: float) -> torch.Tensor:
        """Warp ``img`` ``(C, H, W, D)`` by ``amplitude_mm`` times a cached :func:`rectal_weight`
        ``([1,] H, W, D)``: the field of :meth:`field` without recomputing its shape; the one-axis warp with border
        padding."""
        spacing, axis = self.spacing_and_axis(img)
        weight = torch.as_tensor(weight)
        weight = weight[0] if weight.ndim == 4 else weight
        shift = amplitude_mm * weight.to(torch.float32) / float(spacing[axis])
        if self.padding_mode != "border":
            ddf = torch.zeros((3, *shift.shape), dtype=torch.float32)
            ddf[axis] = shift
            return self.warp(img, ddf)
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        warped = warp_along_axis(x, shift.to(x.device), axis)
        return MetaTensor(warped, meta=dict(img.meta)) if isinstance(img, MetaTensor) else warped

    def warp(self, img: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """``(C, H, W, D)`` image, ``(3, H, W, D)`` voxel field -> ``(C, H, W, D)`` warped image."""
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if ddf.shape != (3, *x.shape[1:]):
            raise ValueError(f"field must be (3, H, W, D) = {(3, *x.shape[1:])}, got {tuple(ddf.shape)}")
        warped = self._warp(x[None].float(), ddf[None].to(device=x.device, dtype=torch.float32))[0].to(x.dtype)
        return MetaTensor(warped, meta=dict(img.meta)) if isinstance(img, MetaTensor) else warped

    def __call__(self, img: torch.Tensor, rectum: torch.Tensor, amplitude_mm: float) -> torch.Tensor:
        """``(C, H, W, D)`` image, ``(1, H, W, D)`` mask, amplitude in mm -> ``(C, H, W, D)`` warped image."""
        return self.warp(img, self.field(img, rectum, amplitude_mm))


class RectalDistortiond(Randomizable, MapTransform):
    """Distort ``keys`` (T2W) by a random rectal field; keep the undistorted volumes as targets.

    Per sample the amplitude is drawn uniformly from ``amplitude_range`` mm and, with ``random_sign``, its sign
    (either phase-encoding polarity). All keys of a sample share one field.

    Args:
        keys: volumes to distort (default ``"t2w"``).
        rectum_key: the rectal mask ``(1, H, W, D)`` (default ``"rectum"``).
        target_keys: where to copy the undistorted volumes, one per key (e.g. ``"label"``); ``None`` keeps none.
        field_key: where to store the ``(3, H, W, D)`` voxel field; ``None`` (default) stores nothing.
        amplitude_range: ``(min, max)`` peak displacement in mm (default ``(3, 8)``).
        random_sign: draw the field's sign at random (default True); otherwise it points to +axis.
        decay_mm, smooth_mm, axis, padding_mode: see :class:`RectalDistortion`.
        seed: seed of the per-case generators and of the transform's own generator (default 0).
        deterministic_per_case: draw from ``(seed, case id)`` (evaluation; default False draws from the
            transform's own generator, training augmentation).
        id_key: the case id (default ``"id"``).
        weight_key: where a cached :func:`rectal_weight` of the sample may be (:class:`RectalWeightd`); with it,
            each call only scales it and warps along one axis (border padding). ``None`` (default) computes the
            field every call.
        allow_missing_keys: skip keys absent from the sample.
    """

    def __init__(
        self,
        keys: KeysCollection = "t2w",
        rectum_key: str = "rectum",
        target_keys: KeysCollection | None = None,
        field_key: str | None = None,
        amplitude_range: Sequence[float] = (3.0, 8.0),
        random_sign: bool = True,
        decay_mm: float = 10.0,
        smooth_mm: float = 2.0,
        axis: int | None = None,
        padding_mode: str = "border",
        seed: int = 0,
        deterministic_per_case: bool = False,
        id_key: str = "id",
        weight_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.weight_key = weight_key
        if len(amplitude_range) != 2 or not 0 <= float(amplitude_range[0]) <= float(amplitude_range[1]):
            raise ValueError(f"amplitude_range must be (min, max) mm with 0 <= min <= max, got {amplitude_range!r}")
        self.distortion = RectalDistortion(decay_mm, smooth_mm, axis, padding_mode)
        self.rectum_key = rectum_key
        self.target_keys = None if target_keys is None else ensure_tuple(target_keys)
        if self.target_keys is not None and len(self.target_keys) != len(self.keys):
            raise ValueError(f"need one target key per key, got keys={self.keys}, target_keys={self.target_keys}")
        self.field_key = field_key
        self.amplitude_range = (float(amplitude_range[0]), float(amplitude_range[1]))
        self.random_sign = bool(random_sign)
        case_rng(seed, "")  # validates seed
        self.seed = int(seed)
        self.deterministic_per_case = bool(deterministic_per_case)
        self.id_key = id_key
        self.amplitude_mm = 0.0
        self.set_random_state(seed=seed)

    def randomize(self, data: Mapping[Hashable, Any] | None = None) -> None:
        """Draw ``self.amplitude_mm`` (signed) for the sample ``data``."""
        if self.deterministic_per_case:
            rng = case_rng(self.seed, case_id_of(data or {}, self.id_key, type(self).__name__), type(self).__name__)
        else:
            rng = self.R
        amplitude = float(rng.uniform(*self.amplitude_range))
        if self.random_sign and rng.uniform() < 0.5:
            amplitude = -amplitude
        self.amplitude_mm = amplitude

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """``data[key]`` ``(C, H, W, D)`` -> warped; targets and field as configured."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        if self.rectum_key not in d:
            raise ValueError(
                f"RectalDistortiond needs a rectal mask under {self.rectum_key!r}; the sample has {sorted(d)}"
            )
        self.randomize(d)
        if self.weight_key is not None and self.weight_key in d and self.field_key is None:
            weight = d[self.weight_key]
            for i, key in enumerate(self.keys):
                if key not in d:
                    continue
                if self.target_keys is not None:
                    d[self.target_keys[i]] = d[key]
                d[key] = self.distortion.warp_weighted(d[key], weight, self.amplitude_mm)
            return d
        try:
            ddf = self.distortion.field(d[keys[0]], d[self.rectum_key], self.amplitude_mm)
        except ValueError as err:
            raise ValueError(f"{describe_case(d, self.rectum_key, self.id_key)}: {err}") from err
        for i, key in enumerate(self.keys):
            if key not in d:
                continue
            if self.target_keys is not None:
                d[self.target_keys[i]] = d[key]
            d[key] = self.distortion.warp(d[key], ddf)
        if self.field_key is not None:
            d[self.field_key] = ddf
        return d


class RectalWeightd(MapTransform):
    """The deterministic half of :class:`RectalDistortiond`: ``data[weight_key]`` = :func:`rectal_weight` of
    ``data[rectum_key]`` ``(1, H, W, D)`` -> ``(1, H, W, D)`` float32, with the voxel spacing of the mask's affine
    (flip it with the volumes when the pipeline flips them).

    Placed before the random steps, ``CacheDataset`` keeps it, and each epoch's distortion only scales it by the
    drawn amplitude (at the paper size the weight is 690 ms a case, the one-axis warp about 100 ms). It costs one
    float32 volume of memory per cached case.

    Args:
        rectum_key: the rectal mask (default ``"rectum"``).
        weight_key: where to store the weight (default ``"rectal_weight"``).
        decay_mm, smooth_mm: as :class:`RectalDistortion` (must equal the distortion's).
        id_key: the case id, named in errors (default ``"id"``).
    """

    def __init__(
        self,
        rectum_key: str = "rectum",
        weight_key: str = "rectal_weight",
        decay_mm: float = 10.0,
        smooth_mm: float = 2.0,
        id_key: str = "id",
    ) -> None:
        super().__init__(rectum_key)
        RectalDistortion(decay_mm, smooth_mm)  # validates both as the distortion does
        self.decay_mm, self.smooth_mm = float(decay_mm), float(smooth_mm)
        self.rectum_key, self.weight_key, self.id_key = rectum_key, weight_key, id_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.rectum_key not in d:
            raise ValueError(f"RectalWeightd needs a rectal mask under {self.rectum_key!r}; the sample has {sorted(d)}")
        try:
            weight = rectal_weight(d[self.rectum_key], voxel_spacing(d[self.rectum_key]), self.decay_mm, self.smooth_mm)
        except ValueError as err:
            raise ValueError(f"{describe_case(d, self.rectum_key, self.id_key)}: {err}") from err
        d[self.weight_key] = weight[None]  # channel-first like the volumes, so that a flip of them flips it too
        return d
