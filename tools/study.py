"""The study in one command (DESIGN.md sections 5, 6 and 8): every run of the transfer-limits study for a profile,
resumable, in parallel, reported to one MLflow store, and analysed at the end.

    python -m tools.study --profile smoke --seeds 0        # what ./vfm run does
    python -m tools.study --profile gpu --seeds 0 1 2 --profound_weights profound_tiny.pt
    python -m tools.study --profile paper --emit slurm --tracking_uri http://mlflow-host:5000

The grid (:func:`build_grid`), per seed: the two pretraining bundles (left out for an FM whose official weights are
given), the twenty downstream bundles (a finetune run after its FM's pretraining run of the same seed), the ten
random-weight runs (each finetune bundle with ``--init random``, DESIGN.md section 1), the five specialised bundles;
then the tools bundle reads the store and writes the report. A run is one ``python -m monai.bundle run`` of a bundle
from the repository root, which the bundles need (their configs name shared fragments by repository-relative paths).

- Resume: a run is done when the store holds a FINISHED run with its tags (study, bundle, regime, seed, profile)
  and, where that run recorded them as params, the same datalist and pretrained weights. Done runs are skipped;
  ``--force`` runs them again into new MLflow runs (the analysis uses the latest). An interrupted run is started with
  the same command and continues from its checkpoints into its own MLflow run: the bundles do that themselves. A
  run left RUNNING by a process that is gone (SIGKILL, the OOM killer) is marked KILLED before the grid starts. The
  analysis is skipped while its report is newer than every finished run of the study.
- Life cycle (DESIGN.md section 10): the tracking URI is checked before any work; each bundle runs in its own
  process group and gets SIGTERM when the runner dies (even by SIGKILL), so no bundle outlives it; the bundles hold
  the study lock's file too, so a second runner cannot start while a bundle of the first one still runs.
- Parallel: ``--jobs`` runs at once (default one per GPU; on CPU as many as the cores and the memory bear), each with
  ``cores / jobs`` torch threads and its own log ``<study_dir>/logs/<run>.log``. A failed run does not stop the
  others; the runs that need it are not started. The synthetic cohort and the tracking store are made once before
  any run starts, because parallel first-time creation races (DESIGN.md section 5).
- Cluster: ``--emit slurm`` writes job arrays, one task per run (``torchrun`` over the node's GPUs for bundles with a
  ``multi_gpu_train.json``), and the analysis job, all reporting to one tracking server (DESIGN.md section 8).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import fnmatch
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from common.contract import resume_checkpoint
from common.foundation_models import fm_ids, get_fm
from common.tasks import get_task, task_ids

__all__ = [
    "FMS",
    "SPECIALISED",
    "TASKS",
    "Outcome",
    "Run",
    "Study",
    "apply_overrides",
    "build_grid",
    "default_jobs",
    "emit_slurm",
    "main",
    "select",
]

REPO = Path(__file__).resolve().parents[1]
#: the grid derives from the two registries (common.foundation_models, common.tasks)
FMS = fm_ids()
TASKS = task_ids()
#: task -> the specialised task model's bundle (DESIGN.md section 2)
SPECIALISED = {task: get_task(task).specialised_bundle for task in TASKS}
ANALYSIS = "analysis"
#: params a finished run must share with the planned run to count as done (when the finished run recorded them)
IDENTITY_PARAMS = ("datalist", "pretrained_ckpt")
#: peak resident memory of one CPU run per profile, GB (smoke measured at 2.7 GB); sets the default --jobs on CPU
CPU_RUN_MEMORY_GB = {"smoke": 3.0, "demo": 4.0, "gpu": 12.0, "paper": 48.0}
#: concurrent runs one SQLite store is allowed: 32 processes writing 100 metrics each at full speed met no lock
#: error on a local disk (with the tracker's retry), and a bundle writes a few records per epoch; we keep a margin
SQLITE_MAX_JOBS = 16
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs"}
#: what a run's outcome can be; "done" = finished before this invocation (skipped)
STATUSES = ("pending", "running", "done", "finished", "failed", "blocked", "interrupted")


# ------------------------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Study:
    """What identifies a study on disk and in the store.

    Args:
        profile: ``smoke``, ``demo``, ``gpu`` or ``paper`` (``common/profiles.py``).
        seeds: the seeds every run is repeated with.
        name: the study (MLflow experiment and ``study`` tag). Default ``vfm-study``.
        study_dir: absolute output folder (cohort, runs, logs, analysis, SQLite store).
        datalist: absolute path of the cohort's datalist (the synthetic one under ``study_dir`` or a real one).
        weights: FM -> official pretrained weights; that FM's pretraining runs are left out. Default none.
    """

    profile: str
    seeds: tuple[int, ...]
    study_dir: Path
    datalist: str
    name: str = "vfm-study"
    weights: Mapping[str, str] = field(default_factory=dict)

    @property
    def analysis_dir(self) -> Path:
        return self.study_dir / ANALYSIS

    @property
    def logs_dir(self) -> Path:
        return self.study_dir / "logs"


@dataclass(frozen=True)
class Run:
    """One run of the study grid: a bundle, its overrides and the runs it needs.

    Args:
        name: ``<bundle>/seed<k>``, ``<bundle>/random/seed<k>`` for a random-weight run (the run's folder under
            ``<study_dir>/runs``), or ``analysis``.
        bundle: the bundle's folder under ``bundles/``; ``tools`` for the analysis.
        stage: ``pretrain``, ``finetune``, ``random``, ``scratch``, ``specialised`` or ``analysis``.
        regime: the run's MLflow ``regime`` tag.
        seed: the run's seed; None for the analysis.
        args: the bundle's overrides as ``(key, value)`` pairs, passed as ``--key value``.
        depends: names of the runs that must have finished first. Default none.
        output_dir: the run's output folder. Default ``""`` (the analysis: its ``output_dir`` arg).
    """

    name: str
    bundle: str
    stage: str
    regime: str
    seed: int | None
    args: tuple[tuple[str, str], ...]
    depends: tuple[str, ...] = ()
    output_dir: str = ""

    @property
    def key(self) -> str:
        """The name without its seed (``profound_pretrain``, ``provicnet_segmentation_finetune/random``)."""
        return re.sub(r"/seed\d+$", "", self.name)

    @property
    def log_name(self) -> str:
        return self.name.replace("/", ".") + ".log"

    def matches(self, pattern: str) -> bool:
        """Whether the glob ``pattern`` matches the run's name or its name without the seed."""
        return fnmatch.fnmatchcase(self.name, pattern) or fnmatch.fnmatchcase(self.key, pattern)

    def config_file(self, multi_gpu: bool = False) -> str:
        """The ``--config_file`` value, repository-relative; with ``multi_gpu`` the list that merges the bundle's
        ``multi_gpu_train.json`` over ``train.json`` (the MONAI model-zoo convention)."""
        if self.stage == ANALYSIS:
            return "tools/configs/analyze.json"
        folder = bundle_folder(self.bundle)
        train = f"{folder}/{self.bundle}/configs/train.json"
        if not multi_gpu:
            return train
        return f"['{train}','{folder}/{self.bundle}/configs/multi_gpu_train.json']"

    @property
    def has_multi_gpu(self) -> bool:
        overlay = REPO / bundle_folder(self.bundle) / self.bundle / "configs" / "multi_gpu_train.json"
        return self.stage != ANALYSIS and overlay.is_file()

    def overrides(self) -> list[str]:
        """``--key value`` for every arg, in order."""
        return [item for key, value in self.args for item in (f"--{key}", value)]


