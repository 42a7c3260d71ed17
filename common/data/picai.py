"""Build a datalist for the PI-CAI Public Training and Development dataset.

PI-CAI (Saha et al., "Artificial Intelligence and Radiologists at Prostate Cancer Detection in MRI: The PI-CAI
Challenge", doi:10.5281/zenodo.6522364): 1500 bpMRI studies of 1476 patients. Its public layout:

- images (zenodo record 6517398, ``picai_public_images_fold0..4``)::

      <images_dir>/<patient_id>/<patient_id>_<study_id>_{t2w,adc,hbv,sag,cor}.mha

  The fold folders may be kept or merged: the tree is searched recursively. ``sag``/``cor`` are not used.
- labels (github DIAGNijmegen/picai_labels, CC BY-NC 4.0)::

      <labels_dir>/csPCa_lesion_delineations/human_expert/resampled/<pid>_<sid>.nii.gz   (on the T2W grid)
      <labels_dir>/csPCa_lesion_delineations/AI/Bosma22a/<pid>_<sid>.nii.gz             (AI, where no expert one)
      <labels_dir>/anatomical_delineations/whole_gland/AI/Bosma22b/<pid>_<sid>.nii.gz   (AI whole gland, optional)
      <labels_dir>/clinical_information/marksheet.csv

Label handling:

- Expert lesion masks are graded (0 = ISUP <= 1, 2..5 = the lesion's ISUP grade); AI masks are binary. Every mask
  holding values above 1 is **binarised** (``> 0`` -> 1) into a copy under ``<out folder>/picai_lesions_binary/``,
  because the datalist contract is lesion {0, 1}; binary masks are referenced in place.
- The whole gland is a binary {0, 1} ``prostate`` mask (no PZ/TZ zones); PI-CAI has no rectal mask.
- Case PI-RADS = the maximum of the marksheet's comma-separated per-lesion ``lesion_PIRADS`` scores. ``N/A`` or
  empty means no lesion was reported on MRI; such cases get PI-RADS **1** (the lowest category, "highly
  unlikely"), our documented choice, since PI-CAI does not record 1 vs 2 for negative MRI.

Grids: PI-CAI's ADC and high-b (``hbv``, the datalist's ``dwi``) are acquired on a different grid than T2W. The
datalist records this (``"resample_to": "t2w"``) and must be validated with
``load_datalist(..., allow_resample=True)``; the pipelines resample onto T2W.

Splits are drawn per **patient** (a patient's studies never straddle splits), stratified by the patient's highest
case PI-RADS, with :func:`common.data.splits.split_ids` and the paper's 555/37/148 proportions by default.

Command line::

    python -m common.data.picai --images DIR --labels DIR --out datalist.json [--skip-incomplete] [--validate]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.data.datalist import DEFAULT_SPLITS, DatalistError
from common.data.splits import split_ids

__all__ = [
    "GLAND_DIRS",
    "LESION_DIRS",
    "MARKSHEET",
    "MODALITY_SUFFIXES",
    "build_picai_datalist",
    "case_pirads",
    "main",
]

MODALITY_SUFFIXES: dict[str, str] = {"t2w": "t2w", "adc": "adc", "dwi": "hbv"}
"""Datalist key -> PI-CAI file suffix."""
LESION_DIRS: tuple[tuple[str, str], ...] = (
    ("human_expert", "csPCa_lesion_delineations/human_expert/resampled"),
    ("AI/Bosma22a", "csPCa_lesion_delineations/AI/Bosma22a"),
)
"""``(source name, folder under labels_dir)`` in order of preference."""
GLAND_DIRS: tuple[str, ...] = (
    "anatomical_delineations/whole_gland/AI/Bosma22b",
    "anatomical_delineations/whole_gland/AI",  # earlier picai_labels releases, before the Bosma22b folder
)
MARKSHEET = "clinical_information/marksheet.csv"
BINARY_LESION_DIR = "picai_lesions_binary"
NEGATIVE_MRI_PIRADS = 1
_IMAGE_NAME = re.compile(r"^(?P<pid>[^_/]+)_(?P<sid>[^_/]+)_(?P<mod>[a-z0-9]+)\.(?:mha|mhd|nii|nii\.gz)$")
_NO_SCORE = {"", "n/a", "na", "nan", "none", "-"}


def case_pirads(value: str | float | int | None) -> int:
    """Case PI-RADS from a marksheet ``lesion_PIRADS`` cell: the maximum per-lesion score.

    ``"3,4"`` -> 4, ``"N/A,5"`` -> 5, ``"N/A"`` / empty / ``None`` / NaN -> 1 (no lesion reported on MRI; see the
    module docstring).

    Raises:
        ValueError: a score that is not an integer in 1..5.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NEGATIVE_MRI_PIRADS
    scores = []
    for token in re.split(r"[,;\s]+", str(value).strip()):
        if token.lower() in _NO_SCORE:
            continue
        try:
            number = float(token)
        except ValueError:
            raise ValueError(f"cannot read PI-RADS score {token!r} in {value!r}") from None
        if not number.is_integer() or not 1 <= number <= 5:
            raise ValueError(f"PI-RADS score {token!r} in {value!r} is not an integer in 1..5")
        scores.append(int(number))
    return max(scores, default=NEGATIVE_MRI_PIRADS)


