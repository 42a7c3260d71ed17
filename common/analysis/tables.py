"""The study's tables: alignment distances and RPG per FM and task, their correlations across tasks, cost.

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888):
D2R = MMD^2(Phi_ft, Phi_rand), D2P = MMD^2(Phi_ft, Phi_pre), D2S = MMD^2(Phi_ft, Phi_scratch) (section 3.2, Eq. 1),
RPG (section 3.3, Eq. 2) against the random-weight FM, the specialised model and the scratch model, and their
Pearson correlation across tasks per FM (section 4, Fig. 2). The bootstrap resamples each task's test images and
recomputes the three distances and the four P's on every resample. Everything here works on loaded arrays; the MLflow
side is in :mod:`common.analysis.runs` and :mod:`common.analysis.analyze`.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.alignment import (
    bootstrap_correlation,
    bootstrap_indices,
    bootstrap_mmd2,
    compute_linear_cka,
    compute_mmd2,
    compute_rpg,
    epochs_to_fraction,
    mean_std,
    mmd_permutation_test,
    pair_by_ids,
    pearson,
    spearman,
)
from common.analysis.runs import FeatureSnapshot, Predictions
from common.metrics.classification import compute_specificity_at_sensitivity

__all__ = [
    "ALIGNMENT_COLUMNS",
    "CORRELATION_COLUMNS",
    "COST_COLUMNS",
    "DISTANCES",
    "REFERENCES",
    "SeedData",
    "TaskAlignment",
    "align_task",
    "alignment_row",
    "RunCost",
    "cost_row",
    "correlation_rows",
    "performance",
    "safe_rpg",
    "write_csv",
]

# distance name -> (first snapshot, second snapshot); 'ft' is the finetune run at the chosen snapshot
DISTANCES: dict[str, tuple[str, str]] = {"d2r": ("ft", "rand"), "d2p": ("ft", "pre"), "d2s": ("ft", "scratch")}
REFERENCES: tuple[str, ...] = ("random", "specialised", "scratch")
PERFORMANCE_REGIMES: tuple[str, ...] = ("finetune", "random", "specialised", "scratch")

ALIGNMENT_COLUMNS: tuple[str, ...] = (
    "fm", "task", "metric_name", "p_finetune", "p_random", "p_specialised", "p_scratch", "d2r", "d2p", "d2s",
    "rpg_random", "rpg_specialised", "rpg_scratch",
)  # fmt: skip
EXTRA_ALIGNMENT_COLUMNS: tuple[str, ...] = (
    "cka_d2r", "cka_d2p", "cka_d2s", "mmd_p_d2r", "mmd_p_d2p", "mmd_p_d2s", "n_seeds", "n_images", "layer",
)  # fmt: skip
STD_COLUMNS: tuple[str, ...] = tuple(f"{c}_std" for c in ALIGNMENT_COLUMNS[3:] + ("cka_d2r", "cka_d2p", "cka_d2s"))
CORRELATION_COLUMNS: tuple[str, ...] = (
    "fm", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high",
)  # fmt: skip
EXTRA_CORRELATION_COLUMNS: tuple[str, ...] = ("n_tasks", "n_valid_resamples", "tasks")
COST_COLUMNS: tuple[str, ...] = (
    "fm", "task", "gpu_hours_finetune", "gpu_hours_scratch", "ratio", "wall_seconds_finetune", "wall_seconds_scratch",
    "epochs_to_95_finetune", "epochs_to_95_scratch",
)  # fmt: skip


def safe_rpg(p_ft: float, p_ref: float) -> float:
    """:func:`common.alignment.compute_rpg` in percent; NaN where undefined (a missing value or ``p_ref <= 0``)."""
    try:
        return compute_rpg(p_ft, p_ref)
    except ValueError:
        return math.nan


def performance(pred: Predictions, indices: np.ndarray | None = None) -> float:
    """The task metric P on the test images ``indices`` (all when None) from per-image predictions.

    ``per_image``: the mean (Dice, SSIM). Classification: specificity at sensitivity 0.9 of the binary cut
    ``class >= 1`` with score ``sum(scores[:, 1:])`` (paper section 3.1), NaN if a resample lacks a class.
    """
    idx = np.arange(len(pred.ids)) if indices is None else np.asarray(indices)
    if pred.per_image is not None:
        return float(np.mean(pred.per_image[idx]))
    if pred.scores is None or pred.labels is None:
        raise ValueError("predictions hold neither per_image nor scores + labels.")
    score = pred.scores[idx, 1:].sum(axis=1)
    truth = (pred.labels[idx] >= 1).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a resample without one class gives NaN, counted, not shown
        return compute_specificity_at_sensitivity(score, truth, sensitivity=0.9)


def _performance_resampled(pred: Predictions, indices: np.ndarray) -> np.ndarray:
    """P on every row of ``(B, N)`` ``indices`` -> ``(B,)``."""
    if pred.per_image is not None:
        return pred.per_image[indices].mean(axis=1)
    return np.array([performance(pred, row) for row in indices])


def _reorder(ids: Sequence[str], canonical: Sequence[str], what: str) -> np.ndarray:
    """Index array ``order`` with ``ids[order] == canonical``; ValueError naming ``what`` if the sets differ."""
    position = {i: k for k, i in enumerate(ids)}
    missing = [i for i in canonical if i not in position]
    if missing or len(ids) != len(canonical):
        extra = sorted(set(ids) - set(canonical))
        raise ValueError(
            f"{what}: image ids differ from the finetune snapshot ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(extra)} extra, e.g. {extra[:3]})."
        )
    return np.array([position[i] for i in canonical], dtype=np.int64)


@dataclass
class SeedData:
    """Inputs of one seed of one FM and task.

    Args:
        seed: the seed tag.
        p: regime (finetune, random, specialised, scratch) -> logged ``test_metric`` (NaN where no run).
        features: ``ft`` (finetune at the chosen snapshot), ``pre`` (finetune ``step0``), ``rand`` (random-weight
            ``step0``), ``scratch`` (scratch at the chosen snapshot) -> snapshot, or None where missing.
        predictions: regime -> per-image test predictions, or None where missing.
    """

    seed: int
    p: dict[str, float]
    features: dict[str, FeatureSnapshot | None]
    predictions: dict[str, Predictions | None]


@dataclass
class TaskAlignment:
    """Per-seed values of one FM and task and their resampled versions for the bootstrap.

    ``values[s]`` maps column names (``p_*``, ``d2*``, ``rpg_*``, ``cka_*``, ``mmd_p_*``) to numbers for seed ``s``;
    ``resampled`` maps ``d2*``, ``rpg_*`` to ``(B,)`` seed-mean arrays over the image resamples (absent if not
    computable); ``problems`` says what could not be computed and why.
    """

    fm: str
    task: str
    metric_name: str
    seeds: list[int] = field(default_factory=list)
    values: list[dict[str, float]] = field(default_factory=list)
    resampled: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    n_images: int = 0
    layer: str = ""


def align_task(
    fm: str,
    task: str,
    metric_name: str,
    seeds: Sequence[SeedData],
    n_bootstrap: int = 1000,
    n_permutations: int = 1000,
    sigma: float = 1.0,
    normalize: bool = True,
    random_seed: int = 0,
) -> TaskAlignment:
    """Distances (squared MMD, 1 - linear CKA), permutation p-values, P and RPG of every seed of one FM and task.

    All snapshots are paired by image id with the finetune snapshot of the first seed (its id order is the task's
    canonical order), so one ``(B, N)`` bootstrap index array resamples the same images in every run; a snapshot or
    prediction file with other ids makes only the values that need it NaN, with a problem recorded.

    Args:
        fm, task, metric_name: labels of the row.
        seeds: one :class:`SeedData` per seed.
        n_bootstrap: image resamples ``B`` (0 disables the bootstrap).
        n_permutations: permutations of each MMD test (0 disables them).
        sigma, normalize: kernel bandwidth and per-image L2 normalisation of Eq. 1.
        random_seed: seed of the bootstrap indices and the permutations.
    """
    out = TaskAlignment(fm=fm, task=task, metric_name=metric_name)
    canonical: list[str] | None = None
    for sd in seeds:
        ft = sd.features.get("ft")
        if ft is not None:
            canonical = list(ft.ids)
            out.layer = ft.layer
            break
    out.n_images = len(canonical) if canonical else 0
    indices = bootstrap_indices(len(canonical), n_bootstrap, random_seed) if canonical and n_bootstrap > 0 else None
    seed_resampled: list[dict[str, np.ndarray]] = []
    for sd in seeds:
        tag = f"{fm}/{task} seed {sd.seed}"
        values: dict[str, float] = {f"p_{r}": float(sd.p.get(r, math.nan)) for r in PERFORMANCE_REGIMES}
        resampled: dict[str, np.ndarray] = {}
        for ref in REFERENCES:
            values[f"rpg_{ref}"] = safe_rpg(values["p_finetune"], values[f"p_{ref}"])
        ft = sd.features.get("ft")
        ft_rows = None
        if ft is not None and canonical is not None:
            try:
                ft_rows = ft.features[_reorder(ft.ids, canonical, f"{tag} finetune snapshot")]
            except ValueError as err:
                out.problems.append(str(err))
        for name, (_, other_key) in DISTANCES.items():
            values[name] = values[f"cka_{name}"] = values[f"mmd_p_{name}"] = math.nan
            other = sd.features.get(other_key)
            if ft_rows is None or other is None:
                out.problems.append(
                    f"{tag}: {name} not computed (no {'ft' if ft_rows is None else other_key} snapshot)"
                )
                continue
            try:
                a, b, _ = pair_by_ids(ft_rows, canonical, other.features, other.ids)
            except ValueError as err:
                out.problems.append(f"{tag}: {name} not computed, snapshots do not pair: {err}")
                continue
            values[name] = compute_mmd2(a, b, sigma=sigma, normalize=normalize)
            try:
                values[f"cka_{name}"] = 1.0 - compute_linear_cka(a, b)
            except ValueError as err:  # e.g. a constant representation
                out.problems.append(f"{tag}: no CKA for {name}: {err}")
            if n_permutations > 0:
                _, values[f"mmd_p_{name}"] = mmd_permutation_test(
                    a, b, n_permutations=n_permutations, seed=random_seed, sigma=sigma, normalize=normalize
                )
            if indices is not None:
                resampled[name] = bootstrap_mmd2(a, b, indices, sigma=sigma, normalize=normalize)
        if indices is not None:
            p_resampled: dict[str, np.ndarray] = {}
            for regime in PERFORMANCE_REGIMES:
                pred = sd.predictions.get(regime)
                if pred is None:
                    continue
                try:
                    order = _reorder(pred.ids, canonical, f"{tag} {regime} predictions")
                except ValueError as err:
                    out.problems.append(str(err))
                    continue
                recomputed = performance(pred)
                if math.isfinite(values[f"p_{regime}"]) and not abs(recomputed - values[f"p_{regime}"]) <= 1e-4:
                    out.problems.append(
                        f"{tag}: {regime} test_metric {values[f'p_{regime}']:.6g} differs from P recomputed from "
                        f"test/predictions.npz ({recomputed:.6g}); the CIs resample the predictions"
                    )
                p_resampled[regime] = _performance_resampled(pred, order[indices])
            for ref in REFERENCES:
                if "finetune" in p_resampled and ref in p_resampled:
                    pref = p_resampled[ref]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        resampled[f"rpg_{ref}"] = np.where(
                            pref > 0, (p_resampled["finetune"] - pref) / pref * 100.0, np.nan
                        )
        out.seeds.append(sd.seed)
        out.values.append(values)
        seed_resampled.append(resampled)
    for key in [*DISTANCES, *(f"rpg_{r}" for r in REFERENCES)]:
        if seed_resampled and all(key in r for r in seed_resampled):
            out.resampled[key] = np.mean(np.stack([r[key] for r in seed_resampled]), axis=0)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std across seeds; NaN (not an error) when any seed's value is missing."""
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return mean_std(values)