def bundle_folder(bundle: str) -> str:
    """The folder that holds ``bundle``: its FM's ``bundles`` (``common.foundation_models``; an FM registered from
    outside the repository keeps its bundles there), else the repository's ``bundles``. Relative paths are relative
    to the repository, the runner's working directory."""
    fm = bundle.split("_", 1)[0]
    folder = get_fm(fm).bundles if fm in FMS else None
    return folder or "bundles"


def _pretrain_name(fm: str, seed: int) -> str:
    return f"{get_fm(fm).pretrain_bundle}/seed{seed}"


def build_grid(study: Study, tracking_uri: str) -> list[Run]:
    """Every run of ``study`` in the order they are started when ready: the pretraining runs of every seed, then per
    seed the finetune, random-weight, scratch and specialised runs, and last the analysis, reading ``tracking_uri``.

    Per seed that is 2 pretraining runs (fewer with official weights), 10 finetune, 10 random-weight, 10 scratch and
    5 specialised runs. A finetune run needs its FM's pretraining run of the same seed unless official weights are
    given; the others need nothing (a random-weight run does not read the pretrained weights)."""
    runs_dir = study.study_dir / "runs"

    def run(bundle: str, stage: str, regime: str, seed: int, *extra: tuple[str, str], depends=()) -> Run:
        sub = f"{bundle}/random/seed{seed}" if stage == "random" else f"{bundle}/seed{seed}"
        common = (("profile", study.profile), ("seed", str(seed)), ("study", study.name),
                  ("study_dir", str(study.study_dir)), ("datalist", study.datalist))  # fmt: skip
        return Run(sub, bundle, stage, regime, seed, common + extra, tuple(depends), str(runs_dir / sub))

    grid = []
    for seed in study.seeds:
        grid += [run(get_fm(fm).pretrain_bundle, "pretrain", "pretrain", seed) for fm in FMS
                 if fm not in study.weights and get_fm(fm).pretrain_bundle]  # fmt: skip
    for seed in study.seeds:
        for fm in FMS:
            for task in TASKS:
                if fm in study.weights:
                    ckpt, depends = study.weights[fm], ()
                else:
                    ckpt = str(runs_dir / _pretrain_name(fm, seed) / "models" / "model.pt")
                    depends = (_pretrain_name(fm, seed),)
                grid.append(run(f"{fm}_{task}_finetune", "finetune", "finetune", seed, ("pretrained_ckpt", ckpt),
                                depends=depends))  # fmt: skip
        grid += [run(f"{fm}_{t}_finetune", "random", "random", seed, ("init", "random")) for fm in FMS for t in TASKS]
        grid += [run(f"{fm}_{t}_scratch", "scratch", "scratch", seed) for fm in FMS for t in TASKS]
        grid += [run(SPECIALISED[t], "specialised", "specialised", seed) for t in TASKS]
    analysis_args = (("tracking_uri", tracking_uri), ("study", study.name), ("output_dir", str(study.analysis_dir)))
    grid.append(Run(ANALYSIS, "tools", ANALYSIS, ANALYSIS, None, analysis_args))
    return grid


