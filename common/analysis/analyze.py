"""The tools bundle's entry point: read a study's MLflow runs, compute the alignment tables, figures and report.

``tools/configs/analyze.json`` builds :class:`StudyAnalysis` with ``_target_`` and calls its :meth:`run`. The
MLflow contract it reads is in ``tools/docs/README.md``; DESIGN.md sections 4 and 5 give the measurements.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.alignment import compute_mmd2, pair_by_ids
from common.analysis import figures, report
from common.analysis.runs import (
    FeatureSnapshot,
    Predictions,
    RunRecord,
    Selection,
    feature_artifact,
    list_study_runs,
    load_features,
    load_predictions,
    select_runs,
)
from common.analysis.tables import (
    ALIGNMENT_COLUMNS,
    CORRELATION_COLUMNS,
    COST_COLUMNS,
    DISTANCES,
    EXTRA_ALIGNMENT_COLUMNS,
    EXTRA_CORRELATION_COLUMNS,
    REFERENCES,
    STD_COLUMNS,
    RunCost,
    SeedData,
    align_task,
    alignment_row,
    correlation_rows,
    cost_row,
    write_csv,
)
from common.contract import LAYERS, METRIC_TEST, METRIC_TEST_DICE_ON, PREDICTIONS_ARTIFACT, TAG_BASELINE
from common.foundation_models import FOUNDATION_MODELS
from common.tasks import TASKS

__all__ = ["AnalysisResult", "StudyAnalysis"]

_REGIME_OF = {"ft": "finetune", "pre": "finetune", "rand": "random", "scratch": "scratch"}

logger = logging.getLogger(__name__)

TRAJECTORY_COLUMNS: tuple[str, ...] = ("fm", "task", "seed", "epoch", "d2p")
SELECTED_COLUMNS: tuple[str, ...] = ("run_id", "run_name", "model", "task", "regime", "seed", "profile", "bundle",
                                     "bundle_version", "git_commit", "test_metric", "baseline_metric", "baseline_name",
                                     "beats_baseline", "test_auc", "test_dice_all", *METRIC_TEST_DICE_ON.values(),
                                     "test_fp_volume_ml")  # fmt: skip
LAYER_OPTIONS: tuple[str, ...] = ("auto", *LAYERS)
EXCLUDED_COLUMNS: tuple[str, ...] = ("run_id", "run_name", "model", "task", "regime", "seed", "status", "reason")


@dataclass
class AnalysisResult:
    """What :meth:`StudyAnalysis.run` produced: table rows (``alignment`` and ``correlations`` on every layer,
    ``headline`` marks the headline layer's), curves ``(fm, task, regime) -> {metric: (epochs, values)}`` of the
    lowest seed, the headline layer per FM, the runs that did not beat their trivial baseline, the layer
    warnings, problems, output files and the analysis run id."""

    alignment: list[dict[str, object]] = field(default_factory=list)
    headline_layers: dict[str, str] = field(default_factory=dict)
    below_baseline: list[dict[str, object]] = field(default_factory=list)
    baseline_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    correlations: list[dict[str, object]] = field(default_factory=list)
    cost: list[dict[str, object]] = field(default_factory=list)
    trajectory: list[dict[str, object]] = field(default_factory=list)
    curves: dict[tuple[str, str, str], dict[str, tuple[tuple[int, ...], tuple[float, ...]]]] = field(
        default_factory=dict
    )
    problems: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def headline(self) -> list[dict[str, object]]:
        """The alignment rows on each FM's headline layer."""
        return [r for r in self.alignment if r.get("headline")]

    @property
    def headline_correlations(self) -> list[dict[str, object]]:
        """The correlation rows on each FM's headline layer."""
        return [r for r in self.correlations if r.get("headline")]


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def _clean_path(value: Any, name: str) -> Path:
    """A path given on the command line with or without MONAI's ``$`` expression prefix (DESIGN.md section 5)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{name} must be a non-empty path, got {value!r}.")
    text = str(value).strip()
    if text.startswith("$"):  # a '$' expression that MONAI left unevaluated, e.g. from an args file
        text = text[1:].strip().strip("'\"")
    return Path(text).expanduser()


class StudyAnalysis:
    """Alignment (D2R, D2P, D2S), RPG, correlations, cost and figures of one study's MLflow runs.

    Paper: Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv
    2601.15888), sections 3.2-4.3, Eq. 1 and 2, Fig. 1b, 2, 3 and Table 1.

    Args:
        tracking_uri: MLflow tracking URI, e.g. ``sqlite:///study/mlflow.db``.
        study: the study name (tag ``study``); also the experiment name unless ``experiment`` is given.
        output_dir: folder for the CSV tables, figures, ``report.md`` and ``report.html`` (created).
        experiment: MLflow experiment name; default None = ``study``.
        snapshot: ``final`` (default) or ``epoch_<k>``: the finetune and scratch snapshot the distances use.
        layer: the headline layer of the tables and figures: ``auto`` (default: the FM's ``common_layer`` in
            :data:`common.foundation_models.FOUNDATION_MODELS` where it has one, else ``head_input``) or a name of
            :data:`common.contract.LAYERS`. The distances are computed on every recorded layer regardless.
        n_bootstrap: image resamples of the correlation CIs, default 1000 (0 disables).
        n_permutations: permutations of each MMD test, default 1000 (0 disables).
        sigma: Gaussian kernel bandwidth of Eq. 1, default 1.0.
        normalize: L2-normalise features per image before the MMD, default True.
        confidence: CI coverage, default 0.95.
        seed: seed of the bootstrap and permutations, default 0.
        fraction: convergence threshold as a fraction of the final validation value, default 0.95.
        log_to_mlflow: log the outputs to a new run tagged ``regime=analysis``, default True.
        bundle_version: the tools bundle's version, recorded as a tag.
        mlflow_ui: the MLflow UI's address (``http://127.0.0.1:5000``); every run id in the report links to the
            run's page there. Default None: plain run ids.
    """

    def __init__(
        self,
        tracking_uri: str,
        study: str,
        output_dir: str | Path,
        experiment: str | None = None,
        snapshot: str = "final",
        layer: str = "auto",
        n_bootstrap: int = 1000,
        n_permutations: int = 1000,
        sigma: float = 1.0,
        normalize: bool = True,
        confidence: float = 0.95,
        seed: int = 0,
        fraction: float = 0.95,
        log_to_mlflow: bool = True,
        bundle_version: str = "",
        mlflow_ui: str | None = None,
    ) -> None:
        if not isinstance(tracking_uri, str) or not tracking_uri.strip():
            raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}.")
        if study is None or not str(study).strip():
            raise ValueError("study must be a non-empty name.")
        if snapshot == "final" or (isinstance(snapshot, str) and snapshot.startswith("epoch_")):
            feature_artifact(snapshot)  # validates epoch_<k>
        else:
            raise ValueError(f"snapshot must be 'final' or 'epoch_<k>' (k >= 1), got {snapshot!r}.")
        if layer not in LAYER_OPTIONS:
            raise ValueError(f"layer must be one of {LAYER_OPTIONS}, got {layer!r}.")
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0, got {sigma!r}.")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}.")
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}.")
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}.")
        self.tracking_uri = tracking_uri.strip()
        self.study = str(study).strip()  # fire turns a numeric name into an int
        self.experiment = self.study if experiment is None or not str(experiment).strip() else str(experiment).strip()
        self.output_dir = _clean_path(output_dir, "output_dir")
        self.snapshot = snapshot
        self.layer = layer
        self.n_bootstrap = _check_count(n_bootstrap, "n_bootstrap")
        self.n_permutations = _check_count(n_permutations, "n_permutations")
        self.sigma = float(sigma)
        self.normalize = normalize
        self.confidence = float(confidence)
        self.seed = _check_count(seed, "seed")
        self.fraction = float(fraction)
        self.log_to_mlflow = bool(log_to_mlflow)
        self.bundle_version = str(bundle_version)
        if mlflow_ui is not None and not str(mlflow_ui).startswith(("http://", "https://")):
            raise ValueError(f"mlflow_ui must be the UI's address, http(s)://HOST:PORT, got {mlflow_ui!r}.")
        self.mlflow_ui = None if mlflow_ui is None else str(mlflow_ui).rstrip("/")

    def _run_link(self, experiment_id: str):
        """Run id -> its page in the MLflow UI at ``mlflow_ui``; None without an address."""
        if self.mlflow_ui is None:
            return None
        return lambda run_id: f"{self.mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}"

    # -- loading -------------------------------------------------------------------------------------------------

    def _features(
        self,
        client: Any,
        run: RunRecord | None,
        snapshot: str,
        layer: str,
        cache: Path,
        problems: list[str],
        missing: dict[str, str],
        key: str,
    ) -> FeatureSnapshot | None:
        """The snapshot, or None with ``missing[key]`` saying why (a missing run, file or unreadable file)."""
        if run is None:
            missing[key] = f"no usable {_REGIME_OF[key]} run (see Missing or excluded runs)"
            return None
        path = feature_artifact(snapshot, layer)
        if path not in run.artifacts:
            missing[key] = f"run {run.run_id} ({run.regime}) has no {path}"
            return None
        try:
            snap = load_features(client, run.run_id, snapshot, cache, layer=layer)
        except Exception as err:  # a corrupt or unreadable artifact is reported, not fatal
            problems.append(f"run {run.run_id} ({run.regime}): cannot read {path}: {err}")
            missing[key] = f"run {run.run_id} ({run.regime}): {path} is unreadable"
            return None
        if not snap.kind and run.layer_kinds.get(layer):
            snap = FeatureSnapshot(snap.features, snap.ids, snap.layer, run.layer_kinds[layer])
        return snap

    def _predictions(
        self, client: Any, run: RunRecord | None, cache: Path, problems: list[str], missing: dict[str, str]
    ) -> Predictions | None:
        if run is None:
            return None
        if PREDICTIONS_ARTIFACT not in run.artifacts:
            missing[f"{run.regime}_predictions"] = f"run {run.run_id} has no {PREDICTIONS_ARTIFACT}"
            return None
        try:
            return load_predictions(client, run.run_id, cache)
        except Exception as err:
            problems.append(f"run {run.run_id} ({run.regime}): cannot read {PREDICTIONS_ARTIFACT}: {err}")
            missing[f"{run.regime}_predictions"] = f"run {run.run_id}: {PREDICTIONS_ARTIFACT} is unreadable"
            return None

    def headline_layer(self, fm: str) -> str:
        """The headline layer of ``fm``: ``layer`` unless ``auto``, then the FM's ``common_layer`` or
        ``head_input``."""
        if self.layer != "auto":
            return self.layer
        entry = FOUNDATION_MODELS.get(fm)
        return entry.common_layer if entry is not None and entry.common_layer else "head_input"

    @staticmethod
    def _partner(runs: list[RunRecord], seed: int) -> RunRecord | None:
        """The run of the same seed, else the lowest seed (e.g. one specialised run for several FM seeds)."""
        same = [r for r in runs if r.seed == seed]
        return same[0] if same else (runs[0] if runs else None)

    def _history(self, client: Any, run_id: str, metric: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: float(m.value) for m in points}  # a re-logged step keeps its last value
        steps = tuple(sorted(by_step))
        return steps, tuple(by_step[s] for s in steps)

    # -- the pipeline --------------------------------------------------------------------------------------------

    def run(self) -> AnalysisResult:
        """Select the runs, compute and write every table, figure and the report, log them to MLflow.

        Returns:
            :class:`AnalysisResult` with the rows, the problems and the output paths.

        Raises:
            ValueError: if the experiment does not exist.
        """
        import mlflow

        started = time.time()
        client = mlflow.MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            raise ValueError(f"no MLflow experiment named {self.experiment!r} at {self.tracking_uri}.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        records = list_study_runs(client, experiment.experiment_id)
        selection = select_runs(records, self.snapshot)
        result = AnalysisResult()
        with tempfile.TemporaryDirectory(prefix="vfm_analysis_") as tmp:
            self._compute(client, selection, Path(tmp), result)
        profiles = sorted({r.tags.get("profile", "") for r in selection.runs.values()} - {""})
        result.files.update(self._write_tables(selection, result))
        result.files.update(figures.make_all(result, self.output_dir))
        md, html = report.write_report(
            self.output_dir,
            study=self.study,
            experiment=self.experiment,
            tracking_uri=self.tracking_uri,
            profiles=profiles,
            settings=self._settings(),
            result=result,
            selection=selection,
            run_link=self._run_link(experiment.experiment_id),
        )
        result.files.update(report_md=md, report_html=html)
        if self.log_to_mlflow:
            result.run_id = self._log(client, experiment.experiment_id, profiles, result, started)
        logger.info("analysis of study %s written to %s", self.study, self.output_dir)
        return result

    def _settings(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot,
            "layer": self.layer,
            "n_bootstrap": self.n_bootstrap,
            "n_permutations": self.n_permutations,
            "sigma": self.sigma,
            "normalize": self.normalize,
            "confidence": self.confidence,
            "seed": self.seed,
            "fraction": self.fraction,
        }

    def _compute(self, client: Any, selection: Selection, cache: Path, result: AnalysisResult) -> None:
        fms = [fm for fm in FOUNDATION_MODELS if any(k[0] == fm for k in selection.runs)]
        if not any(k[0] in FOUNDATION_MODELS and k[2] == "finetune" for k in selection.runs):
            result.problems.append(f"no usable finetune run of an FM ({', '.join(FOUNDATION_MODELS)}): no rows")
        self._baselines(selection, result)
        for fm in fms:
            headline = self.headline_layer(fm)
            result.headline_layers[fm] = headline
            tasks = sorted({k[1] for k in selection.runs if k[0] == fm and k[2] == "finetune"})
            missing_ft = sorted({k[1] for k in selection.runs if k[0] == fm} - set(tasks))
            for task in missing_ft:
                result.problems.append(f"{fm}/{task}: no usable finetune run, no row")
            by_layer: dict[str, list] = {layer: [] for layer in LAYERS}
            for task in tasks:
                entry = TASKS.get(task)
                higher = entry.higher_is_better if entry is not None else True
                ft_runs = selection.get(fm, task, "finetune")
                rand_runs = selection.get(fm, task, "random")
                scratch_runs = selection.get(fm, task, "scratch")
                spec_runs = selection.specialised(task)
                for regime, runs in (("random", rand_runs), ("scratch", scratch_runs), ("specialised", spec_runs)):
                    if not runs:
                        result.problems.append(f"{fm}/{task}: no usable {regime} run; its columns are NaN")
                per_layer: dict[str, list[SeedData]] = {layer: [] for layer in LAYERS}
                for ft in ft_runs:
                    partners = {
                        "finetune": ft,
                        "random": self._partner(rand_runs, ft.seed),
                        "scratch": self._partner(scratch_runs, ft.seed),
                        "specialised": self._partner(spec_runs, ft.seed),
                    }
                    missing: dict[str, str] = {
                        k: f"no usable {k} run (see Missing or excluded runs)" for k, r in partners.items() if r is None
                    }
                    preds: dict[str, Predictions | None] = {
                        k: self._predictions(client, r, cache, result.problems, missing) for k, r in partners.items()
                    }
                    p = {k: (r.metric(METRIC_TEST) if r is not None else math.nan) for k, r in partners.items()}
                    baseline = {k: r.baseline for k, r in partners.items() if r is not None}
                    for layer in LAYERS:
                        layer_missing = dict(missing)
                        feats: dict[str, FeatureSnapshot | None] = {
                            key: self._features(client, run, snap, layer, cache, result.problems, layer_missing, key)
                            for key, run, snap in (
                                ("ft", ft, self.snapshot),
                                ("pre", ft, "step0"),
                                ("rand", partners["random"], "step0"),
                                ("scratch", partners["scratch"], self.snapshot),
                            )
                        }
                        per_layer[layer].append(
                            SeedData(ft.seed, p, feats, preds, baseline, ft.tags.get(TAG_BASELINE, ""), layer_missing)
                        )
                        if layer == headline:
                            result.trajectory.extend(
                                self._trajectory(client, fm, task, ft, feats["pre"], layer, cache, result)
                            )
                metric_name = ft_runs[0].tags.get("metric_name", "") if ft_runs else ""
                if not metric_name and entry is not None:
                    metric_name = entry.metric_label
                for layer in LAYERS:
                    ta = align_task(
                        fm,
                        task,
                        metric_name,
                        per_layer[layer],
                        n_bootstrap=self.n_bootstrap,
                        n_permutations=self.n_permutations,
                        sigma=self.sigma,
                        normalize=self.normalize,
                        random_seed=self.seed,
                        layer=layer,
                        higher_is_better=higher,
                    )
                    # P, baselines and RPG are the same on every layer: report their problems once
                    result.problems.extend(
                        q for q in ta.problems if layer == headline or not q.split(": ", 1)[-1].startswith("RPG")
                    )
                    by_layer[layer].append(ta)
                    result.alignment.append(alignment_row(ta, headline=layer == headline))
                result.cost.append(self._cost(client, fm, task, ft_runs, scratch_runs, result))
            for layer, tas in by_layer.items():
                fm_rows = [r for r in result.alignment if r["fm"] == fm and r["layer"] == layer]
                rows, problems = correlation_rows(fm, tas, fm_rows, self.confidence, headline=layer == headline)
                result.correlations.extend(rows)
                result.problems.extend(problems if layer == headline else [])
            result.warnings.extend(_layer_warnings(fm, headline, self.layer, by_layer))

    def _baselines(self, selection: Selection, result: AnalysisResult) -> None:
        """Count the selected runs that beat their trivial baseline and list those that did not."""
        runs = [r for _, r in sorted(selection.runs.items())]
        with_baseline = [r for r in runs if math.isfinite(r.baseline) and math.isfinite(r.metric(METRIC_TEST))]
        result.baseline_counts = {
            "runs": len(runs),
            "with_baseline": len(with_baseline),
            "beat_baseline": sum(r.beats_baseline() for r in with_baseline),
        }
        table = {row["run_id"]: row for row in selection.rows()}  # the run table's row, not a second copy of it
        keys = ("model", "task", "regime", "seed", "test_metric", "baseline_metric", "baseline_name", "run_id")
        result.below_baseline = [{k: table[r.run_id][k] for k in keys} for r in with_baseline if not r.beats_baseline()]

    def _cost(
        self,
        client: Any,
        fm: str,
        task: str,
        ft_runs: list[RunRecord],
        scratch_runs: list[RunRecord],
        result: AnalysisResult,
    ) -> dict[str, object]:
        costs: dict[str, list[RunCost]] = {}
        for regime, runs in (("finetune", ft_runs), ("scratch", scratch_runs)):
            costs[regime] = []
            for r in runs:
                curves = {m: self._history(client, r.run_id, m) for m in ("train_loss", "val_metric")}
                result.curves.setdefault((fm, task, regime), curves)  # the lowest seed is plotted
                costs[regime].append(
                    RunCost(
                        gpu_hours=r.metric("gpu_hours"),
                        wall_seconds=r.metric("wall_seconds"),
                        val_epochs=curves["val_metric"][0],
                        val_values=curves["val_metric"][1],
                    )
                )
        row = cost_row(fm, task, costs["finetune"], costs["scratch"], self.fraction)
        why: dict[str, str] = {}
        for regime in ("finetune", "scratch"):
            if not costs[regime]:
                for col in ("gpu_hours", "wall_seconds", "epochs_to_95"):
                    why[f"{col}_{regime}"] = f"no usable {regime} run"
                continue
            for col in ("gpu_hours", "wall_seconds"):
                why[f"{col}_{regime}"] = f"a {regime} run logged no {col} metric"
            why[f"epochs_to_95_{regime}"] = (
                f"a {regime} run logged no val_metric curve, or it never reached {self.fraction:g} of its final value"
            )
        why["ratio"] = "GPU-hours of finetune or scratch missing, or scratch 0 (a CPU run logs 0: see wall_ratio)"
        why["wall_ratio"] = "wall seconds of finetune or scratch missing, or scratch 0"
        row["_why"] = why
        return row

    def _trajectory(
        self,
        client: Any,
        fm: str,
        task: str,
        ft: RunRecord,
        pre: FeatureSnapshot | None,
        layer: str,
        cache: Path,
        result: AnalysisResult,
    ) -> list[dict[str, object]]:
        """D2P = MMD^2(epoch_k, step0) on ``layer`` over the finetune run's ``epoch_<k>`` snapshots (epoch 0 =
        step0)."""
        epochs = sorted(int(s.split("_")[1]) for s in ft.snapshots(layer) if s.startswith("epoch_"))
        if pre is None or not epochs:
            return []
        rows: list[dict[str, object]] = [{"fm": fm, "task": task, "seed": ft.seed, "epoch": 0, "d2p": 0.0}]
        for k in epochs:
            snap = self._features(client, ft, f"epoch_{k}", layer, cache, result.problems, {}, "ft")
            if snap is None:
                continue
            try:
                a, b, _ = pair_by_ids(snap.features, snap.ids, pre.features, pre.ids)
            except ValueError as err:
                result.problems.append(f"{fm}/{task} seed {ft.seed}: D2P at epoch {k} not computed: {err}")
                continue
            d2p = compute_mmd2(a, b, sigma=self.sigma, normalize=self.normalize)
            rows.append({"fm": fm, "task": task, "seed": ft.seed, "epoch": k, "d2p": d2p})
        return rows

    def _write_tables(self, selection: Selection, result: AnalysisResult) -> dict[str, Path]:
        out = self.output_dir
        selected = selection.rows()
        excluded = [vars(e) for e in selection.excluded]
        return {
            "alignment": write_csv(
                result.alignment, ALIGNMENT_COLUMNS + EXTRA_ALIGNMENT_COLUMNS + STD_COLUMNS, out / "alignment.csv"
            ),
            "correlations": write_csv(
                result.correlations, CORRELATION_COLUMNS + EXTRA_CORRELATION_COLUMNS, out / "correlations.csv"
            ),
            "cost": write_csv(result.cost, COST_COLUMNS, out / "cost.csv"),
            "trajectory": write_csv(result.trajectory, TRAJECTORY_COLUMNS, out / "d2p_trajectory.csv"),
            "selected_runs": write_csv(selected, SELECTED_COLUMNS, out / "selected_runs.csv"),
            "excluded_runs": write_csv(excluded, EXCLUDED_COLUMNS, out / "excluded_runs.csv"),
        }

    def _log(self, client: Any, experiment_id: str, profiles: list[str], result: AnalysisResult, started: float) -> str:
        """One FINISHED MLflow run that holds the analysis: started when the analysis started (its duration is the
        analysis's), tagged with the code's git commit, its settings as params, summary metrics and every output
        file as artifacts."""
        from common.bundle.tracking import git_commit

        stamp = _dt.datetime.fromtimestamp(started, _dt.UTC).strftime("%Y%m%d-%H%M%S")
        tags = {
            "git_commit": git_commit(),
            "regime": "analysis",
            "study": self.study,
            "bundle": "tools",
            "bundle_version": self.bundle_version,
            "profile": ",".join(profiles),
            "snapshot": self.snapshot,
            # the run's description on its page: MLflow lists artifacts alphabetically, so it points to the report
            "mlflow.note.content": (
                f"Analysis of study `{self.study}` (profile {', '.join(profiles)}): "
                f"{int(result.baseline_counts.get('runs', 0))} runs, "
                f"{int(result.baseline_counts.get('beat_baseline', 0))} of them beat their task's trivial baseline. "
                "Read **report.html** first (Artifacts tab): how to read it, the headline table with every P beside "
                "its baseline, the correlations, cost, figures, and what could not be computed. The CSV tables and "
                "the figures are the other artifacts (tools/docs/README.md, Outputs)."
            ),
        }
        run = client.create_run(
            experiment_id,
            run_name=f"analysis {self.study} {stamp}-{uuid.uuid4().hex[:4]}",
            tags=tags,
            start_time=int(started * 1000),
        )
        run_id = run.info.run_id
        try:
            for key, value in self._settings().items():
                client.log_param(run_id, key, value)
            for key, value in _summary_metrics(result).items():
                client.log_metric(run_id, key, value)
            client.log_metric(run_id, "wall_seconds", time.time() - started)
            client.log_artifacts(run_id, str(self.output_dir))
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
        return run_id


def _summary_metrics(result: AnalysisResult) -> dict[str, float]:
    """What the analysis run logs as metrics: run counts, baseline counts, rows, and the headline correlations."""
    metrics = {
        "n_runs": float(result.baseline_counts.get("runs", 0)),
        "n_runs_with_baseline": float(result.baseline_counts.get("with_baseline", 0)),
        "n_runs_beat_baseline": float(result.baseline_counts.get("beat_baseline", 0)),
        "n_runs_below_baseline": float(len(result.below_baseline)),
        "n_alignment_rows": float(len(result.headline)),
        "n_rpg_computed": float(
            sum(math.isfinite(float(r[f"rpg_{ref}"])) for r in result.headline for ref in REFERENCES)  # type: ignore[arg-type]
        ),
        "n_layer_warnings": float(len(result.warnings)),
    }
    for c in result.headline_correlations:
        r, p = float(c["pearson_r"]), float(c["pearson_p"])  # type: ignore[arg-type]
        if math.isfinite(r):
            metrics[f"r_{c['fm']}_{c['distance']}_{c['reference']}"] = r
            metrics[f"p_{c['fm']}_{c['distance']}_{c['reference']}"] = p
    return metrics


def _layer_warnings(fm: str, headline: str, option: str, by_layer: dict[str, list]) -> list[str]:
    """The report's layer warnings for one FM: no common layer, mixed or unknown kinds on the headline layer, and
    distances identically zero because a layer did not train (citing the registry's ``frozen_layers``)."""
    out = []
    entry = FOUNDATION_MODELS.get(fm)
    if option == "auto" and (entry is None or not entry.common_layer):
        note = f" ({entry.note})" if entry is not None and entry.note else ""
        out.append(f"{fm}: no recorded layer is one kind across its tasks and trains{note}; the headline layer falls "
                   f"back to {headline}.")  # fmt: skip
    tas = [ta for ta in by_layer.get(headline, []) if ta.n_images]
    kinds = {ta.task: ta.kind for ta in tas}
    known = {k for k in kinds.values() if k}
    if len(known) > 1:
        listing = ", ".join(f"{t}: {k or 'unknown'}" for t, k in kinds.items())
        out.append(f"{fm}: the headline correlations mix layers of different kinds on layer {headline} ({listing}); "
                   "they compare different representations across tasks (see the sensitivity table).")  # fmt: skip
    unknown = [t for t, k in kinds.items() if not k]
    if unknown:
        out.append(f"{fm}: the kind of layer {headline} is unknown for {', '.join(unknown)} (runs that predate the "
                   "'kind' key); whether its correlations mix layer kinds cannot be checked.")  # fmt: skip
    frozen = entry.frozen_layers if entry is not None else ()
    for layer, layer_tas in by_layer.items():
        for dist in DISTANCES:
            zero = [ta.task for ta in layer_tas if dist in ta.identical]
            if not zero:
                continue
            why = (
                f"{fm}'s finetune protocol freezes it (frozen_layers = {', '.join(frozen)})"
                if layer in frozen
                else "the two snapshots are the same representation"
            )
            out.append(f"{fm}: {dist.upper()} on layer {layer} is identically 0 on {', '.join(zero)}: the layer did "
                       f"not train ({why}); its correlations on this layer say nothing.")  # fmt: skip
    return out