def alignment_row(ta: TaskAlignment) -> dict[str, object]:
    """One ``alignment.csv`` row: seed means in the named columns, seed std (ddof 1) in ``*_std``.

    Permutation p-values across several seeds: the largest (the most conservative).
    """
    row: dict[str, object] = {"fm": ta.fm, "task": ta.task, "metric_name": ta.metric_name}
    for col in ALIGNMENT_COLUMNS[3:] + ("cka_d2r", "cka_d2p", "cka_d2s"):
        row[col], row[f"{col}_std"] = _mean_std([v[col] for v in ta.values])
    for name in DISTANCES:
        ps = [v[f"mmd_p_{name}"] for v in ta.values]
        row[f"mmd_p_{name}"] = max(ps) if ps and all(math.isfinite(p) for p in ps) else math.nan
    row["n_seeds"] = len(ta.seeds)
    row["n_images"] = ta.n_images
    row["layer"] = ta.layer
    return row


def correlation_rows(
    fm: str, tasks: Sequence[TaskAlignment], rows: Sequence[dict[str, object]], confidence: float = 0.95
) -> tuple[list[dict[str, object]], list[str]]:
    """Pearson r (p) and Spearman rho across tasks of each distance with each RPG, with a bootstrap CI of r.

    The point values are the table's (``rows``, seed means); tasks where either value is NaN are left out, and fewer
    than 3 tasks give NaN. The CI is the percentile interval of r over the image resamples (columns where any task's
    resampled value is not finite are dropped and counted in ``n_valid_resamples``).

    Returns:
        ``(correlation rows, problems)``.
    """
    out: list[dict[str, object]] = []
    problems: list[str] = []
    by_task = {ta.task: ta for ta in tasks}
    for dist in DISTANCES:
        for ref in REFERENCES:
            ycol = f"rpg_{ref}"
            used = [
                r
                for r in rows
                if math.isfinite(float(r[dist])) and math.isfinite(float(r[ycol]))  # type: ignore[arg-type]
            ]
            row: dict[str, object] = {"fm": fm, "distance": dist, "reference": ref, "n_tasks": len(used)}
            row["tasks"] = " ".join(str(r["task"]) for r in used)
            row.update(pearson_r=math.nan, pearson_p=math.nan, spearman_rho=math.nan, ci_low=math.nan)
            row.update(ci_high=math.nan, n_valid_resamples=0)
            if len(used) < 3:
                problems.append(f"{fm}: {dist} vs RPG({ref}) needs >= 3 tasks with both values, has {len(used)}")
                out.append(row)
                continue
            x = [float(r[dist]) for r in used]  # type: ignore[arg-type]
            y = [float(r[ycol]) for r in used]  # type: ignore[arg-type]
            row["pearson_r"], row["pearson_p"] = pearson(x, y)
            row["spearman_rho"] = spearman(x, y)
            tas = [by_task[str(r["task"])] for r in used]
            if all(dist in ta.resampled and ycol in ta.resampled for ta in tas):
                xr = np.stack([ta.resampled[dist] for ta in tas])
                yr = np.stack([ta.resampled[ycol] for ta in tas])
                keep = np.isfinite(xr).all(axis=0) & np.isfinite(yr).all(axis=0)
                try:
                    ci = bootstrap_correlation(x, y, xr[:, keep], yr[:, keep], method="pearson", confidence=confidence)
                    row.update(ci_low=ci.low, ci_high=ci.high, n_valid_resamples=ci.n_valid)
                except ValueError as err:
                    problems.append(f"{fm}: no bootstrap CI for {dist} vs RPG({ref}): {err}")
            else:
                problems.append(f"{fm}: no bootstrap CI for {dist} vs RPG({ref}) (no resamples for some task)")
            out.append(row)
    return out, problems


