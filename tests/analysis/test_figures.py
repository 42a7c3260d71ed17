"""Figures: one panel per metric with the trivial baseline, and the reasons an empty figure gives."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.analysis.figures import SNAPSHOT_EPOCHS_OPTION, empty_figures, plot_scratch_vs_finetune


def row(fm: str, task: str, metric: str, p_ft: float, p_sc: float, base: float) -> dict[str, object]:
    return {"fm": fm, "task": task, "metric_name": metric, "p_finetune": p_ft, "p_scratch": p_sc, "p_baseline": base,
            "d2s": 0.3, "d2r": 0.2, "d2p": 0.1, "rpg_random": 5.0, "rpg_specialised": math.nan, "rpg_scratch": 1.0,
            "layer": "encoder", "headline": True}  # fmt: skip


def test_scratch_vs_finetune_has_a_panel_per_metric_and_the_baselines(tmp_path: Path) -> None:
    rows = [row("provicnet", "segmentation", "dice", 0.3, 0.2, 0.25),
            row("provicnet", "super_resolution", "ssim", 0.44, 0.6, 0.99),
            row("provicnet", "distortion_correction", "ssim", 0.8, 0.7, 0.94)]  # fmt: skip
    files = plot_scratch_vs_finetune(rows, tmp_path)
    svg = files["fig1b_scratch_vs_finetune_svg"].read_text()
    # the metric on each axis, one panel each; the baselines are labelled with the task's short name
    for text in ("P(scratch): dice", "P(finetune): ssim", "seg baseline", "SR baseline", "DC baseline"):
        assert f"<!-- {text} -->" in svg, text
    assert "trivial baseline (per task)" in svg


def _result(**kwargs: object) -> SimpleNamespace:
    base = {"headline": [row("profound", "segmentation", "dice", 0.3, math.nan, 0.25)], "curves": {}, "trajectory": []}
    return SimpleNamespace(**{**base, **kwargs})


def test_empty_figures_say_why_and_what_fills_them() -> None:
    empty = empty_figures(_result())
    assert set(empty) == {"fig1b_scratch_vs_finetune", "fig3_curves", "d2p_trajectory"}
    assert "snapshot_epochs" in empty["d2p_trajectory"] and SNAPSHOT_EPOCHS_OPTION in empty["d2p_trajectory"]
    assert "--only '*_scratch'" in empty["fig1b_scratch_vs_finetune"]
    full = _result(
        headline=[row("profound", "segmentation", "dice", 0.3, 0.2, 0.25)],
        curves={("profound", "segmentation", "finetune"): {"train_loss": ((1, 2), (0.5, 0.4))}},
        trajectory=[{"fm": "profound", "task": "segmentation", "seed": 0, "epoch": 0, "d2p": 0.0}],
    )
    assert empty_figures(full) == {}


@pytest.mark.parametrize("metric", ["dice", ""])
def test_scratch_vs_finetune_without_points_draws_an_empty_panel(tmp_path: Path, metric: str) -> None:
    files = plot_scratch_vs_finetune([row("profound", "segmentation", metric, 0.3, math.nan, math.nan)], tmp_path)
    assert "no FM and task with both P" in files["fig1b_scratch_vs_finetune_svg"].read_text()