def apply_overrides(runs: Sequence[Run], overrides: Iterable[tuple[str, str]]) -> list[Run]:
    """``runs`` with each ``(glob, "key=value")`` applied to the runs the glob matches (:meth:`Run.matches`): the
    key's value is replaced, or the key added. A ``ValueError`` names a malformed override or a glob that matches
    nothing."""
    out = list(runs)
    for pattern, assignment in overrides:
        key, sep, value = assignment.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value:
            raise ValueError(f"--override {pattern} {assignment!r}: expected KEY=VALUE with a non-empty value")
        hit = False
        for i, r in enumerate(out):
            if r.matches(pattern):
                hit = True
                args = dict(r.args)
                args[key] = value
                out[i] = replace(r, args=tuple(args.items()))
        if not hit:
            raise ValueError(f"--override {pattern}: no run of the grid matches (names look like {out[0].name})")
    return out


def select(runs: Sequence[Run], only: Sequence[str] | None, analysis: bool = True) -> list[Run]:
    """The runs matching any glob of ``only`` (all when None or empty), keeping the analysis when ``analysis``.
    A ``ValueError`` names a glob that matches no run."""
    chosen = [r for r in runs if r.stage != ANALYSIS]
    if only:
        for pattern in only:
            if not any(r.matches(pattern) for r in chosen):
                names = ", ".join(sorted({r.key for r in chosen})[:6])
                raise ValueError(f"--only {pattern}: no run of the grid matches it (runs are named like {names}, ...)")
        chosen = [r for r in chosen if any(r.matches(p) for p in only)]
    return chosen + ([r for r in runs if r.stage == ANALYSIS] if analysis else [])


# ------------------------------------------------------------------------------------------------------------------
# the store


def tracking_setup(uri: str) -> tuple[list[str], dict[str, str]]:
    """The ``--tracking`` arguments and the extra environment of a bundle run reporting to ``uri``: a SQLite store
    through ``mlflow_config/sqlite.json``, anything else through ``mlflow_config/server.json`` and
    ``MLFLOW_TRACKING_URI``."""
    if uri.startswith("sqlite:"):
        return ["--tracking", "mlflow_config/sqlite.json", "--tracking_uri", uri], {}
    return ["--tracking", "mlflow_config/server.json"], {"MLFLOW_TRACKING_URI": uri}


