"""Analysis of a study's MLflow runs: run selection, alignment tables, figures and report (the tools bundle).

- ``runs``: selecting runs by tag and loading their feature snapshots (every recorded layer) and test predictions.
- ``tables``: P beside its trivial baseline, D2R / D2P / D2S per layer, RPG, correlations across tasks with
  bootstrap CIs (images and seeds resampled), cost; every value not computed carries its reason.
- ``figures``: paper Fig. 1b, 2, 3 and the D2P trajectory (PNG + SVG), and why a figure is empty.
- ``report``: ``report.md`` and a self-contained ``report.html``, with how to read them.
- ``analyze``: :class:`StudyAnalysis`, what ``tools/configs/analyze.json`` builds and runs.
"""

from __future__ import annotations

from common.analysis.analyze import AnalysisResult, StudyAnalysis
from common.analysis.runs import Exclusion, RunRecord, Selection, list_study_runs, required_artifacts, select_runs

__all__ = [
    "AnalysisResult",
    "Exclusion",
    "RunRecord",
    "Selection",
    "StudyAnalysis",
    "list_study_runs",
    "required_artifacts",
    "select_runs",
]
