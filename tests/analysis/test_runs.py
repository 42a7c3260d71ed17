"""Run selection by tag (no MLflow store needed: RunRecord objects are built directly)."""

from __future__ import annotations

import pytest

from common.analysis.runs import RunRecord, feature_artifact, required_artifacts, select_runs

FULL = frozenset(
    {"features/step0.npz", "features/final.npz", "features/epoch_3.npz", "test/predictions.npz"}
)  # fmt: skip


def record(
    run_id: str,
    regime: str = "finetune",
    status: str = "FINISHED",
    start: int = 0,
    artifacts: frozenset[str] = FULL,
    seed: str = "0",
    model: str = "profound",
    task: str = "segmentation",
) -> RunRecord:
    tags = {"model": model, "task": task, "regime": regime, "seed": seed}
    tags = {k: v for k, v in tags.items() if v}
    seed_int = int(seed) if seed.lstrip("-").isdigit() else -1
    return RunRecord(run_id, f"name-{run_id}", status, start, tags, {}, artifacts, model, task, regime, seed_int)


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED", "SCHEDULED"])
def test_unfinished_runs_are_excluded_with_their_status(status: str) -> None:
    sel = select_runs([record("a", status=status), record("b", start=-5)])
    assert sel.runs[("profound", "segmentation", "finetune", 0)].run_id == "b"
    assert [(e.run_id, e.reason) for e in sel.excluded] == [("a", f"run status is {status}, not FINISHED")]


def test_latest_finished_wins_and_older_is_listed() -> None:
    runs = [record("old", start=100), record("new", start=300), record("mid", start=200)]
    sel = select_runs(runs)
    assert sel.runs[("profound", "segmentation", "finetune", 0)].run_id == "new"
    assert sorted((e.run_id, e.reason) for e in sel.excluded) == [
        ("mid", "superseded by the later finished run new"),
        ("old", "superseded by the later finished run new"),
    ]


def test_incomplete_newer_run_does_not_hide_complete_older_one() -> None:
    runs = [record("old", start=1), record("new", start=2, artifacts=frozenset({"test/predictions.npz"}))]
    sel = select_runs(runs)
    assert sel.runs[("profound", "segmentation", "finetune", 0)].run_id == "old"
    assert sel.excluded[0].reason == "missing artifact(s): features/step0.npz, features/final.npz"


@pytest.mark.parametrize(
    ("regime", "snapshot", "expected"),
    [
        ("finetune", "final", ("features/step0.npz", "features/final.npz", "test/predictions.npz")),
        ("finetune", "epoch_3", ("features/step0.npz", "features/epoch_3.npz", "test/predictions.npz")),
        ("random", "epoch_3", ("features/step0.npz", "test/predictions.npz")),
        ("scratch", "epoch_3", ("features/epoch_3.npz", "test/predictions.npz")),
        ("specialised", "final", ("test/predictions.npz",)),
    ],
)
def test_required_artifacts(regime: str, snapshot: str, expected: tuple[str, ...]) -> None:
    assert required_artifacts(regime, snapshot) == expected


def test_snapshot_option_changes_what_is_missing() -> None:
    scratch = record("s", regime="scratch", artifacts=frozenset({"features/final.npz", "test/predictions.npz"}))
    assert select_runs([scratch], "final").runs
    sel = select_runs([scratch], "epoch_2")
    assert not sel.runs and sel.excluded[0].reason == "missing artifact(s): features/epoch_2.npz"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"seed": ""}, "missing tag(s) seed"),
        ({"model": "", "task": ""}, "missing tag(s) model, task"),
        ({"seed": "x1"}, "tag seed='x1' is not an integer >= 0"),
        ({"regime": "pretrain"}, "regime 'pretrain' is not used by the analysis"),
    ],
)
def test_untagged_or_unused_runs_are_listed(kwargs: dict, reason: str) -> None:
    sel = select_runs([record("r", **kwargs)])
    assert not sel.runs
    assert sel.excluded[0].reason == reason


def test_seeds_and_regimes_are_separate_keys_and_specialised_lookup() -> None:
    runs = [
        record("f0"),
        record("f1", seed="1"),
        record("r0", regime="random"),
        record("u", regime="specialised", model="unet"),
    ]
    sel = select_runs(runs)
    assert [r.run_id for r in sel.get("profound", "segmentation", "finetune")] == ["f0", "f1"]
    assert [r.run_id for r in sel.get("profound", "segmentation", "finetune", seed=1)] == ["f1"]
    assert [r.run_id for r in sel.specialised("segmentation")] == ["u"]
    assert sel.excluded == []


@pytest.mark.parametrize("bad", ["epoch_0", "epoch_", "last", "final.npz", 3])
def test_feature_artifact_rejects_bad_snapshot_names(bad: object) -> None:
    with pytest.raises(ValueError, match="snapshot must be"):
        feature_artifact(bad)  # type: ignore[arg-type]


def test_feature_artifact_paths() -> None:
    assert feature_artifact("epoch_12") == "features/epoch_12.npz"
    assert feature_artifact("step0", encoder=True) == "features/step0_encoder.npz"


def test_record_lists_snapshots() -> None:
    r = record("a", artifacts=frozenset({"features/epoch_2.npz", "features/final_encoder.npz", "features/x.npz"}))
    assert r.snapshots() == ["epoch_2"]
    assert r.snapshots(encoder=True) == ["final"]
