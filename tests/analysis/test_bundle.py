"""The tools bundle end to end: ``python -m monai.bundle run --config_file tools/configs/analyze.json`` on a fake study.

Expected values come from the fixture's hand-chosen metrics and from a direct double-loop MMD^2 and a numpy CKA
computed here, never from the code under test.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.analysis.conftest import (
    BASELINE_NAME,
    BELOW_BASELINE,
    ENCODER_DIM,
    EXPECTED_RPG,
    FMS,
    GPU_HOURS,
    HEAD_KIND,
    NEAR_ZERO_P,
    P_BASELINE,
    P_SPECIALISED,
    TASKS,
    WALL_SECONDS,
    FakeStudy,
    P,
)

REPO = Path(__file__).resolve().parents[2]
ALIGNMENT_HEAD = ["fm", "task", "metric_name", "p_finetune", "p_random", "p_specialised", "p_scratch", "d2r", "d2p",
                  "d2s", "rpg_random", "rpg_specialised", "rpg_scratch"]  # fmt: skip
CORRELATION_HEAD = ["fm", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high"]
COST_HEAD = ["fm", "task", "gpu_hours_finetune", "gpu_hours_scratch", "ratio", "wall_seconds_finetune",
             "wall_seconds_scratch", "wall_ratio", "epochs_to_95_finetune", "epochs_to_95_scratch"]  # fmt: skip
PAIRS = {"d2r": ("finetune", "final", "random", "step0"), "d2p": ("finetune", "final", "finetune", "step0"),
         "d2s": ("finetune", "final", "scratch", "final")}  # fmt: skip
SUFFIX = {"head_input": "", "encoder": "_encoder"}
HEADLINE = {"profound": "head_input", "provicnet": "encoder"}  # layer auto: the registry's common_layer, else head


def dash_count(md: str) -> tuple[int, int]:
    """``-`` cells in the report's tables, and the rows the "Every `-`" list names (one label per row and line)."""
    body, listing = md.split("## What could not be computed")
    cells = sum(
        cell.strip().removesuffix("†").strip() == "-"
        for line in body.splitlines()
        if line.startswith("| ")
        for cell in line.strip("|").split("|")
    )
    dashes = listing.split("### Empty figures")[0]
    named = 0
    for line in dashes.splitlines():
        if line.startswith("- "):  # "- <table>: `col`, `col` for <row>, <row>: <reason>"
            columns, rest = line.split(" for ", 1)
            labels, reason = rest.split(": ", 1)
            assert reason.strip(), line
            named += columns.count("`") // 2 * len(labels.split(", "))
    return cells, named


