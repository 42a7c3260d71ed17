"""The command line of the runner (``python -m tools.study``): options, resolution of the study, the plan, and the
summary."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from common.foundation_models import get_fm

from .executor import Executor, Outcome, Progress, _duration
from .grid import ANALYSIS, FMS, REPO, STATUSES, Run, Study, apply_overrides, build_grid, select
from .machine import (
    NETWORK_FILESYSTEMS,
    SQLITE_MAX_JOBS,
    cpu_count,
    default_jobs,
    filesystem_type,
    memory_gb,
    visible_gpus,
)
from .slurm import emit_slurm
from .store import analysis_is_current, experiment_id, finished_runs, is_done, resumable, tracking_setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.study",
        description="Run the transfer-limits study for a profile: cohort, pretraining, the twenty downstream bundles, "
        "the random-weight runs, the specialised bundles, for each seed, then the analysis (README, 'The study'). "
        "Run it again to skip what finished and resume what was interrupted.",
    )
    p.add_argument("--profile", default="smoke", help="smoke | demo | gpu | paper (default smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="seeds (default 0)")
    p.add_argument("--study", default="vfm-study", help="study name = MLflow experiment (default vfm-study)")
    p.add_argument("--study_dir", help="output folder (default results/study-<profile> in the repository)")
    p.add_argument("--datalist", help="a real cohort's datalist.json (default: the synthetic cohort, made once)")
    p.add_argument("--tracking_uri", help="MLflow store (default sqlite:///<study_dir>/mlflow.db); a server: "
                   "http://HOST:PORT")  # fmt: skip
    p.add_argument("--weights", nargs="+", action="extend", metavar="FM=PATH", default=[],
                   help="an FM's official pretrained weights: skips its pretraining runs (FMs: " + ", ".join(FMS)
                   + ")")  # fmt: skip
    p.add_argument("--profound_weights", help="official ProFound weights (same as --weights profound=PATH)")
    p.add_argument("--provicnet_weights", help="official ProViCNet or DINOv2 weights (--weights provicnet=PATH)")
    p.add_argument("--jobs", type=int, help="runs at once (default: one per GPU, on CPU what cores and memory bear)")
    p.add_argument("--only", nargs="+", action="extend", metavar="GLOB",
                   help="run only these runs, by name glob: 'profound_*', 'provicnet_pretrain', '*/random', "
                        "'unet_segmentation/seed1' (the analysis runs too unless --no_analysis)")  # fmt: skip
    p.add_argument("--override", nargs=2, action="append", default=[], metavar=("GLOB", "KEY=VALUE"),
                   help="pass --KEY VALUE to the runs matching GLOB, e.g. --override '*' epochs=1 or --override "
                        "analysis n_bootstrap=200; it does not change which finished runs count as done")  # fmt: skip
    p.add_argument("--force", action="store_true", help="run finished runs again (into new MLflow runs)")
    p.add_argument("--no_analysis", action="store_true", help="leave out the analysis at the end")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the commands, run nothing")
    p.add_argument("--emit", choices=["slurm"], help="write cluster job scripts instead of running")
    p.add_argument("--slurm_out", help="folder of the Slurm scripts (default <study_dir>/slurm)")
    p.add_argument("--slurm_gpus", type=int, default=1, help="GPUs per run task (default 1; >1 uses torchrun)")
    p.add_argument("--slurm_cpus", type=int, default=8, help="CPUs per run task (default 8)")
    p.add_argument("--slurm_time", default="24:00:00", help="time limit per run task (default 24:00:00)")
    p.add_argument("--slurm_partition", help="Slurm partition")
    p.add_argument("--slurm_account", help="Slurm account")
    return p


class UsageError(ValueError):
    """A problem with the command line or its inputs; reported without a traceback."""


@contextlib.contextmanager
def _study_lock(study_dir: Path) -> Iterator[int]:
    """Hold ``<study_dir>/.study.lock`` and yield its file descriptor: two runners on one study would start the same
    runs twice. The lock belongs to the open file, which the runner's bundles inherit, so it lasts until the runner and
    every bundle it started have ended (it is never unlocked explicitly, which would release it for them too)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".study.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise UsageError(f"another tools.study runs on {study_dir} (runner {handle.read().strip()}, or a bundle it "
                             "started that still runs); wait for it or stop it") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield handle.fileno()


