"""common.bundle.tracking: the MLflow record of a run, on a real temporary SQLite store and a real Ignite engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from mlflow import MlflowClient

from common.bundle import StudyTracker, ensure_experiment, sqlite_uri
from common.bundle.tracking import RunFolderBusy, Terminated, check_tracking_uri

TAGS = {
    "model": "profound",
    "task": "segmentation",
    "regime": "finetune",
    "seed": 3,
    "profile": "smoke",
    "study": "s",
    "bundle": "profound_segmentation_finetune",
    "bundle_version": "0.1.0",
    "metric_name": "dice",
}


def _engine(losses: list[float], epochs: int) -> tuple[Engine, int]:
    per_epoch = len(losses) // epochs

    def step(engine: Engine, batch: int) -> dict:
        return {"loss": torch.tensor(losses[engine.state.iteration - 1])}

    return Engine(step), per_epoch


def _tracker(tmp_path: Path, **kwargs) -> StudyTracker:
    return StudyTracker(
        tracking_uri=sqlite_uri(tmp_path / "mlflow.db"),
        experiment_name="s",
        tags=TAGS,
        output_dir=tmp_path / "run",
        run_name_prefix="pf-seg",
        params={"lr": 1e-4},
        **kwargs,
    )


def test_run_has_tags_params_epoch_losses_and_finishes(tmp_path: Path) -> None:
    losses = [4.0, 2.0, 1.0, 3.0]  # epoch means 3.0 and 2.0
    engine, per_epoch = _engine(losses, epochs=2)
    tracker = _tracker(tmp_path, artifacts={str(tmp_path / "missing.pt"): "model"})
    tracker.attach(engine)
    engine.run(list(range(per_epoch)), max_epochs=2)

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"profound seg finetune s{TAGS['seed']}"  # what differs between runs comes first
    assert {k: run.data.tags[k] for k in TAGS} == {k: str(v) for k, v in TAGS.items()}
    assert run.data.tags["git_commit"]
    assert run.data.params["lr"] == "0.0001"
    history = [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "train_loss")]
    assert history == [(1, 3.0), (2, 2.0)]
    epoch_seconds = client.get_metric_history(tracker.run_id, "epoch_seconds")
    assert [m.step for m in epoch_seconds] == [1, 2] and all(m.value > 0 for m in epoch_seconds)
    assert run.data.metrics["gpu_hours"] == 0.0  # no GPU here
    assert run.data.metrics["wall_seconds"] > 0
    state = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    assert state["run_id"] == tracker.run_id and state["status"] == "FINISHED"


@pytest.mark.parametrize("keep", [False, True, "true"])
def test_a_finished_run_drops_its_resumable_state_unless_kept(tmp_path: Path, keep) -> None:
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    for name in ("checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"):
        (models / name).write_bytes(b"x")
    engine, per_epoch = _engine([1.0, 1.0], epochs=2)
    seen_while_running = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen_while_running.append(len(list(models.iterdir()))))
    tracker = _tracker(tmp_path, keep_checkpoints=keep)
    tracker.attach(engine)
    engine.run(list(range(per_epoch)), max_epochs=2)
    assert seen_while_running == [3, 3]  # a run that is interrupted keeps what it resumes from
    kept = sorted(p.name for p in models.iterdir())
    assert kept == (["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"] if keep else ["model.pt"])


def test_a_logged_file_in_a_local_store_is_a_hard_link_not_a_copy(tmp_path: Path) -> None:
    weights = tmp_path / "run" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"w": torch.arange(4.0)}, weights)
    engine, per_epoch = _engine([1.0], epochs=1)
    tracker = _tracker(tmp_path, artifacts={str(weights): "model"})
    tracker.attach(engine)
    engine.run(list(range(per_epoch)), max_epochs=1)
    client = MlflowClient(tracker.tracking_uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/model.pt"]
    logged = Path(client.download_artifacts(tracker.run_id, "model/model.pt", str(tmp_path / "dl")))
    assert torch.equal(torch.load(logged, weights_only=True)["w"], torch.arange(4.0))
    stored = Path(client.get_run(tracker.run_id).info.artifact_uri.removeprefix("file://")) / "model" / "model.pt"
    assert stored.stat().st_ino == weights.stat().st_ino  # one copy on disk
    # a later save replaces the file by rename (atomic_save): the logged artifact keeps what was logged
    from common.networks.checkpoint import atomic_save

    atomic_save({"w": torch.zeros(4)}, weights)
    assert torch.equal(torch.load(stored, weights_only=True)["w"], torch.arange(4.0))


def test_keep_checkpoints_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_checkpoints must be true or false, got 'yes'"):
        _tracker(tmp_path, keep_checkpoints="yes")


def test_validator_key_metric_is_logged_per_trainer_epoch(tmp_path: Path) -> None:
    engine, per_epoch = _engine([1.0, 1.0, 1.0], epochs=3)
    validator = Engine(lambda e, b: None)

    @validator.on(Events.COMPLETED)
    def _metric(e: Engine) -> None:
        e.state.key_metric_name = "dice"
        e.state.metrics = {"dice": 0.1 * engine.state.epoch}

    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run([0]))
    tracker = _tracker(tmp_path, validator=validator)
    tracker.attach(engine)
    engine.run(list(range(per_epoch)), max_epochs=3)
    history = MlflowClient(tracker.tracking_uri).get_metric_history(tracker.run_id, "val_metric")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_nan_loss_stops_the_run_and_marks_it_failed(tmp_path: Path) -> None:
    engine, per_epoch = _engine([1.0, math.nan, 1.0, 1.0], epochs=2)
    tracker = _tracker(tmp_path)
    tracker.attach(engine)
    with pytest.raises(RuntimeError, match="training loss is nan at epoch 1, iteration 2"):
        engine.run(list(range(per_epoch)), max_epochs=2)
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_restart_resumes_its_unfinished_run_only_when_the_trainer_resumed(tmp_path: Path) -> None:
    engine, per_epoch = _engine([1.0, 2.0, 5.0, 5.0], epochs=2)
    first = _tracker(tmp_path)
    first.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def _crash(e: Engine) -> None:
        if e.state.epoch == 1:
            raise KeyboardInterrupt  # killed after epoch 1

    with pytest.raises(KeyboardInterrupt):
        engine.run(list(range(per_epoch)), max_epochs=2)
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    resumed_engine, _ = _engine([0.0, 0.0, 3.0, 5.0], epochs=2)

    @resumed_engine.on(Events.STARTED)
    def _load_checkpoint(e: Engine) -> None:  # what MONAI's CheckpointLoader, attached first, does at STARTED
        e.state.epoch, e.state.iteration = 1, per_epoch

    second = _tracker(tmp_path)
    second.attach(resumed_engine)
    resumed_engine.run(list(range(per_epoch)), max_epochs=2)
    assert second.run_id == first.run_id
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train_loss")]
    assert history == [(1, 1.5), (2, 4.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"

    fresh_engine, _ = _engine([1.0, 1.0], epochs=1)
    third = _tracker(tmp_path)  # a run that did not resume from a checkpoint never attaches to an old run
    third.attach(fresh_engine)
    fresh_engine.run(list(range(2)), max_epochs=1)
    assert third.run_id != first.run_id


def test_parallel_processes_create_one_store_and_experiment(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path / "new" / "mlflow.db")
    code = "import sys; from common.bundle import ensure_experiment; print(ensure_experiment(sys.argv[1], 'study'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    # generous: four processes importing torch and MLflow and migrating one new store in turn, on a CPU that the
    # other test worker shares (the 120 s this had timed out twice in a full suite on two cores)
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert ensure_experiment(uri, "study") == results[0][0].strip()
    location = MlflowClient(uri).get_experiment_by_name("study").artifact_location
    assert location.startswith((tmp_path / "new" / "artifacts").as_uri())


def test_an_epoch_rerun_after_a_kill_keeps_one_record(tmp_path: Path) -> None:
    engine, per_epoch = _engine([1.0, 1.0, 2.0, 2.0], epochs=2)
    first = _tracker(tmp_path)
    first.attach(engine)

    @engine.on(Events.EPOCH_COMPLETED)
    def _killed_before_the_checkpoint(e: Engine) -> None:  # epoch 2 logged, its checkpoint never written
        if e.state.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run(list(range(per_epoch)), max_epochs=3)

    rerun, _ = _engine([0.0, 0.0, 9.0, 9.0, 3.0, 3.0], epochs=3)

    @rerun.on(Events.STARTED)
    def _load_epoch_1_checkpoint(e: Engine) -> None:
        e.state.epoch, e.state.iteration = 1, per_epoch

    second = _tracker(tmp_path)
    second.attach(rerun)
    rerun.run(list(range(per_epoch)), max_epochs=3)
    history = MlflowClient(first.tracking_uri).get_metric_history(first.run_id, "train_loss")
    assert second.run_id == first.run_id
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]


# ------------------------------------------------------------------------------------------------------------------
# the run's life cycle (DESIGN.md section 10)


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (Terminated(), "KILLED")],
)
def test_an_error_marks_the_run_even_behind_a_stats_handler(tmp_path: Path, error: BaseException, status: str) -> None:
    from monai.handlers import StatsHandler

    engine, per_epoch = _engine([1.0, 1.0, 1.0, 1.0], epochs=2)
    StatsHandler(name="stats", iteration_log=False, epoch_log=False).attach(
        engine
    )  # registers for EXCEPTION_RAISED before the tracker, and re-raises
    config = tmp_path / "run" / "config_20250101_000000.json"
    config.parent.mkdir(parents=True)
    config.write_text("{}")
    tracker = _tracker(tmp_path, execute_config=str(config))
    tracker.attach(engine)

    @engine.on(Events.ITERATION_COMPLETED(once=3))
    def _fail(e: Engine) -> None:
        raise error

    with pytest.raises(type(error)):
        engine.run(list(range(per_epoch)), max_epochs=2)
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags["error"].startswith(type(error).__name__)
    assert json.loads(tracker.state_path.read_text())["status"] == status
    assert [a.path for a in client.list_artifacts(tracker.run_id, "config")] == ["config/" + config.name]
    assert not config.exists()  # recorded in the run; nothing left for a rerun


def test_sigterm_raises_terminated_while_the_run_trains(tmp_path: Path) -> None:
    import os
    import signal

    engine, per_epoch = _engine([1.0, 1.0], epochs=1)
    tracker = _tracker(tmp_path)
    tracker.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught:
        engine.run(list(range(per_epoch)), max_epochs=1)
    assert caught.value.code == 143
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # handed back when the run ended


def test_one_writer_per_folder_and_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    code = ("import sys, time; from common.bundle.tracking import hold_run_folder; h = hold_run_folder(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        engine, _ = _engine([1.0], epochs=1)
        with pytest.raises(RunFolderBusy, match=f"in use by pid {holder.pid} "):
            _tracker(tmp_path).attach(engine)
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    engine, _ = _engine([1.0], epochs=1)
    tracker = _tracker(tmp_path)
    tracker.attach(engine)
    engine.run([0], max_epochs=1)
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_a_run_left_running_by_a_dead_process_is_marked_killed_by_the_next_start(tmp_path: Path) -> None:
    engine, _ = _engine([1.0, 1.0], epochs=1)
    first = _tracker(tmp_path)
    first.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: e.terminate())
    first.started(engine)  # the run is RUNNING; then its process is SIGKILLed: nothing is marked, the OS unlocks
    first._lock.close()
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"

    fresh, _ = _engine([2.0], epochs=1)  # no checkpoint: a fresh start
    second = _tracker(tmp_path)
    second.attach(fresh)
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert "process gone" in client.get_run(first.run_id).data.tags["error"]
    fresh.run([0], max_epochs=1)
    assert second.run_id != first.run_id and client.get_run(second.run_id).info.status == "FINISHED"


def test_a_resumed_run_logs_each_metric_step_once(tmp_path: Path) -> None:
    """Killed after the test pass logged its metric but before FINISHED: the rerun repeats the test pass."""
    engine, per_epoch = _engine([1.0, 3.0], epochs=2)
    first = _tracker(tmp_path)

    @engine.on(Events.COMPLETED)
    def _test_pass_then_killed(e: Engine) -> None:
        first.log_metric("test_metric", 0.25)
        raise KeyboardInterrupt

    first.attach(engine)
    with pytest.raises(KeyboardInterrupt):
        engine.run(list(range(per_epoch)), max_epochs=2)

    resumed, _ = _engine([0.0, 0.0], epochs=2)
    second = _tracker(tmp_path)
    resumed.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 2))  # the last checkpoint
    resumed.add_event_handler(Events.COMPLETED, lambda e: second.log_metric("test_metric", 0.5))
    second.attach(resumed)
    resumed.run(list(range(per_epoch)), max_epochs=2)
    client = MlflowClient(first.tracking_uri)
    assert second.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "test_metric")] == [(0, 0.25)]
    assert [m.step for m in client.get_metric_history(first.run_id, "train_loss")] == [1, 2]


def test_stale_executed_configs_are_removed_at_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    old = run / "config_20240101_000000.json"  # left by a start that failed before its tracker existed
    old.write_text("{}")
    current = run / "config_20250101_000000.json"
    current.write_text("{}")
    engine, _ = _engine([1.0], epochs=1)
    _tracker(tmp_path, execute_config=str(current)).attach(engine)
    assert sorted(p.name for p in run.glob("config_*.json")) == [current.name]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bogus://x", "unknown kind of store (scheme 'bogus')"),
        ("mlflow.db", "unknown kind of store (no scheme)"),
        ("http://127.0.0.1:9", "no MLflow server answers there within 3 s"),
        ("sqlite:////no/such/folder/mlflow.db", "the folder /no/such/folder does not exist"),
    ],
)
def test_tracking_uri_is_checked_fast_with_a_message_that_names_it(uri: str, message: str) -> None:
    import time

    start = time.monotonic()
    with pytest.raises(ValueError, match="tracking URI") as caught:
        check_tracking_uri(uri)
    assert message in str(caught.value) and uri in str(caught.value)
    assert time.monotonic() - start < 5


def test_tracking_uri_accepts_a_store_in_an_existing_folder_or_one_it_may_make(tmp_path: Path) -> None:
    assert check_tracking_uri(sqlite_uri(tmp_path / "mlflow.db")) == sqlite_uri(tmp_path / "mlflow.db")
    assert check_tracking_uri(sqlite_uri(tmp_path / "new" / "mlflow.db"), create=True)


def test_the_study_store_of_a_new_study_folder_is_made_other_missing_folders_stop_the_run(tmp_path: Path) -> None:
    """Two bundles started at once on a new study folder: the one whose output lies outside the study folder must
    not depend on the other having made it (CI stop 17 failed on exactly this race)."""
    from common.bundle.tracking import check_tracking_store

    study = tmp_path / "new-study"
    assert check_tracking_store(sqlite_uri(study / "mlflow.db"), True, str(study)) == sqlite_uri(study / "mlflow.db")
    assert study.is_dir()
    executed = tmp_path / "config_1.json"
    executed.write_text("{}")
    with pytest.raises(ValueError, match="does not exist"):
        check_tracking_store(sqlite_uri(tmp_path / "elsewhere" / "mlflow.db"), str(executed), str(study))
    assert not executed.exists() and not (tmp_path / "elsewhere").exists()


def test_study_run_names_put_what_differs_first() -> None:
    from common.bundle.tracking import study_run_name

    tags = {"model": "provicnet", "task": "distortion_correction", "regime": "random", "seed": 2}
    assert study_run_name(tags, "x") == "provicnet DC random s2"
    assert study_run_name({**tags, "task": "pretrain", "regime": "pretrain"}, "x") == "provicnet pretrain s2"
    assert study_run_name({"model": "unet"}, "unet_segmentation").startswith("unet_segmentation-")


def test_study_runs_get_a_description_in_words() -> None:
    from common.bundle.tracking import study_run_description

    tags = {"model": "profound", "task": "segmentation", "regime": "finetune", "seed": 0, "profile": "demo",
            "pretrained_run": "abc123", "bundle": "profound_segmentation_finetune",
            "bundle_version": "0.1.0"}  # fmt: skip
    assert study_run_description(tags) == (
        "profound on lesion segmentation: finetuned from its pretrained encoder; seed 0, profile demo. Pretrained "
        "weights from MLflow run abc123. Bundle profound_segmentation_finetune 0.1.0."
    )
    assert "random-weight reference" in study_run_description({**tags, "regime": "random", "pretrained_run": "none"})
    assert study_run_description({"model": "x"}) == ""


def test_source_run_id_reads_the_run_folder_of_a_checkpoint(tmp_path: Path) -> None:
    from common.bundle.tracking import STATE_FILE, source_run_id

    models = tmp_path / "runs" / "profound_pretrain" / "seed0" / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"")
    assert source_run_id(models / "model.pt") == "none"  # no run wrote it
    (models.parent / STATE_FILE).write_text('{"run_id": "abc123", "status": "FINISHED"}')
    assert source_run_id(models / "model.pt") == "abc123"
    assert source_run_id(None) == "none" and source_run_id(tmp_path / "official.pt") == "none"
