"""MLflow tracking for the study's bundles (DESIGN.md section 5), built around the measured pitfalls of
MONAI 1.6.1 + MLflow 3 with SQLite.

- The store is created once, under a file lock, before a run touches it: several processes creating a new SQLite
  store at once race in its schema migration and leave it broken.
- Every run gets a unique run name and is addressed by its run id through :class:`mlflow.MlflowClient`, never via
  MLflow's global "active run" (MONAI's handler attaches to any unfinished run when ``run_name`` is unset,
  MONAI issue 6415). A run resumes into its previous MLflow run only when the trainer itself resumed from a
  checkpoint, and it finds that run by the id it wrote to ``<output_dir>/mlflow_run.json``.
- The executed config is logged from the file MONAI wrote, whether ``--output_dir`` was given with or without
  ``$`` (a plain path makes MONAI's recorded config path a literal string that names no file).
- A run's status is always true (DESIGN.md section 10): the tracker's exception handler runs before every other one
  (MONAI's ``StatsHandler`` logs and re-raises, which would skip the handlers after it), SIGTERM is handled like
  Ctrl-C, and a RUNNING run whose process is gone is marked KILLED by the next process on its output folder.
- One writer per output folder: an exclusive ``flock`` on ``<output_dir>/.run.lock``, which the OS releases when
  the process dies, so a crash never leaves a stale lock.
- The tracking URI is checked (:func:`check_tracking_uri`) before the run touches the store: a server that does not
  answer is one clear error within seconds instead of minutes of retries.

:class:`StudyTracker` is an Ignite handler; ``mlflow_config/*.json`` adds it to a bundle's trainer through MONAI's
own ``--tracking`` option.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from common.contract import RUN_FILE, checkpoint_files
from common.tasks import TASKS

__all__ = [
    "RunFolderBusy",
    "StudyTracker",
    "Terminated",
    "check_tracking_store",
    "check_tracking_uri",
    "source_run_id",
    "ensure_experiment",
    "git_commit",
    "hold_run_folder",
    "mark_abandoned",
    "sqlite_path",
    "sqlite_uri",
    "unique_run_name",
]

logger = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = RUN_FILE
LOCK_FILE = ".run.lock"
#: schemes of the stores MLflow can track to (``postgresql+psycopg2`` counts as ``postgresql``)
STORE_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql")
#: seconds a tracking server has to accept a connection
SERVER_TIMEOUT = 3.0
#: exit status of a process ended by SIGTERM (128 + 15), kept when the tracker handles the signal
SIGTERM_EXIT = 128 + signal.SIGTERM


def sqlite_uri(path: str | os.PathLike) -> str:
    """``sqlite:///`` URI of a database file, absolute so that it means the same from every working directory."""
    return "sqlite:///" + os.path.abspath(os.fspath(path))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_tracking_uri(uri: str, timeout: float = SERVER_TIMEOUT, create: bool = False) -> str:
    """``uri`` when a run can report to it, else a ``ValueError`` that names it and says what to do.

    The scheme must be one MLflow stores runs in (``STORE_SCHEMES``); an ``http(s)`` server must accept a connection
    within ``timeout`` seconds (MLflow itself retries for minutes); the folder of a ``sqlite:///`` or ``file:`` store
    must exist, unless ``create`` (a mistyped path would otherwise make new folders and an empty store)."""
    uri = str(uri or "")
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower()
    use = ("use sqlite:////absolute/path/mlflow.db for a local store or http://HOST:PORT for an MLflow server "
           "(README, 'Tracking server')")  # fmt: skip
    if "://" not in uri or scheme not in STORE_SCHEMES:
        kind = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"tracking URI {uri!r}: unknown kind of store ({kind}); {use}")
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        try:
            port = parts.port or (443 if scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                pass
        except (OSError, ValueError) as err:
            raise ValueError(
                f"tracking URI {uri}: no MLflow server answers there within {timeout:g} s ({err}). Start it "
                "(README, 'Tracking server': mlflow server --host 0.0.0.0 --port 5000 ...), check the host and port, "
                "or track to a local store with --tracking_uri sqlite:////absolute/path/mlflow.db"
            ) from None
        return uri
    folder = sqlite_path(uri).parent if scheme == "sqlite" else None
    if scheme == "sqlite" and sqlite_path(uri) is None:
        raise ValueError(f"tracking URI {uri!r}: a SQLite store is sqlite:/// followed by the database file; {use}")
    if scheme == "file":
        folder = Path(urllib.parse.urlsplit(uri).path).parent
    if folder is not None and not create and not folder.is_dir():
        raise ValueError(
            f"tracking URI {uri}: the folder {folder} does not exist (a mistyped path?). Create it first if it is "
            "meant, or pass the study's store (<study_dir>/mlflow.db)"
        )
    return uri


def check_tracking_store(
    uri: str, execute_config: str | os.PathLike | bool | None = None, study_dir: str | os.PathLike | None = None
) -> str:
    """:func:`check_tracking_uri` as the first step of a tracked bundle (``mlflow_config/*.json`` puts it in the
    bundle's ``tracking_checks``, which ``initialize`` evaluates before any data is loaded or network built).

    The study's own store, ``<study_dir>/mlflow.db``, may be new: its folder is made (a bundle started on a new
    study folder must not depend on another run having made it first). Any other SQLite folder must exist.
    On failure the executed config MONAI wrote moments ago for this start (``execute_config``, the bundle's
    ``save_execute_config``) is removed, so that a failed start leaves nothing in the output folder, and the
    ``ValueError`` naming the URI is raised."""
    store = sqlite_path(str(uri or ""))
    own = study_dir is not None and store is not None and store.parent.resolve() == Path(study_dir).resolve()
    try:
        checked = check_tracking_uri(uri, create=own)
    except ValueError:
        if isinstance(execute_config, (str, os.PathLike)):
            Path(execute_config).unlink(missing_ok=True)
        raise
    if own:
        store.parent.mkdir(parents=True, exist_ok=True)
    return checked


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread while a tracked run trains (Slurm's ``scancel`` and time limit, ``docker
    stop``): the run is marked KILLED like on Ctrl-C, and the process exits with status 143 as if killed by it."""

    def __init__(self) -> None:
        super().__init__(SIGTERM_EXIT)

    def __str__(self) -> str:
        return "terminated by SIGTERM"


class RunFolderBusy(RuntimeError):
    """Another live process holds the output folder's lock (one writer per run, DESIGN.md section 10)."""


def _lock_holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "another process"


def hold_run_folder(output_dir: str | os.PathLike):
    """Take the exclusive lock of the run folder ``output_dir`` (made if new) and return its open lock file: the
    lock lasts while that file is open, and the OS releases it when the process dies. Raises :class:`RunFolderBusy`
    naming the PID of the process that holds it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - open for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(handle)
        handle.close()
        raise RunFolderBusy(
            f"{folder} is in use by {holder}: another run is writing there. Wait for it to end, stop it (kill the "
            "PID), or pass another --output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def mark_abandoned(output_dir: str | os.PathLike, locked: bool = False) -> str | None:
    """Mark KILLED the MLflow run that ``<output_dir>/mlflow_run.json`` says is RUNNING when no live process holds
    the folder (its process was killed without warning, e.g. SIGKILL or the OOM killer); return its run id, or None
    when there is none, it is alive, or its store cannot be read. ``locked``: the caller holds the folder's lock.
    A run with checkpoints is still resumed by its next start (KILLED runs resume like interrupted ones)."""
    folder = Path(output_dir)
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("status") != "RUNNING" or not state.get("run_id") or not state.get("tracking_uri"):
        return None
    handle = None
    if not locked:
        try:
            handle = hold_run_folder(folder)
        except RunFolderBusy:
            return None  # its writer is alive
    try:
        from mlflow import MlflowClient

        client = MlflowClient(state["tracking_uri"])
        run_id = state["run_id"]
        if client.get_run(run_id).info.status == "RUNNING":
            _retry(client.set_tag, run_id, "error", "process gone: killed without warning (found by a later start)")
            _retry(client.set_terminated, run_id, "KILLED")
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**state, "status": "KILLED"}, indent=2))
        tmp.replace(state_path)
        logger.warning(f"MLflow: run {run_id} of {folder} was left RUNNING by a process that is gone: marked KILLED")
        return run_id
    except Exception as err:  # a store that is gone or unreachable must not stop the caller
        logger.warning(f"MLflow: could not check the run recorded in {state_path}: {err}")
        return None
    finally:
        if handle is not None:
            handle.close()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive file lock beside a SQLite store (no-op for a tracking server)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(tracking_uri: str, experiment_name: str) -> str:
    """Create the tracking store (if new) and the experiment (if new), safely from parallel processes; return the
    experiment id. A SQLite store keeps its artifacts beside the database (``<db folder>/artifacts/``), not in the
    working directory's ``mlruns``."""
    from mlflow import MlflowClient

    with _store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        db = sqlite_path(tracking_uri)
        location = (db.parent / "artifacts" / experiment_name).as_uri() if db is not None else None
        return client.create_experiment(experiment_name, artifact_location=location)


def _local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a ``file:`` (or plain path) artifact URI; None for a remote one (``http``, ``s3``, ...)."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and os.path.isabs(artifact_uri):
        return Path(artifact_uri)
    return None


def unique_run_name(prefix: str) -> str:
    """``<prefix>-<YYYYmmdd-HHMMSS>-<6 hex>``: unique across parallel starts within the same second."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def source_run_id(checkpoint: str | os.PathLike | None) -> str:
    """The MLflow run id that wrote ``checkpoint``, read from ``mlflow_run.json`` of the run folder it lies in
    (``<output_dir>/models/model.pt`` -> ``<output_dir>/mlflow_run.json``), or ``"none"`` when the file is not one a
    study run wrote (official weights, a missing file). A finetune run tags it as ``pretrained_run``, so that it
    points to its pretraining run in the store, not only by a file path."""
    if not checkpoint:
        return "none"
    path = Path(checkpoint)
    for folder in (path.parent, path.parent.parent):
        try:
            run_id = json.loads((folder / STATE_FILE).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if run_id:
            return str(run_id)
    return "none"


def study_run_name(tags: Mapping[str, object], prefix: str) -> str:
    """The MLflow run name of a study run: ``<model> <task> <regime> s<seed>`` from its tags, the task by its short
    name (``provicnet DC random s0``, ``profound pretrain s0``, ``unet seg specialised s1``), so that the runs of one
    bundle in its three regimes differ in the first words the MLflow UI shows (a random-weight run was named like a
    finetune run and cut to the same prefix). Runs without those tags get :func:`unique_run_name` of ``prefix``."""
    if not all(k in tags for k in ("model", "task", "regime", "seed")):
        return unique_run_name(prefix)
    task = str(tags["task"])
    short = TASKS[task].short if task in TASKS else task
    words = [str(tags["model"]), short] + ([] if tags["regime"] == task else [str(tags["regime"])])
    return " ".join(words) + f" s{tags['seed']}"


_REGIME_WORDS = {
    "finetune": "finetuned from its pretrained encoder",
    "random": "the random-weight reference (same network and freezing, no pretraining)",
    "scratch": "trained from scratch (every weight, random initialisation)",
    "specialised": "the task's specialised model, trained from scratch",
    "pretrain": "pretraining",
}


def study_run_description(tags: Mapping[str, object]) -> str:
    """The MLflow run description (tag ``mlflow.note.content``, shown on the run's page) of a study run: what it is in
    words, from its tags; empty for a run without the study's tags."""
    if not all(k in tags for k in ("model", "task", "regime", "seed")):
        return ""
    task = str(tags["task"])
    title = TASKS[task].title if task in TASKS else task
    regime = str(tags["regime"])
    text = f"{tags['model']} on {title}: {_REGIME_WORDS.get(regime, regime)}; seed {tags['seed']}"
    if "profile" in tags:
        text += f", profile {tags['profile']}"
    if tags.get("pretrained_run") not in (None, "", "none"):
        text += f". Pretrained weights from MLflow run {tags['pretrained_run']}"
    if "bundle" in tags:
        text += f". Bundle {tags['bundle']} {tags.get('bundle_version', '')}".rstrip()
    return text + "."


def git_commit() -> str:
    """The repository's commit, with ``+dirty`` when the work tree has changes; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _retry(call, *args, attempts: int = 6, **kwargs):
    """Call an MLflow client method, retrying briefly when SQLite reports a lock held by a parallel writer."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


def _loss_components(output: object) -> dict[str, float]:
    """Scalar entries other than ``loss`` of a network output dict (e.g. the pretraining objectives' terms)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]
    pred = output.get("pred") if isinstance(output, Mapping) else None
    if not isinstance(pred, Mapping):
        return {}
    return {
        str(k): float(v.detach().float())
        for k, v in pred.items()
        if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1
    }


def _loss_of(output: object) -> float | None:
    """The loss of an iteration from a MONAI trainer's output (a dict, or a list of per-sample dicts)."""
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor):
        return float(output.detach().float().mean())
    return float(output) if isinstance(output, int | float) else None


class StudyTracker:
    """Ignite handler that records one bundle run in the study's MLflow store (DESIGN.md section 5).

    Attach it to the trainer (``mlflow_config/*.json`` does so). It logs:

    - tags: ``tags`` (``model``, ``task``, ``regime``, ``seed``, ``profile``, ``study``, ``bundle``,
      ``bundle_version``, ``metric_name``) plus ``git_commit``; params: ``params``;
    - per epoch (step = epoch, 1-based): ``train_loss`` (mean over the epoch's iterations), ``train_<term>`` for each
      scalar term a network reports beside its loss (``{"loss", "dino_loss", "patch_loss"}`` gives
      ``train_dino_loss`` and ``train_patch_loss``), ``lr``, ``epoch_seconds`` (the epoch's training iterations, data
      loading included, as Ignite times them; validation not included: what a cache across epochs shortens), and
      ``val_metric`` from ``validator``'s key metric when a validator is given;
    - at the end: ``wall_seconds`` (summed over resumed segments), ``gpu_hours`` (GPUs x hours), the executed config
      and each existing path of ``artifacts``; the run is then FINISHED. An exception marks it FAILED with the error
      as tag ``error`` and the executed config as artifact; Ctrl-C and SIGTERM mark it KILLED (SIGTERM exits with
      status 143, as the signal would). ``mlflow_run.json`` says the same. A loss that is NaN or infinite stops the
      run with a message naming the epoch and iteration. A resumed run does not log again an epoch, or a metric step,
      its MLflow run already holds (one record per step).

    ``attach`` checks the tracking URI (:func:`check_tracking_uri`), takes the output folder's lock (refusing to
    start while another process holds it), marks KILLED a RUNNING run whose process is gone and removes the executed
    configs of earlier starts (each one went to its MLflow run, or belongs to a start that never made one).

    Args:
        tracking_uri: the store, e.g. ``sqlite:///abs/path/mlflow.db`` or ``http://localhost:5000``.
        experiment_name: the study's experiment.
        tags: run tags; values are converted to strings.
        output_dir: the run's output folder; ``mlflow_run.json`` there holds the run id for resuming.
        run_name_prefix: prefix of the unique run name of a run whose tags do not name its model, task, regime and
            seed (the study's runs are named from those, :func:`study_run_name`). Default ``"run"``.
        params: flat mapping logged as MLflow params. Default none.
        validator: the evaluator whose key metric is ``val_metric``. Default None.
        optimizer: its first group's learning rate is logged as ``lr``. Default None.
        execute_config: the executed-config path MONAI recorded (``@save_execute_config``). Default None.
        artifacts: files logged at the end (e.g. the final checkpoint), ``{path: artifact folder}``. Default none.
        keep_checkpoints: keep the resumable training state (``<output_dir>/models/checkpoint_epoch=<k>.pt``, with the
            optimizer's) once the run is FINISHED. Default False: a finished run never resumes from it
            (:func:`common.contract.resume_checkpoint`), and it is most of a run folder's size; ``models/model.pt``,
            snapshots, predictions and the config stay.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        tags: Mapping[str, object],
        output_dir: str | os.PathLike,
        run_name_prefix: str = "run",
        params: Mapping[str, object] | None = None,
        validator=None,
        optimizer: torch.optim.Optimizer | None = None,
        execute_config: str | None = None,
        artifacts: Mapping[str, str] | None = None,
        keep_checkpoints: bool = False,
    ) -> None:
        if not tracking_uri or not experiment_name:
            raise ValueError("StudyTracker: tracking_uri and experiment_name must be non-empty")
        self.tracking_uri = str(tracking_uri)
        self.experiment_name = str(experiment_name)
        self.tags = {str(k): str(v) for k, v in tags.items()}
        self.output_dir = Path(output_dir)
        self.run_name_prefix = run_name_prefix
        self.params = dict(params or {})
        self.validator = validator
        self.optimizer = optimizer
        self.execute_config = execute_config
        self.artifacts = dict(artifacts or {})
        if isinstance(keep_checkpoints, str) and keep_checkpoints.lower() in ("true", "false"):
            keep_checkpoints = keep_checkpoints.lower() == "true"  # `--keep_checkpoints true` on the command line
        if not isinstance(keep_checkpoints, bool):
            raise ValueError(f"StudyTracker: keep_checkpoints must be true or false, got {keep_checkpoints!r}")
        self.keep_checkpoints = keep_checkpoints
        self.run_id: str | None = None
        self._client = None
        self._trainer = None
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._segment_start = 0.0
        self._previous_seconds = 0.0
        self._logged_epochs = 0
        self._existing: dict[str, set[int]] = {}
        self._lock = None
        self._ended = False
        self._pid = os.getpid()
        self._previous_sigterm = None

    # ---------------------------------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        from ignite.engine import Events

        try:
            check_tracking_uri(self.tracking_uri)
            self._lock = hold_run_folder(self.output_dir)
        except (ValueError, RunFolderBusy):
            self._remove_own_config()  # written by this process moments ago, for a run that will not be
            raise
        mark_abandoned(self.output_dir, locked=True)
        self._remove_stale_configs()
        self._ended = False
        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        _run_first(engine, Events.EXCEPTION_RAISED, self.exception_raised)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self.validation_completed)

    def _own_config(self) -> Path | None:
        config = Path(str(self.execute_config)) if self.execute_config else None
        return config if config is not None and config.is_file() and config.parent == self.output_dir else None

    def _remove_own_config(self) -> None:
        config = self._own_config()
        if config is not None:
            config.unlink(missing_ok=True)

    def _remove_stale_configs(self) -> None:
        """Keep only this start's executed config (the newest) in the output folder."""
        configs = sorted(self.output_dir.glob("config_*.json"), key=lambda p: p.stat().st_mtime)
        current = self._own_config() or (configs[-1] if configs else None)
        for path in configs:
            if path != current:
                path.unlink(missing_ok=True)

    def _release(self) -> None:
        """Give back the folder lock and the SIGTERM handler: the run has ended."""
        self._ended = True
        if self._previous_sigterm is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker (DataLoader) inherited the handler: end as SIGTERM says
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    @property
    def state_path(self) -> Path:
        return self.output_dir / STATE_FILE

    def _write_state(self, status: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment_name,
                 "status": status, "wall_seconds": self._wall_seconds(), "pid": os.getpid()}  # fmt: skip
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def _wall_seconds(self) -> float:
        return self._previous_seconds + (time.perf_counter() - self._segment_start if self._segment_start else 0.0)

    def _resumable_run(self, client, epoch: int) -> tuple[str, float] | None:
        """The previous run to continue, if the trainer resumed (epoch > 0) and that run did not finish."""
        if epoch == 0 or not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("tracking_uri") != self.tracking_uri or not state.get("run_id"):
            return None
        try:
            run = client.get_run(state["run_id"])
        except Exception:  # the run was deleted or the store replaced
            return None
        if run.info.status == "FINISHED":
            return None
        return state["run_id"], float(state.get("wall_seconds", 0.0))

    # ---------------------------------------------------------------------------------------------------------
    def started(self, engine) -> None:
        from mlflow import MlflowClient

        experiment_id = ensure_experiment(self.tracking_uri, self.experiment_name)
        self._client = client = MlflowClient(self.tracking_uri)
        resumed = self._resumable_run(client, engine.state.epoch)
        if resumed is not None:
            self.run_id, self._previous_seconds = resumed
            # a kill between logging epoch k and checkpointing it re-runs epoch k: keep its first record only
            history = _retry(client.get_metric_history, self.run_id, "train_loss")
            self._logged_epochs = max((m.step for m in history), default=0)
            # ... and of the metrics logged after training (the test pass, wall time): a kill before FINISHED repeats it
            metrics = _retry(client.get_run, self.run_id).data.metrics
            self._existing = {k: {m.step for m in _retry(client.get_metric_history, self.run_id, k)} for k in metrics}
            _retry(client.update_run, self.run_id, status="RUNNING")
            logger.info(f"MLflow: resuming run {self.run_id} at epoch {engine.state.epoch}")
        else:
            tags = {**self.tags, "git_commit": git_commit()}
            description = study_run_description(tags)
            if description:
                tags["mlflow.note.content"] = description
            name = study_run_name(tags, self.run_name_prefix)
            run = _retry(client.create_run, experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            self._previous_seconds = 0.0
            self._existing = {}
            for key, value in self.params.items():
                _retry(client.log_param, self.run_id, key, str(value)[:6000])
            logger.info(f"MLflow: run {run.info.run_name} ({self.run_id}) in experiment {self.experiment_name}")
        self._segment_start = time.perf_counter()
        self._write_state("RUNNING")
        from ignite.engine import Events

        _run_first(engine, Events.EXCEPTION_RAISED, self.exception_raised)  # handlers attached after ours
        with contextlib.suppress(ValueError):  # signals reach only the main thread
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def iteration_completed(self, engine) -> None:
        loss = _loss_of(engine.state.output)
        if loss is None:
            return
        if not math.isfinite(loss):
            raise RuntimeError(
                f"training loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                "stopping (lower the learning rate, check the inputs for NaN, or use fp32)"
            )
        self._losses.append(loss)
        for key, value in _loss_components(engine.state.output).items():
            self._terms.setdefault(key, []).append(value)

    @property
    def active(self) -> bool:
        """True once the tracker has created or resumed its MLflow run (after the engine's ``STARTED``)."""
        return self._client is not None and self.run_id is not None

    def _require_run(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"StudyTracker: cannot {what} before the run started (attach it to the trainer).")

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        """Log metric ``key`` of the run (retried while the store is locked)."""
        self._require_run(f"log metric {key!r}")
        if int(step) in self._existing.get(key, ()):
            return  # logged by the segment before a resume
        _retry(self._client.log_metric, self.run_id, key, float(value), step=int(step))

    def log_artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        """Log the file ``path`` under the run's artifact ``folder``."""
        self._require_run(f"log {os.fspath(path)!r}")
        _retry(self._client.log_artifact, self.run_id, os.fspath(path), folder)

    def set_tag(self, key: str, value: object) -> None:
        """Set tag ``key`` of the run to ``str(value)``."""
        self._require_run(f"set tag {key!r}")
        _retry(self._client.set_tag, self.run_id, key, str(value))

    def _log(self, key: str, value: float, step: int) -> None:
        self.log_metric(key, value, step)

    def epoch_completed(self, engine) -> None:
        epoch = engine.state.epoch
        if epoch <= self._logged_epochs:
            self._losses, self._terms = [], {}
            return
        if self._losses:
            self._log("train_loss", sum(self._losses) / len(self._losses), epoch)
            self._losses = []
        for key, values in self._terms.items():
            self._log(f"train_{key}", sum(values) / len(values), epoch)
        self._terms = {}
        if self.optimizer is not None:
            self._log("lr", self.optimizer.param_groups[0]["lr"], epoch)
        seconds = engine.state.times.get("EPOCH_COMPLETED")
        if seconds is not None:
            self._log("epoch_seconds", seconds, epoch)
        self._write_state("RUNNING")

    def validation_completed(self, evaluator) -> None:
        name = getattr(evaluator.state, "key_metric_name", None)
        if self._trainer is None or self.run_id is None or name not in evaluator.state.metrics:
            return
        if self._trainer.state.epoch <= self._logged_epochs:
            return
        self._log("val_metric", evaluator.state.metrics[name], self._trainer.state.epoch)

    def _executed_config(self) -> Path | None:
        if self.execute_config and os.path.isfile(str(self.execute_config)):
            return Path(str(self.execute_config))
        configs = sorted(self.output_dir.glob("config_*.json"), key=lambda p: p.stat().st_mtime)
        return configs[-1] if configs else None

    def completed(self, engine) -> None:
        seconds = self._wall_seconds()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() and gpus:
            gpus = torch.distributed.get_world_size()
        self._log("wall_seconds", seconds, 0)
        self._log("gpu_hours", gpus * seconds / 3600.0, 0)
        config = self._executed_config()
        if config is not None:
            _retry(self._client.log_artifact, self.run_id, str(config), "config")
        for path, folder in self.artifacts.items():
            if os.path.exists(path):
                self._log_file(Path(path), folder or "")
        _retry(self._client.set_terminated, self.run_id, "FINISHED")
        self._segment_start = 0.0
        self._previous_seconds = seconds
        self._write_state("FINISHED")
        if not self.keep_checkpoints:
            for _, path in checkpoint_files(self.output_dir / "models"):
                path.unlink(missing_ok=True)
        self._release()

    def _log_file(self, path: Path, folder: str) -> None:
        """Log ``path`` as artifact ``folder/<name>``. Where the run's artifacts are a local folder on the same file
        system (the study's SQLite store), a hard link instead of a copy: the store shows the file without holding
        a second copy of the weights (files are replaced by rename, never rewritten in place, so the link keeps the
        logged content)."""
        root = _local_artifact_dir(self._client.get_run(self.run_id).info.artifact_uri)
        if root is not None:
            target = root / folder / path.name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                os.link(path, target)
                return
            except OSError:  # another file system, or no hard links there: copy
                pass
        _retry(self._client.log_artifact, self.run_id, str(path), folder or None)

    def exception_raised(self, engine, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for Ctrl-C and SIGTERM), then re-raise. Ignite may call it twice for one
        exception (from the iteration loop and from the run); it acts once."""
        if self._ended:
            raise exc
        interrupted = isinstance(exc, KeyboardInterrupt | Terminated)
        status = "KILLED" if interrupted else "FAILED"
        quiet = []
        with contextlib.suppress(ValueError):  # a second Ctrl-C or SIGTERM must not cut the marking short
            quiet = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)]
        try:
            if self.active:
                _retry(self._client.set_tag, self.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
                config = self._executed_config()
                if config is not None:
                    _retry(self._client.log_artifact, self.run_id, str(config), "config")
                    config.unlink(missing_ok=True)  # recorded; a rerun writes its own
                _retry(self._client.set_terminated, self.run_id, status)
                self._write_state(status)
                logger.error(f"MLflow: run {self.run_id} marked {status} ({type(exc).__name__}: {exc})")
        except Exception as err:  # never hide the original error behind a tracking error
            logger.error(f"MLflow: could not mark run {self.run_id} {status}: {err}")
        finally:
            for sig, previous in quiet:
                signal.signal(sig, previous)
            self._release()
        raise exc


def _run_first(engine, event, handler) -> None:
    """Move ``handler`` to the front of ``engine``'s handlers of ``event``. Ignite calls an event's handlers in
    order and stops at the first that raises; MONAI's ``StatsHandler`` re-raises on EXCEPTION_RAISED, so a handler
    after it never runs. Ignite has no public way to reorder; its handler list is ``engine._event_handlers``."""
    handlers = getattr(engine, "_event_handlers", {}).get(event)
    if not handlers:
        return
    ours = [h for h in handlers if h[0] == handler]  # bound methods compare by function and instance
    for entry in ours:
        handlers.remove(entry)
    handlers[:0] = ours
