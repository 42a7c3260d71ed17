"""Faults injected into a real bundle run (``python -m monai.bundle run``), each followed by a rerun of the same
command (DESIGN.md section 10): SIGKILL before the first checkpoint, SIGTERM after it, a crash, Ctrl-C after the test
pass, an unreachable tracking server. After the last rerun the output folder holds exactly one FINISHED MLflow run,
every metric step once, no RUNNING run, and nothing a rerun trips over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from common.bundle import sqlite_uri
from common.data.phantom import make_cohort

REPO = Path(__file__).resolve().parents[2]
BUNDLE = "profound_classification_scratch"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _command(study: Path, datalist: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run",
            "--config_file", str(REPO / "bundles" / BUNDLE / "configs" / "train.json"),
            "--tracking", str(REPO / "mlflow_config" / "sqlite.json"), "--study_dir", str(study),
            "--datalist", str(datalist), "--epochs", "2", *extra]  # fmt: skip


def _default_sigint() -> None:
    """Ctrl-C acts in the bundle process even when the suite runs as a background job (a non-interactive shell
    starts background jobs with SIGINT ignored, and the ignore is inherited: the injected SIGINT then did nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fault(at: str, action: str) -> tuple[str, str]:
    handler = f"{{'_target_': 'tests.reliability.faults.Fault', 'at': '{at}', 'action': '{action}'}}"
    return "--tracking_handlers", f"[{handler}]"


def _statuses(client: MlflowClient) -> dict[str, str]:
    experiment = client.get_experiment_by_name("vfm-study").experiment_id
    return {r.info.run_id: r.info.status for r in client.search_runs([experiment])}


@pytest.mark.slow
def test_faults_at_every_stage_then_a_rerun_leave_one_finished_run(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", cases=6, seed=0, size=(32, 64, 64))
    study = tmp_path / "study"
    out = study / "runs" / BUNDLE / "seed0"
    client = MlflowClient(sqlite_uri(study / "mlflow.db"))

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(_command(study, datalist, *extra), cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=900, preexec_fn=_default_sigint)  # fmt: skip

    # (fault, expected exit status, status of the run it hit); SIGINT ends the process as Python does (by SIGINT)
    faults = [
        (("iteration", "SIGKILL"), -signal.SIGKILL, "RUNNING"),  # before the first checkpoint: nothing can mark it
        (("epoch2", "SIGTERM"), 143, "KILLED"),  # after the first checkpoint
        (("iteration", "raise"), 1, "FAILED"),  # a crash in the resumed epoch 2
        (("test", "SIGINT"), -signal.SIGINT, "KILLED"),  # after the test pass logged its metric
    ]
    hit = []
    for (at, action), code, status in faults:
        done = run(*_fault(at, action))
        assert done.returncode == code, (at, action, done.stdout[-2000:] + done.stderr[-3000:])
        state = json.loads((out / "mlflow_run.json").read_text())
        hit.append(state["run_id"])
        assert _statuses(client)[state["run_id"]] == status, (at, action)
        assert state["status"] == status
        if action == "raise":
            assert client.get_run(state["run_id"]).data.tags["error"].startswith("InjectedFault")

    final = run()
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    statuses = _statuses(client)
    # the SIGKILLed run never reached a checkpoint: marked KILLED by the next start; the others resumed one run
    assert statuses == {hit[0]: "KILLED", hit[1]: "FINISHED"}, statuses
    assert hit[1] == hit[2] == hit[3]
    finished = client.get_run(hit[1])
    for key in finished.data.metrics:
        steps = Counter(m.step for m in client.get_metric_history(hit[1], key))
        assert all(n == 1 for n in steps.values()), (key, steps)  # every metric step once
    assert [m.step for m in client.get_metric_history(hit[1], "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(hit[1], "val_metric")] == [1, 2]
    assert len(client.get_metric_history(hit[1], "test_metric")) == 1
    assert len(list(out.glob("config_*.json"))) == 1 and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_clear_error_within_seconds(tmp_path: Path) -> None:
    datalist = make_cohort(tmp_path / "cohort", cases=6, seed=0, size=(32, 64, 64))
    command = _command(tmp_path / "study", datalist)
    command[command.index("--tracking") + 1] = str(REPO / "mlflow_config" / "server.json")
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env={**ENV, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "tracking URI http://127.0.0.1:9: no MLflow server answers there" in done.stdout + done.stderr
    assert time.monotonic() - start < 120  # was: no error after 300 s
    assert not list((tmp_path / "study" / "runs" / BUNDLE / "seed0").glob("config_*.json"))
    # checked first in initialize: no datalist read, no network built (both log a line when they happen)
    assert "parameters trainable" not in done.stdout + done.stderr
    assert not list((tmp_path / "cohort").rglob(".vfm-validated*"))
