"""Run selection by tag (no MLflow store needed: RunRecord objects are built directly)."""

from __future__ import annotations

import math

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
    runs = [record("old", start=1), record("new", start=2, artifacts=frozenset({"features/final_encoder.npz"}))]
    sel = select_runs(runs)
    assert sel.runs[("profound", "segmentation", "finetune", 0)].run_id == "old"
    assert sel.excluded[0].reason == "missing artifact(s): features/step0.npz, features/final.npz"


@pytest.mark.parametrize(
    ("regime", "snapshot", "expected"),
    [
        ("finetune", "final", ("features/step0.npz", "features/final.npz")),
        ("finetune", "epoch_3", ("features/step0.npz", "features/epoch_3.npz")),
        ("random", "epoch_3", ("features/step0.npz",)),
        ("scratch", "epoch_3", ("features/epoch_3.npz",)),
        ("specialised", "final", ()),
    ],
)
def test_required_artifacts(regime: str, snapshot: str, expected: tuple[str, ...]) -> None:
    assert required_artifacts(regime, snapshot) == expected


def test_snapshot_option_changes_what_is_missing() -> None:
    scratch = record("s", regime="scratch", artifacts=frozenset({"features/final.npz"}))
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
    assert feature_artifact("step0", "encoder") == "features/step0_encoder.npz"


def test_record_lists_snapshots() -> None:
    r = record("a", artifacts=frozenset({"features/epoch_2.npz", "features/final_encoder.npz", "features/x.npz"}))
    assert r.snapshots() == ["epoch_2"]
    assert r.snapshots("encoder") == ["final"]


def test_run_without_predictions_is_selected() -> None:
    # it has its test metric and snapshots: its point values count, only its confidence intervals are missing
    ft = record("f", artifacts=frozenset({"features/step0.npz", "features/final.npz"}))
    spec = record("u", regime="specialised", model="unet", artifacts=frozenset())
    sel = select_runs([ft, spec])
    assert sorted(r.run_id for r in sel.runs.values()) == ["f", "u"] and sel.excluded == []


@pytest.mark.parametrize(
    ("task", "metrics", "beats"),
    [
        ("segmentation", {"test_metric": 0.3, "baseline_metric": 0.25}, True),
        ("segmentation", {"test_metric": 0.25, "baseline_metric": 0.25}, False),  # equal is not better
        ("super_resolution", {"test_metric": 0.44, "baseline_metric": 0.99}, False),
        ("classification", {"test_metric": 0.5, "baseline_metric": 0.0}, True),
    ],
)
def test_beats_baseline(task: str, metrics: dict, beats: bool) -> None:
    tags = {"model": "profound", "task": task, "regime": "finetune", "seed": "0"}
    r = RunRecord("a", "a", "FINISHED", 0, tags, metrics, FULL, "profound", task, "finetune", 0)
    assert r.baseline == metrics["baseline_metric"] and r.beats_baseline() is beats
    row = select_runs([r]).rows()[0]
    assert row["beats_baseline"] == ("yes" if beats else "no")


def test_old_run_without_baseline_or_kinds() -> None:
    r = RunRecord("a", "a", "FINISHED", 0, {"layer_kinds": "not json"}, {"test_metric": 0.5}, FULL)
    assert math.isnan(r.baseline) and not r.beats_baseline() and r.layer_kinds == {}
    r2 = RunRecord("b", "b", "FINISHED", 0, {"layer_kinds": '{"encoder": "backbone_pooled"}'}, {}, FULL)
    assert r2.layer_kinds == {"encoder": "backbone_pooled"}
