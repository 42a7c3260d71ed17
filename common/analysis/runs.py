"""Selecting a study's MLflow runs by tag and loading their feature snapshots and test predictions.

The contract the downstream bundles follow is :mod:`common.contract`, written out in ``tools/docs/README.md``
(DESIGN.md section 5): one experiment per study; tags ``model``, ``task``, ``regime``, ``seed`` (and ``profile``,
``study``, ``bundle``, ``bundle_version``, ``git_commit``, ``metric_name``, ``baseline_name``, ``layer_kinds``);
metrics ``val_metric`` / ``train_loss`` per epoch, ``test_metric``, ``baseline_metric``, ``wall_seconds``,
``gpu_hours``; artifacts ``features/<snapshot><suffix>.npz`` per recorded layer and ``test/predictions.npz``.
Nothing here drops a run silently: every run that is not selected comes back as an :class:`Exclusion` with the
reason. A run without ``test/predictions.npz`` is still selected: it gives its point values, not their intervals.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.contract import (
    FEATURES_DIR,
    METRIC_BASELINE,
    METRIC_TEST,
    METRIC_TEST_AUC,
    METRIC_TEST_DICE_ALL,
    METRIC_TEST_DICE_ON,
    METRIC_TEST_FP_VOLUME,
    PREDICTIONS_ARTIFACT,
    TAG_BASELINE,
    TAG_LAYER_KINDS,
    feature_artifact,
    parse_feature_artifact,
)
from common.tasks import TASKS

__all__ = [
    "Exclusion",
    "FeatureSnapshot",
    "Predictions",
    "RunRecord",
    "Selection",
    "USED_REGIMES",
    "feature_artifact",
    "list_study_runs",
    "load_features",
    "load_predictions",
    "required_artifacts",
    "select_runs",
]

USED_REGIMES: tuple[str, ...] = ("finetune", "scratch", "random", "specialised")

RunKey = tuple[str, str, str, int]  # (model, task, regime, seed)


def required_artifacts(regime: str, snapshot: str = "final") -> tuple[str, ...]:
    """Artifacts a run of ``regime`` must have for the analysis at ``snapshot`` (DESIGN.md section 4).

    finetune: its own ``step0`` (Phi_pre) and ``snapshot`` (Phi_ft); random: ``step0`` (Phi_rand); scratch:
    ``snapshot`` (Phi_scratch); specialised: nothing (its ``test_metric`` is its point value). Only the
    ``head_input`` snapshots are required; other layers and ``test/predictions.npz`` are optional, and what they
    would give (a distance on that layer, a confidence interval) is reported as missing with the reason.
    """
    if regime == "finetune":
        return feature_artifact("step0"), feature_artifact(snapshot)
    if regime == "random":
        return (feature_artifact("step0"),)
    if regime == "scratch":
        return (feature_artifact(snapshot),)
    if regime == "specialised":
        return ()
    raise ValueError(f"regime must be one of {USED_REGIMES}, got {regime!r}.")


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as the analysis sees it (tags parsed, latest metric values, artifact paths listed)."""

    run_id: str
    run_name: str
    status: str
    start_time: int
    tags: dict[str, str]
    metrics: dict[str, float]
    artifacts: frozenset[str]
    model: str = ""
    task: str = ""
    regime: str = ""
    seed: int = -1

    @property
    def key(self) -> RunKey:
        return self.model, self.task, self.regime, self.seed

    def metric(self, name: str) -> float:
        """Latest logged value of metric ``name``, NaN if it was never logged."""
        return float(self.metrics.get(name, math.nan))

    def snapshots(self, layer: str = "head_input") -> list[str]:
        """Snapshot names of ``layer`` present under ``features/``, e.g. ``['epoch_2', 'final', 'step0']`` (sorted)."""
        parsed = (parse_feature_artifact(path) for path in self.artifacts)
        return sorted(p[0] for p in parsed if p is not None and p[1] == layer)

    @property
    def layer_kinds(self) -> dict[str, str]:
        """The tag ``layer_kinds`` (JSON ``{layer: kind}``); empty when absent or unreadable (older runs)."""
        try:
            kinds = json.loads(self.tags.get(TAG_LAYER_KINDS, "") or "{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in kinds.items()} if isinstance(kinds, dict) else {}

    @property
    def baseline(self) -> float:
        """The logged ``baseline_metric`` (the task's strongest trivial baseline), NaN if never logged."""
        return self.metric(METRIC_BASELINE)

    def beats_baseline(self) -> bool:
        """Whether ``test_metric`` is strictly better than ``baseline_metric`` in the task's direction (False when
        either is missing: check :attr:`baseline` first to tell "no baseline" from "did not beat it")."""
        p, b = self.metric(METRIC_TEST), self.baseline
        if not (math.isfinite(p) and math.isfinite(b)):
            return False
        task = TASKS.get(self.task)
        return p > b if task is None or task.higher_is_better else p < b


@dataclass(frozen=True)
class Exclusion:
    """A run that the analysis does not use, and why."""

    run_id: str
    run_name: str
    model: str
    task: str
    regime: str
    seed: str
    status: str
    reason: str


@dataclass
class Selection:
    """The selected run per ``(model, task, regime, seed)`` and every run that was left out."""

    runs: dict[RunKey, RunRecord] = field(default_factory=dict)
    excluded: list[Exclusion] = field(default_factory=list)

    def get(self, model: str, task: str, regime: str, seed: int | None = None) -> list[RunRecord]:
        """Selected runs of ``model``/``task``/``regime`` (all seeds, or one), sorted by seed."""
        found = [r for (m, t, g, s), r in self.runs.items() if (m, t, g) == (model, task, regime)]
        return sorted((r for r in found if seed is None or r.seed == seed), key=lambda r: r.seed)

    def tasks(self) -> list[str]:
        return sorted({k[1] for k in self.runs})

    def rows(self) -> list[dict[str, Any]]:
        """One row per selected run (ids, tags, test metric beside its baseline), in key order: the run table."""
        return [
            {
                "run_id": r.run_id,
                "run_name": r.run_name,
                "model": r.model,
                "task": r.task,
                "regime": r.regime,
                "seed": r.seed,
                **{t: r.tags.get(t, "") for t in ("profile", "bundle", "bundle_version", "git_commit")},
                "test_metric": r.metric(METRIC_TEST),
                "baseline_metric": r.baseline,
                "baseline_name": r.tags.get(TAG_BASELINE, ""),
                "beats_baseline": ("yes" if r.beats_baseline() else "no") if math.isfinite(r.baseline) else "",
                "test_auc": r.metric(METRIC_TEST_AUC),
                "test_dice_all": r.metric(METRIC_TEST_DICE_ALL),
                **{key: r.metric(key) for key in METRIC_TEST_DICE_ON.values()},
                "test_fp_volume_ml": r.metric(METRIC_TEST_FP_VOLUME),
            }
            for _, r in sorted(self.runs.items())
        ]

    def specialised(self, task: str) -> list[RunRecord]:
        """The specialised model runs of ``task`` (regime ``specialised``, any model tag), sorted by seed."""
        return sorted((r for k, r in self.runs.items() if k[1] == task and k[2] == "specialised"), key=lambda r: r.seed)


def _list_artifacts(client: Any, run_id: str) -> frozenset[str]:
    """Paths of the run's files under ``features/`` and ``test/`` (two directory listings, no download)."""
    paths = set()
    for folder in (FEATURES_DIR, PREDICTIONS_ARTIFACT.split("/")[0]):
        try:
            infos = client.list_artifacts(run_id, folder)
        except Exception:  # an unreachable artifact store reads as 'no artifacts', reported by the selection
            infos = []
        paths.update(i.path for i in infos if not i.is_dir)
    return frozenset(paths)


def list_study_runs(client: Any, experiment_id: str) -> list[RunRecord]:
    """All active (not deleted) runs of the experiment as :class:`RunRecord`, including artifact listings.

    Runs tagged ``regime=analysis`` (this bundle's own runs) are not returned.
    """
    from mlflow.entities import ViewType

    records: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        for run in page:
            tags = dict(run.data.tags)
            if tags.get("regime") == "analysis":
                continue
            seed_text = tags.get("seed", "")
            try:
                seed = int(seed_text)
            except ValueError:
                seed = -1
            records.append(
                RunRecord(
                    run_id=run.info.run_id,
                    run_name=run.info.run_name or "",
                    status=run.info.status,
                    start_time=int(run.info.start_time or 0),
                    tags=tags,
                    metrics=dict(run.data.metrics),
                    artifacts=_list_artifacts(client, run.info.run_id)
                    if run.info.status == "FINISHED"
                    else frozenset(),
                    model=tags.get("model", ""),
                    task=tags.get("task", ""),
                    regime=tags.get("regime", ""),
                    seed=seed,
                )
            )
        token = page.token
        if not token:
            return records


def _exclude(record: RunRecord, reason: str) -> Exclusion:
    return Exclusion(
        run_id=record.run_id,
        run_name=record.run_name,
        model=record.model,
        task=record.task,
        regime=record.regime,
        seed=record.tags.get("seed", ""),
        status=record.status,
        reason=reason,
    )


def select_runs(records: list[RunRecord], snapshot: str = "final") -> Selection:
    """For each ``(model, task, regime, seed)`` pick the latest FINISHED run that has its required artifacts.

    Left out, each with a reason: runs missing one of the tags ``model``, ``task``, ``regime``, ``seed`` (an integer);
    regimes the analysis does not use (``pretrain``); runs not FINISHED (FAILED, RUNNING, KILLED, SCHEDULED); finished
    runs missing an artifact of :func:`required_artifacts`; finished complete runs superseded by a later one.

    Args:
        records: runs from :func:`list_study_runs`.
        snapshot: the snapshot the distances are computed at (``final`` or ``epoch_<k>``).
    """
    feature_artifact(snapshot)  # validates the name
    selection = Selection()
    candidates: dict[RunKey, list[RunRecord]] = {}
    for record in records:
        missing_tags = [t for t in ("model", "task", "regime", "seed") if not record.tags.get(t)]
        if missing_tags:
            selection.excluded.append(_exclude(record, f"missing tag(s) {', '.join(missing_tags)}"))
        elif record.seed < 0:
            selection.excluded.append(_exclude(record, f"tag seed={record.tags['seed']!r} is not an integer >= 0"))
        elif record.regime not in USED_REGIMES:
            selection.excluded.append(_exclude(record, f"regime {record.regime!r} is not used by the analysis"))
        elif record.status != "FINISHED":
            selection.excluded.append(_exclude(record, f"run status is {record.status}, not FINISHED"))
        else:
            missing = [a for a in required_artifacts(record.regime, snapshot) if a not in record.artifacts]
            if missing:
                selection.excluded.append(_exclude(record, f"missing artifact(s): {', '.join(missing)}"))
            else:
                candidates.setdefault(record.key, []).append(record)
    for key, group in sorted(candidates.items()):
        group = sorted(group, key=lambda r: (r.start_time, r.run_id), reverse=True)
        selection.runs[key] = group[0]
        for older in group[1:]:
            selection.excluded.append(_exclude(older, f"superseded by the later finished run {group[0].run_id}"))
    return selection


@dataclass(frozen=True)
class FeatureSnapshot:
    """``features`` ``(N, d)`` float, ``ids`` ``N`` image ids, ``layer`` the recorded layer (a name of
    :data:`common.contract.LAYERS`) and ``kind`` what sort of layer it is (:data:`common.contract.LAYER_KINDS`;
    ``""`` when the run did not say)."""

    features: np.ndarray
    ids: list[str]
    layer: str
    kind: str = ""


@dataclass(frozen=True)
class Predictions:
    """Per-image test results: ``per_image`` ``(N,)`` metric values (NaN where the metric does not count the
    image), or ``scores`` ``(N, K)`` and ``labels``; the trivial baseline's ``baseline_per_image`` or
    ``baseline_scores`` beside them when the run wrote them (None for older runs)."""

    ids: list[str]
    per_image: np.ndarray | None = None
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    baseline_per_image: np.ndarray | None = None
    baseline_scores: np.ndarray | None = None


def _download(client: Any, run_id: str, path: str, cache_dir: str | Path | None) -> Path:
    """Local path of artifact ``path`` of ``run_id``, downloaded once into ``cache_dir/<run_id>/``."""
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="vfm_analysis_"))
    target = root / run_id / path
    if not target.is_file():
        (root / run_id).mkdir(parents=True, exist_ok=True)
        client.download_artifacts(run_id, path, str(root / run_id / Path(path).parent))
    if not target.is_file():
        raise ValueError(f"artifact {path} of run {run_id} could not be downloaded.")
    return target