def _index_images(images_dir: Path) -> dict[str, dict[str, Path]]:
    """``{"<pid>_<sid>": {suffix: path}}`` for every PI-CAI image file under ``images_dir`` (recursive)."""
    index: dict[str, dict[str, Path]] = {}
    for root, _, files in os.walk(images_dir):
        for name in files:
            match = _IMAGE_NAME.match(name)
            if match:
                case = f"{match['pid']}_{match['sid']}"
                index.setdefault(case, {}).setdefault(match["mod"], Path(root) / name)
    return index


def _read_marksheet(path: Path) -> tuple[dict[str, dict[str, str]], set[str], list[str]]:
    """``({case: row}, {cases listed more than once}, [problems that make the whole marksheet unusable])``."""
    rows: dict[str, dict[str, str]] = {}
    duplicates: set[str] = set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or [])
            missing = {"patient_id", "study_id", "lesion_PIRADS"} - columns
            if missing:
                return rows, duplicates, [f"marksheet {path}: missing column(s) {sorted(missing)}"]
            for row in reader:
                case = f"{row['patient_id'].strip()}_{row['study_id'].strip()}"
                if case in rows:
                    duplicates.add(case)
                rows[case] = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return rows, duplicates, [f"marksheet {path}: cannot be read ({type(exc).__name__}: {exc})"]
    if not rows:
        return rows, duplicates, [f"marksheet {path}: no rows"]
    return rows, duplicates, []


def _first_existing(folders: Sequence[Path], case: str) -> Path | None:
    for folder in folders:
        candidate = folder / f"{case}.nii.gz"
        if candidate.is_file():
            return candidate
    return None