def _display(path: Path | str) -> str:
    """``path`` relative to the working directory when inside it, for shorter messages."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _write_json(path: Path, data: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _summary(outcomes: Sequence[Outcome], study: Study, tracking_uri: str, wall: float, out: TextIO) -> None:
    by = {s: [o for o in outcomes if o.status == s] for s in STATUSES}
    parts = [f"{len(by['finished'])} finished now", f"{len(by['done'])} already done"]
    parts += [f"{len(by[s])} {s}" for s in ("failed", "blocked", "interrupted", "pending") if by[s]]
    print(f"\nStudy {study.name} (profile {study.profile}, seeds {' '.join(map(str, study.seeds))}): "
          f"{len(outcomes)} runs, {', '.join(parts)}; {_duration(wall)}.", file=out)  # fmt: skip
    if by["failed"]:
        print("Failed (the log of each says why):", file=out)
        for o in by["failed"]:
            print(f"  {o.run.name}  exit {o.returncode}  log: {_display(o.log)}", file=out)
            if o.reason:
                print(f"      {o.reason}", file=out)
    if by["blocked"]:
        print("Not started:", file=out)
        for o in by["blocked"]:
            print(f"  {o.run.name}: {o.reason}", file=out)
    if by["interrupted"] or by["pending"]:
        print("Interrupted: run the same command again to resume from the checkpoints.", file=out)
    if by["failed"] or by["blocked"]:
        print("Fix the cause and run the same command again: finished runs are skipped.", file=out)
    report = study.analysis_dir / "report.html"
    if report.is_file():
        print(f"Report: {_display(report)} (and {_display(report.with_suffix('.md'))})", file=out)
    else:
        print(f"No report yet ({_display(report)} is written by the analysis).", file=out)
    if tracking_uri.startswith("sqlite:"):
        mlflow = Path(sys.executable).with_name("mlflow")
        found = experiment_id(tracking_uri, study.name)  # its runs table, not MLflow 3's GenAI start page
        page = "http://127.0.0.1:5000" + (f"/#/experiments/{found}/runs" if found is not None else "")
        print(f"See the runs: {shlex.quote(_display(mlflow))} ui --backend-store-uri {shlex.quote(tracking_uri)} "
              f"--host 127.0.0.1 --port 5000   (then open {page})", file=out)  # fmt: skip
    else:
        print(f"See the runs on the tracking server: {tracking_uri}", file=out)


def _resolve(args: argparse.Namespace) -> tuple[Study, str]:
    """The study and its tracking URI from the command line, with every path absolute; makes nothing."""
    from common.profiles import get_profile

    try:
        get_profile(args.profile)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    study_dir = Path(args.study_dir).resolve() if args.study_dir else REPO / "results" / f"study-{args.profile}"
    weights = {}
    pairs = [("profound", args.profound_weights), ("provicnet", args.provicnet_weights)]
    for item in args.weights:
        fm, sep, path = item.partition("=")
        if not sep or fm not in FMS or not path:
            raise UsageError(f"--weights {item}: expected FM=PATH with FM one of {', '.join(FMS)}")
        pairs.append((fm, path))
    for fm, path in pairs:
        if path:
            if not Path(path).is_file():
                raise UsageError(f"weights of {fm}: {path}: no such file")
            weights[fm] = str(Path(path).resolve())
    for fm in FMS:
        if fm not in weights and not get_fm(fm).pretrain_bundle:
            raise UsageError(f"{fm} has no pretraining bundle: give its weights with --weights {fm}=PATH")
    if args.datalist:
        if not Path(args.datalist).is_file():
            raise UsageError(f"--datalist {args.datalist}: no such file")
        datalist = str(Path(args.datalist).resolve())
    else:
        datalist = str(study_dir / f"cohort-{args.profile}" / "datalist.json")
    from common.bundle import sqlite_path, sqlite_uri

    if not args.tracking_uri:
        uri = sqlite_uri(study_dir / "mlflow.db")
    elif sqlite_path(args.tracking_uri) is not None:  # absolute, so that every run means the same file
        uri = sqlite_uri(sqlite_path(args.tracking_uri))
    else:
        uri = args.tracking_uri
    if not args.study.strip() or any(c in args.study for c in "\t\n'\"/"):
        raise UsageError(f"--study {args.study!r}: use a plain name")
    study = Study(args.profile, tuple(args.seeds), study_dir, datalist, args.study, weights)
    return study, uri


def _plan(args: argparse.Namespace, study: Study, uri: str) -> list[Run]:
    try:
        runs = apply_overrides(build_grid(study, uri), [tuple(o) for o in args.override])
        return select(runs, args.only, analysis=not args.no_analysis)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _make_cohort(args: argparse.Namespace, study: Study, out: TextIO) -> float:
    """Make (or reuse) the synthetic cohort, once, before any run; return the seconds it took."""
    from common.bundle import resolve_datalist

    start = time.perf_counter()
    if args.datalist:
        return 0.0
    with contextlib.redirect_stdout(out):
        resolve_datalist(None, study.profile, study.study_dir)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The command line (``python -m tools.study --help``); returns the exit code: 0 when every run finished (or was
    done before), 1 when a run failed, was blocked or interrupted, 2 for a usage error. Messages go to ``out``
    (default stdout)."""
    args = _parser().parse_args(argv)
    try:
        return _main(args, out or sys.stdout)
    except UsageError as err:
        print(f"tools.study: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, out: TextIO) -> int:
    study, uri = _resolve(args)
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if args.emit == "slurm":
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            raise UsageError("--emit slurm needs a tracking server every node reaches: --tracking_uri http://HOST:5000 "
                             "(README, 'Tracking server'); SQLite is not safe across nodes")  # fmt: skip
        runs = _plan(args, study, uri)
        _make_cohort(args, study, out)
        folder = Path(args.slurm_out).resolve() if args.slurm_out else study.study_dir / "slurm"
        written = emit_slurm(runs, study, folder, uri, gpus=args.slurm_gpus, cpus=args.slurm_cpus,
                             time_limit=args.slurm_time, partition=args.slurm_partition,
                             account=args.slurm_account)  # fmt: skip
        n = sum(r.stage != ANALYSIS for r in runs)
        print(f"Wrote {len(written)} files for {n} runs to {_display(folder)}. The study dir "
              f"{_display(study.study_dir)} must be on a filesystem every node sees. Start the tracking server first "
              f"(README, 'Tracking server'), then: {shlex.quote(str(folder / 'submit.sh'))}", file=out)  # fmt: skip
        return 0

    runs = _plan(args, study, uri)
    _check_store(uri, study)
    if args.dry_run:
        return _dry_run(runs, study, uri, args, out)
    with _study_lock(study.study_dir) as lock_fd:
        return _run_here(runs, study, uri, args, out, hold_fds=(lock_fd,))


def _check_store(uri: str, study: Study) -> None:
    """The tracking store, checked before any work (DESIGN.md section 10): a known kind, a server that answers, a
    SQLite folder that exists unless it is the study folder, which the runner makes."""
    from common.bundle.tracking import check_tracking_uri, sqlite_path

    db = sqlite_path(uri)
    try:
        check_tracking_uri(uri, create=db is not None and db.parent == study.study_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _dry_run(runs: Sequence[Run], study: Study, uri: str, args: argparse.Namespace, out: TextIO) -> int:
    finished = finished_runs(uri, study.name) if not args.force else []
    tracking, env = tracking_setup(uri)
    print(f"Study {study.name}, profile {study.profile}, seeds {' '.join(map(str, study.seeds))}: {len(runs)} runs; "
          f"store {uri}; run from {REPO}{' with ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}",
          file=out)  # fmt: skip
    for run in runs:
        if run.stage == ANALYSIS:
            state = "done" if analysis_is_current(finished, study, study.analysis_dir / "report.html") else "run"
            cmd = ["python", "-m", "monai.bundle", "run", "--config_file", run.config_file(), *run.overrides()]
        else:
            state = "done" if is_done(run, finished, study) else ("resume" if resumable(run) else "run")
            cmd = ["python", "-m", "monai.bundle", "run", "--config_file", run.config_file(), *tracking,
                   *run.overrides()]  # fmt: skip
        needs = f"  (after {', '.join(run.depends)})" if run.depends else ""
        print(f"{state:6s} {run.name}{needs}\n       {shlex.join(cmd)}", file=out)
    return 0


def _run_here(
    runs: Sequence[Run], study: Study, uri: str, args: argparse.Namespace, out: TextIO, hold_fds: Sequence[int] = ()
) -> int:
    start_wall = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    cores, memory, gpus = cpu_count(), memory_gb(), visible_gpus()
    jobs = args.jobs or default_jobs(study.profile, len(gpus), cores, memory)
    from common.bundle import sqlite_path

    db = sqlite_path(uri)
    if db is not None:
        if jobs > SQLITE_MAX_JOBS:
            print(f"tools.study: {jobs} runs at once is more than one SQLite store bears here (at most "
                  f"{SQLITE_MAX_JOBS}); running {SQLITE_MAX_JOBS}. For more, use a tracking server "
                  "(--tracking_uri http://HOST:5000; README, 'Tracking server').", file=out)  # fmt: skip
            jobs = SQLITE_MAX_JOBS
        kind = filesystem_type(db.parent if db.parent.exists() else study.study_dir)
        if kind.split(".")[0] in NETWORK_FILESYSTEMS or kind in NETWORK_FILESYSTEMS:
            print(f"tools.study: the SQLite store {db} is on a network filesystem ({kind}), whose file locks SQLite "
                  "cannot rely on: parallel runs may fail with 'database is locked' or corrupt it. Put --study_dir "
                  "on a local disk or use a tracking server (README, 'Tracking server').", file=out)  # fmt: skip

    from common.bundle import ensure_experiment

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "creating tables" notes amid the plan
    cohort_seconds = _make_cohort(args, study, out)
    ensure_experiment(uri, study.name)  # once, before parallel runs (DESIGN.md section 5)
    finished = finished_runs(uri, study.name)

    from common.bundle.tracking import mark_abandoned

    abandoned = [r.name for r in runs if r.output_dir and mark_abandoned(r.output_dir)]
    if abandoned:
        print(f"Marked KILLED {len(abandoned)} run(s) left RUNNING by a process that is gone: {', '.join(abandoned)} "
              "(those with checkpoints resume).", file=out)  # fmt: skip
    outcomes = [Outcome(r) for r in runs]
    names = {r.name for r in runs}
    grid = {r.name: r for r in build_grid(study, uri)}
    for o in outcomes:
        if o.run.stage == ANALYSIS:
            continue
        if not args.force and is_done(o.run, finished, study):
            o.status, o.reason = "done", "finished before"
            continue
        outside = [d for d in o.run.depends if d not in names]
        unmet = [d for d in outside if not is_done(grid[d], finished, study)]
        if unmet:
            o.status = "blocked"
            o.reason = f"needs {', '.join(unmet)}, which is not selected and has not finished (add it to --only)"
        o.run = replace(o.run, depends=tuple(d for d in o.run.depends if d in names))
    analysis_current = not args.force and analysis_is_current(finished, study, study.analysis_dir / "report.html")

    timing_path = study.study_dir / "study_timing.json"
    machine = {"cores": cores, "memory_gb": round(memory, 1), "gpus": len(gpus), "gpu_names": _gpu_names(gpus)}

    n_done = sum(o.status == "done" for o in outcomes)
    n_resume = sum(o.status == "pending" and resumable(o.run) for o in outcomes)
    n_todo = sum(o.status == "pending" and o.run.stage != ANALYSIS for o in outcomes)
    threads = max(1, cores // max(1, min(jobs, n_todo)))  # cores shared by the runs that can be running together
    device = f"{len(gpus)} GPU(s)" if gpus else f"{cores} CPU cores, {memory:.0f} GB free"
    print(f"Study {study.name}, profile {study.profile}, seeds {' '.join(map(str, study.seeds))}: {len(outcomes)} runs "
          f"({n_done} already finished{', skipped' if n_done else ''}; {n_resume} to resume); {jobs} at once on "
          f"{device}{'' if gpus else f', {threads} thread(s) each'}.", file=out)  # fmt: skip
    print(f"Store {uri}; logs in {_display(study.logs_dir)}/", file=out)
    setup_seconds = time.monotonic() - start_wall

    def record() -> None:
        """``<study_dir>/study_timing.json``: this invocation's runs with their status and seconds (bench/). An
        invocation that only finds everything done keeps the record of the one that did the work."""
        if analysis_current and all(o.status == "done" for o in outcomes if o.run.stage != ANALYSIS):
            return
        _write_json(timing_path, {
            "study": study.name, "profile": study.profile, "seeds": list(study.seeds), "started": started,
            "wall_seconds": round(time.monotonic() - start_wall, 2), "setup_seconds": round(setup_seconds, 2),
            "cohort_seconds": round(cohort_seconds, 2), "jobs": jobs, "threads_per_run": threads, "machine": machine,
            "tracking_uri": uri, "runs": [o.record() for o in outcomes],
        })  # fmt: skip

    executor = Executor(outcomes, jobs=jobs, threads=threads, gpus=gpus, tracking_uri=uri, logs_dir=study.logs_dir,
                        progress=Progress(out), analysis_current=analysis_current, record=record,
                        hold_fds=hold_fds)  # fmt: skip
    completed = executor.run()
    record()
    _summary(outcomes, study, uri, time.monotonic() - start_wall, out)
    bad = any(o.status in ("failed", "blocked", "interrupted", "pending") for o in outcomes)
    return 1 if bad or not completed else 0


def _gpu_names(gpus: Sequence[str]) -> list[str]:
    """The GPUs' names from ``nvidia-smi`` (not through torch, which would open a CUDA context in the runner)."""
    if not gpus:
        return []
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    names = dict(line.split(", ", 1) for line in query.stdout.splitlines() if ", " in line)
    return [names.get(g, "") for g in gpus]
