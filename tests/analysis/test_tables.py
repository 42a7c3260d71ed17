"""The numerical core of the analysis on in-memory inputs, against hand values and a direct double-loop MMD."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common.analysis import StudyAnalysis
from common.analysis.runs import FeatureSnapshot, Predictions
from common.analysis.tables import (
    RunCost,
    SeedData,
    align_task,
    alignment_row,
    correlation_rows,
    cost_row,
    performance,
    rpg_with_reason,
    safe_rpg,
    write_csv,
)
from tests.analysis.test_bundle import mmd2_double_loop

IDS = [f"i{k}" for k in range(6)]


def snap(features: np.ndarray, ids: list[str] = IDS) -> FeatureSnapshot:
    return FeatureSnapshot(features=np.asarray(features, dtype=np.float64), ids=list(ids), layer="head_input")


def seed_data(seed: int = 0, p_ft: float = 0.6, shift: float = 0.0, rand_ids: list[str] | None = None) -> SeedData:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(6, 3)) + 1.0
    feats = {"ft": snap(base + shift), "pre": snap(base), "rand": snap(-base), "scratch": snap(base * 2.0 + 0.5)}
    if rand_ids is not None:
        feats["rand"] = snap(-base, rand_ids)
    per = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    preds = {
        "finetune": Predictions(IDS, per_image=per - per.mean() + p_ft),
        "random": Predictions(IDS, per_image=per - per.mean() + 0.5),
        "specialised": Predictions(IDS, per_image=per - per.mean() + 0.75),
        "scratch": Predictions(IDS, per_image=per - per.mean() + 0.4),
    }
    p = {"finetune": p_ft, "random": 0.5, "specialised": 0.75, "scratch": 0.4}
    return SeedData(seed=seed, p=p, features=feats, predictions=preds)


@pytest.mark.parametrize(
    ("indices", "expected"),
    [(None, 2.0 / 3.0), (np.array([0, 2, 3, 4]), 1.0), (np.array([3, 4, 1, 1]), 0.0)],
)
def test_classification_performance_is_specificity_at_sensitivity_09(indices, expected) -> None:
    # positive score = sum of probs of classes >= 1; both positives (0.6, 0.9) must be called: threshold 0.6
    score = np.array([0.2, 0.7, 0.4, 0.6, 0.9])
    probs = np.stack([1 - score, score / 2, score / 2], axis=1)
    pred = Predictions([f"c{k}" for k in range(5)], scores=probs, labels=np.array([0, 0, 0, 1, 2]))
    assert performance(pred, indices) == pytest.approx(expected)


def test_per_image_performance_is_the_mean() -> None:
    pred = Predictions(["a", "b", "c"], per_image=np.array([0.2, 0.5, 0.8]))
    assert performance(pred) == pytest.approx(0.5)
    assert performance(pred, np.array([2, 2, 0])) == pytest.approx(0.6)


@pytest.mark.parametrize(("p_ft", "p_ref", "expected"), [(0.6, 0.5, 20.0), (0.3, 0.6, -50.0), (0.5, 0.0, math.nan)])
def test_safe_rpg(p_ft: float, p_ref: float, expected: float) -> None:
    assert safe_rpg(p_ft, p_ref) == pytest.approx(expected, nan_ok=True)


def test_align_task_matches_double_loop_and_pairs_by_id() -> None:
    sd = seed_data(rand_ids=IDS)
    order = [5, 3, 1, 0, 2, 4]  # the random run stored its rows in another order
    sd.features["rand"] = snap(sd.features["rand"].features[order], [IDS[k] for k in order])
    ta = align_task("profound", "segmentation", "dice", [sd], n_bootstrap=7, n_permutations=9)
    v = ta.values[0]
    ft = sd.features["ft"].features
    assert v["d2p"] == pytest.approx(mmd2_double_loop(ft, sd.features["pre"].features), rel=1e-9)
    assert v["d2r"] == pytest.approx(mmd2_double_loop(ft, -ft), rel=1e-9)
    assert v["d2s"] == pytest.approx(mmd2_double_loop(ft, sd.features["scratch"].features), rel=1e-9)
    # -x is a linear map of x: CKA is 1 only when the rows are paired correctly
    assert v["cka_d2r"] == pytest.approx(0.0, abs=1e-12)
    assert v["cka_d2p"] == pytest.approx(0.0, abs=1e-12)  # shift 0: identical
    assert (v["rpg_random"], v["rpg_specialised"], v["rpg_scratch"]) == pytest.approx((20.0, -20.0, 50.0))
    assert all(0 < v[f"mmd_p_{d}"] <= 1 for d in ("d2r", "d2p", "d2s"))
    assert {k: a.shape for k, a in ta.resampled.items()} == {
        k: (7,) for k in ("d2r", "d2p", "d2s", "rpg_random", "rpg_specialised", "rpg_scratch")
    }
    assert ta.problems == [] and ta.n_images == 6 and ta.layer == "head_input"


def test_mismatched_ids_give_nan_and_a_problem_not_a_crash() -> None:
    sd = seed_data(rand_ids=["i0", "i1", "i2", "i3", "i4", "other"])
    ta = align_task("provicnet", "segmentation", "dice", [sd], n_bootstrap=3, n_permutations=0)
    assert math.isnan(ta.values[0]["d2r"]) and math.isfinite(ta.values[0]["d2p"])
    assert any("d2r not computed, snapshots do not pair" in p and "other" in p for p in ta.problems)
    assert "d2r" not in ta.resampled and "d2p" in ta.resampled


def test_test_metric_that_disagrees_with_predictions_is_reported() -> None:
    sd = seed_data()
    sd.p["scratch"] = 0.9
    ta = align_task("profound", "segmentation", "dice", [sd], n_bootstrap=2, n_permutations=0)
    assert any("scratch test_metric 0.9 differs" in p for p in ta.problems)


def test_alignment_row_seed_mean_and_std() -> None:
    ta = align_task(
        "profound", "segmentation", "dice", [seed_data(0, p_ft=0.6), seed_data(1, p_ft=0.8)], 0, 0
    )  # fmt: skip
    row = alignment_row(ta)
    assert row["p_finetune"] == pytest.approx(0.7)
    assert row["p_finetune_std"] == pytest.approx(math.sqrt(0.02))
    assert row["rpg_random"] == pytest.approx(40.0)  # (20 + 60) / 2
    assert row["rpg_random_std"] == pytest.approx(math.sqrt(800.0))
    assert row["n_seeds"] == 2 and math.isnan(row["mmd_p_d2r"])  # permutations disabled


def test_correlation_needs_three_tasks() -> None:
    tas = [align_task("profound", t, "dice", [seed_data(k, 0.55 + 0.1 * k, shift=0.3 * k)], 0, 0)
           for k, t in enumerate(("a", "b"))]  # fmt: skip
    rows, problems = correlation_rows("profound", tas, [alignment_row(t) for t in tas])
    assert len(rows) == 9 and all(math.isnan(r["pearson_r"]) and r["n_tasks"] == 2 for r in rows)
    assert (
        "profound layer head_input: d2r vs RPG(random) needs >= 3 tasks with both the distance and the RPG, has 2"
        in problems
    )


def test_correlation_ci_brackets_point_estimate_on_consistent_data() -> None:
    tas = [align_task("profound", t, "dice", [seed_data(k, 0.55 + 0.1 * k, shift=0.4 * k)], 200, 0)
           for k, t in enumerate(("a", "b", "c", "d"))]  # fmt: skip
    table = [alignment_row(t) for t in tas]
    rows, _ = correlation_rows("profound", tas, table)
    r = next(r for r in rows if r["distance"] == "d2p" and r["reference"] == "random")
    x = [t["d2p"] for t in table]
    y = [t["rpg_random"] for t in table]
    assert r["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert r["ci_low"] <= r["pearson_r"] <= r["ci_high"] and r["n_valid_resamples"] == 200


def test_cost_row_by_hand() -> None:
    ft = [RunCost(0.5, 1800.0, (1, 2, 3, 4), (0.5, 0.7, 0.78, 0.8)), RunCost(0.7, 2200.0, (2, 4), (0.9, 1.0))]
    sc = [RunCost(2.0, 7200.0, (1, 2, 3), (0.2, 0.5, 0.6)), RunCost(2.8, 8000.0)]
    row = cost_row("profound", "segmentation", ft, sc)
    assert row["gpu_hours_finetune"] == pytest.approx(0.6) and row["gpu_hours_scratch"] == pytest.approx(2.4)
    assert row["ratio"] == pytest.approx(0.25)
    assert row["wall_seconds_finetune"] == pytest.approx(2000.0)
    assert row["wall_ratio"] == pytest.approx(2000.0 / 7600.0)
    cpu = cost_row("profound", "segmentation", [RunCost(0.0, 30.0)], [RunCost(0.0, 120.0)])  # a CPU study: 0 GPU-hours
    assert math.isnan(cpu["ratio"]) and cpu["wall_ratio"] == pytest.approx(0.25)
    assert row["epochs_to_95_finetune"] == pytest.approx(3.5)  # (3 + 4) / 2: 0.78 >= 0.76, 1.0 >= 0.95 at epoch 4
    assert math.isnan(row["epochs_to_95_scratch"])  # one scratch run logged no curve


def test_write_csv(tmp_path: Path) -> None:
    path = write_csv([{"a": 1, "b": math.nan}, {"a": "x"}], ["a", "b"], tmp_path / "t.csv")
    assert path.read_text().splitlines() == ["a,b", "1,nan", "x,"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tracking_uri": ""}, "tracking_uri"),
        ({"study": " "}, "study"),
        ({"snapshot": "step0"}, "snapshot"),
        ({"snapshot": "epoch_0"}, "snapshot"),
        ({"layer": "decoder"}, "layer must be one of"),
        ({"n_bootstrap": -1}, "n_bootstrap"),
        ({"sigma": 0}, "sigma"),
        ({"confidence": 1.0}, "confidence"),
        ({"normalize": "yes"}, "normalize"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_study_analysis_rejects_bad_args(kwargs: dict, match: str) -> None:
    args = {"tracking_uri": "sqlite:///x.db", "study": "s", "output_dir": "out", **kwargs}
    with pytest.raises(ValueError, match=match):
        StudyAnalysis(**args)


@pytest.mark.parametrize("given", ["/tmp/a b", "$'/tmp/a b'", '$"/tmp/a b"'])
def test_output_dir_with_or_without_dollar(given: str) -> None:
    analysis = StudyAnalysis(tracking_uri="sqlite:///x.db", study=123, output_dir=given)
    assert analysis.output_dir == Path("/tmp/a b")
    assert analysis.study == "123" and analysis.experiment == "123"


def test_per_image_performance_skips_images_the_metric_does_not_count() -> None:
    # lesion-free cases are NaN under the lesion-case Dice: P is the mean of the other three
    pred = Predictions(["a", "b", "c", "d"], per_image=np.array([np.nan, 0.2, 0.5, 0.8]),
                       baseline_per_image=np.array([np.nan, 0.0, 0.0, 0.3]))  # fmt: skip
    assert performance(pred) == pytest.approx(0.5)
    assert performance(pred, baseline=True) == pytest.approx(0.1)
    assert performance(pred, np.array([0, 0, 3])) == pytest.approx(0.8)
    assert math.isnan(performance(Predictions(["a"], per_image=np.array([0.4])), baseline=True))  # an older run


@pytest.mark.parametrize(
    ("p_ft", "p_ref", "higher", "expected", "reason"),
    [
        (0.017, 0.0008, True, math.nan, "at or near zero"),  # the smoke study's +2000 %
        (0.0309, 0.0066, True, math.nan, "at or near zero"),  # a later smoke study's +367 %
        (0.0309, 0.01, True, 209.0, ""),  # 1 % of the metric's range is divided by
        (0.5, 0.0, True, math.nan, "at or near zero"),
        (0.3, 0.4, False, 25.0, ""),
        (0.5, math.nan, True, math.nan, "P(reference) is missing"),
    ],
)
def test_rpg_with_reason(p_ft: float, p_ref: float, higher: bool, expected: float, reason: str) -> None:
    value, why = rpg_with_reason(p_ft, p_ref, higher)
    assert value == pytest.approx(expected, nan_ok=True) and reason in why and bool(why) == bool(reason)


def test_near_zero_reference_rpg_is_not_computed() -> None:
    sd = seed_data()
    sd.p["random"] = 0.0008
    sd.predictions["random"] = Predictions(IDS, per_image=np.full(6, 0.0008))
    ta = align_task("profound", "segmentation", "dice", [sd], n_bootstrap=5, n_permutations=0)
    row = alignment_row(ta)
    assert math.isnan(row["rpg_random"]) and row["rpg_specialised"] == pytest.approx(-20.0)
    assert "reference P = 0.0008 is at or near zero" in row["_why"]["rpg_random"]
    assert any("RPG vs random not computed" in p for p in ta.problems)
    assert np.isnan(ta.resampled["rpg_random"]).all()


def test_runs_below_their_baseline_are_flagged() -> None:
    sd = seed_data(p_ft=0.6)  # P: finetune 0.6, random 0.5, specialised 0.75, scratch 0.4
    sd.baseline = {"finetune": 0.55, "random": 0.55, "specialised": 0.55, "scratch": 0.55}
    sd.baseline_name = "empty_mask"
    row = alignment_row(align_task("profound", "segmentation", "dice", [sd], 0, 0))
    assert row["p_baseline"] == pytest.approx(0.55) and row["baseline_name"] == "empty_mask"
    assert row["below_baseline"] == "random scratch"
    assert row["rpg_below_baseline"] == "rpg_random rpg_scratch"
    sd.baseline["finetune"] = 0.65  # now finetune itself does not beat it: every RPG involves it
    row = alignment_row(align_task("profound", "segmentation", "dice", [sd], 0, 0))
    assert row["below_baseline"] == "finetune random scratch"
    assert row["rpg_below_baseline"] == "rpg_random rpg_specialised rpg_scratch"


def test_lower_is_better_baseline_and_rpg() -> None:
    sd = seed_data(p_ft=0.6)  # read as an error: finetune 0.6 is worse than scratch 0.4
    sd.baseline = {"finetune": 0.55, "scratch": 0.55}
    ta = align_task("profound", "segmentation", "err", [sd], 0, 0, higher_is_better=False)
    assert ta.below == ["finetune"]
    assert ta.values[0]["rpg_scratch"] == pytest.approx(-50.0)  # -(0.6 - 0.4) / 0.4


def test_run_without_predictions_keeps_its_point_values() -> None:
    sd = seed_data()
    sd.predictions["scratch"] = None
    sd.missing["scratch_predictions"] = "run s1 has no test/predictions.npz"
    ta = align_task("profound", "segmentation", "dice", [sd], n_bootstrap=4, n_permutations=0)
    assert ta.values[0]["rpg_scratch"] == pytest.approx(50.0) and math.isfinite(ta.values[0]["d2s"])
    assert "rpg_scratch" not in ta.resampled and "rpg_random" in ta.resampled
    assert ta.no_resamples["rpg_scratch"] == "scratch P is not resampled: run s1 has no test/predictions.npz"


def test_identical_snapshots_are_detected() -> None:
    sd = seed_data(shift=0.0)  # the finetune snapshot equals step 0: a frozen layer
    ta = align_task("profound", "segmentation", "dice", [sd], 0, 0, layer="encoder")
    assert ta.identical == ["d2p"] and ta.values[0]["d2p"] == pytest.approx(0.0, abs=1e-12)
    assert alignment_row(ta)["identical"] == "d2p" and alignment_row(ta)["layer"] == "encoder"
    moved = align_task("profound", "segmentation", "dice", [seed_data(shift=1e-3)], 0, 0)
    assert moved.identical == []


def test_bootstrap_resamples_seeds_as_well_as_images() -> None:
    seeds = [seed_data(0, p_ft=0.6, shift=0.2), seed_data(1, p_ft=0.8, shift=0.9)]
    ta = align_task("profound", "segmentation", "dice", seeds, n_bootstrap=300, n_permutations=0)
    per_seed = [align_task("profound", "segmentation", "dice", [s], n_bootstrap=300, n_permutations=0) for s in seeds]
    a, b = (t.resampled["d2p"] for t in per_seed)
    got = ta.resampled["d2p"]
    # each column is the mean of two seeds drawn with replacement: (a, a), (b, b) or one of each
    choices = np.stack([a, b, (a + b) / 2])
    assert np.all(np.isclose(choices, got).any(axis=0))
    share = np.isclose(choices, got).mean(axis=1)
    assert share[0] > 0.12 and share[1] > 0.12 and share[2] > 0.35  # 1/4, 1/4, 1/2 in expectation
    np.testing.assert_allclose(per_seed[0].resampled["d2p"], a)  # one seed: the image bootstrap alone


def test_correlation_warnings_for_few_tasks_mixed_kinds_and_zero_distance() -> None:
    kinds = {"a": "mlp_hidden", "b": "decoder_features", "c": "decoder_features"}
    tas = []
    for k, task in enumerate(("a", "b", "c")):
        sd = seed_data(k, 0.55 + 0.1 * k, shift=0.4 * k)
        sd.features = {n: FeatureSnapshot(s.features, s.ids, "head_input", kinds[task]) for n, s in sd.features.items()}
        tas.append(align_task("profound", task, "dice", [sd], 20, 0))
    rows, _ = correlation_rows("profound", tas, [alignment_row(t) for t in tas], headline=False)
    d2p = next(r for r in rows if r["distance"] == "d2p" and r["reference"] == "random")
    assert d2p["warning"] == (
        "only 3 of 5 tasks; mixes layer kinds a: mlp_hidden, b: decoder_features, c: decoder_features; "
        "d2p identically 0 on a (layer did not train)"
    )
    assert d2p["kinds"] == "decoder_features mlp_hidden" and d2p["headline"] is False and d2p["layer"] == "head_input"
    d2r = next(r for r in rows if r["distance"] == "d2r" and r["reference"] == "random")
    assert "identically" not in d2r["warning"]