def _lesion_max(source: Path) -> float | str:
    """Largest voxel value of a lesion mask, or why it cannot be read."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(source)).dataobj)
        return float(data.max()) if data.size else 0.0
    except Exception as exc:  # reported with the other problems of the layout
        return f"cannot be read, the file is corrupt or truncated ({type(exc).__name__}: {exc})"


def _binarise(source: Path, target_dir: Path) -> Path:
    """Write a ``> 0`` -> 1 uint8 copy of a graded lesion mask into ``target_dir``; returns its path."""
    import nibabel as nib

    img = nib.load(str(source))
    data = np.asanyarray(img.dataobj)
    target_dir.mkdir(exist_ok=True)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    target = target_dir / source.name
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), img.affine, header), str(target))
    return target


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0


def _portable(path: Path, root: Path) -> str:
    """Relative to the datalist folder when the file lies under it, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def build_picai_datalist(
    images_dir: str | os.PathLike[str],
    labels_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    marksheet: str | os.PathLike[str] | None = None,
    seed: int = 0,
    proportions: Sequence[float] = (555, 37, 148),
    prostate_dir: str | os.PathLike[str] | None = None,
    skip_incomplete: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a datalist (``t2w``, ``adc``, ``dwi`` = hbv, ``lesion``, ``prostate`` where found, ``pirads``) for PI-CAI.

    Args:
        images_dir: the unpacked image folds (searched recursively for ``<pid>_<sid>_<t2w|adc|hbv>.mha``).
        labels_dir: a checkout of picai_labels.
        out_path: the datalist JSON to write; binarised lesion copies go beside it.
        marksheet: the clinical marksheet; default ``<labels_dir>/clinical_information/marksheet.csv``.
        seed: seed of the patient-level split.
        proportions: training/validation/test proportions passed to ``split_ids`` (paper: 555/37/148).
        prostate_dir: folder of ``<pid>_<sid>.nii.gz`` whole-gland masks; default the Bosma22b AI masks.
        skip_incomplete: leave out studies that lack a modality, a lesion label or a marksheet row (they are
            listed in a ``UserWarning`` and in the datalist's ``build.skipped``) instead of raising.
        workers: threads that read (and binarise) the lesion masks; default ``min(8, cpu count)``.

    Returns:
        ``out_path``.

    Raises:
        ValueError: bad arguments or folders.
        DatalistError: studies with missing files or marksheet entries (all listed), unless ``skip_incomplete``.
    """
    images_dir, labels_dir, out_path = Path(images_dir), Path(labels_dir), Path(out_path)
    if not images_dir.is_dir():
        raise ValueError(f"images_dir {images_dir} is not a folder")
    if not labels_dir.is_dir():
        raise ValueError(f"labels_dir {labels_dir} is not a folder")
    if len(proportions) != 3 or not all(_positive_number(p) for p in proportions):
        raise ValueError(f"proportions must be 3 positive numbers (training, validation, test), got {proportions!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    marksheet_path = Path(marksheet) if marksheet is not None else labels_dir / MARKSHEET
    if not marksheet_path.is_file():
        raise ValueError(f"marksheet {marksheet_path} not found; PI-RADS scores come from it")
    gland_dirs = [Path(prostate_dir)] if prostate_dir is not None else [labels_dir / d for d in GLAND_DIRS]
    if prostate_dir is not None and not gland_dirs[0].is_dir():
        raise ValueError(f"prostate_dir {prostate_dir} is not a folder")

    images = _index_images(images_dir)
    if not images:
        raise ValueError(f"no PI-CAI images (<patient_id>_<study_id>_t2w.mha ...) found under {images_dir}")
    rows, duplicates, sheet_problems = _read_marksheet(marksheet_path)
    if sheet_problems:
        raise DatalistError(marksheet_path, sheet_problems, subject="PI-CAI marksheet")

    lesion_dirs = [labels_dir / folder for _, folder in LESION_DIRS]
    source_names = {folder: name for (name, _), folder in zip(LESION_DIRS, lesion_dirs, strict=True)}
    lesion_files = {case: path for case in images if (path := _first_existing(lesion_dirs, case)) is not None}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        lesion_max = dict(zip(lesion_files, pool.map(_lesion_max, lesion_files.values()), strict=True))
    entries: dict[str, dict[str, Any]] = {}
    incomplete: dict[str, list[str]] = {}
    for case in sorted(images):
        found = images[case]
        case_problems = []
        entry: dict[str, Any] = {"id": case}
        for key, suffix in MODALITY_SUFFIXES.items():
            if suffix in found:
                entry[key] = found[suffix]
            else:
                case_problems.append(f"{case}: {key} ({case}_{suffix}.mha): not found under {images_dir}")
        if case not in lesion_files:
            where = " or ".join(str(d) for d in lesion_dirs)
            case_problems.append(f"{case}: lesion ({case}.nii.gz): not found in {where}")
        elif isinstance(lesion_max[case], str):
            case_problems.append(f"{case}: lesion {lesion_files[case]}: {lesion_max[case]}")
        if case in duplicates:
            case_problems.append(f"{case}: pirads: study listed more than once in marksheet {marksheet_path}")
        gland = _first_existing(gland_dirs, case)
        if gland is not None:
            entry["prostate"] = gland
        row = rows.get(case)
        if row is None:
            case_problems.append(f"{case}: pirads: study not in marksheet {marksheet_path}")
        else:
            try:
                entry["pirads"] = case_pirads(row.get("lesion_PIRADS"))
            except ValueError as exc:
                case_problems.append(f"{case}: pirads: {exc} (marksheet {marksheet_path})")
            entry["patient_id"] = row["patient_id"].strip()
            entry["study_id"] = row["study_id"].strip()
            entry["case_ISUP"] = _int_or_none(row.get("case_ISUP"))
            cspca = (row.get("case_csPCa") or "").strip().upper()
            entry["case_csPCa"] = {"YES": True, "NO": False}.get(cspca)
        if case_problems:
            incomplete[case] = case_problems
        else:
            entries[case] = entry
    problems = [p for case_problems in incomplete.values() for p in case_problems]
    if problems and not skip_incomplete:
        raise DatalistError(images_dir, problems, subject="PI-CAI layout under")
    if not entries:
        raise DatalistError(images_dir, problems or ["no complete study"], subject="PI-CAI layout under")
    skipped = {case: "; ".join(p.split(": ", 1)[1] for p in ps) for case, ps in incomplete.items()}
    if skipped:
        warnings.warn(
            f"PI-CAI: skipped {len(skipped)} incomplete stud(y/ies): " + ", ".join(sorted(skipped)[:20]),
            UserWarning,
            stacklevel=2,
        )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    root = out_path.parent.resolve()
    binary_dir = root / BINARY_LESION_DIR
    cases = sorted(entries)
    graded = [c for c in cases if lesion_max[c] > 1]  # expert masks carry the ISUP grade 2..5 as the label
    with ThreadPoolExecutor(max_workers=workers) as pool:
        copies = dict(zip(graded, pool.map(lambda c: _binarise(lesion_files[c], binary_dir), graded), strict=True))
    n_binarised = len(copies)
    for case in cases:
        entries[case]["lesion"] = copies.get(case, lesion_files[case])
        entries[case]["lesion_source"] = source_names[lesion_files[case].parent]

    # Split patients, not studies, so that no patient is in two splits; stratify by the patient's highest PI-RADS.
    patients: dict[str, list[str]] = {}
    for case in cases:
        patients.setdefault(entries[case]["patient_id"], []).append(case)
    patient_ids = sorted(patients)
    strata = [max(entries[c]["pirads"] for c in patients[p]) for p in patient_ids]
    try:
        split_patients = split_ids(patient_ids, proportions=tuple(proportions), seed=seed, strata=strata)
    except ValueError as exc:
        raise ValueError(f"cannot split {len(patient_ids)} patients into training/validation/test: {exc}") from exc
    path_keys = ("t2w", "adc", "dwi", "prostate", "lesion")
    datalist: dict[str, Any] = {
        "name": "PI-CAI",
        "description": (
            "PI-CAI Public Training and Development dataset (bpMRI: T2W, ADC, high-b DWI). ADC and DWI lie on a "
            "different grid than T2W: validate with allow_resample=True; pipelines resample onto T2W. Lesion masks "
            "are binary (graded expert masks binarised, > 0 -> 1); prostate is a binary AI whole-gland mask; no "
            "rectal mask. pirads = max per-lesion lesion_PIRADS, N/A -> 1."
        ),
        "reference": "Saha et al., The PI-CAI Challenge, doi:10.5281/zenodo.6522364",
        "licence": "labels CC BY-NC 4.0 (DIAGNijmegen/picai_labels); images: see their zenodo record",
        "modality": {"t2w": "T2W", "adc": "ADC", "dwi": "high-b DWI (PI-CAI hbv)"},
        "labels": {"lesion": {"0": "background", "1": "csPCa (ISUP >= 2)"}, "prostate": {"0": "bg", "1": "gland"}},
        "resample_to": "t2w",
        "build": {
            "images_dir": str(images_dir.resolve()),
            "labels_dir": str(labels_dir.resolve()),
            "marksheet": str(marksheet_path.resolve()),
            "seed": seed,
            "proportions": list(proportions),
            "split_unit": "patient",
            "pirads_rule": "max of lesion_PIRADS; N/A or empty -> 1",
            "lesion_sources": dict(Counter(entries[c]["lesion_source"] for c in cases)),
            "lesions_binarised": n_binarised,
            "with_prostate": sum("prostate" in entries[c] for c in cases),
            "skipped": skipped,
            "marksheet_studies_without_images": len(set(rows) - set(images)),
        },
    }
    for split, members in zip(DEFAULT_SPLITS, split_patients, strict=True):
        split_entries = []
        for case in sorted(c for p in members for c in patients[p]):
            entry = dict(entries[case])
            for key in path_keys:
                if key in entry:
                    entry[key] = _portable(Path(entry[key]), root)
            split_entries.append(entry)
        datalist[split] = split_entries
    out_path.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    return out_path


def _summary(path: Path) -> str:
    data = json.loads(path.read_text(encoding="utf-8"))
    build = data["build"]
    lines = [f"wrote {path}"]
    for split in DEFAULT_SPLITS:
        counts = Counter(e["pirads"] for e in data[split])
        pirads = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts))
        lines.append(f"  {split}: {len(data[split])} studies; PI-RADS {pirads}")
    lines.append(f"  lesion masks: {build['lesion_sources']}; binarised copies: {build['lesions_binarised']}")
    lines.append(f"  with whole-gland mask: {build['with_prostate']}")
    if build["skipped"]:
        lines.append(f"  skipped {len(build['skipped'])} incomplete studies:")
        lines.extend(f"    {case}: {why}" for case, why in sorted(build["skipped"].items()))
    if build["marksheet_studies_without_images"]:
        lines.append(f"  marksheet studies without images (not included): {build['marksheet_studies_without_images']}")
    return "\n".join(lines)


def _proportions(text: str) -> tuple[float, ...]:
    values = tuple(float(t) for t in text.split(","))
    return tuple(int(v) if v.is_integer() else v for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the PI-CAI datalist; exit 0, or 2 with every problem listed."""
    parser = argparse.ArgumentParser(prog="python -m common.data.picai", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of the unpacked PI-CAI image folds")
    parser.add_argument("--labels", required=True, help="checkout of DIAGNijmegen/picai_labels")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    parser.add_argument("--marksheet", default=None, help=f"default: <labels>/{MARKSHEET}")
    parser.add_argument("--prostate-dir", default=None, help="whole-gland masks; default the Bosma22b AI masks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proportions", type=_proportions, default=(555, 37, 148), help="e.g. 555,37,148")
    parser.add_argument("--skip-incomplete", action="store_true", help="leave out incomplete studies")
    parser.add_argument("--validate", action="store_true", help="then read every file with load_datalist")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # skipped studies are printed in the summary
            out = build_picai_datalist(
                args.images,
                args.labels,
                args.out,
                marksheet=args.marksheet,
                seed=args.seed,
                proportions=args.proportions,
                prostate_dir=args.prostate_dir,
                skip_incomplete=args.skip_incomplete,
                workers=args.workers,
            )
        print(_summary(out))
        if args.validate:
            from common.data.datalist import load_datalist

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                load_datalist(
                    out,
                    required_keys=("t2w", "adc", "dwi", "lesion", "pirads"),
                    allow_resample=True,
                    workers=args.workers,
                )
            print("  validated: every file reads; ADC/DWI on other grids than T2W are accepted (resampled later)")
    except ValueError as exc:  # DatalistError included
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