def finished_runs(uri: str, experiment: str) -> list:
    """Every FINISHED MLflow run of ``experiment`` (none when the store or the experiment does not exist yet)."""
    from common.bundle import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_done(run: Run, finished: Sequence, study: Study) -> bool:
    """Whether ``finished`` holds a run of ``run``: same tags study, bundle, regime, seed and profile, and the same
    datalist and pretrained weights where it recorded them."""
    want = {"study": study.name, "bundle": run.bundle, "regime": run.regime, "seed": str(run.seed),
            "profile": study.profile}  # fmt: skip
    args = dict(run.args)
    for candidate in finished:
        tags, params = candidate.data.tags, candidate.data.params
        if all(tags.get(k) == v for k, v in want.items()) and all(
            params.get(k, args[k]) == args[k] for k in IDENTITY_PARAMS if k in args
        ):
            return True
    return False


def analysis_is_current(finished: Sequence, study: Study, report: Path) -> bool:
    """Whether ``report`` exists and the study's latest analysis run started after every other run finished."""
    if not report.is_file():
        return False
    analyses = [r.info.start_time or 0 for r in finished
                if r.data.tags.get("regime") == ANALYSIS and r.data.tags.get("study") == study.name]  # fmt: skip
    if not analyses:
        return False
    others = [r.info.end_time or 0 for r in finished if r.data.tags.get("regime") != ANALYSIS]
    return max(others, default=0) <= max(analyses)


def resumable(run: Run) -> bool:
    """Whether ``run``'s folder holds checkpoints of an unfinished run (the bundle will continue from them): the
    bundles' own rule, :func:`common.contract.resume_checkpoint`."""
    return bool(run.output_dir) and resume_checkpoint(run.output_dir) is not None


# ------------------------------------------------------------------------------------------------------------------
# the machine