@dataclass(frozen=True)
class RunCost:
    """Cost and convergence of one run: ``gpu_hours``, ``wall_seconds`` and its ``val_metric`` curve (step = epoch)."""

    gpu_hours: float
    wall_seconds: float
    val_epochs: tuple[int, ...] = ()
    val_values: tuple[float, ...] = ()

    def epochs_to(self, fraction: float = 0.95) -> float:
        """First epoch reaching ``fraction`` of the final validation value (paper Fig. 3); NaN without a curve."""
        if not self.val_values or not all(math.isfinite(v) for v in self.val_values):
            return math.nan
        epoch = epochs_to_fraction(list(self.val_values), fraction, epochs=list(self.val_epochs))
        return math.nan if epoch is None else float(epoch)


def cost_row(
    fm: str, task: str, finetune: Sequence[RunCost], scratch: Sequence[RunCost], fraction: float = 0.95
) -> dict[str, object]:
    """One ``cost.csv`` row (paper Table 1): seed means of GPU-hours, wall seconds and epochs to 95 % of the final
    validation value for finetune and scratch; ``ratio`` = GPU-hours finetune / scratch (NaN if scratch is 0 or
    missing)."""

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else math.nan

    row: dict[str, object] = {"fm": fm, "task": task}
    for regime, runs in (("finetune", finetune), ("scratch", scratch)):
        row[f"gpu_hours_{regime}"] = mean([r.gpu_hours for r in runs])
        row[f"wall_seconds_{regime}"] = mean([r.wall_seconds for r in runs])
        row[f"epochs_to_95_{regime}"] = mean([r.epochs_to(fraction) for r in runs])
    ft, sc = float(row["gpu_hours_finetune"]), float(row["gpu_hours_scratch"])  # type: ignore[arg-type]
    row["ratio"] = ft / sc if math.isfinite(ft) and math.isfinite(sc) and sc > 0 else math.nan
    return row


def _format(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(rows: Sequence[dict[str, object]], columns: Sequence[str], path: str | Path) -> Path:
    """Write ``rows`` with exactly ``columns`` (in that order; missing values empty) to ``path``; returns it."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row.get(c, "")) for c in columns])
    return path
