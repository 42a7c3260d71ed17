"""Analysis of a study's MLflow runs: run selection, alignment tables, figures and report (the tools bundle).

- ``runs``: selecting runs by tag and loading their feature snapshots and test predictions.
- ``tables``: D2R / D2P / D2S, RPG, correlations across tasks with bootstrap CIs, cost.
- ``figures``: paper Fig. 1b, 2, 3 and the D2P trajectory (PNG + SVG).
- ``report``: ``report.md`` and a self-contained ``report.html``.
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