def cpu_count() -> int:
    """CPU cores this process may use."""
    with contextlib.suppress(AttributeError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def memory_gb() -> float:
    """Available memory in GB (``MemAvailable``; total memory where that is unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def visible_gpus() -> list[str]:
    """The CUDA devices runs can be given, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def default_jobs(profile: str, gpus: int, cores: int, memory: float) -> int:
    """Runs at once: one per GPU; on CPU, as many as the cores and the memory bear (``CPU_RUN_MEMORY_GB``)."""
    if gpus:
        return gpus
    return max(1, min(cores, int(memory // CPU_RUN_MEMORY_GB.get(profile, 8.0))))


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from ``/proc/mounts``; ``""`` where unknown)."""
    best, kind = "", ""
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")):
                if len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    return kind


# ------------------------------------------------------------------------------------------------------------------
# running the grid here


@dataclass
class Outcome:
    """What became of one run in this invocation (``status`` is one of ``STATUSES``; ``start_s``: seconds after the
    grid started, None when it did not start)."""

    run: Run
    status: str = "pending"
    seconds: float = 0.0
    returncode: int | None = None
    log: str = ""
    reason: str = ""
    resumed: bool = False
    started: float = 0.0
    start_s: float | None = None

    def record(self) -> dict:
        ended = self.start_s is not None and self.status != "running"
        return {"name": self.run.name, "bundle": self.run.bundle, "stage": self.run.stage, "seed": self.run.seed,
                "status": self.status, "seconds": round(self.seconds, 2), "returncode": self.returncode,
                "start_s": None if self.start_s is None else round(self.start_s, 2),
                "end_s": round(self.start_s + self.seconds, 2) if ended else None,
                "resumed": self.resumed, "log": self.log, "reason": self.reason}  # fmt: skip


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """The grid's progress: on a terminal one status line rewritten in place, with events printed above it;
    otherwise (a log file, CI) the events and a status line every ``interval`` seconds."""

    def __init__(self, stream: TextIO = sys.stdout, interval: float = 30.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._status = ""

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + "\n" + self._status)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, text: str, force: bool = False) -> None:
        if self.tty:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except OSError:
                columns = 0
            text = text[: columns - 1] if columns >= 40 else text
            if text != self._status:
                self._status = text
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
        elif force or time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._status:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self._status = ""


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int):
    """A ``preexec_fn`` for a child of process ``parent``: the kernel sends it SIGTERM when ``parent`` dies, however
    it dies (SIGKILL, the OOM killer), so that the child marks its run KILLED and ends instead of living on as an
    orphan that a rerun would run beside. A no-op where there is no ``prctl`` (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Executor:
    """Runs the pending outcomes' bundles, at most ``jobs`` at once, each in its own process group with its log.

    A run starts when every run it depends on is done or finished; it is ``blocked`` when one of them failed. The
    analysis starts when nothing else is pending or running, whatever failed, and is skipped (``done``) when
    ``analysis_current`` and no run finished in this invocation. ``record`` is called after every change. Each
    bundle gets SIGTERM when the runner dies, and keeps ``hold_fds`` open (the study lock, so that it is held until
    the last bundle ends).
    """

    def __init__(
        self,
        outcomes: Sequence[Outcome],
        *,
        jobs: int,
        threads: int,
        gpus: Sequence[str],
        tracking_uri: str,
        logs_dir: Path,
        progress: Progress,
        analysis_current: bool = False,
        record=None,
        poll: float = 0.5,
        hold_fds: Sequence[int] = (),
    ) -> None:
        self.outcomes = {o.run.name: o for o in outcomes}
        self.jobs, self.threads, self.gpus = jobs, threads, list(gpus)
        self.tracking_args, tracking_env = tracking_setup(tracking_uri)
        self.logs_dir = logs_dir
        self.progress = progress
        self.analysis_current = analysis_current
        self.record = record or (lambda: None)
        self.poll = poll
        self.hold_fds = tuple(hold_fds)
        self.start = time.monotonic()
        self._procs: dict[int, tuple[Outcome, subprocess.Popen, TextIO]] = {}
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, **tracking_env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}  # fmt: skip

    def command(self, run: Run) -> list[str]:
        tracking = [] if run.stage == ANALYSIS else self.tracking_args
        return [sys.executable, "-m", "monai.bundle", "run", "--config_file", run.config_file(), *tracking,
                *run.overrides()]  # fmt: skip

    # -------------------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for o in self.outcomes.values():
            counts[o.status] += 1
        return counts

    def status_line(self) -> str:
        c = self.counts()
        now = time.monotonic()
        total = len(self.outcomes)
        text = (f"[{_clock(now - self.start)}] {c['done'] + c['finished']}/{total} done ({c['done']} earlier) | "
                f"{c['running']} running | {c['failed']} failed | {c['blocked']} blocked | "
                f"{c['pending']} left")  # fmt: skip
        took = [o.seconds for o in self.outcomes.values() if o.status == "finished" and o.run.stage != ANALYSIS]
        if c["pending"] + c["running"] and took:
            mean = sum(took) / len(took)
            running = [now - o.started for o in self.outcomes.values() if o.status == "running"]
            work = c["pending"] * mean + sum(max(mean - t, 0.0) for t in running)
            text += f" | ~{_duration(work / self.jobs)} to go"
        return text

    def _event(self, text: str) -> None:
        self.progress.event(f"[{_clock(time.monotonic() - self.start)}] {text}")

    # -------------------------------------------------------------------------------------------------------------
    def _ready(self, outcome: Outcome) -> bool | None:
        """True to start, False to wait, None when blocked (``reason`` set)."""
        if outcome.run.stage == ANALYSIS:
            others = [o for o in self.outcomes.values() if o is not outcome]
            return not any(o.status in ("pending", "running") for o in others)
        for dep in outcome.run.depends:
            status = self.outcomes[dep].status
            if status in ("failed", "blocked", "interrupted"):
                outcome.reason = f"needs {dep}, which {'failed' if status == 'failed' else 'did not run'}"
                return None
            if status not in ("done", "finished"):
                return False
        return True

    def _start(self, outcome: Outcome, slot: int) -> None:
        run = outcome.run
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / run.log_name
        env = dict(self.env)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        cmd = self.command(run)
        log = open(log_path, "a")  # noqa: SIM115 - closed when the process ends
        device = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if self.gpus else f"{self.threads} CPU threads"
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} tools.study, {device}, from {REPO}:\n"
                  f"# {shlex.join(cmd)}\n")  # fmt: skip
        log.flush()
        outcome.resumed = resumable(run)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=self.hold_fds,
                                preexec_fn=_die_with(os.getpid()))  # fmt: skip
        outcome.status, outcome.log, outcome.started = "running", str(log_path), time.monotonic()
        outcome.start_s = outcome.started - self.start
        self._procs[slot] = (outcome, proc, log)
        self._event(f"start   {run.name}{' (resuming)' if outcome.resumed else ''}")

    def _reap(self) -> bool:
        changed = False
        for slot, (outcome, proc, log) in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del self._procs[slot]
            outcome.seconds = time.monotonic() - outcome.started
            outcome.returncode = code
            changed = True
            if code == 0:
                outcome.status = "finished"
                self._event(f"done    {outcome.run.name} in {_duration(outcome.seconds)}")
            else:
                outcome.status = "failed"
                outcome.reason = last_error(Path(outcome.log))
                self._event(f"FAILED  {outcome.run.name} (exit {code}) after {_duration(outcome.seconds)}: "
                            f"{outcome.log}")  # fmt: skip
        return changed

    def _schedule(self) -> bool:
        changed = False
        for outcome in self.outcomes.values():
            if outcome.status != "pending":
                continue
            ready = self._ready(outcome)
            if ready is None:
                outcome.status = "blocked"
                self._event(f"blocked {outcome.run.name}: {outcome.reason}")
                changed = True
            elif ready and len(self._procs) < self.jobs:
                if (
                    outcome.run.stage == ANALYSIS
                    and self.analysis_current
                    and not any(o.status == "finished" for o in self.outcomes.values())
                ):
                    outcome.status, outcome.reason = "done", "the report is newer than every run"
                    changed = True
                    continue
                slot = min(set(range(self.jobs)) - set(self._procs))
                self._start(outcome, slot)
                changed = True
        return changed

    def _stop_all(self) -> None:
        """Interrupt every running bundle (SIGINT to its process group: its tracker marks the run KILLED), then kill
        what is still there after 30 s."""
        for _, proc, _ in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        for outcome, proc, log in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            outcome.status, outcome.returncode = "interrupted", proc.returncode
            outcome.seconds = time.monotonic() - outcome.started
        self._procs.clear()

    def run(self) -> bool:
        """Run the grid; False when interrupted (Ctrl-C or SIGTERM: the running bundles are stopped, and running the
        same command again resumes them)."""
        # SIGTERM (a scheduler, kill) stops the grid like Ctrl-C; SIGINT gets Python's handler even where the runner
        # was started with it ignored (a background job), so that the bundles started from here get it too
        previous = (
            signal.signal(signal.SIGTERM, _raise_interrupt),
            signal.signal(signal.SIGINT, signal.default_int_handler),
        )
        try:
            while True:
                ended = self._reap()
                started = self._schedule()
                if ended or started:
                    self.record()
                if not self._procs and not any(o.status == "pending" for o in self.outcomes.values()):
                    break
                self.progress.status(self.status_line(), force=ended)
                time.sleep(self.poll)
            return True
        except KeyboardInterrupt:
            self.progress.close()
            self._event(f"interrupted: stopping {len(self._procs)} running bundle(s) (up to 30 s)")
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan them mid-stop
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._stop_all()
            self.record()
            return False
        finally:
            self.progress.close()
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:.*)?$")
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def last_error(log: Path, width: int = 200) -> str:
    """Why a run failed, from the end of its log: the first exception of the last chained traceback (the cause, e.g.
    ``ValueError: datalist ... does not exist``) and, when it differs, the exception that ended the process (MONAI
    wraps config errors in ``RuntimeError: Failed to evaluate ...``); the last non-empty line without a traceback."""
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 262144))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        text = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return text if len(text) <= width else text[: width - 3] + "..."
    k = len(starts) - 1
    while k > 0 and any(line.startswith(_CHAINED) for line in lines[starts[k - 1] : starts[k]]):
        k -= 1
    errors = [line.strip() for line in lines[starts[k] :] if _EXCEPTION_LINE.match(line)]
    if not errors:
        return ""
    parts = [errors[0]] if errors[0] == errors[-1] else [errors[0], f"(raised as {errors[-1]})"]
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------------------------------------------
# a cluster: Slurm job arrays


