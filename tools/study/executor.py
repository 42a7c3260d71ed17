"""Running the grid on this machine: parallel bundle processes, their life cycle, the progress line and the
error of a failed run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .grid import ANALYSIS, REPO, STATUSES, Run
from .store import resumable, tracking_setup


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
        work = self.remaining_work(now)
        if work is not None:
            text += f" | ~{_duration(work / self.jobs)} to go"
        return text

    def remaining_work(self, now: float) -> float | None:
        """Run-seconds still to do: each pending run's expected duration, and what a running one has left of it;
        None before any run finished or when nothing is left. A run is expected to take the mean of the finished runs
        of its bundle (finetune and random-weight share one), else of its task, else of all: the tasks of a study
        differ by 10x in cost (the demo: a classification finetune 16 s, a modality translation 7 min), so one mean
        over the first, short runs predicted a third of the demo study's remaining time."""
        finished = [o for o in self.outcomes.values() if o.status == "finished" and o.run.stage != ANALYSIS]
        left = [o for o in self.outcomes.values() if o.status in ("pending", "running")]
        if not finished or not left:
            return None

        by_bundle: dict[str, list[float]] = {}
        by_task: dict[str, list[float]] = {}  # pretraining and the analysis have no task
        for o in finished:
            by_bundle.setdefault(o.run.bundle, []).append(o.seconds)
            if o.run.task is not None:
                by_task.setdefault(o.run.task, []).append(o.seconds)
        overall = [o.seconds for o in finished]

        def expected(run: Run) -> float:
            group = by_bundle.get(run.bundle) or by_task.get(run.task or "") or overall
            return sum(group) / len(group)

        work = 0.0
        for o in left:
            estimate = expected(o.run)
            work += max(estimate - (now - o.started), 0.0) if o.status == "running" else estimate
        return work

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