def mmd2_double_loop(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> float:
    """Biased MMD^2 of Eq. 1 with k(u, v) = exp(-||u - v||^2 / sigma^2) on L2-normalised rows, term by term."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def mean_k(a: np.ndarray, b: np.ndarray) -> float:
        total = 0.0
        for u in a:
            for v in b:
                total += math.exp(-float(np.sum((u - v) ** 2)) / sigma**2)
        return total / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2.0 * mean_k(x, y)


def one_minus_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    cka = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    return 1.0 - float(cka)


def run_bundle(study: FakeStudy, output_dir: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "tools/configs/analyze.json",
           "--tracking_uri", study.uri, "--study", study.study, "--output_dir", output_dir,
           "--n_bootstrap", "40", "--n_permutations", "20", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def num(row: dict[str, str], key: str) -> float:
    return float(row[key])


@pytest.mark.slow
def test_clean_study_every_number(clean_study: FakeStudy, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    run_bundle(clean_study, str(out))
    f = clean_study.features

    header, all_rows = read_csv(out / "alignment.csv")
    assert header[: len(ALIGNMENT_HEAD)] == ALIGNMENT_HEAD
    assert {"cka_d2r", "cka_d2p", "cka_d2s", "mmd_p_d2r", "d2r_std", "p_baseline", "below_baseline"} <= set(header)
    # one row per FM, task and recorded layer
    assert [(r["fm"], r["task"], r["layer"]) for r in all_rows] == [
        (fm, t, layer) for fm in FMS for t in TASKS for layer in ("head_input", "encoder")
    ]
    for r in all_rows:
        key, layer = (r["fm"], r["task"]), r["layer"]
        assert r["headline"] == str(layer == HEADLINE[r["fm"]])
        assert num(r, "p_finetune") == pytest.approx(P[key]["finetune"])
        assert num(r, "p_random") == pytest.approx(P[key]["random"])
        assert num(r, "p_scratch") == pytest.approx(P[key]["scratch"])
        assert num(r, "p_specialised") == pytest.approx(P_SPECIALISED[r["task"]])
        assert num(r, "p_baseline") == pytest.approx(P_BASELINE[r["task"]])
        assert r["baseline_name"] == BASELINE_NAME[r["task"]]
        below = [g for g in ("finetune", "random", "specialised", "scratch")
                 if (r["fm"] if g != "specialised" else {"segmentation": "unet"}.get(r["task"]), r["task"], g)
                 in BELOW_BASELINE]  # fmt: skip
        assert r["below_baseline"] == " ".join(below)
        for col, expected in zip(("rpg_random", "rpg_specialised", "rpg_scratch"), EXPECTED_RPG[key], strict=True):
            assert num(r, col) == pytest.approx(expected, abs=1e-9), col
        assert r["layer_kind"] == (HEAD_KIND[r["task"]] if layer == "head_input" else
                                   {"profound": "encoder_pooled", "provicnet": "backbone_pooled"}[r["fm"]])  # fmt: skip
        assert r["dim"] == ("8" if layer == "head_input" else str(ENCODER_DIM))
        frozen = layer == "encoder" and r["fm"] == "profound"
        assert r["identical"] == ("d2p" if frozen else "")
        for name, (reg_a, snap_a, reg_b, snap_b) in PAIRS.items():
            a, b = f[(*key, reg_a, snap_a + SUFFIX[layer])], f[(*key, reg_b, snap_b + SUFFIX[layer])]
            if frozen and name == "d2p":
                assert num(r, name) == 0.0 and num(r, "cka_d2p") == 0.0  # exactly, not rounding noise
                continue
            assert num(r, name) == pytest.approx(mmd2_double_loop(a, b), rel=1e-6, abs=1e-9), (key, name)
            # rows of profound/segmentation/scratch were stored in reversed id order: CKA checks the pairing
            assert num(r, f"cka_{name}") == pytest.approx(one_minus_cka(a, b), rel=1e-6, abs=1e-9), (key, name)
            assert 0 < num(r, f"mmd_p_{name}") <= 1
        assert r["n_seeds"] == "1" and r["n_images"] == "12"
        assert math.isnan(num(r, "d2r_std"))  # one seed: spread unknown

    header, corr = read_csv(out / "correlations.csv")
    assert header[: len(CORRELATION_HEAD)] == CORRELATION_HEAD
    assert len(corr) == 2 * 2 * 3 * 3  # FM x layer x distance x reference
    for c in corr:
        table = [r for r in all_rows if r["fm"] == c["fm"] and r["layer"] == c["layer"]]
        x = [num(r, c["distance"]) for r in table]
        y = [num(r, f"rpg_{c['reference']}") for r in table]
        assert c["headline"] == str(c["layer"] == HEADLINE[c["fm"]])
        assert c["warning"].startswith("only 3 of 5 tasks")
        assert ("mixes layer kinds" in c["warning"]) == (c["layer"] == "head_input")
        if np.ptp(x) == 0:  # profound's frozen encoder: D2P is 0 on every task, r is undefined
            assert (c["fm"], c["layer"], c["distance"]) == ("profound", "encoder", "d2p")
            assert math.isnan(num(c, "pearson_r")) and "identically 0" in c["warning"]
            continue
        ref = stats.pearsonr(x, y)
        assert num(c, "pearson_r") == pytest.approx(ref.statistic, abs=1e-9)
        assert num(c, "pearson_p") == pytest.approx(ref.pvalue, abs=1e-9)
        assert num(c, "spearman_rho") == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-9)
        assert -1 <= num(c, "ci_low") <= num(c, "ci_high") <= 1
    header, cost = read_csv(out / "cost.csv")
    assert header == COST_HEAD
    ratios = {"classification": 0.25, "segmentation": 0.25, "super_resolution": 0.8}
    for c in cost:
        assert num(c, "gpu_hours_finetune") == pytest.approx(GPU_HOURS[c["task"]][0])
        assert num(c, "gpu_hours_scratch") == pytest.approx(GPU_HOURS[c["task"]][1])
        assert num(c, "ratio") == pytest.approx(ratios[c["task"]])
        assert (num(c, "wall_seconds_finetune"), num(c, "wall_seconds_scratch")) == WALL_SECONDS
        assert (num(c, "epochs_to_95_finetune"), num(c, "epochs_to_95_scratch")) == (3.0, 5.0)

    _, traj = read_csv(out / "d2p_trajectory.csv")
    assert len(traj) == 2 * 3 * 3  # epochs 0, 1, 2 per FM and task, on the headline layer
    for t in traj:
        epoch, suffix = int(t["epoch"]), SUFFIX[HEADLINE[t["fm"]]]
        expected = 0.0 if epoch == 0 else mmd2_double_loop(
            f[(t["fm"], t["task"], "finetune", f"epoch_{epoch}{suffix}")],
            f[(t["fm"], t["task"], "finetune", f"step0{suffix}")],
        )  # fmt: skip
        assert num(t, "d2p") == pytest.approx(expected, rel=1e-6, abs=1e-9)

    for stem in ("fig1b_scratch_vs_finetune", "fig2_distance_vs_rpg", "fig3_curves", "d2p_trajectory"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / f"{stem}.svg").read_text()[:2000]
    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 4 and "overflow-x:auto" in html
    md = (out / "report.md").read_text()
    assert "Smoke profile" in md and "Smoke profile" in html
    assert all(run_id in md for run_id in clean_study.run_ids.values())  # the selected runs are listed
    for section in ("## How to read this report", "### Glossary of columns", "## Runs that did not beat the trivial",
                    "### Layer warnings", "## Sensitivity: every correlation on every layer"):  # fmt: skip
        assert section in md
    assert "14 of 21 runs with a logged trivial baseline beat it." in md
    assert "provicnet finetune beats scratch on 0 of 3 tasks" in md
    below = md.split("## Runs that did not beat the trivial baseline")[1].split("\n## ")[0]
    assert sum(line.startswith("| ") for line in below.splitlines()) == 1 + len(BELOW_BASELINE)  # header + runs
    # the headline marks P and RPG of runs below their baseline: provicnet/segmentation's finetune did not beat it
    seg = next(line for line in md.splitlines() if line.startswith("| provicnet | segmentation | encoder"))
    assert seg.count("†") == 6  # p_finetune, p_random, p_specialised and the three RPGs
    warnings = md.split("### Layer warnings")[1].split("\n## ")[0]
    assert "profound: the headline correlations mix layers of different kinds on layer head_input" in warnings
    assert (
        "profound: D2P on layer encoder is identically 0 on classification, segmentation, super_resolution"
        in (warnings)
        and "frozen_layers = encoder" in warnings
    )
    assert "provicnet" not in warnings  # its headline layer is one kind and moves
    cells, named = dash_count(md)
    assert cells == named and cells > 0  # the secondary-metric columns of other tasks are blank, not "-"

    import mlflow

    client = mlflow.MlflowClient(clean_study.uri)
    exp = client.get_experiment_by_name(clean_study.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.regime = 'analysis'")
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["study"] == clean_study.study
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    metrics = runs[0].data.metrics
    assert (metrics["n_runs"], metrics["n_runs_beat_baseline"], metrics["n_runs_below_baseline"]) == (21, 14, 7)
    headline_r = next(c for c in corr if c["fm"] == "provicnet" and c["layer"] == "encoder"
                      and c["distance"] == "d2p" and c["reference"] == "specialised")  # fmt: skip
    assert metrics["r_provicnet_d2p_specialised"] == pytest.approx(num(headline_r, "pearson_r"))
    assert {"alignment.csv", "correlations.csv", "cost.csv", "report.html", "fig2_distance_vs_rpg.png"} <= logged
    # the run lasts as long as the analysis did (it was created at the end, 44 ms long) and names the code
    info = runs[0].info
    assert metrics["wall_seconds"] > 0 and (info.end_time - info.start_time) / 1000 >= metrics["wall_seconds"] - 0.5
    assert runs[0].data.tags["git_commit"] and info.run_name.startswith(f"analysis {clean_study.study} ")
    assert "21 runs, 14 of them beat their task's trivial baseline" in runs[0].data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_messy_study_reports_exclusions(messy_study: FakeStudy, tmp_path: Path) -> None:
    out = tmp_path / "analysis messy"
    # the '$' expression form of the output dir, and an experiment name other than the study's
    run_bundle(messy_study, f"$'{out}'", "--experiment", messy_study.experiment)
    _, excluded = read_csv(out / "excluded_runs.csv")
    reasons = {e["run_id"]: e["reason"] for e in excluded}
    extra = messy_study.extra_run_ids
    assert "FAILED" in reasons[extra["failed"]]
    newer = messy_study.run_ids[("profound", "segmentation", "finetune")]
    assert reasons[extra["older_duplicate"]] == f"superseded by the later finished run {newer}"
    assert reasons[extra["no_snapshots"]] == "missing artifact(s): features/final.npz"
    assert len(excluded) == 3
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for run_id in extra.values():
        assert run_id in md and run_id in html

    _, rows = read_csv(out / "alignment.csv")
    by_key = {(r["fm"], r["task"]): r for r in rows if r["layer"] == "head_input"}
    assert len(rows) == 12
    f = messy_study.features
    seg = by_key[("profound", "segmentation")]  # the newer duplicate is the one used
    assert num(seg, "p_finetune") == pytest.approx(0.8)
    a, b = f[("profound", "segmentation", "finetune", "final")], f[("profound", "segmentation", "random", "step0")]
    assert num(seg, "d2r") == pytest.approx(mmd2_double_loop(a, b), rel=1e-6)
    # the random run's P is near zero: no RPG against it, and the report says why
    assert num(seg, "p_random") == pytest.approx(NEAR_ZERO_P) and math.isnan(num(seg, "rpg_random"))
    assert (
        "`rpg_random` for profound/segmentation: RPG vs random not computed: reference P = 0.0008 is at or near " in md
    )
    sr = by_key[("provicnet", "super_resolution")]
    assert math.isnan(num(sr, "d2s")) and math.isnan(num(sr, "p_scratch")) and math.isnan(num(sr, "rpg_scratch"))
    assert num(sr, "rpg_random") == pytest.approx(EXPECTED_RPG[("provicnet", "super_resolution")][0])
    a, b = (
        f[("provicnet", "super_resolution", "finetune", "final")],
        f[("provicnet", "super_resolution", "finetune", "step0")],
    )
    assert num(sr, "d2p") == pytest.approx(mmd2_double_loop(a, b), rel=1e-6)
    # the run that logged no kinds (an older bundle): its kind is unknown, and the report says so
    assert [r["layer_kind"] for r in rows if r["fm"] == "provicnet" and r["task"] == "super_resolution"] == ["", ""]
    assert "provicnet: the kind of layer encoder is unknown for super_resolution" in md
    # the scratch run without test/predictions.npz keeps its point values; only the CIs that resample it are missing
    cls = by_key[("profound", "classification")]
    assert num(cls, "p_scratch") == pytest.approx(0.25) and num(cls, "rpg_scratch") == pytest.approx(200.0)

    _, corr = read_csv(out / "correlations.csv")
    corr = [c for c in corr if c["headline"] == "True"]
    provicnet_d2s = [c for c in corr if c["fm"] == "provicnet" and c["distance"] == "d2s"]
    assert all(math.isnan(num(c, "pearson_r")) and c["n_tasks"] == "2" for c in provicnet_d2s)
    for c in (c for c in corr if c["fm"] == "profound"):
        if c["reference"] == "random":  # segmentation's RPG is not computed: two tasks left
            assert math.isnan(num(c, "pearson_r")) and c["n_tasks"] == "2"
        else:
            assert math.isfinite(num(c, "pearson_r"))
        assert math.isnan(num(c, "ci_low")) == (c["reference"] != "specialised")  # scratch: no predictions
    no_predictions = messy_study.run_ids[("profound", "classification", "scratch")]
    assert f"scratch P is not resampled: run {no_predictions} has no test/predictions.npz" in md
    cells, named = dash_count(md)
    assert cells == named and cells >= 5 * 8 + 5


@pytest.mark.slow
def test_snapshot_option_uses_epoch_snapshots(clean_study: FakeStudy, tmp_path: Path) -> None:
    from common.analysis import StudyAnalysis

    analysis = StudyAnalysis(tracking_uri=clean_study.uri, study=clean_study.study, output_dir=tmp_path,
                             snapshot="epoch_2", layer="head_input", n_bootstrap=0, n_permutations=0,
                             log_to_mlflow=False)  # fmt: skip
    result = analysis.run()
    assert result.run_id is None
    f = clean_study.features
    for row in result.alignment:
        if row["layer"] != "head_input":
            continue
        key = (row["fm"], row["task"])
        ft = f[(*key, "finetune", "epoch_2")]
        assert row["d2p"] == pytest.approx(mmd2_double_loop(ft, f[(*key, "finetune", "step0")]), rel=1e-6)
        assert row["d2r"] == pytest.approx(mmd2_double_loop(ft, f[(*key, "random", "step0")]), rel=1e-6)
        assert math.isnan(row["d2s"])  # the scratch runs logged no epoch_2 snapshot: excluded and reported
        assert row["headline"]  # layer head_input chosen for every FM
    _, excluded = read_csv(tmp_path / "excluded_runs.csv")
    assert len(excluded) == 6
    assert {e["reason"] for e in excluded} == {"missing artifact(s): features/epoch_2.npz"}
    assert result.headline_layers == {"profound": "head_input", "provicnet": "head_input"}
    assert any(
        w.startswith("provicnet: the headline correlations mix layers of different kinds") for w in result.warnings
    )
    # bootstrap off: every CI is "-" with the option that fills it
    md = (tmp_path / "report.md").read_text()
    assert "the bootstrap is off (n_bootstrap = 0; set --n_bootstrap 1000)" in md
    cells, named = dash_count(md)
    assert cells == named