def load_features(
    client: Any, run_id: str, snapshot: str, cache_dir: str | Path | None = None, layer: str = "head_input"
) -> FeatureSnapshot:
    """Load ``features/<snapshot><suffix>.npz`` of ``layer``: keys ``features`` ``(N, d)``, ``ids`` ``(N,)``,
    ``layer`` and ``kind`` (the last two optional; ``layer`` defaults to the one asked for, ``kind`` to ``""``).

    Raises:
        ValueError: if the file lacks a key or ``features`` is not 2-D with one row per id.
    """
    path = _download(client, run_id, feature_artifact(snapshot, layer), cache_dir)
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("features", "ids") if k not in data.files]
        if missing:
            raise ValueError(f"{path.name} of run {run_id} lacks key(s) {missing}.")
        features = np.asarray(data["features"], dtype=np.float64)
        ids = [str(i) for i in data["ids"].tolist()]
        stored_layer = str(data["layer"]) if "layer" in data.files else layer
        kind = str(data["kind"]) if "kind" in data.files else ""
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise ValueError(f"{path.name} of run {run_id}: features {features.shape} do not match {len(ids)} ids.")
    return FeatureSnapshot(features=features, ids=ids, layer=stored_layer, kind=kind)


def load_predictions(client: Any, run_id: str, cache_dir: str | Path | None = None) -> Predictions:
    """Load ``test/predictions.npz``: ``ids`` and ``per_image`` ``(N,)``, or ``scores`` ``(N, K)`` and ``labels``;
    ``baseline_per_image`` / ``baseline_scores`` when present.

    Raises:
        ValueError: if neither form is present or the lengths disagree with ``ids``.
    """
    path = _download(client, run_id, PREDICTIONS_ARTIFACT, cache_dir)
    with np.load(path, allow_pickle=False) as data:
        if "ids" not in data.files:
            raise ValueError(f"predictions of run {run_id} lack key 'ids'.")
        ids = [str(i) for i in data["ids"].tolist()]
        if "per_image" in data.files:
            per_image = np.asarray(data["per_image"], dtype=np.float64)
            if per_image.shape != (len(ids),):
                raise ValueError(f"predictions of run {run_id}: per_image {per_image.shape} for {len(ids)} ids.")
            baseline = None
            if "baseline_per_image" in data.files:
                baseline = np.asarray(data["baseline_per_image"], dtype=np.float64)
                if baseline.shape != per_image.shape:
                    raise ValueError(
                        f"predictions of run {run_id}: baseline_per_image {baseline.shape} for {len(ids)} ids."
                    )
            return Predictions(ids=ids, per_image=per_image, baseline_per_image=baseline)
        if "scores" in data.files and "labels" in data.files:
            scores = np.asarray(data["scores"], dtype=np.float64)
            labels = np.asarray(data["labels"]).astype(np.int64)
            if scores.ndim != 2 or scores.shape[0] != len(ids) or labels.shape != (len(ids),):
                raise ValueError(
                    f"predictions of run {run_id}: scores {scores.shape} / labels {labels.shape} for {len(ids)} ids."
                )
            baseline = None
            if "baseline_scores" in data.files:
                baseline = np.asarray(data["baseline_scores"], dtype=np.float64)
                if baseline.shape != scores.shape:
                    raise ValueError(
                        f"predictions of run {run_id}: baseline_scores {baseline.shape}, scores {scores.shape}."
                    )
            return Predictions(ids=ids, scores=scores, labels=labels, baseline_scores=baseline)
    raise ValueError(f"predictions of run {run_id} hold neither 'per_image' nor 'scores' + 'labels'.")
