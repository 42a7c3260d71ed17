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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.alignment import compute_mmd2, pair_by_ids
from common.analysis import figures, report
from common.analysis.runs import (
    FOUNDATION_MODELS,
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
    EXTRA_ALIGNMENT_COLUMNS,
    EXTRA_CORRELATION_COLUMNS,
    STD_COLUMNS,
    RunCost,
    SeedData,
    align_task,
    alignment_row,
    correlation_rows,
    cost_row,
    write_csv,
)

__all__ = ["AnalysisResult", "StudyAnalysis"]

logger = logging.getLogger(__name__)

TRAJECTORY_COLUMNS: tuple[str, ...] = ("fm", "task", "seed", "epoch", "d2p")
SELECTED_COLUMNS: tuple[str, ...] = ("run_id", "run_name", "model", "task", "regime", "seed", "profile", "bundle",
                                     "bundle_version", "git_commit", "test_metric")  # fmt: skip
EXCLUDED_COLUMNS: tuple[str, ...] = ("run_id", "run_name", "model", "task", "regime", "seed", "status", "reason")


@dataclass
class AnalysisResult:
    """What :meth:`StudyAnalysis.run` produced: table rows, curves ``(fm, task, regime) -> {metric: (epochs,
    values)}`` of the lowest seed, problems, output files and the analysis run id."""

    alignment: list[dict[str, object]] = field(default_factory=list)
    correlations: list[dict[str, object]] = field(default_factory=list)
    cost: list[dict[str, object]] = field(default_factory=list)
    trajectory: list[dict[str, object]] = field(default_factory=list)
    curves: dict[tuple[str, str, str], dict[str, tuple[tuple[int, ...], tuple[float, ...]]]] = field(
        default_factory=dict
    )
    problems: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None


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
        n_bootstrap: image resamples of the correlation CIs, default 1000 (0 disables).
        n_permutations: permutations of each MMD test, default 1000 (0 disables).
        sigma: Gaussian kernel bandwidth of Eq. 1, default 1.0.
        normalize: L2-normalise features per image before the MMD, default True.
        confidence: CI coverage, default 0.95.
        seed: seed of the bootstrap and permutations, default 0.
        fraction: convergence threshold as a fraction of the final validation value, default 0.95.
        log_to_mlflow: log the outputs to a new run tagged ``regime=analysis``, default True.
        bundle_version: the tools bundle's version, recorded as a tag.
    """

    def __init__(
        self,
        tracking_uri: str,
        study: str,
        output_dir: str | Path,
        experiment: str | None = None,
        snapshot: str = "final",
        n_bootstrap: int = 1000,
        n_permutations: int = 1000,
        sigma: float = 1.0,
        normalize: bool = True,
        confidence: float = 0.95,
        seed: int = 0,
        fraction: float = 0.95,
        log_to_mlflow: bool = True,
        bundle_version: str = "",
    ) -> None:
        if not isinstance(tracking_uri, str) or not tracking_uri.strip():
            raise ValueError(f"tracking_uri must be a non-empty string, got {tracking_uri!r}.")
        if study is None or not str(study).strip():
            raise ValueError("study must be a non-empty name.")
        if snapshot == "final" or (isinstance(snapshot, str) and snapshot.startswith("epoch_")):
            feature_artifact(snapshot)  # validates epoch_<k>
        else:
            raise ValueError(f"snapshot must be 'final' or 'epoch_<k>' (k >= 1), got {snapshot!r}.")
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
        self.n_bootstrap = _check_count(n_bootstrap, "n_bootstrap")
        self.n_permutations = _check_count(n_permutations, "n_permutations")
        self.sigma = float(sigma)
        self.normalize = normalize
        self.confidence = float(confidence)
        self.seed = _check_count(seed, "seed")
        self.fraction = float(fraction)
        self.log_to_mlflow = bool(log_to_mlflow)
        self.bundle_version = str(bundle_version)

    # -- loading -------------------------------------------------------------------------------------------------

    def _features(
        self, client: Any, run: RunRecord | None, snapshot: str, cache: Path, problems: list[str]
    ) -> FeatureSnapshot | None:
        if run is None:
            return None
        try:
            return load_features(client, run.run_id, snapshot, cache)
        except Exception as err:  # a corrupt or unreadable artifact is reported, not fatal
            problems.append(f"run {run.run_id} ({run.regime}): cannot read {feature_artifact(snapshot)}: {err}")
            return None

    def _predictions(self, client: Any, run: RunRecord | None, cache: Path, problems: list[str]) -> Predictions | None:
        if run is None:
            return None
        try:
            return load_predictions(client, run.run_id, cache)
        except Exception as err:
            problems.append(f"run {run.run_id} ({run.regime}): cannot read test/predictions.npz: {err}")
            return None

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
        )
        result.files.update(report_md=md, report_html=html)
        if self.log_to_mlflow:
            result.run_id = self._log(client, experiment.experiment_id, profiles, result)
        logger.info("analysis of study %s written to %s", self.study, self.output_dir)
        return result

    def _settings(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot,
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
        for fm in fms:
            tasks = sorted({k[1] for k in selection.runs if k[0] == fm and k[2] == "finetune"})
            missing_ft = sorted({k[1] for k in selection.runs if k[0] == fm} - set(tasks))
            for task in missing_ft:
                result.problems.append(f"{fm}/{task}: no usable finetune run, no row")
            fm_tasks = []
            for task in tasks:
                ft_runs = selection.get(fm, task, "finetune")
                rand_runs = selection.get(fm, task, "random")
                scratch_runs = selection.get(fm, task, "scratch")
                spec_runs = selection.specialised(task)
                for regime, runs in (("random", rand_runs), ("scratch", scratch_runs), ("specialised", spec_runs)):
                    if not runs:
                        result.problems.append(f"{fm}/{task}: no usable {regime} run; its columns are NaN")
                seeds = []
                for ft in ft_runs:
                    partners = {
                        "finetune": ft,
                        "random": self._partner(rand_runs, ft.seed),
                        "scratch": self._partner(scratch_runs, ft.seed),
                        "specialised": self._partner(spec_runs, ft.seed),
                    }
                    feats: dict[str, FeatureSnapshot | None] = {
                        "ft": self._features(client, ft, self.snapshot, cache, result.problems),
                        "pre": self._features(client, ft, "step0", cache, result.problems),
                        "rand": self._features(client, partners["random"], "step0", cache, result.problems),
                        "scratch": self._features(client, partners["scratch"], self.snapshot, cache, result.problems),
                    }
                    preds: dict[str, Predictions | None] = {
                        k: self._predictions(client, r, cache, result.problems) for k, r in partners.items()
                    }
                    p = {k: (r.metric("test_metric") if r is not None else math.nan) for k, r in partners.items()}
                    seeds.append(SeedData(seed=ft.seed, p=p, features=feats, predictions=preds))
                    result.trajectory.extend(self._trajectory(client, fm, task, ft, feats["pre"], cache, result))
                metric_name = ft_runs[0].tags.get("metric_name", "") if ft_runs else ""
                ta = align_task(
                    fm,
                    task,
                    metric_name,
                    seeds,
                    n_bootstrap=self.n_bootstrap,
                    n_permutations=self.n_permutations,
                    sigma=self.sigma,
                    normalize=self.normalize,
                    random_seed=self.seed,
                )
                result.problems.extend(ta.problems)
                fm_tasks.append(ta)
                result.alignment.append(alignment_row(ta))
                costs = {}
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
                result.cost.append(cost_row(fm, task, costs["finetune"], costs["scratch"], self.fraction))
            fm_rows = [r for r in result.alignment if r["fm"] == fm]
            rows, problems = correlation_rows(fm, fm_tasks, fm_rows, confidence=self.confidence)
            result.correlations.extend(rows)
            result.problems.extend(problems)

    def _trajectory(
        self,
        client: Any,
        fm: str,
        task: str,
        ft: RunRecord,
        pre: FeatureSnapshot | None,
        cache: Path,
        result: AnalysisResult,
    ) -> list[dict[str, object]]:
        """D2P = MMD^2(epoch_k, step0) of the finetune run over its ``epoch_<k>`` snapshots (epoch 0 = step0)."""
        epochs = sorted(int(s.split("_")[1]) for s in ft.snapshots() if s.startswith("epoch_"))
        if pre is None or not epochs:
            return []
        rows: list[dict[str, object]] = [{"fm": fm, "task": task, "seed": ft.seed, "epoch": 0, "d2p": 0.0}]
        for k in epochs:
            snap = self._features(client, ft, f"epoch_{k}", cache, result.problems)
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

    def _log(self, client: Any, experiment_id: str, profiles: list[str], result: AnalysisResult) -> str:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
        tags = {
            "regime": "analysis",
            "study": self.study,
            "bundle": "tools",
            "bundle_version": self.bundle_version,
            "profile": ",".join(profiles),
            "snapshot": self.snapshot,
        }
        run = client.create_run(
            experiment_id, run_name=f"analysis-{self.study}-{stamp}-{uuid.uuid4().hex[:6]}", tags=tags
        )
        run_id = run.info.run_id
        try:
            for key, value in self._settings().items():
                client.log_param(run_id, key, value)
            client.log_artifacts(run_id, str(self.output_dir))
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
        return run_id