def _table(runs: Sequence[Run], tracking_args: Sequence[str]) -> str:
    lines = ["#name\toutput_dir\tconfig_file\tmulti_gpu_config_file\targuments..."]
    for r in runs:
        fields = [r.name, r.output_dir, r.config_file(), r.config_file(True) if r.has_multi_gpu else "-",
                  *tracking_args, *r.overrides()]  # fmt: skip
        for f in fields:
            if not f or any(c in f for c in "\t\n\r"):
                raise ValueError(f"{r.name}: argument {f!r} is empty or holds a tab or newline; Slurm tables need none")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"


_ARRAY_SCRIPT = """#!/bin/bash
# The study's runs as a Slurm job array, written by `python -m tools.study --emit slurm` (README, "The study").
# submit.sh submits it once per run table ($1: pretrain.tsv, runs.tsv or finetune.tsv), one array index per line.
# Each task runs one bundle from the repository root; with several GPUs on its node and a multi_gpu_train.json it
# runs under torchrun (DDP, one process per GPU). A task whose run already finished (its mlflow_run.json says so)
# exits at once unless FORCE=1; an interrupted one continues from its checkpoints.
#SBATCH --job-name={job}
#SBATCH --nodes=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output={slurm_logs}/%x-%A_%a.log
{extra}set -euo pipefail
cd {repo}
PYTHON="${{PYTHON:-{python}}}"
export MLFLOW_TRACKING_URI="${{MLFLOW_TRACKING_URI:-{uri}}}"
export MPLBACKEND=Agg
table="$1"
IFS=$'\\t' read -r -a fields < <(sed -n "$((SLURM_ARRAY_TASK_ID + 2))p" "$table")
name="${{fields[0]}}" output_dir="${{fields[1]}}" config="${{fields[2]}}" multi_gpu_config="${{fields[3]}}"
args=("${{fields[@]:4}}")
if [ "${{FORCE:-0}}" != 1 ] && grep -qs '"status": "FINISHED"' "$output_dir/mlflow_run.json"; then
    echo "$name: already finished ($output_dir/mlflow_run.json); FORCE=1 runs it again"
    exit 0
fi
gpus="${{SLURM_GPUS_ON_NODE:-1}}"
echo "$name on $(hostname), $gpus GPU(s), tracking $MLFLOW_TRACKING_URI"
if [ "$multi_gpu_config" != - ] && [ "$gpus" -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$gpus" \\
        -m monai.bundle run --config_file "$multi_gpu_config" "${{args[@]}}"
fi
exec "$PYTHON" -m monai.bundle run --config_file "$config" "${{args[@]}}"
"""

