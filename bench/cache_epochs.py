"""The frozen-encoder cache in the real bundles: each ProFound finetune bundle trained for a few epochs through its
documented entry point (``python -m monai.bundle run``), once with ``--encoder_cache off`` and once with the task's
cached mode, one after the other on the same machine; the training time of every epoch read back from the MLflow
run (``epoch_seconds``, Ignite's time of the epoch's training pass, validation excluded).

    python bench/cache_epochs.py [--profile demo] [--epochs N (default: the profile's)] [--tasks ...]
                                 [--out bench/results/cache_epochs_<profile>_cpu<threads>.json]

Epoch 1 of a cached run fills the cache (it computes the encoder as the uncached run does, plus the bookkeeping);
from epoch 2 every training step reuses the stage maps. Reported per task: each run's epoch times, epoch 1 and the
mean of the later epochs, the ratio uncached / cached of those later epochs (the issue's measure) and of the whole
run's wall time (validation passes included, which the cache serves from the first pass on).

The runs are the bundles' random-weight runs (``--init random``): the same network, frozen encoder and training
steps as the pretrained finetune, without needing a pretraining checkpoint; weights do not change the cost. The
profile's synthetic cohort is made once before the first run, in ``--work`` (a temporary folder by default, removed
afterwards), which holds every run's folder and one SQLite store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from common.bundle.data import resolve_datalist  # noqa: E402
from common.contract import RUN_FILE  # noqa: E402
from common.profiles import get_profile  # noqa: E402
from common.tasks import get_task  # noqa: E402
from tools.study import tracking_setup  # noqa: E402

#: the ProFound finetune bundles whose task caches the frozen encoder in training (``Task.encoder_cache == "all"``)
TASKS = ("classification", "segmentation", "super_resolution")
#: what the bundle logs at exit about its cache (``common.bundle.downstream.cache_frozen_encoder``)
CACHE_LINE = re.compile(
    r"encoder cache at exit: FeatureCache\((\d+) volumes, ([\d.]+) MiB of [\d.]+, (\d+) hits, (\d+) misses\)"
)


def bundle_command(task: str, mode: str, profile: str, epochs: int, work: Path) -> list[str]:
    """The documented bundle command of ``profound_<task>_finetune``'s random-weight run with ``--encoder_cache
    mode``: study folder ``work`` (its cohort), run folder ``work/<task>-<mode>``, the store ``work/mlflow.db``."""
    tracking, _ = tracking_setup(f"sqlite:///{work / 'mlflow.db'}")  # the runner's own arguments for a SQLite store
    return [sys.executable, "-m", "monai.bundle", "run",
            "--config_file", f"bundles/profound_{task}_finetune/configs/train.json",
            "--profile", profile, "--init", "random", "--epochs", str(epochs), "--encoder_cache", mode,
            "--study_dir", str(work), "--output_dir", str(work / f"{task}-{mode}"), *tracking]  # fmt: skip


def epoch_seconds(work: Path, output_dir: Path) -> list[float]:
    """The ``epoch_seconds`` history of the run in ``output_dir`` from the store ``work/mlflow.db``, by epoch."""
    from mlflow import MlflowClient

    run_id = json.loads((output_dir / RUN_FILE).read_text())["run_id"]
    history = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_metric_history(run_id, "epoch_seconds")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def run_bundle(task: str, mode: str, profile: str, epochs: int, work: Path, threads: int) -> dict:
    """Run one bundle to completion; its epoch times and wall time. Raises with the log's tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    command = bundle_command(task, mode, profile, epochs, work)
    print(f"{task} encoder_cache={mode}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{task} encoder_cache={mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    epochs_s = epoch_seconds(work, work / f"{task}-{mode}")
    if len(epochs_s) != epochs:
        raise RuntimeError(f"{task} encoder_cache={mode}: {len(epochs_s)} epoch times logged, expected {epochs}")
    found = CACHE_LINE.search(done.stdout + done.stderr)
    cache = None
    if found:
        volumes, mib, hits, misses = found.groups()
        cache = {"volumes": int(volumes), "mib": float(mib), "hits": int(hits), "misses": int(misses)}
    elif mode != "off":
        raise RuntimeError(f"{task} encoder_cache={mode}: the run did not report its cache (no {CACHE_LINE.pattern!r})")
    print(f"  epochs {[round(s, 2) for s in epochs_s]} s, wall {wall:.1f} s, cache {cache}", flush=True)
    return {
        "mode": mode,
        "epoch_seconds": [round(s, 3) for s in epochs_s],
        "first_epoch_seconds": round(epochs_s[0], 3),
        "later_epoch_seconds": round(statistics.mean(epochs_s[1:]), 3),  # main() asks for at least 2 epochs
        "wall_seconds": round(wall, 1),
        "cache": cache,
    }


def compare(task: str, uncached: dict, cached: dict) -> dict:
    """One task's row: both runs and the ratios uncached / cached."""
    return {
        "task": task,
        "bundle": f"profound_{task}_finetune",
        "uncached": uncached,
        "cached": cached,
        "later_epochs_ratio": round(uncached["later_epoch_seconds"] / cached["later_epoch_seconds"], 2),
        "wall_ratio": round(uncached["wall_seconds"] / cached["wall_seconds"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--epochs", type=int, help="at least 2: epoch 1 fills the cache (default: the profile's)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of each bundle run")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, help="default: bench/results/cache_epochs_<profile>_cpu<threads>.json")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or get_profile(args.profile).epochs
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch fills the cache, the later ones use it")
    out = args.out or REPO / "bench" / "results" / f"cache_epochs_{args.profile}_cpu{args.threads}.json"
    rows = []
    with tempfile.TemporaryDirectory(prefix="vfm-cache-epochs-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        print(f"cohort: {resolve_datalist(None, args.profile, work)}", flush=True)  # made once, outside the runs' times
        for task in args.tasks:
            cached_mode = get_task(task).encoder_cache
            if cached_mode != "all":
                raise SystemExit(f"{task}: its encoder_cache default is {cached_mode!r}, not 'all'")
            runs = {mode: run_bundle(task, mode, args.profile, args.epochs, work, args.threads)
                    for mode in ("off", cached_mode)}  # fmt: skip
            rows.append(compare(task, runs["off"], runs[cached_mode]))
            print(f"{task}: later epochs {rows[-1]['later_epochs_ratio']}x faster with the cache, "
                  f"whole run {rows[-1]['wall_ratio']}x", flush=True)  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "profile": args.profile,
              "epochs": args.epochs, "init": "random", "rows": rows}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
