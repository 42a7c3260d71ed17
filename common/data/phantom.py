"""Synthetic prostate mpMRI cohort: T2W, ADC and high-b DWI with zonal, lesion and rectal masks.

The study's embedded default cohort (DESIGN section 6): a seeded stand-in for PROMIS (Huang et al., ISBI 2026,
section 3.1) on which all five tasks are learnable and non-trivial.

Anatomy (axial male pelvis, built in millimetres and sampled on the voxel grid, so the shapes do not depend on the
resolution): body outline with subcutaneous fat, rectus, obturator internus, levator ani and gluteal muscles,
femoral heads, pubic symphysis and bony side walls (dark cortex, fatty marrow), femoral vessels (flow voids),
bladder (anterior-superior), seminal vesicles (cranial), prostate (25-60 ml; peripheral zone crescent, central
gland with nodular BPH texture and a dark anterior fibromuscular stroma, dark capsule), neurovascular bundles and
the rectum (dark wall, lumen with an air pocket of strongly varying size above a horizontal air-fluid level, none in
about 30 % of cases). Organ surfaces are ellipsoids with low-frequency radial perturbations; position, size and
rotation vary per case.

Through-plane detail (DESIGN section 6): the organs above are smooth, and a stack of them alone would reduce
super-resolution to interpolation. Tissue therefore also holds structures a few millimetres across in every direction,
so that they span a few native slices and are lost in thick ones: fibrous septa of the fat (dark sheets 1-2 mm thick
bounding lobules of ~4-8 mm) with small vessels in them (flow-void tubes where two such sheets cross), fat between
muscle fascicles (bright sheets), fibromuscular striations of the peripheral zone and dark rims around the transition
zone's BPH nodules (the level set of its 3 mm nodular texture), besides the 1 mm capsule and the lesions. They are zero
sets of smooth Gaussian random fields defined in millimetres, so their size does not depend on the grid, and T2W
features (fat and fibrous tissue are dark on the fat-suppressed diffusion series). Trilinear upsampling of slice pairs
averaged into thick slices (the super-resolution input and its trivial baseline) misses them: on the smoke profile's
test split (native grid 32 x 64 x 64) its 3D SSIM against the native T2W is 0.925; 0.966 without them on the same grid.

Lesions and grades (PROMIS-like mix: PI-RADS 1-2 30 %, 3 25 %, 4 25 %, 5 20 %): a lesion lies in the peripheral
zone (70 %) or the transition zone (30 %) and is set by size and diffusion contrast, with overlap between grades:

=======  ===============================================  ==============================  ============
PI-RADS  lesion                                           ADC (1e-6 mm^2/s)               lesion mask
=======  ===============================================  ==============================  ============
1        none                                             --                              empty
2        4-8 mm faint T2 hypointensity, no restriction    unchanged                       empty
3        5-9 mm                                           1000-1180 (mild)                lesion
4        8-14 mm                                          750-1000                        lesion
5        15-24 mm                                         550-800                         lesion
=======  ===============================================  ==============================  ============

Normal ADC (tissue values; partial volume with fat lowers mask medians by ~50-100): peripheral zone 1530-1730,
transition zone 1150-1300 (nodular), urine 2800. A lesion ADC is also kept <= 0.88 x its zone's. The high-b image is
``S0 * exp(-b * ADC)`` with b = 1400 s/mm^2 before noise, so T2W -> DWI translation is learnable.

Acquisition: smooth multiplicative bias field brighter posteriorly (pelvic coil), Rician noise (magnitude of a
complex Gaussian), slice-profile blur through-plane (Gaussian, 0.45 slice); ADC and DWI at a blurrier,
lower-resolution look.

Geometry: fixed field of view ``FOV_MM`` = 180 x 180 mm in-plane and 72 mm through-plane, spacing = FOV / size: 2.25 mm
slices and 1.875 mm in-plane at the default size 32 x 96 x 96, 0.75 mm slices at the paper profile's 96. A cohort's
native slice count is at least the target of the pipelines that read it (``Profile.cohort_size`` D >=
``Profile.spatial_size`` D), so that the super-resolution target is an acquired volume, not an interpolation. NIfTI
arrays are ``(H, W, D)`` = voxel axes ``(i, j, k)``; the affine is ``diag(-sx, -sy, sz)`` (i towards patient left, j
posterior, k superior: nibabel reports ``('L', 'P', 'S')``, the orientation ITK gives to DICOM data) with the volume
centre at the world origin. Displayed as ``arr[:, :, k].T`` the slice is in radiological convention (anterior up,
patient right on the viewer's left).

Reproducibility: case ``k`` draws from ``np.random.default_rng([seed, k])`` (its textures and noise from
``[seed, k, 1]``, the through-plane detail fields from ``[seed, k, 3]``), so it is the same whatever the cohort
size; its scalar parameters (PI-RADS, sizes, positions) do not depend on the grid size either. Files are gzipped
with ``mtime=0``: the same seed gives the same bytes.

Command line::

    python -m common.data.phantom --out DIR --cases N [--seed S] [--size D,H,W] [--preview]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from common.data.splits import PROMIS_PROPORTIONS, split_ids

__all__ = [
    "B_VALUE",
    "DEFAULT_SIZE",
    "FOV_MM",
    "IMAGE_KEYS",
    "KEYS",
    "MASK_KEYS",
    "PIRADS_PROBABILITIES",
    "PIRADS_TO_CLASS",
    "pirads_of_case",
    "case_id",
    "main",
    "make_case",
    "make_cohort",
    "preview_png",
    "spacing_for",
    "write_case",
]

FOV_MM: tuple[float, float, float] = (180.0, 180.0, 72.0)
"""Field of view in mm along the voxel axes (i, j, k) = (H, W, D): axial T2W-like, 2.25 mm slices at D = 32."""
DEFAULT_SIZE: tuple[int, int, int] = (32, 96, 96)
"""Default grid ``(D, H, W)``: 2.25 mm slices, 1.875 mm in-plane."""
B_VALUE = 1400.0
"""b-value of the high-b image in s/mm^2."""
IMAGE_KEYS: tuple[str, ...] = ("t2w", "adc", "dwi")
MASK_KEYS: tuple[str, ...] = ("prostate", "lesion", "rectum")
KEYS: tuple[str, ...] = IMAGE_KEYS + MASK_KEYS
PIRADS_PROBABILITIES: dict[int, float] = {1: 0.15, 2: 0.15, 3: 0.25, 4: 0.25, 5: 0.20}
"""PROMIS-like PI-RADS mix."""
PIRADS_TO_CLASS: dict[int, int] = {1: 0, 2: 0, 3: 1, 4: 2, 5: 3}
"""PI-RADS -> classification target (K = 4), the same map as ``common.transforms.label.PIRADS_TO_CLASS``."""
LABELS: dict[str, Any] = {
    "prostate": {"0": "background", "1": "peripheral zone", "2": "transition zone (central gland incl. AFMS)"},
    "lesion": {"0": "background", "1": "lesion of PI-RADS >= 3"},
    "rectum": {"0": "background", "1": "rectal wall and lumen including air"},
    "pirads_to_class": {str(k): v for k, v in PIRADS_TO_CLASS.items()},
}

_MIN_SIZE = (4, 16, 16)
_SIZE_LIMIT = 1024
_LESION_DIAMETER_MM = {3: (5.0, 9.0), 4: (8.0, 14.0), 5: (15.0, 24.0)}
_LESION_ADC = {3: (1000.0, 1180.0), 4: (750.0, 1000.0), 5: (550.0, 800.0)}
_SHEET_MM = 4.0  # correlation length of the fields whose zero sets are septa and vessels
_CASE_ID = re.compile(r"^case_(\d+)$")

# Tissue properties: (T2W signal, S0 of the fat-suppressed diffusion series, ADC in 1e-6 mm^2/s).
_TISSUE: dict[str, tuple[float, float, float]] = {
    "air": (0.0, 0.0, 0.0),
    "skin": (380.0, 200.0, 1100.0),
    "fat": (800.0, 60.0, 300.0),
    "muscle": (170.0, 250.0, 1450.0),
    "cortex": (40.0, 20.0, 300.0),
    "marrow": (520.0, 70.0, 450.0),
    "cartilage": (150.0, 120.0, 1200.0),
    "vessel": (50.0, 30.0, 1800.0),
    "urine": (1150.0, 1400.0, 2800.0),
    "bladder_wall": (220.0, 300.0, 1400.0),
    "seminal": (950.0, 900.0, 2100.0),
    "rectal_wall": (190.0, 350.0, 1050.0),
    "rectal_mucosa": (330.0, 380.0, 1150.0),
    "rectal_content": (450.0, 400.0, 1300.0),
    "pz": (620.0, 800.0, 1600.0),
    "tz": (330.0, 550.0, 1250.0),
    "afms": (200.0, 300.0, 1100.0),
    "nvb": (120.0, 150.0, 1500.0),
    "lesion": (225.0, 650.0, 900.0),
}


def spacing_for(size: Sequence[int]) -> tuple[float, float, float]:
    """Voxel spacing ``(sx, sy, sz)`` in mm along ``(H, W, D)`` for a grid ``size = (D, H, W)``: ``FOV_MM / size``."""
    d, h, w = _check_size(size)
    return (FOV_MM[0] / h, FOV_MM[1] / w, FOV_MM[2] / d)


def case_id(index: int) -> str:
    """``7 -> 'case_0007'``."""
    return f"case_{int(index):04d}"


def _check_size(size: Sequence[int]) -> tuple[int, int, int]:
    try:
        values = tuple(int(s) for s in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"size must be three integers (D, H, W), got {size!r}") from err
    if len(values) != 3 or any(int(s) != s for s in size):
        raise ValueError(f"size must be three integers (D, H, W), got {size!r}")
    if any(v < m or v > _SIZE_LIMIT for v, m in zip(values, _MIN_SIZE, strict=True)):
        raise ValueError(f"size (D, H, W) must be at least {_MIN_SIZE} and at most {_SIZE_LIMIT}, got {values}")
    return values  # type: ignore[return-value]


def _case_index(case: int | str) -> int:
    if isinstance(case, bool):
        raise ValueError(f"case_id must be an index >= 0 or 'case_NNNN', got {case!r}")
    if isinstance(case, str):
        match = _CASE_ID.match(case)
        if match is None:
            raise ValueError(f"case_id must be an index >= 0 or 'case_NNNN', got {case!r}")
        return int(match.group(1))
    if int(case) != case or case < 0:
        raise ValueError(f"case_id must be an index >= 0 or 'case_NNNN', got {case!r}")
    return int(case)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _affine(shape_hwd: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """LPS-like diagonal affine with the volume centre at the world origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.asarray(shape_hwd, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


# ---------------------------------------------------------------------------------------------------------------
# Geometry helpers. Coordinates are millimetres from the volume centre: u towards patient left (i), v posterior (j),
# w superior (k). Every shape returns a signed distance proxy in mm (positive inside).
# ---------------------------------------------------------------------------------------------------------------


class _Grid:
    """Voxel-centre coordinates, rotated in-plane by the patient's yaw; ``v0`` is the unrotated (gravity) axis."""

    def __init__(self, shape_hwd: tuple[int, int, int], spacing: tuple[float, float, float], yaw_deg: float) -> None:
        h, w, d = shape_hwd
        self.shape = shape_hwd
        self.spacing = spacing
        u = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * spacing[0])[:, None, None]
        v = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * spacing[1])[None, :, None]
        self.w = ((np.arange(d, dtype=np.float32) - (d - 1) / 2) * spacing[2])[None, None, :]
        c, s = np.float32(math.cos(math.radians(yaw_deg))), np.float32(math.sin(math.radians(yaw_deg)))
        self.u = c * u + s * v  # (H, W, 1)
        self.v = -s * u + c * v
        self.v0 = v
        self.edge = np.float32(0.3 * min(spacing))

    def box(self, centre: Sequence[float], radius: float) -> tuple[slice, slice, slice] | None:
        """Voxel box holding the cube of half-side ``radius`` mm about ``centre`` (None: outside the grid)."""
        inside = (np.abs(self.u[..., 0] - np.float32(centre[0])) <= radius) & (
            np.abs(self.v[..., 0] - np.float32(centre[1])) <= radius
        )
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        depth = np.flatnonzero(np.abs(self.w[0, 0] - np.float32(centre[2])) <= radius)
        if not (rows.size and cols.size and depth.size):
            return None
        return (
            slice(int(rows[0]), int(rows[-1]) + 1),
            slice(int(cols[0]), int(cols[-1]) + 1),
            slice(int(depth[0]), int(depth[-1]) + 1),
        )

    def frame(
        self,
        centre: Sequence[float],
        yaw_deg: float = 0.0,
        tilt_deg: float = 0.0,
        region: tuple[slice, slice, slice] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates ``(p, q, s)`` about ``centre`` (within ``region``): yaw about w, then tilt about p."""
        u, v, w = self.u, self.v, self.w
        if region is not None:
            u, v, w = u[region[0], region[1]], v[region[0], region[1]], w[..., region[2]]
        du, dv, dw = u - np.float32(centre[0]), v - np.float32(centre[1]), w - np.float32(centre[2])
        c, s = np.float32(math.cos(math.radians(yaw_deg))), np.float32(math.sin(math.radians(yaw_deg)))
        p, q = c * du + s * dv, -s * du + c * dv
        if tilt_deg:
            ct, st = np.float32(math.cos(math.radians(tilt_deg))), np.float32(math.sin(math.radians(tilt_deg)))
            return p, ct * q + st * dw, -st * q + ct * dw
        return p, q, dw

    def alpha(self, sd: np.ndarray, edge: float | None = None) -> np.ndarray:
        """Soft occupancy ``sigmoid(sd / edge)`` as float32."""
        e = self.edge if edge is None else np.float32(edge)
        return (0.5 + 0.5 * np.tanh(sd / (2 * e))).astype(np.float32, copy=False)


def _bumps(rng: np.random.Generator, count: int, amplitude: float, dims: int = 3) -> np.ndarray:
    """``(count, dims + 3)`` rows of (amplitude, frequency, unit direction..., phase) for radial perturbations."""
    rows = np.empty((count, dims + 3))
    rows[:, 0] = amplitude * rng.uniform(0.4, 1.0, count)
    rows[:, 1] = rng.uniform(1.5, 3.5, count)
    n = rng.standard_normal((count, dims))
    rows[:, 2 : 2 + dims] = n / np.linalg.norm(n, axis=1, keepdims=True)
    rows[:, -1] = rng.uniform(0, 2 * np.pi, count)
    return rows


def _ellipsoid_sd(
    p: np.ndarray,
    q: np.ndarray,
    s: np.ndarray | None,
    semi: Sequence[float],
    bumps: np.ndarray | None = None,
) -> np.ndarray:
    """Signed distance proxy (mm, along the ray from the centre) to a perturbed ellipsoid; ``s=None``: a cylinder."""
    axes = [p / np.float32(semi[0]), q / np.float32(semi[1])]
    phys = p * p + q * q
    if s is not None:
        axes.append(s / np.float32(semi[2]))
        phys = phys + s * s
    rho = np.sqrt(sum(a * a for a in axes))
    # mm per unit of normalised radius along the ray; its limit at the centre is direction-dependent, take the mean.
    scale = np.float32(np.mean(semi[: len(axes)]))
    per_unit = np.where(rho > 1e-4, np.sqrt(phys) / np.maximum(rho, np.float32(1e-4)), scale)
    rho = rho + np.float32(1e-6)
    surface = np.float32(1.0)
    if bumps is not None and len(bumps):
        dims = len(axes)
        for row in bumps:
            proj = sum(np.float32(row[2 + k]) * axes[k] for k in range(dims)) / rho
            surface = surface + np.float32(row[0]) * np.cos(np.float32(row[1]) * proj + np.float32(row[-1]))
    return per_unit * (surface - rho)


def _segment_sd(u: np.ndarray, v: np.ndarray, a: Sequence[float], b: Sequence[float], radius: float) -> np.ndarray:
    """In-plane signed distance to a rod of ``radius`` mm around the segment ``a -> b`` (extruded along w)."""
    ab = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    t = ((u - np.float32(a[0])) * ab[0] + (v - np.float32(a[1])) * ab[1]) / np.float32(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    du, dv = u - (np.float32(a[0]) + t * ab[0]), v - (np.float32(a[1]) + t * ab[1])
    return np.float32(radius) - np.sqrt(du * du + dv * dv)


def _window(w: np.ndarray, low: float, high: float, edge: float = 4.0) -> np.ndarray:
    """Soft slab ``low < w < high`` (mm), used to give an extruded structure a cranio-caudal extent."""
    e = np.float32(edge)
    return (0.5 + 0.5 * np.tanh((w - np.float32(low)) / e)) * (0.5 + 0.5 * np.tanh((np.float32(high) - w) / e))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing: Sequence[float]):
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma_mm``."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), [sigma_mm / s for s in spacing], mode="reflect", truncate=3.0
    )
    return field / np.float32(field.std() + 1e-8)


Region = tuple[slice, slice, slice]


def _support(alpha: np.ndarray) -> Region | None:
    """Bounding box of ``alpha > 1e-4`` (None: empty); an axis where ``alpha`` has size 1 spans the canvas."""
    nz = alpha > np.float32(1e-4)
    plane = nz.any(axis=2)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if not rows.size:
        return None
    depth = np.flatnonzero(nz.any(axis=(0, 1)))
    spans = [(rows, alpha.shape[0]), (cols, alpha.shape[1]), (depth, alpha.shape[2])]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) if n > 1 else slice(None) for i, n in spans)  # type: ignore[return-value]


def _crop(value: Any, region: Region, shape: tuple[int, int, int]) -> Any:
    """``value[region]`` on the axes where ``value`` spans the canvas; scalars and size-1 axes pass through."""
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        return value
    index = tuple(
        r if n == full and n > 1 else slice(None) for r, n, full in zip(region, value.shape, shape, strict=True)
    )
    return value[index]


class _Canvas:
    """Painter's compositing of tissue properties; tracks the visible fraction of the rectum.

    ``alpha`` is either canvas-sized (broadcastable) and cropped to its support, or already cropped to ``region``.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        t2, s0, adc = _TISSUE["air"]
        self.shape = shape
        self.t2 = np.full(shape, t2, np.float32)
        self.s0 = np.full(shape, s0, np.float32)
        self.adc = np.full(shape, adc, np.float32)
        self.rectum = np.zeros(shape, np.float32)

    def _region(self, alpha: np.ndarray, region: Region | None) -> tuple[np.ndarray, Region] | None:
        if region is None:
            region = _support(alpha)
            if region is None:
                return None
            alpha = _crop(alpha, region, self.shape)
        return alpha, region

    def paint(
        self,
        alpha: np.ndarray,
        tissue: str,
        t2: Any = None,
        s0: Any = None,
        adc: Any = None,
        region: Region | None = None,
        rectum: bool = False,
    ) -> None:
        """Composite ``tissue`` (values optionally overridden by arrays) with occupancy ``alpha`` over the canvas."""
        cropped = self._region(alpha, region)
        if cropped is None:
            return
        alpha, region = cropped
        base = _TISSUE[tissue]
        for field, value, default in ((self.t2, t2, base[0]), (self.s0, s0, base[1]), (self.adc, adc, base[2])):
            value = np.float32(default) if value is None else _crop(value, region, self.shape)
            part = field[region]
            part += alpha * (value - part)
        part = self.rectum[region]
        part *= 1.0 - alpha
        if rectum:
            part += alpha

    def scale_t2(self, weight: np.ndarray, factor: float, region: Region | None = None) -> None:
        """Multiply T2W by ``factor`` where ``weight`` is 1 (a T2-only change: capsule, benign hypointensity)."""
        cropped = self._region(weight, region)
        if cropped is not None:
            weight, region = cropped
            part = self.t2[region]
            part *= 1.0 - weight * np.float32(1.0 - factor)


# ---------------------------------------------------------------------------------------------------------------
# Case parameters (scalars only, so that they do not depend on the grid size) and rendering.
# ---------------------------------------------------------------------------------------------------------------


_PIRADS_BLOCK = 20


def pirads_of_case(seed: int, index: int) -> int:
    """PI-RADS of case ``index``: dealt from shuffled blocks of 20 cases holding exactly the proportions of
    :data:`PIRADS_PROBABILITIES` (3, 3, 5, 5, 4 cases of PI-RADS 1-5), so that every 20 consecutive cases of a cohort
    have the PROMIS-like mix and small cohorts are not left with a class or two by chance; still independent of the
    cohort's size."""
    block, position = divmod(index, _PIRADS_BLOCK)
    counts = [round(p * _PIRADS_BLOCK) for p in PIRADS_PROBABILITIES.values()]
    grades = np.repeat(list(PIRADS_PROBABILITIES), counts)
    np.random.default_rng([seed, block, 2]).shuffle(grades)
    return int(grades[position])


def _draw_parameters(rng: np.random.Generator, pirads: int) -> dict[str, Any]:
    """All per-case random scalars, drawn in a fixed order before any grid-sized array."""
    g: dict[str, Any] = {"pirads": pirads}
    g["gain_t2"], g["gain_dwi"] = rng.uniform(0.8, 1.25, 2)
    g["yaw"] = rng.uniform(-3.0, 3.0)
    # Prostate: volume 25-60 ml; half-axes width : AP : cranio-caudal = 1 : 0.7 : 0.85 (x1.06 for the apex taper
    # and the flat posterior surface).
    g["volume_ml"] = rng.uniform(25.0, 60.0)
    a = (1.06 * g["volume_ml"] * 1000.0 / (4.0 / 3.0 * math.pi * 0.7 * 0.85)) ** (1.0 / 3.0)
    g["gland_semi"] = (a * rng.uniform(0.95, 1.05), 0.7 * a * rng.uniform(0.93, 1.07), 0.85 * a * rng.uniform(0.9, 1.1))
    g["gland_centre"] = (rng.uniform(-4.0, 4.0), rng.uniform(-6.0, 4.0), rng.uniform(-9.0, -3.0))
    g["gland_yaw"], g["gland_tilt"] = rng.uniform(-6.0, 6.0), rng.uniform(-14.0, -2.0)
    g["gland_bumps"] = _bumps(rng, 5, 0.05)
    g["cg_scale"] = 0.8 + 0.3 * (g["volume_ml"] - 25.0) / 35.0 + rng.uniform(-0.05, 0.05)
    g["cg_bumps"] = _bumps(rng, 4, 0.06)
    g["pz_adc"], g["tz_adc"] = rng.uniform(1530.0, 1730.0), rng.uniform(1150.0, 1300.0)
    g["pz_t2"], g["tz_t2"] = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
    # Rectum: about 30 % without air; otherwise an air pocket filling 15-95 % of the lumen height (small pockets
    # most often), the lumen distended accordingly.
    has_air = rng.uniform() >= 0.3
    g["air_fraction"] = 0.15 + 0.8 * rng.uniform() ** 1.5 if has_air else 0.0
    g["distension"] = min(1.0, 0.25 + g["air_fraction"] * rng.uniform(0.7, 1.1)) if has_air else rng.uniform(0.0, 0.25)
    g["rectum_shift"] = (rng.uniform(-4.0, 4.0), rng.uniform(1.5, 4.0))
    g["rectal_wall_mm"] = rng.uniform(2.5, 4.0)
    g["rectum_wave"] = (rng.uniform(0.05, 0.2), rng.uniform(0.0, 2 * np.pi))
    g["rectum_bumps"] = _bumps(rng, 4, 0.08, dims=2)
    g["lumen_bumps"] = _bumps(rng, 4, 0.12, dims=2)
    # Pelvis.
    g["bladder_radius"] = rng.uniform(22.0, 42.0)
    g["bladder_shift"] = (rng.uniform(-6.0, 6.0), rng.uniform(-14.0, -6.0))
    g["bladder_bumps"] = _bumps(rng, 4, 0.05)
    g["skin_anterior"] = rng.uniform(-86.0, -74.0)
    g["body_half_width"] = rng.uniform(150.0, 185.0)
    g["femur"] = (rng.uniform(82.0, 92.0), rng.uniform(-2.0, 10.0), rng.uniform(20.0, 25.0))
    g["symphysis_gap"] = rng.uniform(12.0, 20.0)
    g["obturator"] = (rng.uniform(52.0, 58.0), rng.uniform(8.0, 11.0))
    g["sv_offset"] = (rng.uniform(14.0, 22.0), rng.uniform(3.0, 9.0))
    g["sv_bumps"] = _bumps(rng, 3, 0.12)
    g["pelvis_bumps"] = [_bumps(rng, 3, 0.06, dims=2) for _ in range(8)]
    g["bias"] = (rng.uniform(0.25, 0.5), rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.05), rng.uniform(-0.1, 0.1))
    g["bias_dwi"] = (rng.uniform(0.15, 0.35), rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.05), rng.uniform(-0.1, 0.1))
    # Lesion (drawn for every case so that the stream stays aligned; used for PI-RADS >= 2).
    g["lesion_tz"] = rng.uniform() < 0.3
    pirads = g["pirads"]
    low, high = _LESION_DIAMETER_MM.get(pirads, (4.0, 8.0))
    g["lesion_diameter"] = rng.uniform(low, high)
    low, high = _LESION_ADC.get(pirads, (0.0, 0.0))
    g["lesion_adc"] = rng.uniform(low, high)
    g["lesion_aspect"] = (rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
    g["lesion_rotation"] = (rng.uniform(-90.0, 90.0), rng.uniform(-30.0, 30.0))
    g["lesion_bumps"] = _bumps(rng, 4, 0.22)
    g["lesion_site"] = rng.uniform()
    return g


def _bias(grid: _Grid, coefficients: Sequence[float]) -> np.ndarray:
    """Smooth coil-like gain: ``exp(a v + b u + c u^2 + d w)`` (normalised coordinates), brighter posteriorly."""
    a, b, c, d = (np.float32(x) for x in coefficients)
    un, vn, wn = grid.u / np.float32(90.0), grid.v0 / np.float32(90.0), grid.w / np.float32(36.0)
    return np.exp(a * vn + b * un + c * un * un + d * wn)


def _render(g: dict[str, Any], grid: _Grid, tex: np.random.Generator, detail: np.random.Generator) -> dict[str, Any]:
    """Paint one case; returns noiseless maps and the masks. ``detail`` draws the through-plane detail fields."""
    shape, spacing, u, v, w = grid.shape, grid.spacing, grid.u, grid.v, grid.w
    canvas = _Canvas(shape)
    fine = _smooth_noise(tex, shape, 1.0, spacing)
    nodules = _smooth_noise(tex, shape, 3.0, spacing)
    coarse = _smooth_noise(tex, shape, 6.0, spacing)
    # Through-plane detail (module docstring): the zero set of a smooth random field is a randomly oriented sheet
    # 1-2 mm thick bounding cells a few mm across; where the zero sets of two fields cross, a tortuous tube.
    sheets = _smooth_noise(detail, shape, _SHEET_MM, spacing)
    crossing = _smooth_noise(detail, shape, _SHEET_MM, spacing)
    septa = np.exp(-((sheets / np.float32(0.25)) ** 2))
    fascicles = np.exp(-((crossing / np.float32(0.2)) ** 2))
    vessels = np.exp(-(sheets * sheets + crossing * crossing) / np.float32(0.09))
    stroma = np.exp(-((nodules / np.float32(0.25)) ** 2))

    # Body: skin, subcutaneous and pelvic fat.
    body_centre_v = g["skin_anterior"] + 105.0
    body = _ellipse_2d(u, v, (0.0, body_centre_v), (g["body_half_width"], 105.0))
    canvas.paint(grid.alpha(body), "skin")
    # Fibrous septa and small vessels (flow voids) in the fat.
    fat_t2 = _TISSUE["fat"][0] * (1 + 0.05 * fine) * (1 - 0.5 * septa) * (1 - 0.8 * vessels)
    canvas.paint(grid.alpha(body - 2.0), "fat", t2=fat_t2)

    # Muscles: gluteus maximus (posterolateral), rectus abdominis (anterior).
    gc = g["gland_centre"]
    ga, gb, gcc = g["gland_semi"]
    bumps = g["pelvis_bumps"]
    muscle_t2 = _TISSUE["muscle"][0] * (1 + 0.08 * fine + 1.5 * fascicles)  # fat between fascicles
    marrow_t2 = _TISSUE["marrow"][0] * (1 + 0.12 * fine + 0.08 * coarse)
    for n, side in enumerate((-1.0, 1.0)):
        glut = _ellipse_2d(u, v, (side * 72.0, 98.0), (55.0, 34.0), bumps[n], side * 20.0)
        canvas.paint(grid.alpha(glut), "muscle", t2=muscle_t2)
        rectus = _ellipse_2d(u, v, (side * 22.0, g["skin_anterior"] + 15.0), (17.0, 5.5))
        canvas.paint(grid.alpha(rectus), "muscle", t2=muscle_t2)
    ob_u, ob_half = g["obturator"]
    fu, fv, fr = g["femur"]
    sym_v = gc[1] - gb - g["symphysis_gap"] - 8.0
    sym_window = _window(w, -80.0, gc[2] + 8.0)
    for n, side in enumerate((-1.0, 1.0)):
        # Ischium / acetabulum lateral to the obturator internus; femoral head beyond it, cranially.
        ischium = _ellipse_2d(u, v, (side * (ob_u + ob_half + 14.0), 8.0), (10.0, 36.0), bumps[2 + n], side * 8.0)
        canvas.paint(grid.alpha(ischium), "cortex")
        canvas.paint(grid.alpha(ischium - 2.0), "marrow", t2=marrow_t2)
        head_centre = (side * fu, fv, gc[2] + 20.0)
        box = grid.box(head_centre, fr + 3.0)
        if box is not None:
            p, q, s = grid.frame(head_centre, region=box)
            head = _ellipsoid_sd(p, q, s, (fr, fr, fr))
            canvas.paint(grid.alpha(head), "cortex", region=box)
            canvas.paint(grid.alpha(head - 2.5), "marrow", t2=marrow_t2, region=box)
        # Obturator internus: a thick muscle sheet on the inner side wall.
        ob = _ellipse_2d(u, v, (side * ob_u, 4.0), (ob_half, 40.0), bumps[4 + n], -side * 10.0)
        canvas.paint(grid.alpha(ob), "muscle", t2=muscle_t2)
        vessel = _ellipse_2d(u, v, (side * (ob_u + 2.0), sym_v - 6.0), (4.5, 4.0))
        canvas.paint(grid.alpha(vessel) * _window(w, gc[2] - 10.0, 80.0), "vessel")
        # Pubic body beside the symphysis and the superior pubic ramus running laterally-posteriorly.
        pubis = _ellipse_2d(u, v, (side * 11.0, sym_v), (8.5, 13.0), bumps[6 + n], -side * 25.0)
        ramus = _ellipse_2d(u, v, (side * 36.0, sym_v + 12.0), (24.0, 6.5), None, side * 28.0)
        bone = np.maximum(pubis, ramus)
        canvas.paint(grid.alpha(bone) * sym_window, "cortex")
        canvas.paint(grid.alpha(bone - 2.0) * sym_window, "marrow", t2=marrow_t2)
    disc = _ellipse_2d(u, v, (0.0, sym_v), (1.8, 11.0))
    canvas.paint(grid.alpha(disc) * sym_window, "cartilage")

    # Rectum: centre behind the gland's posterior surface, curving posteriorly away from the gland.
    distension = g["distension"]
    lumen_semi = (6.0 + 14.0 * distension, 3.5 + 11.0 * distension)
    wall_mm = g["rectal_wall_mm"]
    outer_semi = (lumen_semi[0] + wall_mm, lumen_semi[1] + wall_mm)
    rect_u = gc[0] + g["rectum_shift"][0]
    rect_v0 = gc[1] + 0.85 * gb * 1.05 + g["rectum_shift"][1] + outer_semi[1]
    rect_v = rect_v0 + 0.004 * (w - gc[2]) ** 2
    # The lumen widens and narrows along the rectum (valves of Houston, ampulla).
    along = np.float32(1.0) + np.float32(g["rectum_wave"][0]) * np.sin(
        w / np.float32(14.0) + np.float32(g["rectum_wave"][1])
    )
    du, dv = (u - np.float32(rect_u)) / along, (v - rect_v) / along
    # Levator ani: a U-shaped sling around the rectum and the gland, open anteriorly.
    sling_v = 0.5 * (gc[1] + rect_v0 + outer_semi[1])
    sling_semi = (max(ga, outer_semi[0]) + 9.0, 0.5 * (rect_v0 + outer_semi[1] - gc[1]) + 7.0)
    ring = np.abs(_ellipse_2d(u, v, (rect_u, sling_v), sling_semi, g["pelvis_bumps"][0])) - 2.5
    sling = grid.alpha(-ring) * grid.alpha(v - sling_v + 0.6 * sling_semi[1], edge=3.0)
    canvas.paint(sling * _window(w, -80.0, gc[2] + 0.6 * gcc, edge=6.0), "muscle")
    canvas.paint(grid.alpha(_ellipse_2d(du, dv, (0.0, 0.0), outer_semi, g["rectum_bumps"])), "rectal_wall", rectum=True)
    canvas.paint(
        grid.alpha(_ellipse_2d(du, dv, (0.0, 0.0), (lumen_semi[0] + 1.2, lumen_semi[1] + 1.2), g["rectum_bumps"])),
        "rectal_mucosa",
        rectum=True,
    )
    lumen = grid.alpha(_ellipse_2d(du, dv, (0.0, 0.0), lumen_semi, g["lumen_bumps"]))
    canvas.paint(lumen, "rectal_content", t2=_TISSUE["rectal_content"][0] * (1 + 0.25 * fine), rectum=True)
    if g["air_fraction"] > 0:
        # Supine patient: air rises anteriorly (towards the prostate) above a horizontal air-fluid level.
        level = rect_v + along * lumen_semi[1] * (2.0 * g["air_fraction"] - 1.0)
        canvas.paint(lumen * grid.alpha(level - grid.v0, edge=0.5), "air", rectum=True)

    # Bladder anterior-superior to the gland, dark wall; seminal vesicles between bladder and rectum.
    br = g["bladder_radius"]
    bc = (gc[0] + g["bladder_shift"][0], gc[1] + g["bladder_shift"][1], gc[2] + 0.8 * gcc + 0.6 * br)
    box = grid.box(bc, 1.4 * br + 3.0)
    if box is not None:
        p, q, s = grid.frame(bc, region=box)
        bladder = _ellipsoid_sd(p, q, s, (1.15 * br, 0.85 * br, 0.75 * br), g["bladder_bumps"])
        canvas.paint(grid.alpha(bladder), "bladder_wall", region=box)
        canvas.paint(grid.alpha(bladder - 3.0), "urine", region=box)
    sv_lat, sv_up = g["sv_offset"]
    for side in (-1.0, 1.0):
        sv_centre = (gc[0] + side * sv_lat, gc[1] + 0.55 * gb, gc[2] + 0.75 * gcc + sv_up)
        box = grid.box(sv_centre, 22.0)
        if box is not None:
            p, q, s = grid.frame(sv_centre, side * 25.0, region=box)
            sv = grid.alpha(_ellipsoid_sd(p, q, s, (15.0, 5.5, 9.0), g["sv_bumps"]))
            # Convoluted tubules: bright fluid with dark septa.
            septa = 0.55 + 0.45 * np.tanh(2.0 * nodules[box])
            canvas.paint(sv, "seminal", t2=_TISSUE["seminal"][0] * septa, region=box)

    # Prostate: apex narrower than base, flat posterior surface with a shallow midline notch.
    p, q, s = grid.frame(gc, g["gland_yaw"], g["gland_tilt"])
    taper = 1.0 + 0.15 * np.clip(s / np.float32(gcc), -1.0, 1.0)
    posterior = np.float32(0.85) * (1 - 0.12 * np.exp(-((p / np.float32(0.4 * ga)) ** 2)))
    q_scaled = np.where(q > 0, q / posterior, q)
    gland_sd = _ellipsoid_sd(p / taper, q_scaled / taper, s, (ga, gb, gcc), g["gland_bumps"])
    gland = grid.alpha(gland_sd)
    # Central gland (TZ + central zone + AFMS): anterior and cranial, extends past the anterior surface.
    k = g["cg_scale"]
    cg_sd = _ellipsoid_sd(p, q + 0.5 * gb, s - 0.2 * gcc, (0.72 * ga * k, 0.8 * gb * k, 0.78 * gcc), g["cg_bumps"])
    cg = np.minimum(grid.alpha(cg_sd), gland)
    # Neurovascular bundles at 5 and 7 o'clock.
    for side in (-1.0, 1.0):
        nvb = _segment_sd(p, q, (side * 0.72 * ga, 0.62 * gb), (side * 0.72 * ga, 0.62 * gb + 0.01), 2.2)
        canvas.paint(grid.alpha(nvb) * _window(s, -gcc, gcc), "nvb")
    pz_t2, pz_s0, pz_adc = _TISSUE["pz"]
    canvas.paint(
        gland,
        "pz",
        t2=pz_t2 * g["pz_t2"] * (1 + 0.07 * fine + 0.05 * coarse - 0.4 * stroma),  # fibromuscular striations
        adc=g["pz_adc"] + 50.0 * fine + 40.0 * coarse,
    )
    tz_t2, tz_s0, _ = _TISSUE["tz"]
    nod = np.tanh(2.0 * nodules)
    canvas.paint(
        cg,
        "tz",
        t2=tz_t2 * g["tz_t2"] * (1 + 0.35 * nod + 0.06 * fine - 0.4 * stroma),  # nodules with dark rims
        s0=tz_s0 * (1 + 0.15 * nod),
        adc=g["tz_adc"] + 110.0 * nod + 30.0 * fine,
    )
    afms = cg * grid.alpha(-(q + 0.72 * gb), edge=1.5) * grid.alpha(s + 0.2 * gcc, edge=3.0)
    canvas.paint(afms, "afms")
    # Dark capsule and surgical pseudocapsule (T2 only).
    canvas.scale_t2(np.exp(-((gland_sd / 1.0) ** 2)) * gland, 0.55)
    canvas.scale_t2(np.exp(-((cg_sd / 1.2) ** 2)) * gland * (1 - afms), 0.8)

    zones = np.zeros(shape, np.uint8)
    zones[gland > 0.5] = 1
    zones[cg > 0.5] = 2

    # Lesion (PI-RADS >= 3) or benign T2 hypointensity (PI-RADS 2).
    lesion_mask = np.zeros(shape, np.uint8)
    pirads = g["pirads"]
    if pirads >= 2:
        centre, zone = _lesion_centre(g, grid, zones, gland_sd, cg_sd)
        radius = 0.5 * g["lesion_diameter"]
        semi = (radius, radius * g["lesion_aspect"][0], radius * g["lesion_aspect"][1])
        box = grid.box(centre, 1.4 * radius + 2.0)
        p, q, s = grid.frame(centre, *g["lesion_rotation"], region=box)
        blob = np.minimum(grid.alpha(_ellipsoid_sd(p, q, s, semi, g["lesion_bumps"])), gland[box])
        if pirads == 2:
            canvas.scale_t2(blob, 0.8, region=box)
        else:
            adc = min(g["lesion_adc"], 0.88 * (g["tz_adc"] if zone == 2 else g["pz_adc"]))
            t2 = _TISSUE["lesion"][0] * (0.92 if zone == 2 else 1.0)
            canvas.paint(blob, "lesion", t2=t2 * (1 + 0.08 * fine), adc=adc * (1 + 0.04 * fine), region=box)
            lesion_mask[box][blob > 0.5] = 1
    return {
        "t2": canvas.t2,
        "s0": canvas.s0,
        "adc": canvas.adc,
        "prostate": zones,
        "lesion": lesion_mask,
        "rectum": (canvas.rectum > 0.5).astype(np.uint8),
    }


def _ellipse_2d(
    u: np.ndarray,
    v: np.ndarray,
    centre: Sequence[Any],
    semi: Sequence[float],
    bumps: np.ndarray | None = None,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """In-plane (extruded along w) perturbed ellipse rotated by ``angle_deg``; ``centre[1]`` may vary with w."""
    du, dv = u - np.float32(centre[0]), v - centre[1]
    if angle_deg:
        c, s = np.float32(math.cos(math.radians(angle_deg))), np.float32(math.sin(math.radians(angle_deg)))
        du, dv = c * du + s * dv, -s * du + c * dv
    return _ellipsoid_sd(du, dv, None, semi, bumps)


def _lesion_centre(
    g: dict[str, Any], grid: _Grid, zones: np.ndarray, gland_sd: np.ndarray, cg_sd: np.ndarray
) -> tuple[tuple[float, float, float], int]:
    """A voxel centre inside the lesion's zone, away from the zone's border if possible: ``(u, v, w), zone``."""
    zone = 2 if g["lesion_tz"] else 1
    candidates = []
    for depth in (2.5, 1.0, -np.inf):
        inside = zones == zone
        if zone == 2:
            inside &= (cg_sd > depth) & (gland_sd > depth)
        else:
            inside &= (gland_sd > depth) & (cg_sd < -depth)
        candidates = np.flatnonzero(inside)
        if candidates.size:
            break
    if not len(candidates):
        candidates = np.flatnonzero(zones > 0)
    if not len(candidates):
        raise ValueError(f"grid {grid.shape} is too coarse to hold the prostate; use a larger size")
    flat = int(candidates[min(int(g["lesion_site"] * len(candidates)), len(candidates) - 1)])
    i, j, k = np.unravel_index(flat, zones.shape)
    return (float(grid.u[i, j, 0]), float(grid.v[i, j, 0]), float(grid.w[0, 0, k])), int(zones[i, j, k])


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``signal + N(0, sigma) + i N(0, sigma)``."""
    real = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def make_case(case_id: int | str, seed: int = 0, size: Sequence[int] = DEFAULT_SIZE) -> dict[str, Any]:
    """One synthetic case.

    Args:
        case_id: the case index ``k >= 0`` (or its id ``'case_000k'``); the case is drawn from
            ``np.random.default_rng([seed, k])``.
        seed: cohort seed (integer >= 0).
        size: grid ``(D, H, W)``; at least ``(4, 16, 16)``.

    Returns:
        ``t2w``, ``adc``, ``dwi``: float32 ``(H, W, D)`` (ADC in 1e-6 mm^2/s, T2W and DWI in scanner units);
        ``prostate`` (0/1 PZ/2 TZ), ``lesion`` (0/1), ``rectum`` (0/1): uint8 ``(H, W, D)``;
        ``pirads``: int 1..5; ``affine``: float64 ``(4, 4)`` voxel -> RAS mm.
    """
    index = _case_index(case_id)
    seed = _check_seed(seed)
    d, h, w = _check_size(size)
    shape, spacing = (h, w, d), spacing_for((d, h, w))
    rng = np.random.default_rng([seed, index])
    g = _draw_parameters(rng, pirads_of_case(seed, index))
    tex = np.random.default_rng([seed, index, 1])
    grid = _Grid(shape, spacing, g["yaw"])
    maps = _render(g, grid, tex, np.random.default_rng([seed, index, 3]))

    # Slice profile (through-plane partial volume) and a slightly soft in-plane PSF.
    psf = (0.35, 0.35, 0.45)
    t2 = ndimage.gaussian_filter(maps["t2"], psf, truncate=3.0)
    s_b = maps["s0"] * np.exp(np.float32(-B_VALUE * 1e-6) * maps["adc"])
    # Diffusion series: lower in-plane resolution (EPI) than T2W.
    dwi_psf = (1.1 / spacing[0], 1.1 / spacing[1], 0.45)
    s_b = ndimage.gaussian_filter(s_b, dwi_psf, truncate=3.0)
    adc = ndimage.gaussian_filter(maps["adc"], dwi_psf, truncate=3.0)

    t2 = t2 * _bias(grid, g["bias"]) * np.float32(g["gain_t2"])
    s_b = s_b * _bias(grid, g["bias_dwi"]) * np.float32(g["gain_dwi"])
    t2w = _rician(tex, t2, 12.0 * g["gain_t2"])
    dwi = _rician(tex, s_b, 7.0 * g["gain_dwi"])
    adc_noise = tex.normal(0.0, 1.0, adc.shape).astype(np.float32) * (40.0 + 0.04 * adc)
    adc = np.clip(adc + adc_noise, 0.0, 4000.0)
    return {
        "t2w": t2w.astype(np.float32),
        "adc": adc.astype(np.float32),
        "dwi": dwi.astype(np.float32),
        "prostate": maps["prostate"],
        "lesion": maps["lesion"],
        "rectum": maps["rectum"],
        "pirads": g["pirads"],
        "affine": _affine(shape, spacing),
    }


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes with a fixed gzip header (``mtime=0``), so equal arrays give equal files."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def write_case(case: Mapping[str, Any], out_dir: str | Path, name: str) -> dict[str, str]:
    """Write a case from :func:`make_case` as ``out_dir/<name>/<name>_<key>.nii.gz``; returns key -> relative path."""
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in KEYS:
        dtype = np.float32 if key in IMAGE_KEYS else np.uint8
        relative = f"{name}/{name}_{key}.nii.gz"
        (Path(out_dir) / relative).write_bytes(_nifti_bytes(np.asarray(case[key], dtype=dtype), case["affine"]))
        paths[key] = relative
    return paths


def make_cohort(
    out_dir: str | Path,
    cases: int,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    verbose: bool = False,
) -> Path:
    """Write ``cases`` synthetic cases and ``out_dir/datalist.json``; returns the datalist path.

    Splits: :func:`common.data.splits.split_ids` with the paper's 555/37/148 proportions, stratified by the PI-RADS
    class (``PIRADS_TO_CLASS``), seeded by ``seed``. ``verbose`` prints a progress line every few cases.
    Raises ``ValueError`` for ``cases < 3`` (three non-empty splits), a bad seed or a bad size.
    """
    if isinstance(cases, bool) or int(cases) != cases or cases < 3:
        raise ValueError(f"cases must be an integer >= 3 (training, validation and test non-empty), got {cases!r}")
    seed = _check_seed(seed)
    d, h, w = _check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    start = time.perf_counter()
    every = max(5, int(cases) // 20)
    for index in range(int(cases)):
        name = case_id(index)
        case = make_case(index, seed, (d, h, w))
        entries.append({"id": name, **write_case(case, out, name), "pirads": int(case["pirads"])})
        if verbose and ((index + 1) % every == 0 or index + 1 == cases):
            elapsed = time.perf_counter() - start
            print(f"phantom: {index + 1}/{cases} cases, {(index + 1) / elapsed:.1f} cases/s", flush=True)
    ids = [e["id"] for e in entries]
    splits = split_ids(ids, PROMIS_PROPORTIONS, seed=seed, strata=[PIRADS_TO_CLASS[e["pirads"]] for e in entries])
    by_id = {e["id"]: e for e in entries}
    datalist = {
        "name": "vfm-transfer synthetic prostate mpMRI",
        "description": (
            "Synthetic axial prostate mpMRI (common.data.phantom): T2W and high-b DWI (b=1400 s/mm^2) in scanner "
            "units, ADC in 1e-6 mm^2/s; masks: prostate zones, lesion (PI-RADS >= 3), rectum. Arrays (H, W, D), "
            "D through-plane; splits 555/37/148 proportions stratified by PI-RADS class."
        ),
        "seed": seed,
        "size": [d, h, w],
        "spacing": [float(x) for x in spacing_for((d, h, w))],
        "labels": LABELS,
        **{
            split: [by_id[i] for i in part]
            for split, part in zip(("training", "validation", "test"), splits, strict=True)
        },
    }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    return path


def _load_case_dir(folder: Path) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for key in KEYS:
        matches = sorted(folder.glob(f"*_{key}.nii.gz")) or sorted(folder.glob(f"*_{key}.nii"))
        if not matches:
            raise ValueError(f"{folder} has no *_{key}.nii.gz")
        arrays[key] = np.asanyarray(nib.load(str(matches[0])).dataobj)
    datalist = folder.parent / "datalist.json"
    if datalist.is_file():
        listing = json.loads(datalist.read_text())
        for split in ("training", "validation", "test"):
            for entry in listing.get(split, []):
                if entry.get("id") == folder.name:
                    arrays["pirads"] = entry.get("pirads")
    arrays["id"] = folder.name
    return arrays


def ensure_cohort(out_dir: Path, cases: int, seed: int, size: tuple[int, int, int]) -> Path:
    """Return ``out_dir/datalist.json``, making the cohort unless one with the same recipe is already there."""
    datalist = out_dir / "datalist.json"
    if datalist.is_file():
        meta = json.loads(datalist.read_text())
        n = sum(len(meta.get(split, [])) for split in ("training", "validation", "test"))
        if meta.get("seed") == seed and list(meta.get("size", [])) == list(size) and n == cases:
            print(f"cohort: reusing {n} cases in {out_dir}")
            return datalist
    start = time.perf_counter()
    path = make_cohort(out_dir, cases=cases, seed=seed, size=size)
    print(f"cohort: made {cases} cases of size D,H,W={size} in {time.perf_counter() - start:.1f} s -> {out_dir}")
    return Path(path)


def preview_png(case_dir_or_arrays: str | Path | Mapping[str, Any], path: str | Path) -> Path:
    """Save a PNG of one axial slice: T2W, ADC, DWI and the masks over T2W; returns ``path``.

    ``case_dir_or_arrays``: a case folder written by :func:`make_cohort` or a dict from :func:`make_case`. The
    slice is the one with the largest lesion area, else the largest prostate area (mid gland). Shown as
    ``arr[:, :, k].T``: anterior up, patient right on the viewer's left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if isinstance(case_dir_or_arrays, (str, Path)):
        case = _load_case_dir(Path(case_dir_or_arrays))
    else:
        case = dict(case_dir_or_arrays)
    missing = [k for k in KEYS if k not in case]
    if missing:
        raise ValueError(f"preview_png needs {KEYS}; missing {missing}")
    lesion, prostate = np.asarray(case["lesion"]), np.asarray(case["prostate"])
    area = lesion.sum(axis=(0, 1)) if lesion.any() else (prostate > 0).sum(axis=(0, 1))
    k = int(np.argmax(area))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    panels = (("T2W", "t2w", (0.0, 99.5)), ("ADC", "adc", (0.0, 99.0)), ("DWI b1400", "dwi", (0.0, 99.8)))
    for ax, (title, key, (lo, hi)) in zip(axes, panels, strict=False):
        image = np.asarray(case[key])[:, :, k].T
        vmin, vmax = np.percentile(image, [lo, hi])
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
    t2 = np.asarray(case["t2w"])[:, :, k].T
    axes[3].imshow(t2, cmap="gray", vmin=0, vmax=np.percentile(t2, 99.5), interpolation="nearest")
    overlay = np.zeros(t2.shape, np.uint8)
    overlay[prostate[:, :, k].T == 1] = 1
    overlay[prostate[:, :, k].T == 2] = 2
    overlay[np.asarray(case["rectum"])[:, :, k].T > 0] = 3
    overlay[lesion[:, :, k].T > 0] = 4
    colours = ListedColormap(
        [(0, 0, 0, 0), (0.1, 0.8, 0.2, 0.45), (0.2, 0.4, 1.0, 0.45), (1, 0.8, 0, 0.4), (1, 0, 0, 0.6)]
    )
    axes[3].imshow(overlay, cmap=colours, vmin=0, vmax=4, interpolation="nearest")
    axes[3].set_title("PZ green, TZ blue, rectum yellow, lesion red", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{case.get('id', '')}  PI-RADS {case.get('pirads', '?')}  slice k={k}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        return _check_size([int(x) for x in text.split(",")])
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--size must be D,H,W (e.g. 24,96,96): {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a cohort; ``--preview`` also writes one PNG per case into ``DIR/previews``."""
    parser = argparse.ArgumentParser(prog="python -m common.data.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--cases", required=True, type=int, help="number of cases (>= 3)")
    parser.add_argument("--seed", default=0, type=int, help="cohort seed (default 0)")
    parser.add_argument("--size", default=",".join(map(str, DEFAULT_SIZE)), type=_parse_size, help="D,H,W")
    parser.add_argument("--preview", action="store_true", help="write DIR/previews/<id>.png for every case")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        path = make_cohort(args.out, args.cases, seed=args.seed, size=args.size, verbose=not args.quiet)
    except ValueError as err:
        parser.error(str(err))
    if args.preview:
        for index in range(args.cases):
            preview_png(args.out / case_id(index), args.out / "previews" / f"{case_id(index)}.png")
    print(f"phantom: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
