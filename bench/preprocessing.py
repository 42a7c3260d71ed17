"""Does loading keep up with a GPU? Each task's training and evaluation pipeline, split where MONAI's ``CacheDataset``
splits it (before the first random transform), timed per case at a profile's sizes on a few synthetic cases.

    python bench/preprocessing.py [--profile gpu paper] [--cases 3] [--out bench/results/preprocessing_<machine>.json]

The bundles load every split through ``CacheDataset(cache_rate=1.0)`` (``common/configs/downstream.json``): the
deterministic head of the pipeline (reading the NIfTI files, resampling to the profile's grid, intensity
normalisation, padding, the task's fixed steps) runs once per case when the cache fills; every epoch after that runs
only the random tail (flips, the per-epoch distortion of distortion correction, the diffusion-map choice of
segmentation). ``CacheDataset`` rather than ``PersistentDataset``: a study's cohort fits in memory at every profile
(the paper profile's 740 cases of three 200 x 200 x 96 float32 volumes are 10.7 GB), so nothing has to be written
to disk or hashed, and the cache is made once per run. For each task and profile it prints the seconds per case of
the cached head, of the random tail, and the volumes per second one loader worker then feeds a training step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data.datalist import load_datalist  # noqa: E402
from common.data.phantom import make_cohort  # noqa: E402
from common.profiles import get_profile  # noqa: E402
from common.tasks import task_ids  # noqa: E402
from common.transforms import task_transforms  # noqa: E402


def split_like_cache_dataset(pipeline) -> tuple[list, list]:
    """``(cached head, per-epoch tail)`` of a ``Compose``, split where ``CacheDataset`` stops caching: before the
    first transform that is random (``RandomizableTrait``) or not a MONAI ``Transform``."""
    from monai.transforms import RandomizableTrait, Transform

    first = pipeline.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    transforms = list(pipeline.transforms)
    return (transforms, []) if first is None else (transforms[:first], transforms[first:])


def _apply(transforms: list, item: dict) -> dict:
    from monai.transforms import apply_transform

    for t in transforms:
        item = apply_transform(t, item)
    return item


def time_pipeline(entries: list[dict], task: str, profile: str, train: bool) -> dict:
    """Median seconds per case of the cached head and of the random tail (over the cases, tail 3x per case)."""
    pipeline = task_transforms(task, profile, seed=0, train=train)
    head, tail = split_like_cache_dataset(pipeline)
    head_s, tail_s = [], []
    for entry in entries:
        start = time.perf_counter()
        cached = _apply(head, dict(entry))
        head_s.append(time.perf_counter() - start)
        for _ in range(3):
            start = time.perf_counter()
            _apply(tail, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cached.items()})
            tail_s.append(time.perf_counter() - start)
    head_med, tail_med = statistics.median(head_s), statistics.median(tail_s)
    return {
        "task": task,
        "profile": profile,
        "train": train,
        "cached_steps": [type(t).__name__ for t in head],
        "per_epoch_steps": [type(t).__name__ for t in tail],
        "cached_seconds_per_case": round(head_med, 4),
        "per_epoch_seconds_per_case": round(tail_med, 4),
        "uncached_seconds_per_case": round(head_med + tail_med, 4),
        "volumes_per_second_per_worker": round(1.0 / max(tail_med, 1e-6), 1),
        "volumes_per_second_per_worker_uncached": round(1.0 / (head_med + tail_med), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", nargs="+", default=["gpu", "paper"])
    parser.add_argument("--cases", type=int, default=3, help="synthetic cases per profile (median over them)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's view
    rows = []
    with tempfile.TemporaryDirectory(prefix="vfm_preprocessing_") as tmp:
        for name in args.profile:
            prof = get_profile(name)
            start = time.perf_counter()
            datalist = make_cohort(Path(tmp) / name, cases=max(args.cases, 3), seed=0, size=prof.cohort_size)
            made = time.perf_counter() - start
            splits = load_datalist(datalist, ("t2w", "adc", "dwi", "lesion", "rectum", "pirads"), check_files=False)
            entries = [e for split in splits.values() for e in split][: args.cases]
            print(f"{name}: {len(entries)} cases of {prof.cohort_size} (D, H, W) made in {made:.1f} s", flush=True)
            for task in task_ids():
                for train in (True, False):
                    row = time_pipeline(entries, task, name, train)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    machine = f"{platform.processor() or platform.machine()} 1 thread"
    out = args.out or REPO / "bench" / "results" / f"preprocessing_{platform.machine()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
