"""A look at the data before a study: make the cohort, run the five tasks' pipelines, show what they give.

``python -m common.data.overview --profile smoke --out results``:

1. makes the synthetic cohort for the profile under ``<out>/cohort-<profile>/`` (or reuses it when its datalist
   records the same seed, size and case count), or takes ``--datalist`` for a real cohort;
2. validates the datalist as training would (every file, shape, affine, label value, NaN);
3. runs each task's evaluation pipeline (DESIGN.md section 2) over every case and prints shapes, label balance and
   timing;
4. writes PNG previews (the cohort and one figure per task) and ``summary.json`` to ``<out>/overview-<profile>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common.data.phantom import ensure_cohort
from common.profiles import PROFILES, get_profile
from common.tasks import get_task

CLASS_NAMES = ("PI-RADS<=2", "PI-RADS 3", "PI-RADS 4", "PI-RADS 5")


def _as_numpy(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)


def _radiological(ras_slice: np.ndarray) -> np.ndarray:
    """An axial ``(i, j)`` slice of a RAS-oriented volume as displayed by radiologists: anterior at the top, the
    patient's right on the left of the screen (rows = anterior -> posterior, columns = right -> left)."""
    return ras_slice[::-1, ::-1].T


def _mid_slice(volume: np.ndarray, mask: np.ndarray | None = None) -> int:
    """Slice index (last axis) through the mask's centre of mass, or the middle slice."""
    if mask is not None and mask.any():
        return int(round(np.nonzero(mask)[-1].mean()))
    return volume.shape[-1] // 2


def summarise_task(task: str, samples: list[dict]) -> dict:
    """Shapes, label balance and value ranges of one task's pipeline output (``image``/``label`` per sample)."""
    kind, in_place = get_task(task).target_kind, get_task(task).restores_in_place
    image_shapes = Counter(tuple(_as_numpy(s["image"]).shape) for s in samples)
    summary: dict = {"cases": len(samples), "image_shape": [list(k) for k in image_shapes]}
    if kind == "class":
        counts = Counter(int(_as_numpy(s["label"]).reshape(-1)[0]) for s in samples)
        summary["label_balance"] = {CLASS_NAMES[k]: counts.get(k, 0) for k in range(len(CLASS_NAMES))}
        return summary
    summary["label_shape"] = [list(k) for k in Counter(tuple(_as_numpy(s["label"]).shape) for s in samples)]
    if kind == "mask":
        fractions = [float(_as_numpy(s["label"]).mean()) for s in samples]
        summary["label_balance"] = {
            "cases_with_lesion": int(sum(f > 0 for f in fractions)),
            "lesion_voxel_percent": round(100 * float(np.mean(fractions)), 3),
        }
    elif in_place:
        change = [float(np.abs(_as_numpy(s["image"]) - _as_numpy(s["label"])).max()) for s in samples]
        summary["label_balance"] = {"max_abs_change_mean": round(float(np.mean(change)), 4)}
    else:
        summary["label_balance"] = {
            "target_mean": round(float(np.mean([_as_numpy(s["label"]).mean() for s in samples])), 4),
            "target_max": round(float(np.max([_as_numpy(s["label"]).max() for s in samples])), 4),
        }
    return summary


