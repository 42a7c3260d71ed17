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
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["StudyTracker", "ensure_experiment", "git_commit", "sqlite_path", "sqlite_uri", "unique_run_name"]

logger = logging.getLogger(__name__)
_REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "mlflow_run.json"


def sqlite_uri(path: str | os.PathLike) -> str:
    """``sqlite:///`` URI of a database file, absolute so that it means the same from every working directory."""
    return "sqlite:///" + os.path.abspath(os.fspath(path))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


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


def unique_run_name(prefix: str) -> str:
    """``<prefix>-<YYYYmmdd-HHMMSS>-<6 hex>``: unique across parallel starts within the same second."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


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
      ``train_dino_loss`` and ``train_patch_loss``), ``lr``, and ``val_metric`` from ``validator``'s key metric when
      a validator is given;
    - at the end: ``wall_seconds`` (summed over resumed segments), ``gpu_hours`` (GPUs x hours), the executed config
      and each existing path of ``artifacts``; the run is then FINISHED. An exception marks it FAILED and is
      re-raised. A loss that is NaN or infinite stops the run with a message naming the epoch and iteration. A resumed
      run does not log again an epoch its MLflow run already holds (one record per epoch).

    Args:
        tracking_uri: the store, e.g. ``sqlite:///abs/path/mlflow.db`` or ``http://localhost:5000``.
        experiment_name: the study's experiment.
        tags: run tags; values are converted to strings.
        output_dir: the run's output folder; ``mlflow_run.json`` there holds the run id for resuming.
        run_name_prefix: prefix of the unique run name (the bundle name). Default ``"run"``.
        params: flat mapping logged as MLflow params. Default none.
        validator: the evaluator whose key metric is ``val_metric``. Default None.
        optimizer: its first group's learning rate is logged as ``lr``. Default None.
        execute_config: the executed-config path MONAI recorded (``@save_execute_config``). Default None.
        artifacts: files logged at the end (e.g. the final checkpoint), ``{path: artifact folder}``. Default none.
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
        self.run_id: str | None = None
        self._client = None
        self._trainer = None
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._segment_start = 0.0
        self._previous_seconds = 0.0
        self._logged_epochs = 0

    # ---------------------------------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        from ignite.engine import Events

        self._trainer = engine
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self.validation_completed)

    @property
    def state_path(self) -> Path:
        return self.output_dir / STATE_FILE

    def _write_state(self, status: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment": self.experiment_name,
                 "status": status, "wall_seconds": self._wall_seconds()}  # fmt: skip
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
            _retry(client.update_run, self.run_id, status="RUNNING")
            logger.info(f"MLflow: resuming run {self.run_id} at epoch {engine.state.epoch}")
        else:
            tags = {**self.tags, "git_commit": git_commit()}
            run = _retry(client.create_run, experiment_id, run_name=unique_run_name(self.run_name_prefix), tags=tags)
            self.run_id = run.info.run_id
            self._previous_seconds = 0.0
            for key, value in self.params.items():
                _retry(client.log_param, self.run_id, key, str(value)[:6000])
            logger.info(f"MLflow: run {run.info.run_name} ({self.run_id}) in experiment {self.experiment_name}")
        self._segment_start = time.perf_counter()
        self._write_state("RUNNING")

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
                _retry(self._client.log_artifact, self.run_id, str(path), folder or None)
        _retry(self._client.set_terminated, self.run_id, "FINISHED")
        self._segment_start = 0.0
        self._previous_seconds = seconds
        self._write_state("FINISHED")

    def exception_raised(self, engine, exc: BaseException) -> None:
        if self._client is not None and self.run_id is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                _retry(self._client.set_terminated, self.run_id, status)
                self._write_state(status)
            except Exception as err:  # never hide the original error behind a tracking error
                logger.error(f"MLflow: could not mark run {self.run_id} {status}: {err}")
        raise exc