_ANALYSIS_SCRIPT = """#!/bin/bash
# The study's analysis (the tools bundle), written by `python -m tools.study --emit slurm`. submit.sh submits it
# with --dependency=afterok on the run arrays; submit it with --dependency=afterany:<ids> instead to analyse whatever
# finished. It needs no GPU. The report: {report}
#SBATCH --job-name={job}-analysis
#SBATCH --nodes=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output={slurm_logs}/%x-%j.log
{extra}set -euo pipefail
cd {repo}
PYTHON="${{PYTHON:-{python}}}"
export MLFLOW_TRACKING_URI="${{MLFLOW_TRACKING_URI:-{uri}}}"
export MPLBACKEND=Agg
exec "$PYTHON" -m monai.bundle run --config_file tools/configs/analyze.json \\
    --tracking_uri "$MLFLOW_TRACKING_URI" {args}
"""

_SUBMIT_SCRIPT = """#!/bin/bash
# Submits the study written by `python -m tools.study --emit slurm` (README, "The study"): the pretraining array,
# the runs that need no pretrained weights at once, the finetune runs after the pretraining (afterok), and the
# analysis after all of them. Every task reports to MLFLOW_TRACKING_URI (default below).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PYTHON="${{PYTHON:-{python}}}"
export MLFLOW_TRACKING_URI="${{MLFLOW_TRACKING_URI:-{uri}}}"
mkdir -p {slurm_logs}
# the experiment is made once, before parallel tasks could race to make it (DESIGN.md section 5)
(cd {repo} && "$PYTHON" -c 'import sys; from common.bundle import ensure_experiment; \\
ensure_experiment(sys.argv[1], sys.argv[2])' "$MLFLOW_TRACKING_URI" {study})
submit() {{ local id; id="$(sbatch --parsable "$@")"; echo "${{id%%;*}}"; }}
after=()
{body}deps="$(IFS=:; echo "${{after[*]}}")"
analysis="$(submit ${{deps:+--dependency=afterok:$deps}} "$here/analysis.sbatch")"
echo "analysis: job $analysis; report: {report}"
"""