def preview_task(task: str, samples: list[dict], path: Path) -> None:
    """PNG of the first two samples: each input channel and the target at a slice through the lesion/centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask, in_place = get_task(task).target_kind == "mask", get_task(task).restores_in_place
    rows = samples[:2]
    n_cols = max(_as_numpy(s["image"]).shape[0] for s in rows) + 1 + in_place
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.6 * n_cols, 2.8 * len(rows)), squeeze=False)
    for row, sample in zip(axes, rows, strict=False):
        image, label = _as_numpy(sample["image"]), _as_numpy(sample["label"])
        dense = label.ndim == 4
        k_label = _mid_slice(label[0], label[0] > 0.5 if mask else None) if dense else None
        panels = []
        for c in range(image.shape[0]):
            # super-resolution input has half the slices: show the slice at the same position
            k = (
                image.shape[-1] // 2
                if k_label is None
                else min(k_label * image.shape[-1] // label.shape[-1], image.shape[-1] - 1)
            )
            panels.append((f"input ch{c}", image[c, ..., k]))
        if dense:
            panels.append(("target", label[0, ..., k_label]))
            if in_place:
                panels.append(("input - target", image[0, ..., k_label] - label[0, ..., k_label]))
        else:
            panels.append((f"label: {CLASS_NAMES[int(label.reshape(-1)[0])]}", None))
        for ax, (title, arr) in zip(row, panels, strict=False):
            ax.axis("off")
            ax.set_title(title, fontsize=8)
            if arr is None:
                continue
            cmap, limits = ("gray", {}) if title != "input - target" else ("RdBu_r", {"vmin": -0.3, "vmax": 0.3})
            ax.imshow(_radiological(arr), cmap=cmap, **limits)
        row[0].text(0, -0.08, str(sample.get("id", "")), transform=row[0].transAxes, fontsize=7)
    fig.suptitle(task.replace("_", " "), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_ras(path: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def preview_cohort(entries: list[dict], path: Path, n: int = 4) -> None:
    """PNG of ``n`` cases: T2W, ADC, DWI and the masks over T2W, at the slice through the lesion/prostate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted(entries, key=lambda e: -int(e.get("pirads", 0)))[:: max(1, len(entries) // n)][:n]
    fig, axes = plt.subplots(len(entries), 4, figsize=(11, 2.9 * len(entries)), squeeze=False)
    for row, entry in zip(axes, entries, strict=True):
        # reoriented to RAS, as the pipelines do, so one display rule fits both
        vol = {k: _load_ras(entry[k]) for k in ("t2w", "adc", "dwi") if k in entry}
        masks = {k: _load_ras(entry[k]) for k in ("prostate", "lesion", "rectum") if k in entry}
        k = _mid_slice(
            vol["t2w"], masks.get("lesion") if masks.get("lesion", np.zeros(1)).any() else masks.get("prostate")
        )
        for ax, key in zip(row[:3], ("t2w", "adc", "dwi"), strict=True):
            ax.imshow(_radiological(vol[key][..., k]), cmap="gray")
            ax.set_title(f"{entry['id']} {key.upper()}", fontsize=8)
        row[3].imshow(_radiological(vol["t2w"][..., k]), cmap="gray")
        for key, color in (("prostate", "Greens"), ("rectum", "Blues"), ("lesion", "Reds")):
            if key in masks:
                m = _radiological(masks[key][..., k]).astype(float)
                row[3].imshow(np.ma.masked_where(m == 0, m), cmap=color, alpha=0.45, vmin=0, vmax=2.5)
        row[3].set_title(f"PI-RADS {entry.get('pirads', '?')}: gland, lesion, rectum", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_overview(
    out: Path, profile: str = "smoke", seed: int = 0, cases: int | None = None, datalist: Path | None = None
) -> dict:
    """Make or reuse the cohort, validate it, run the five pipelines; return the summary written to ``summary.json``.

    Returns:
        ``{"profile", "datalist", "splits": {split: n}, "tasks": {task: {...}}}`` with per-task shapes, label
        balance and ``seconds_per_case``.
    """
    from monai.utils import set_determinism

    from common.data.datalist import load_datalist
    from common.transforms import TASKS, required_keys, task_transforms

    prof = get_profile(profile)
    out = Path(out)
    report_dir = out / f"overview-{profile}"
    report_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    if datalist is None:
        datalist = ensure_cohort(out / f"cohort-{profile}", cases or prof.cohort_cases, seed, prof.cohort_size)

    start = time.perf_counter()
    all_keys = sorted({k for task in TASKS for k in required_keys(task)})
    splits = load_datalist(datalist, required_keys=all_keys, allow_resample=True)
    n_cases = sum(len(v) for v in splits.values())
    print(
        f"datalist: {datalist} validated ({n_cases} cases, "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f") in {time.perf_counter() - start:.1f} s"
    )
    entries = [e for split in splits.values() for e in split]
    preview_cohort(entries, report_dir / "cohort.png")

    summary = {
        "profile": prof.to_dict(),
        "datalist": str(datalist),
        "splits": {k: len(v) for k, v in splits.items()},
        "tasks": {},
    }
    print(f"\n{'task':<23}{'image':<20}{'label':<18}{'s/case':>8}  label balance")
    for task in TASKS:
        pipeline = task_transforms(task, profile=profile, seed=seed, train=False)
        start = time.perf_counter()
        samples = [pipeline(dict(entry)) for entry in entries]
        seconds = (time.perf_counter() - start) / len(entries)
        info = summarise_task(task, samples) | {"seconds_per_case": round(seconds, 4)}
        summary["tasks"][task] = info
        preview_task(task, samples, report_dir / f"{task}.png")
        label = "x".join(map(str, info["label_shape"][0])) if "label_shape" in info else "class"
        print(
            f"{task:<23}{'x'.join(map(str, info['image_shape'][0])):<20}{label:<18}{seconds:>8.3f}  "
            + ", ".join(f"{k}: {v}" for k, v in info["label_balance"].items())
        )
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\npreviews and summary.json: {report_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.data.overview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES), help="sizes and cohort (smoke)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (results/)")
    parser.add_argument("--seed", type=int, default=0, help="cohort and pipeline seed (0)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (the profile's count)")
    parser.add_argument("--datalist", type=Path, default=None, help="a real cohort's datalist.json instead")
    args = parser.parse_args(argv)
    try:
        run_overview(args.out, profile=args.profile, seed=args.seed, cases=args.cases, datalist=args.datalist)
    except ValueError as err:  # a bad datalist or argument: the message names the case, key and file
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
