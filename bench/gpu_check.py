"""One prepared GPU check (issue: fast where users pay, item 4): every bundle for one epoch at the gpu profile on CUDA
(bf16 autocast, as the bundles run there), each checked for a FINISHED MLflow run, a finite loss every epoch and its
artifacts; then the train-step benchmark; one JSON of results under ``bench/results/``.

On a machine with a CUDA GPU, from the repository root::

    python bench/gpu_check.py          # meant to fit in 8 minutes on one H100 / H200; not yet run on a GPU
    python bench/gpu_check.py --official DIR   # the benchmark times the official networks too (bench/official.py)

``--dry_run`` runs nothing heavy: it prints every command the check would run (the study runner's own dry run) and
times the train-step benchmark at its ``--small`` shapes, so the script is tested on a CPU. ``--allow_cpu`` runs the
real check without CUDA (e.g. ``--allow_cpu --profile smoke --only unet_segmentation``), as the tests do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from common.analysis.runs import required_artifacts  # noqa: E402
from common.contract import PREDICTIONS_ARTIFACT  # noqa: E402


def required(regime: str) -> tuple[str, ...]:
    """Artifacts a FINISHED run of ``regime`` must hold here: its weights; for the downstream regimes also its test
    predictions and what the analysis needs (``common.analysis.runs.required_artifacts``)."""
    if regime == "pretrain":
        return ("model/model.pt",)
    if regime in ("finetune", "random", "scratch", "specialised"):
        return ("model/model.pt", PREDICTIONS_ARTIFACT, *required_artifacts(regime))
    return ()


def study_command(study_dir: Path, profile: str, only: list[str], dry_run: bool) -> list[str]:
    """The study runner at ``profile`` with one epoch per bundle (pretraining included) and a light analysis."""
    command = [sys.executable, "-m", "tools.study", "--profile", profile, "--study_dir", str(study_dir),
               "--override", "*", "epochs=1", "--override", "analysis", "n_bootstrap=100",
               "--override", "analysis", "n_permutations=100"]  # fmt: skip
    if only:
        command += ["--only", *only]
    if dry_run:
        command.append("--dry_run")
    return command


def check_runs(uri: str, experiment: str) -> list[dict]:
    """One row per run of the study: status, epochs with a finite ``train_loss``, missing artifacts, test metric
    beside its baseline, wall seconds; ``ok`` when FINISHED with finite losses and every required artifact."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    rows = []
    for run in client.search_runs([found.experiment_id]):
        tags, metrics = run.data.tags, run.data.metrics
        regime = tags.get("regime", "")
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
        listed = _artifact_paths(client, run.info.run_id)
        missing = [p for p in required(regime) if p not in listed]
        finite = bool(losses) and all(math.isfinite(v) for v in losses)
        row = {
            "run": run.info.run_name,
            "bundle": tags.get("bundle"),
            "regime": regime,
            "status": run.info.status,
            "epochs": len(losses),
            "finite_loss": finite,
            "missing_artifacts": missing,
            "test_metric": metrics.get("test_metric"),
            "baseline_metric": metrics.get("baseline_metric"),
            "wall_seconds": metrics.get("wall_seconds"),
        }
        row["ok"] = run.info.status == "FINISHED" and not missing and (finite or regime == "analysis")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["regime"] == "analysis", r["bundle"] or "", r["regime"]))


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", help="run profile of the bundles (default gpu)")
    parser.add_argument("--only", nargs="*", default=[], help="bundles to run (default: all, and the analysis)")
    parser.add_argument("--study_dir", type=Path, default=None, help="default: results/gpu-check-<time>")
    parser.add_argument("--no_bench", action="store_true", help="skip the train-step benchmark")
    parser.add_argument("--official", type=Path, metavar="DIR",
                        help="a checkout of the official code, timed beside ours (bench/official.py)")  # fmt: skip
    parser.add_argument("--dry_run", action="store_true", help="print the plan, time the benchmark at small shapes")
    parser.add_argument("--allow_cpu", action="store_true", help="run without CUDA (for tests)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not (cuda or args.dry_run or args.allow_cpu):
        parser.error("no CUDA device: this is the GPU check (--dry_run plans it on a CPU, --allow_cpu runs it there)")
    device = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    study_dir = (args.study_dir or REPO / "results" / f"gpu-check-{stamp}").resolve()
    result: dict = {"device": device, "cuda": cuda, "torch": torch.__version__, "profile": args.profile,
                    "dry_run": args.dry_run, "started": stamp, "study_dir": str(study_dir)}  # fmt: skip
    env = {**os.environ, "MPLBACKEND": "Agg"}

    started = time.monotonic()
    command = study_command(study_dir, args.profile, args.only, args.dry_run)
    print("$", " ".join(command), flush=True)
    study = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    print(study.stdout[-4000:], study.stderr[-2000:], sep="\n", flush=True)
    result["study"] = {"command": command, "returncode": study.returncode,
                       "wall_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    if args.dry_run:
        result["study"]["planned"] = [line.strip() for line in study.stdout.splitlines() if "monai.bundle" in line]
        ok = study.returncode == 0 and bool(result["study"]["planned"])
    else:
        runs = check_runs("sqlite:///" + str(study_dir / "mlflow.db"), "vfm-study")
        result["runs"] = runs
        ok = study.returncode == 0 and bool(runs) and all(r["ok"] for r in runs)
        for r in runs:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['run']:<45} {r['status']:<9} epochs {r['epochs']} "
                  f"finite {r['finite_loss']} missing {r['missing_artifacts']}")  # fmt: skip

    if not args.no_bench:
        bench = [sys.executable, str(REPO / "bench" / "train_step.py"), "--out", str(args.out / "gpu_check_bench")]
        if args.dry_run or not cuda:
            bench += ["--small", "--steps", "2", "--warmup", "1", "--variants", "fp32"]  # compile is minutes on a CPU
        if args.official is not None:
            bench += ["--official", str(args.official.resolve())]
        print("$", " ".join(bench), flush=True)
        timed = subprocess.run(bench, cwd=REPO, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in timed.stdout.splitlines() if line.startswith("{")]
        result["train_step"] = {"command": bench, "returncode": timed.returncode, "rows": rows,
                                "stderr_tail": timed.stderr[-2000:]}  # fmt: skip
        ok = ok and timed.returncode == 0 and bool(rows)

    result["ok"] = ok
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "dry_run" if args.dry_run else ("cuda" if cuda else "cpu")
    name = device.split()[1].lower() if cuda and len(device.split()) > 1 else kind
    path = args.out / f"gpu_check_{name}_{args.profile}_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'passed' if ok else 'FAILED'} in {result['wall_seconds']} s; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
