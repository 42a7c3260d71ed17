"""What every bundle of the study shares: its data (``data``) and its MLflow record (``tracking``)."""

from __future__ import annotations

from .data import COHORT_SEED, load_split, resolve_datalist
from .engine import OutputLoss, SaveOnCompleted
from .tracking import StudyTracker, ensure_experiment, git_commit, sqlite_uri, unique_run_name

__all__ = [
    "COHORT_SEED",
    "OutputLoss",
    "SaveOnCompleted",
    "StudyTracker",
    "ensure_experiment",
    "git_commit",
    "load_split",
    "resolve_datalist",
    "sqlite_uri",
    "unique_run_name",
]