def emit_slurm(
    runs: Sequence[Run],
    study: Study,
    out_dir: Path,
    tracking_uri: str,
    *,
    gpus: int = 1,
    cpus: int = 8,
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
) -> list[Path]:
    """Write the Slurm job scripts of ``runs`` to ``out_dir`` and return their paths.

    ``pretrain.tsv``, ``runs.tsv`` (no dependency) and ``finetune.tsv`` (needs the pretraining) list one run per
    line: name, output folder, config file, multi-GPU config file (``-`` when the bundle has none) and the bundle's
    arguments. ``study.sbatch`` runs line ``SLURM_ARRAY_TASK_ID`` of the table it is given; ``analysis.sbatch`` runs
    the tools bundle; ``submit.sh`` submits the arrays and the analysis with their dependencies. Every run reports to
    ``tracking_uri`` (a tracking server: ``--tracking mlflow_config/server.json`` and ``MLFLOW_TRACKING_URI``).
    """
    if tracking_uri.startswith("sqlite:"):
        raise ValueError("--emit slurm needs a tracking server that every node reaches (--tracking_uri "
                         "http://HOST:5000; README, 'Tracking server'): SQLite is not safe across nodes")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = [r for r in runs if r.stage == ANALYSIS]
    work = [r for r in runs if r.stage != ANALYSIS]
    names = {r.name for r in work}
    groups = {
        "pretrain": [r for r in work if r.stage == "pretrain"],
        "runs": [r for r in work if r.stage != "pretrain" and not any(d in names for d in r.depends)],
        "finetune": [r for r in work if r.stage != "pretrain" and any(d in names for d in r.depends)],
    }
    tracking_args, _ = tracking_setup(tracking_uri)
    # the analysis reads the URI from the job's environment, so that MLFLOW_TRACKING_URI can redirect it
    analysis_args = [a for r in analysis for k, v in r.args if k != "tracking_uri" for a in (f"--{k}", v)]
    q = shlex.quote
    slurm_logs = study.logs_dir / "slurm"
    extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in (("partition", partition), ("account", account)) if v)
    common = {"job": study.name, "repo": q(str(REPO)), "python": q(sys.executable), "uri": tracking_uri,
              "slurm_logs": slurm_logs, "extra": extra, "report": study.analysis_dir / "report.html"}  # fmt: skip
    if any(c in tracking_uri for c in '"$`\\\n'):
        raise ValueError(f"tracking URI {tracking_uri!r} holds characters a shell script cannot carry safely")
    if any(c.isspace() for c in str(study.study_dir) + str(REPO)):
        raise ValueError("the study folder and the repository path must hold no spaces for #SBATCH lines")
    written = []
    body = ""
    for group, members in groups.items():
        if not members:
            continue
        path = out_dir / f"{group}.tsv"
        path.write_text(_table(members, tracking_args))
        written.append(path)
        dependency = '--dependency=afterok:"$pretrain" ' if group == "finetune" and groups["pretrain"] else ""
        body += (f'{group}="$(submit --array=0-{len(members) - 1} {dependency}"$here/study.sbatch" '
                 f'"$here/{group}.tsv")"\n'
                 f'echo "{group}: job ${group} ({len(members)} runs)"; after+=("${group}")\n')  # fmt: skip
    missing = sorted({d for r in work for d in r.depends if d not in names})
    if missing:
        body = f"# not in this submission, must have finished before: {' '.join(missing)}\n" + body
    scripts = {
        "study.sbatch": _ARRAY_SCRIPT.format(gpus=gpus, cpus=cpus, time=time_limit, **common),
        "analysis.sbatch": _ANALYSIS_SCRIPT.format(args=shlex.join(analysis_args), **common),
        "submit.sh": _SUBMIT_SCRIPT.format(study=q(study.name), body=body, **common),
    }
    for name, text in scripts.items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------------------------
# the command line


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
        print(f"See the runs: {shlex.quote(_display(mlflow))} ui --backend-store-uri {shlex.quote(tracking_uri)} "
              "--host 127.0.0.1 --port 5000   (then open http://127.0.0.1:5000)", file=out)  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
