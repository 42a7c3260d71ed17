"""The report on hand-made tables: baselines beside P, data-driven sentences, and every "-" listed with its reason."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from common.analysis.report import MARK, Table, write_report


def alignment(task: str, p_ft: float, p_sc: float, p_base: float, **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "fm": "provicnet", "task": task, "layer": "encoder", "layer_kind": "backbone_pooled", "dim": 6,
        "headline": True, "metric_name": "ssim", "baseline_name": "trilinear", "p_baseline": p_base,
        "p_finetune": p_ft, "p_random": 0.1, "p_specialised": 0.5, "p_scratch": p_sc, "d2r": 0.2, "d2p": 0.1,
        "d2s": 0.3, "rpg_random": (p_ft - 0.1) / 0.1 * 100, "rpg_specialised": (p_ft - 0.5) / 0.5 * 100,
        "rpg_scratch": (p_ft - p_sc) / p_sc * 100, "cka_d2r": 0.1, "cka_d2p": 0.1, "cka_d2s": 0.1, "n_seeds": 1,
        "below_baseline": "", "rpg_below_baseline": "", "identical": "", "_why": {},
    }  # fmt: skip
    row.update(extra)
    return row


def result(rows: list[dict[str, object]]) -> SimpleNamespace:
    return SimpleNamespace(
        alignment=rows, headline=rows, headline_layers={"provicnet": "encoder"}, correlations=[],
        headline_correlations=[], cost=[], problems=["a problem"], warnings=["a layer warning"], curves={},
        trajectory=[], below_baseline=[], baseline_counts={"runs": 9, "with_baseline": 8, "beat_baseline": 3},
    )  # fmt: skip


def test_table_lists_each_dash_with_its_reason() -> None:
    rows = [{"fm": "a", "task": "t", "x": math.nan, "y": 1.0, "_why": {"x": "no scratch run"}},
            {"fm": "b", "task": "t", "x": 2.0, "y": math.nan}]  # fmt: skip
    table = Table("Headline: P", ("fm", "task", "x", "y"), rows, marks=[{"x"}, set()])
    assert table.cells() == [["a", "t", "-" + MARK, "1"], ["b", "t", "2", "-"]]
    assert table.dashes() == [("x", "a/t", "no scratch run"), ("y", "b/t", "not computed (see the problems below)")]
    assert table.short == "Headline"


def test_report_sentences_marks_and_what_could_not_be_computed(tmp_path: Path) -> None:
    rows = [
        alignment(
            "super_resolution",
            0.44,
            0.6,
            0.99,
            below_baseline="finetune scratch",
            rpg_below_baseline="rpg_random rpg_specialised rpg_scratch",
        ),  # fmt: skip
        alignment("distortion_correction", 0.96, 0.8, 0.94),
        alignment(
            "modality_translation",
            0.5,
            0.4,
            0.42,
            p_scratch=math.nan,
            rpg_scratch=math.nan,
            _why={"p_scratch": "no usable scratch run", "rpg_scratch": "P(reference) is missing"},
        ),  # fmt: skip
    ]
    selection = SimpleNamespace(rows=lambda: [], excluded=[])
    md_path, html_path = write_report(tmp_path, "s", "s", "sqlite:///x.db", ["demo"], {"layer": "auto"},
                                      result(rows), selection)  # fmt: skip
    md = md_path.read_text()
    # super-resolution finetune 0.44 < 0.99 and scratch 0.6 < 0.99; distortion correction 0.96 > 0.94 > 0.8
    assert ("provicnet finetune beats scratch on 1 of 2 tasks, its random-weight network on 3 of 3 tasks, the "
            "specialised model on 1 of 3 tasks, the trivial baseline on 2 of 3 tasks.") in md  # fmt: skip
    assert (
        "3 of 8 runs with a logged trivial baseline beat it; 1 of the 9 selected runs logged no baseline_metric" in md
    )
    sr = next(line for line in md.splitlines() if line.startswith("| provicnet | super_resolution"))
    assert sr.count(MARK.strip()) == 5  # p_finetune, p_scratch and the three RPGs
    assert "- Headline: `p_scratch` for provicnet/modality_translation: no usable scratch run" in md
    assert "- Headline: `rpg_scratch` for provicnet/modality_translation: P(reference) is missing" in md
    assert "- a layer warning" in md and "- a problem" in md
    assert "RPG** (paper Eq. 2) = (P(finetune) - P(ref)) / P(ref) × 100 %" in md
    html = html_path.read_text()
    assert "<div class='scroll'><table>" in html and "<b>P</b> is a run" in html
    assert "Smoke profile" not in md


def test_run_ids_link_to_their_page_in_the_mlflow_ui(tmp_path: Path) -> None:
    below = [{"model": "provicnet", "task": "segmentation", "regime": "scratch", "seed": 0, "test_metric": 0.0,
              "baseline_metric": 0.0, "baseline_name": "empty_mask", "run_id": "abc123"}]  # fmt: skip
    res = result([alignment("segmentation", 0.3, 0.2, 0.0)])
    res.below_baseline = below
    selection = SimpleNamespace(rows=lambda: [], excluded=[])
    link = lambda run_id: f"http://127.0.0.1:5000/#/experiments/7/runs/{run_id}"  # noqa: E731
    md_path, html_path = write_report(tmp_path, "s", "s", "sqlite:///x.db", ["demo"], {}, res, selection, link)
    href = "http://127.0.0.1:5000/#/experiments/7/runs/abc123"
    assert f"[abc123]({href})" in md_path.read_text()
    assert f"<a href='{href}'>abc123</a>" in html_path.read_text()
    (tmp_path / "plain").mkdir()
    plain, _ = write_report(tmp_path / "plain", "s", "s", "sqlite:///x.db", ["demo"], {}, res, selection)
    assert "| abc123 |" in plain.read_text() and "](http" not in plain.read_text()


def test_cost_sentence_uses_wall_time_when_no_run_logged_gpu_hours(tmp_path: Path) -> None:
    cost = [
        {"fm": "provicnet", "task": t, "gpu_hours_finetune": 0.0, "gpu_hours_scratch": 0.0, "ratio": math.nan,
         "wall_seconds_finetune": ft, "wall_seconds_scratch": sc, "wall_ratio": ft / sc, "_why": {}}
        for t, ft, sc in (("segmentation", 100.0, 200.0), ("super_resolution", 300.0, 200.0))
    ]  # fmt: skip
    res = result([alignment("segmentation", 0.3, 0.2, 0.0)])
    res.cost = cost
    md_path, _ = write_report(
        tmp_path, "s", "s", "sqlite:///x.db", ["demo"], {}, res, SimpleNamespace(rows=lambda: [], excluded=[])
    )
    md = md_path.read_text()
    assert ("No FM and task has GPU-hours of both finetune and scratch (a CPU study); on wall time, finetune needs "
            "less time than scratch on 1 of 2 FM-task pairs (median ratio 1).") in md  # fmt: skip
    header = next(line for line in md.splitlines() if line.startswith("| fm | task | gpu_hours_finetune"))
    assert "| wall_ratio |" in header
    assert "| provicnet | segmentation | 0 | 0 | - | 100 | 200 | 0.5 |" in md


def test_secondary_table_counts_segmentation_runs_that_read_one_diffusion_map(tmp_path: Path) -> None:
    def run(regime: str, adc: float, dwi: float) -> dict[str, object]:
        return {"model": "profound", "task": "segmentation", "regime": regime, "seed": 0, "test_metric": 0.2,
                "test_auc": math.nan, "test_dice_all": 0.4, "test_dice_adc": adc, "test_dice_dwi": dwi,
                "test_fp_volume_ml": 1.0}  # fmt: skip

    rows = [run("finetune", 0.0, 0.31), run("scratch", 0.12, 0.25), run("random", math.nan, 0.3)]
    selection = SimpleNamespace(rows=lambda: rows, excluded=[])
    md_path, _ = write_report(tmp_path, "s", "s", "sqlite:///x.db", ["demo"], {}, result([]), selection)
    md = md_path.read_text()
    assert ("1 of 2 segmentation runs with Dice per diffusion map found lesions on the cases given one map only "
            "(Dice 0 on the other's)") in md  # fmt: skip
    assert "| profound | segmentation | finetune | 0 |  | 0.4 | 0 | 0.31 | 1 |" in md
    assert "| profound | segmentation | random | 0 |  | 0.4 | - | 0.3 | 1 |" in md
    assert "`test_dice_adc` for profound/segmentation/random/0: the segmentation run logged no test_dice_adc" in md


def correlation(r: float, p: float, ci: tuple[float, float], n_tasks: int, warning: str) -> dict[str, object]:
    return {"fm": "provicnet", "layer": "encoder", "distance": "d2p", "reference": "random", "pearson_r": r,
            "pearson_p": p, "spearman_rho": r, "ci_low": ci[0], "ci_high": ci[1], "n_tasks": n_tasks,
            "warning": warning}  # fmt: skip


def test_correlation_sentence_counts_the_significant_ones_that_carry_no_warning(tmp_path: Path) -> None:
    rows = [
        correlation(0.99, 0.001, (0.5, 0.99), 5, ""),  # significant, interval clear of 0, no warning
        correlation(0.98, 0.01, (0.3, 0.99), 4, "only 4 of 5 tasks"),  # significant and clear, but flagged
        correlation(0.95, 0.02, (-0.2, 0.99), 5, ""),  # significant, interval includes 0
        correlation(0.30, 0.60, (-0.8, 0.9), 5, "mixes layer kinds a: x, b: y"),
        correlation(math.nan, math.nan, (math.nan, math.nan), 1, "only 1 of 5 tasks"),  # not computed
    ]
    res = result([alignment("distortion_correction", 0.96, 0.8, 0.94)])
    res.headline_correlations = rows
    md_path, _ = write_report(tmp_path, "s", "s", "sqlite:///x.db", ["demo"], {"layer": "auto"}, res,
                              SimpleNamespace(rows=lambda: [], excluded=[]))  # fmt: skip
    assert ("3 of 4 computed correlations have p < 0.05, 2 of them with a bootstrap interval that excludes 0 and 1 of "
            "those with no warning (the only ones to read as a finding); 1 rest on fewer than 5 tasks; 1 mix layers "
            "of different kinds.") in md_path.read_text()  # fmt: skip
