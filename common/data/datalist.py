"""Load and validate a cohort's datalist before any training starts.

A datalist is a Decathlon-style JSON file::

    {"name": ..., "description": ..., "training": [...], "validation": [...], "test": [...]}

with one entry per case::

    {"id": str, "t2w": path, "adc": path, "dwi": path, "prostate": path, "lesion": path, "rectum": path,
     "pirads": int 1..5}

Paths are relative to the datalist's folder (absolute paths are allowed). Images are NIfTI (``.nii``,
``.nii.gz``, read with nibabel) or ITK MetaImage (``.mha``, ``.mhd``, read with itk). Real cohorts may lack keys
(PI-CAI has no rectal mask), so the caller names the keys its task needs and only those are checked.

``load_datalist`` collects every problem of the whole cohort and raises one :class:`DatalistError` that lists them,
one per line, as ``<split>/<case id>: <key> <file>: <what is wrong>``, so that a broken cohort fails in seconds with
the full list instead of hours into training with the first bad file.

Command line::

    python -m common.data.datalist PATH [--require t2w,adc,lesion] [--splits training,test] [--allow-resample]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SPLITS",
    "IMAGE_KEYS",
    "MASK_LABELS",
    "MAX_LISTED",
    "DatalistError",
    "ImageInfo",
    "load_datalist",
    "main",
    "read_image",
]

DEFAULT_SPLITS: tuple[str, ...] = ("training", "validation", "test")
IMAGE_KEYS: tuple[str, ...] = ("t2w", "adc", "dwi")
"""Intensity images: checked for readability, grid and finite values."""
MASK_LABELS: dict[str, frozenset[int]] = {
    "prostate": frozenset({0, 1, 2}),  # 0 background, 1 PZ, 2 TZ; a binary whole-gland {0, 1} mask is also valid
    "lesion": frozenset({0, 1}),
    "rectum": frozenset({0, 1}),
}
"""Label maps and the voxel values each may hold."""
PIRADS_KEY = "pirads"
MAX_LISTED = 50
"""At most this many problems are written into a :class:`DatalistError` message; all are kept in ``.problems``."""
AFFINE_TOLERANCE_MM = 1e-3
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_ITK_SUFFIXES = (".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AUTO_PROGRESS_CASES = 100


class DatalistError(ValueError):
    """A datalist (or the cohort layout it is built from) that cannot be used.

    ``problems`` holds every problem found, one line each; the message lists the first :data:`MAX_LISTED`.
    """

    def __init__(self, path: str | os.PathLike[str], problems: Sequence[str], subject: str = "datalist") -> None:
        self.path = str(path)
        self.problems = list(problems)
        listed = self.problems[:MAX_LISTED]
        lines = [f"{len(self.problems)} problem(s) in {subject} {self.path}:", *listed]
        if len(self.problems) > len(listed):
            lines.append(f"... and {len(self.problems) - len(listed)} more")
        super().__init__("\n".join(lines))


class ImageInfo:
    """Voxel grid and data of one image file.

    Attributes:
        shape: spatial size in voxel axes ``(i, j, k)`` (``k`` through-plane), as nibabel reports it.
        affine: ``(4, 4)`` voxel-to-world matrix in RAS+ millimetres (ITK's LPS is converted), so NIfTI and
            MetaImage files of one case compare directly.
        array: the voxel values (axis order as the reader returns it; only used for value checks).
    """

    __slots__ = ("affine", "array", "shape")

    def __init__(self, shape: tuple[int, ...], affine: np.ndarray, array: np.ndarray) -> None:
        self.shape = shape
        self.affine = affine
        self.array = array


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*_NIFTI_SUFFIXES, *_ITK_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return ""


def _read_nifti(path: Path) -> ImageInfo:
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asanyarray(img.dataobj)
    return ImageInfo(tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64), array)


def _read_itk(path: Path) -> ImageInfo:
    import itk

    img = itk.imread(str(path))
    size = tuple(int(s) for s in img.GetLargestPossibleRegion().GetSize())  # (i, j, k)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    return ImageInfo(size, _LPS_TO_RAS @ lps, np.asarray(itk.array_from_image(img)))


def read_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read one NIfTI or MetaImage file into an :class:`ImageInfo` (shape ``(i, j, k)``, RAS affine, voxels).

    Raises:
        ValueError: the suffix is not ``.nii``, ``.nii.gz``, ``.mha`` or ``.mhd``.
        Exception: whatever the reader raises for a missing, corrupt or truncated file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix in _NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in _ITK_SUFFIXES:
        return _read_itk(path)
    expected = ", ".join(_NIFTI_SUFFIXES + _ITK_SUFFIXES)
    raise ValueError(f"unsupported file type {path.name!r}; expected one of {expected}")


def _read_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"cannot be read, the file is corrupt, truncated or not an image ({detail})"


def _spatial_shape(info: ImageInfo) -> tuple[int, ...] | None:
    """``(i, j, k)`` of a 3D volume, allowing trailing singleton axes; ``None`` when the image is not 3D."""
    shape = info.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape if len(shape) == 3 else None


def _value_problem(key: str, array: np.ndarray) -> str | None:
    if key in MASK_LABELS:
        allowed = MASK_LABELS[key]
        values = np.unique(array)
        bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in allowed)]
        if bad:
            shown = ", ".join(repr(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            return f"invalid label value(s) {shown}; a {key} mask may only hold {sorted(allowed)}"
        return None
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum() - n_nan)
            return f"non-finite voxel values ({n_nan} NaN, {n_inf} Inf)"
    return None


def _fmt_affine_diff(a: np.ndarray, b: np.ndarray) -> str:
    return f"max |difference| {float(np.abs(a - b).max()):.4g} mm"


def _check_case(
    where: str, entry: Mapping[str, Any], image_keys: Sequence[str], allow_resample: bool
) -> tuple[list[str], list[str]]:
    """Read and check the files of one case; returns ``(problems, resample_notes)``."""
    problems: list[str] = []
    notes: list[str] = []
    reference: tuple[str, str, tuple[int, ...], np.ndarray] | None = None
    for key in image_keys:
        value = entry.get(key)
        if not isinstance(value, str):
            continue  # reported by the structural checks
        path = Path(value)
        prefix = f"{where}: {key} {path}"
        if not path.is_file():
            problems.append(f"{prefix}: file not found" if not path.exists() else f"{prefix}: not a file")
            continue
        if not _suffix(path):
            problems.append(f"{prefix}: unsupported file type; expected .nii, .nii.gz, .mha or .mhd")
            continue
        try:
            info = read_image(path)
        except Exception as exc:  # any reader failure is a problem of this file, reported with the others
            problems.append(f"{prefix}: {_read_error(exc)}")
            continue
        shape = _spatial_shape(info)
        if shape is None:
            problems.append(f"{prefix}: expected a 3D volume, got shape {info.shape}")
            continue
        value_problem = _value_problem(key, info.array)
        if value_problem:
            problems.append(f"{prefix}: {value_problem}")
        if reference is None:
            reference = (key, str(path), shape, info.affine)
            continue
        ref_key, ref_path, ref_shape, ref_affine = reference
        mismatch = None
        if shape != ref_shape:
            mismatch = f"shape {shape} differs from {ref_key} {ref_shape} ({ref_path})"
        elif not np.allclose(info.affine, ref_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
            mismatch = f"affine differs from {ref_key} ({ref_path}), {_fmt_affine_diff(info.affine, ref_affine)}"
        if mismatch is None:
            continue
        if allow_resample:
            notes.append(f"{prefix}: {mismatch}")
        else:
            problems.append(f"{prefix}: {mismatch}; pass allow_resample=True if the pipeline resamples onto {ref_key}")
    return problems, notes


def _resolve(value: str, root: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _image_keys(required_keys: Sequence[str]) -> list[str]:
    return [k for k in required_keys if k not in ("id", PIRADS_KEY)]


def _structure(
    data: Any, path: Path, required_keys: Sequence[str], splits: Sequence[str]
) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, dict[str, Any]]], list[str]]:
    """Structural checks that need no files; returns the resolved datalist, ``(where, entry)`` pairs and problems."""
    problems: list[str] = []
    out: dict[str, list[dict[str, Any]]] = {}
    cases: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(data, dict):
        return out, cases, [f"{path}: top level must be a JSON object with the splits, got {type(data).__name__}"]
    root = path.parent.resolve()
    path_keys = set(IMAGE_KEYS) | set(MASK_LABELS) | set(_image_keys(required_keys))
    seen: dict[str, str] = {}
    for split in splits:
        if split not in data:
            present = sorted(k for k, v in data.items() if isinstance(v, list))
            problems.append(f"{split}: split missing from the datalist (lists present: {present or 'none'})")
            continue
        items = data[split]
        if not isinstance(items, list):
            problems.append(f"{split}: must be a list of cases, got {type(items).__name__}")
            continue
        if not items:
            problems.append(f"{split}: split is empty")
            continue
        resolved_split: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                problems.append(f"{split}/#{index}: entry must be an object, got {type(item).__name__}")
                continue
            case_id = item.get("id")
            if not isinstance(case_id, str) or not case_id:
                problems.append(f"{split}/#{index}: id: missing or not a non-empty string (got {case_id!r})")
                where = f"{split}/#{index}"
            else:
                where = f"{split}/{case_id}"
                if case_id in seen:
                    problems.append(f"{where}: id: duplicate, already used in {seen[case_id]}")
                else:
                    seen[case_id] = split
            entry = dict(item)
            for key in path_keys:
                if isinstance(entry.get(key), str):
                    entry[key] = _resolve(entry[key], root)
            for key in required_keys:
                if key == "id":
                    continue
                if key not in entry or entry[key] is None:
                    problems.append(f"{where}: {key}: required key missing")
                elif key == PIRADS_KEY:
                    score = entry[key]
                    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
                        problems.append(f"{where}: {key}: must be an int in 1..5, got {score!r}")
                elif not isinstance(entry[key], str) or not entry[key]:
                    problems.append(f"{where}: {key}: must be a file path string, got {entry[key]!r}")
            resolved_split.append(entry)
            cases.append((where, entry))
        out[split] = resolved_split
    return out, cases, problems


def load_datalist(
    path: str | os.PathLike[str],
    required_keys: Sequence[str] = ("t2w",),
    splits: Sequence[str] = DEFAULT_SPLITS,
    check_files: bool = True,
    allow_resample: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Read a datalist JSON, resolve its paths and validate every case before training (DESIGN.md section 6).

    Checks, all collected before one :class:`DatalistError` is raised: the JSON reads; every split in ``splits``
    is present and non-empty; ids are unique across splits; every ``required_keys`` key is present; with
    ``check_files``, each required file exists and reads, is a 3D volume, shares shape and affine (within
    1e-3 mm, RAS) with the case's first required image, masks hold only valid labels (prostate {0, 1, 2}, lesion
    and rectum {0, 1}) and images are finite; ``pirads`` (when required) is an int in 1..5.

    Args:
        path: the datalist JSON; relative paths inside it are relative to its folder.
        required_keys: the keys the caller's task needs, e.g. ``("t2w", "adc", "lesion")`` or
            ``("t2w", "pirads")``. Other keys are carried through with their paths resolved, but not checked.
        splits: the splits to load and check.
        check_files: read every required file (set False for a fast structural check only).
        allow_resample: accept modalities on different grids (e.g. PI-CAI's ADC/high-b vs T2W) when the
            pipeline resamples onto the first key; mismatches are then reported in one ``UserWarning``.
        workers: threads reading files; default ``min(8, cpu count)``.
        progress: print ``validated n/N cases`` lines to stderr; default on for 100 cases or more.

    Returns:
        ``{split: [entry, ...]}`` for the requested splits, entries copied with absolute paths.

    Raises:
        ValueError: bad arguments.
        DatalistError: any problem with the datalist, its cases or files (all listed).
    """
    if isinstance(required_keys, str) or isinstance(splits, str):
        raise ValueError("required_keys and splits must be sequences of names, not a single string")
    if not splits:
        raise ValueError("splits must name at least one split")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatalistError(path, [f"{path}: datalist file not found"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatalistError(path, [f"{path}: cannot be read as JSON ({type(exc).__name__}: {exc})"]) from None

    datalist, cases, problems = _structure(data, path, required_keys, splits)
    if check_files and cases:
        image_keys = _image_keys(required_keys)
        results = _check_files(cases, image_keys, allow_resample, workers, progress)
        notes: list[str] = []
        for case_problems, case_notes in results:
            problems.extend(case_problems)
            notes.extend(case_notes)
        if notes and not problems:
            shown = "\n".join(notes[:5]) + (f"\n... and {len(notes) - 5} more" if len(notes) > 5 else "")
            warnings.warn(
                f"{len(notes)} image(s) in {path} are on a different grid than their case's "
                f"{image_keys[0]} and will need resampling:\n{shown}",
                UserWarning,
                stacklevel=2,
            )
    if problems:
        raise DatalistError(path, problems)
    return datalist


def _check_files(
    cases: Sequence[tuple[str, dict[str, Any]]],
    image_keys: Sequence[str],
    allow_resample: bool,
    workers: int,
    progress: bool | None,
) -> list[tuple[list[str], list[str]]]:
    total = len(cases)
    show = total >= _AUTO_PROGRESS_CASES if progress is None else progress
    every = max(1, total // 10) if total >= 20 else 1
    lock = threading.Lock()
    done = 0

    def run(item: tuple[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
        nonlocal done
        result = _check_case(item[0], item[1], image_keys, allow_resample)
        with lock:
            done += 1
            if show and (done % every == 0 or done == total):
                print(f"validated {done}/{total} cases", file=sys.stderr, flush=True)
        return result

    # The first case runs alone: itk loads its modules lazily on first use, which is not safe across threads.
    results = [run(cases[0])]
    if total > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results.extend(pool.map(run, cases[1:]))
    return results


def _summary(path: Path, datalist: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    lines = [f"datalist {path}: OK"]
    total = 0
    for split, entries in datalist.items():
        total += len(entries)
        pirads = Counter(e.get(PIRADS_KEY) for e in entries if isinstance(e.get(PIRADS_KEY), int))
        counts = ", ".join(f"{k}: {pirads[k]}" for k in sorted(pirads)) or "none recorded"
        lines.append(f"  {split}: {len(entries)} cases; PI-RADS {counts}")
    lines.append(f"  total: {total} cases")
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: validate a datalist; prints a summary (exit 0) or every problem (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m common.data.datalist", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="datalist JSON")
    parser.add_argument("--require", default="t2w", help="comma-separated keys the task needs (default: t2w)")
    parser.add_argument("--splits", default=",".join(DEFAULT_SPLITS), help="comma-separated splits to check")
    parser.add_argument("--allow-resample", action="store_true", help="accept modalities on different grids")
    parser.add_argument("--no-files", action="store_true", help="structural checks only, do not read the images")
    parser.add_argument("--workers", type=int, default=None, help="reader threads (default: min(8, cpus))")
    args = parser.parse_args(argv)
    try:
        datalist = load_datalist(
            args.path,
            required_keys=_names(args.require),
            splits=_names(args.splits),
            check_files=not args.no_files,
            allow_resample=args.allow_resample,
            workers=args.workers,
        )
    except DatalistError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_summary(Path(args.path), datalist))
    return 0


if __name__ == "__main__":
    sys.exit(main())
