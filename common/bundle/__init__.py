"""What every bundle of the study shares: its data (``data``), its MLflow record (``tracking``), the feature
snapshots and test predictions the analysis reads (``snapshots``), and engine glue (``engine``)."""

from __future__ import annotations

from .data import COHORT_SEED, load_split, resolve_datalist
from .diffusion import DiffusionLoss, DiffusionSampler, NoisePrepareBatch
from .downstream import (
    INITS,
    baseline_data,
    cache_frozen_encoder,
    class_weights,
    fit_prior,
    init_network,
    load_task_split,
    regime_of,
    save_state_dict,
    snapshot_key,
    test_postprocess,
    test_transforms,
    trainable_summary,
    validation_metric,
)
from .engine import (
    OutputLoss,
    ResumeCheckpoint,
    SaveCheckpoints,
    SaveOnCompleted,
    plain_prepare_batch,
    resume_checkpoint,
)
from .outputs import init_distributed, load_trained, report_evaluation, write_predictions
from .plain import PlainPredictionWriter, plain_datalist, plain_transforms, predict_plain_images
from .snapshots import FeatureSnapshots, TestPredictions
from .tracking import (
    StudyTracker,
    check_tracking_store,
    check_tracking_uri,
    ensure_experiment,
    git_commit,
    source_run_id,
    sqlite_path,
    sqlite_uri,
    unique_run_name,
)

__all__ = [
    "PlainPredictionWriter",
    "plain_datalist",
    "plain_transforms",
    "predict_plain_images",
    "fit_prior",
    "source_run_id",
    "check_tracking_store",
    "check_tracking_uri",
    "DiffusionLoss",
    "DiffusionSampler",
    "NoisePrepareBatch",
    "init_distributed",
    "load_trained",
    "report_evaluation",
    "write_predictions",
    "INITS",
    "baseline_data",
    "cache_frozen_encoder",
    "class_weights",
    "init_network",
    "load_task_split",
    "regime_of",
    "save_state_dict",
    "snapshot_key",
    "test_postprocess",
    "test_transforms",
    "trainable_summary",
    "validation_metric",
    "COHORT_SEED",
    "FeatureSnapshots",
    "OutputLoss",
    "ResumeCheckpoint",
    "SaveCheckpoints",
    "SaveOnCompleted",
    "StudyTracker",
    "TestPredictions",
    "ensure_experiment",
    "plain_prepare_batch",
    "git_commit",
    "load_split",
    "resolve_datalist",
    "resume_checkpoint",
    "sqlite_path",
    "sqlite_uri",
    "unique_run_name",
]
