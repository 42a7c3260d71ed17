"""What every bundle of the study shares: its data (``data``), its MLflow record (``tracking``), the feature
snapshots and test predictions the analysis reads (``snapshots``), and engine glue (``engine``)."""

from __future__ import annotations

from .data import COHORT_SEED, load_split, resolve_datalist
from .engine import OutputLoss, ResumeCheckpoint, SaveCheckpoints, SaveOnCompleted, resume_checkpoint
from .snapshots import FeatureSnapshots, TestPredictions
from .tracking import StudyTracker, ensure_experiment, git_commit, sqlite_uri, unique_run_name

__all__ = [
    "COHORT_SEED",
    "FeatureSnapshots",
    "OutputLoss",
    "ResumeCheckpoint",
    "SaveCheckpoints",
    "SaveOnCompleted",
    "StudyTracker",
    "TestPredictions",
    "ensure_experiment",
    "git_commit",
    "load_split",
    "resolve_datalist",
    "resume_checkpoint",
    "sqlite_uri",
    "unique_run_name",
]
