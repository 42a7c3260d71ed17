"""The study's tables: alignment distances and RPG per FM, task and layer, their correlations across tasks, cost.

Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888):
D2R = MMD^2(Phi_ft, Phi_rand), D2P = MMD^2(Phi_ft, Phi_pre), D2S = MMD^2(Phi_ft, Phi_scratch) (section 3.2, Eq. 1),
RPG (section 3.3, Eq. 2) against the random-weight FM, the specialised model and the scratch model, and their
Pearson correlation across tasks per FM (section 4, Fig. 2). The bootstrap resamples each task's test images and,
with several seeds, the seeds as well, and recomputes the three distances and the four P's on every resample.
Everything here works on loaded arrays; the MLflow side is in :mod:`common.analysis.runs` and
:mod:`common.analysis.analyze`.

Every value that cannot be computed is NaN, and the row's ``_why`` maps its column to the reason (the report lists
every such cell); ``_why`` is not written to the CSVs.
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
from common.alignment.gain import NEAR_ZERO_REFERENCE
from common.alignment.statistics import resample_seed_means
from common.analysis.runs import FeatureSnapshot, Predictions
from common.metrics.classification import compute_specificity_at_sensitivity

__all__ = [
    "ALIGNMENT_COLUMNS",
    "CORRELATION_COLUMNS",
    "COST_COLUMNS",
    "DISTANCES",
    "MIN_TASKS",
    "REFERENCES",
    "RunCost",
    "SeedData",
    "TaskAlignment",
    "align_task",
    "alignment_row",
    "correlation_rows",
    "cost_row",
    "performance",
    "rpg_with_reason",
    "safe_rpg",
    "write_csv",
]

# distance name -> (first snapshot, second snapshot); 'ft' is the finetune run at the chosen snapshot
DISTANCES: dict[str, tuple[str, str]] = {"d2r": ("ft", "rand"), "d2p": ("ft", "pre"), "d2s": ("ft", "scratch")}
REFERENCES: tuple[str, ...] = ("random", "specialised", "scratch")
PERFORMANCE_REGIMES: tuple[str, ...] = ("finetune", "random", "specialised", "scratch")
#: a correlation across fewer tasks than the study's five is flagged
MIN_TASKS = 5
# two snapshots equal to this relative tolerance are one representation (a layer the protocol did not train)
_IDENTICAL_RTOL = 1e-6

ALIGNMENT_COLUMNS: tuple[str, ...] = (
    "fm", "task", "metric_name", "p_finetune", "p_random", "p_specialised", "p_scratch", "d2r", "d2p", "d2s",
    "rpg_random", "rpg_specialised", "rpg_scratch",
)  # fmt: skip
EXTRA_ALIGNMENT_COLUMNS: tuple[str, ...] = (
    "layer", "layer_kind", "dim", "headline", "p_baseline", "baseline_name", "below_baseline", "rpg_below_baseline",
    "identical", "cka_d2r", "cka_d2p", "cka_d2s", "mmd_p_d2r", "mmd_p_d2p", "mmd_p_d2s", "n_seeds", "n_images",
)  # fmt: skip
_SEED_COLUMNS: tuple[str, ...] = ALIGNMENT_COLUMNS[3:] + ("p_baseline", "cka_d2r", "cka_d2p", "cka_d2s")
STD_COLUMNS: tuple[str, ...] = tuple(f"{c}_std" for c in _SEED_COLUMNS)
CORRELATION_COLUMNS: tuple[str, ...] = (
    "fm", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high",
)  # fmt: skip
EXTRA_CORRELATION_COLUMNS: tuple[str, ...] = (
    "layer", "kinds", "headline", "n_tasks", "n_valid_resamples", "tasks", "warning",
)  # fmt: skip
COST_COLUMNS: tuple[str, ...] = (
    "fm", "task", "gpu_hours_finetune", "gpu_hours_scratch", "ratio", "wall_seconds_finetune", "wall_seconds_scratch",
    "wall_ratio",
    "epochs_to_95_finetune", "epochs_to_95_scratch",
)  # fmt: skip


def rpg_with_reason(p_ft: float, p_ref: float, higher_is_better: bool = True) -> tuple[float, str]:
    """RPG in percent (paper Eq. 2) and ``""``, or NaN and why not: a missing P, or a reference at or within
    :data:`~common.alignment.gain.NEAR_ZERO_REFERENCE` of zero (a relative gain over ~0 is a ratio of noise)."""
    if not math.isfinite(p_ft) or not math.isfinite(p_ref):
        return math.nan, f"P({'finetune' if not math.isfinite(p_ft) else 'reference'}) is missing"
    if p_ref < NEAR_ZERO_REFERENCE:
        return math.nan, f"reference P = {p_ref:.3g} is at or near zero (< {NEAR_ZERO_REFERENCE:g}): not divided by"
    return compute_rpg(p_ft, p_ref, NEAR_ZERO_REFERENCE, higher_is_better), ""


def safe_rpg(p_ft: float, p_ref: float, higher_is_better: bool = True) -> float:
    """:func:`rpg_with_reason` without the reason: RPG in percent, NaN where it is not computed."""
    return rpg_with_reason(p_ft, p_ref, higher_is_better)[0]


def _rpg_resampled(p_ft: np.ndarray, p_ref: np.ndarray, higher_is_better: bool) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(p_ref >= NEAR_ZERO_REFERENCE, (p_ft - p_ref) / p_ref * 100.0, np.nan)
    return gain if higher_is_better else -gain


def performance(pred: Predictions, indices: np.ndarray | None = None, baseline: bool = False) -> float:
    """The task metric P on the test images ``indices`` (all when None) from per-image predictions.

    ``per_image``: the mean over the images the metric counts (``nanmean``: segmentation's lesion-free cases are
    NaN under the lesion-case Dice). Classification: specificity at sensitivity 0.9 of the binary cut ``class >= 1``
    with score ``sum(scores[:, 1:])`` (paper section 3.1), NaN if a resample lacks a class. ``baseline``: the same
    for the trivial baseline's arrays (NaN when the run did not write them).
    """
    idx = np.arange(len(pred.ids)) if indices is None else np.asarray(indices)
    per_image = pred.baseline_per_image if baseline else pred.per_image
    scores = pred.baseline_scores if baseline else pred.scores
    if pred.per_image is not None:
        if per_image is None:
            return math.nan
        values = per_image[idx]
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    if pred.labels is None or pred.scores is None:
        raise ValueError("predictions hold neither per_image nor scores + labels.")
    if scores is None:
        return math.nan
    score = scores[idx, 1:].sum(axis=1)
    truth = (pred.labels[idx] >= 1).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a resample without one class gives NaN, counted, not shown
        return compute_specificity_at_sensitivity(score, truth, sensitivity=0.9)


def _performance_resampled(pred: Predictions, indices: np.ndarray) -> np.ndarray:
    """P on every row of ``(B, N)`` ``indices`` -> ``(B,)`` (NaN on a resample without a counted image)."""
    if pred.per_image is not None:
        values = pred.per_image[indices]
        counted = np.isfinite(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counted, values, 0.0).sum(axis=1) / counted.sum(axis=1)
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
    """Inputs of one seed of one FM and task, on one recorded layer.

    Args:
        seed: the seed tag.
        p: regime (finetune, random, specialised, scratch) -> logged ``test_metric`` (NaN where no run).
        features: ``ft`` (finetune at the chosen snapshot), ``pre`` (finetune ``step0``), ``rand`` (random-weight
            ``step0``), ``scratch`` (scratch at the chosen snapshot) -> snapshot of the layer, or None where missing.
        predictions: regime -> per-image test predictions, or None where missing.
        baseline: regime -> that run's logged ``baseline_metric`` (NaN or absent where not logged).
        baseline_name: the finetune run's ``baseline_name`` tag.
        missing: ``ft``/``pre``/``rand``/``scratch`` or a regime -> why its snapshot or predictions are missing.
    """

    seed: int
    p: dict[str, float]
    features: dict[str, FeatureSnapshot | None]
    predictions: dict[str, Predictions | None]
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_name: str = ""
    missing: dict[str, str] = field(default_factory=dict)


@dataclass
class TaskAlignment:
    """Per-seed values of one FM, task and layer and their resampled versions for the bootstrap.

    ``values[s]`` maps column names (``p_*``, ``d2*``, ``rpg_*``, ``cka_*``, ``mmd_p_*``) to numbers for seed ``s``;
    ``resampled`` maps ``d2*``, ``rpg_*`` to ``(B,)`` arrays over the image (and seed) resamples (absent if not
    computable, with the reason in ``no_resamples``); ``why`` maps a column to the reason it is NaN; ``below``
    holds the regimes with a run that did not beat its trivial baseline; ``identical`` the distances whose two
    snapshots are one representation in every seed (a layer that did not train); ``problems`` is what could not
    be computed.
    """

    fm: str
    task: str
    metric_name: str
    layer: str = "head_input"
    kind: str = ""
    dim: int = 0
    seeds: list[int] = field(default_factory=list)
    values: list[dict[str, float]] = field(default_factory=list)
    resampled: dict[str, np.ndarray] = field(default_factory=dict)
    no_resamples: dict[str, str] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    below: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    baseline_name: str = ""
    problems: list[str] = field(default_factory=list)
    n_images: int = 0


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
    layer: str = "head_input",
    higher_is_better: bool = True,
) -> TaskAlignment:
    """Distances (squared MMD, 1 - linear CKA), permutation p-values, P, baseline and RPG of every seed of one FM,
    task and layer.

    All snapshots are paired by image id with the finetune snapshot of the first seed (its id order is the task's
    canonical order), so one ``(B, N)`` bootstrap index array resamples the same images in every run; a snapshot or
    prediction file with other ids makes only the values that need it NaN, with a problem recorded. With several
    seeds every resample also draws the seeds with replacement (:func:`common.alignment.statistics.
    resample_seed_means`). A run without predictions gives its point values; only the resamples that need it are
    missing.

    Args:
        fm, task, metric_name: labels of the row.
        seeds: one :class:`SeedData` per seed, holding the snapshots of ``layer``.
        n_bootstrap: image resamples ``B`` (0 disables the bootstrap).
        n_permutations: permutations of each MMD test (0 disables them).
        sigma, normalize: kernel bandwidth and per-image L2 normalisation of Eq. 1.
        random_seed: seed of the bootstrap indices, the seed draws and the permutations.
        layer: the recorded layer the snapshots come from.
        higher_is_better: the task metric's direction (RPG sign, "beats its baseline").
    """
    out = TaskAlignment(fm=fm, task=task, metric_name=metric_name, layer=layer)
    canonical: list[str] | None = None
    for sd in seeds:
        ft = sd.features.get("ft")
        if ft is not None:
            canonical = list(ft.ids)
            out.kind, out.dim = ft.kind, int(ft.features.shape[1])
            break
    out.baseline_name = next((sd.baseline_name for sd in seeds if sd.baseline_name), "")
    out.n_images = len(canonical) if canonical else 0
    indices = bootstrap_indices(len(canonical), n_bootstrap, random_seed) if canonical and n_bootstrap > 0 else None
    if n_bootstrap == 0:
        for key in [*DISTANCES, *(f"rpg_{r}" for r in REFERENCES)]:
            out.no_resamples[key] = "the bootstrap is off (n_bootstrap = 0; set --n_bootstrap 1000)"
    seed_resampled: list[dict[str, np.ndarray]] = []
    identical: dict[str, list[bool]] = {name: [] for name in DISTANCES}
    for sd in seeds:
        tag = f"{fm}/{task} seed {sd.seed} layer {layer}"
        values: dict[str, float] = {f"p_{r}": float(sd.p.get(r, math.nan)) for r in PERFORMANCE_REGIMES}
        for regime in PERFORMANCE_REGIMES:
            if not math.isfinite(values[f"p_{regime}"]):
                out.why.setdefault(f"p_{regime}", sd.missing.get(regime, f"no {regime} run with a test_metric"))
        baselines = {r: float(sd.baseline.get(r, math.nan)) for r in PERFORMANCE_REGIMES}
        values["p_baseline"] = baselines["finetune"]
        if not math.isfinite(values["p_baseline"]):
            values["p_baseline"] = next((b for b in baselines.values() if math.isfinite(b)), math.nan)
        if not math.isfinite(values["p_baseline"]):
            out.why.setdefault("p_baseline", "no run of this task logged baseline_metric (bundles before 0.2)")
        for regime in PERFORMANCE_REGIMES:
            p, b = values[f"p_{regime}"], baselines[regime]
            if math.isfinite(p) and math.isfinite(b) and not (p > b if higher_is_better else p < b):
                if regime not in out.below:
                    out.below.append(regime)
        resampled: dict[str, np.ndarray] = {}
        for ref in REFERENCES:
            values[f"rpg_{ref}"], reason = rpg_with_reason(values["p_finetune"], values[f"p_{ref}"], higher_is_better)
            if reason:
                out.why.setdefault(f"rpg_{ref}", f"RPG vs {ref} not computed: {reason}")
                if "near zero" in reason:
                    out.problems.append(f"{tag}: RPG vs {ref} not computed: {reason}")
        ft = sd.features.get("ft")
        ft_rows = None
        if ft is not None and canonical is not None:
            try:
                ft_rows = ft.features[_reorder(ft.ids, canonical, f"{tag} finetune snapshot")]
            except ValueError as err:
                out.problems.append(str(err))
        for name, (_, other_key) in DISTANCES.items():
            values[name] = values[f"cka_{name}"] = values[f"mmd_p_{name}"] = math.nan
            if n_permutations == 0:
                out.why.setdefault(f"mmd_p_{name}", "permutation tests are off (n_permutations = 0)")
            other = sd.features.get(other_key)
            if ft_rows is None or other is None:
                missing = "ft" if ft_rows is None else other_key
                reason = sd.missing.get(missing, f"no {missing} snapshot of layer {layer}")
                out.problems.append(f"{tag}: {name} not computed ({reason})")
                for col in (name, f"cka_{name}", f"mmd_p_{name}"):
                    out.why.setdefault(col, f"{name} not computed: {reason}")
                out.no_resamples.setdefault(name, f"{name} not computed: {reason}")
                continue
            try:
                a, b, _ = pair_by_ids(ft_rows, canonical, other.features, other.ids)
            except ValueError as err:
                out.problems.append(f"{tag}: {name} not computed, snapshots do not pair: {err}")
                for col in (name, f"cka_{name}", f"mmd_p_{name}"):
                    out.why.setdefault(col, f"{name} not computed: the snapshots hold different images")
                out.no_resamples.setdefault(name, f"{name}: the snapshots hold different images")
                continue
            same = bool(np.allclose(a, b, rtol=_IDENTICAL_RTOL, atol=0.0))
            identical[name].append(same)
            if same:  # exactly 0, not the kernel's rounding noise (which a correlation would read as signal)
                values[name] = values[f"cka_{name}"] = 0.0
                values[f"mmd_p_{name}"] = 1.0 if n_permutations > 0 else math.nan
                if indices is not None:
                    resampled[name] = np.zeros(indices.shape[0])
                continue
            values[name] = compute_mmd2(a, b, sigma=sigma, normalize=normalize)
            try:
                values[f"cka_{name}"] = 1.0 - compute_linear_cka(a, b)
            except ValueError as err:  # e.g. a constant representation
                out.problems.append(f"{tag}: no CKA for {name}: {err}")
                out.why.setdefault(f"cka_{name}", f"linear CKA undefined: {err}")
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
                    if math.isfinite(values[f"p_{regime}"]):
                        reason = sd.missing.get(f"{regime}_predictions", "its run has no test/predictions.npz")
                        for ref in REFERENCES:
                            if regime in ("finetune", ref):
                                out.no_resamples.setdefault(f"rpg_{ref}", f"{regime} P is not resampled: {reason}")
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
                    resampled[f"rpg_{ref}"] = _rpg_resampled(
                        p_resampled["finetune"], p_resampled[ref], higher_is_better
                    )
        out.seeds.append(sd.seed)
        out.values.append(values)
        seed_resampled.append(resampled)
    out.identical = [name for name, flags in identical.items() if flags and all(flags)]
    for key in [*DISTANCES, *(f"rpg_{r}" for r in REFERENCES)]:
        if seed_resampled and all(key in r for r in seed_resampled):
            out.resampled[key] = resample_seed_means(np.stack([r[key] for r in seed_resampled]), random_seed)
        else:
            out.no_resamples.setdefault(key, f"{key} has no resamples for some seed")
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std across seeds; NaN (not an error) when any seed's value is missing."""
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    return mean_std(values)


def alignment_row(ta: TaskAlignment, headline: bool = True) -> dict[str, object]:
    """One ``alignment.csv`` row: seed means in the named columns, seed std (ddof 1) in ``*_std``.

    Permutation p-values across several seeds: the largest (the most conservative). ``below_baseline``: the regimes
    with a run that did not beat its trivial baseline; ``rpg_below_baseline``: the RPG columns that involve such a
    run; ``identical``: the distances that are identically zero because the two snapshots are one representation.
    """
    row: dict[str, object] = {"fm": ta.fm, "task": ta.task, "metric_name": ta.metric_name}
    for col in _SEED_COLUMNS:
        row[col], row[f"{col}_std"] = _mean_std([v[col] for v in ta.values])
    for name in DISTANCES:
        ps = [v[f"mmd_p_{name}"] for v in ta.values]
        row[f"mmd_p_{name}"] = max(ps) if ps and all(math.isfinite(p) for p in ps) else math.nan
    row["n_seeds"] = len(ta.seeds)
    row["n_images"] = ta.n_images
    row.update(layer=ta.layer, layer_kind=ta.kind, dim=ta.dim, headline=headline, baseline_name=ta.baseline_name)
    row["below_baseline"] = " ".join(r for r in PERFORMANCE_REGIMES if r in ta.below)
    row["rpg_below_baseline"] = " ".join(
        f"rpg_{ref}" for ref in REFERENCES if "finetune" in ta.below or ref in ta.below
    )
    row["identical"] = " ".join(ta.identical)
    row["_why"] = {c: w for c, w in ta.why.items() if isinstance(row.get(c), float) and math.isnan(row[c])}
    for col in _SEED_COLUMNS:
        if isinstance(row[col], float) and math.isnan(row[col]):
            row["_why"].setdefault(col, "a seed lacks this value")  # type: ignore[union-attr]
    return row


def correlation_rows(
    fm: str,
    tasks: Sequence[TaskAlignment],
    rows: Sequence[dict[str, object]],
    confidence: float = 0.95,
    headline: bool = True,
) -> tuple[list[dict[str, object]], list[str]]:
    """Pearson r (p) and Spearman rho across tasks of each distance with each RPG, with a bootstrap CI of r, on the
    layer of ``tasks``.

    The point values are the table's (``rows``, seed means); tasks where either value is NaN are left out, and fewer
    than 3 tasks give NaN. The CI is the percentile interval of r over the image (and seed) resamples (columns where
    any task's resampled value is not finite are dropped and counted in ``n_valid_resamples``). ``warning`` flags a
    correlation over fewer than :data:`MIN_TASKS` tasks, one that mixes layers of different kinds, and one whose
    distance is identically zero on some task.

    Returns:
        ``(correlation rows, problems)``.
    """
    out: list[dict[str, object]] = []
    problems: list[str] = []
    by_task = {ta.task: ta for ta in tasks}
    layer = tasks[0].layer if tasks else ""
    for dist in DISTANCES:
        for ref in REFERENCES:
            ycol = f"rpg_{ref}"
            used = [
                r
                for r in rows
                if math.isfinite(float(r[dist])) and math.isfinite(float(r[ycol]))  # type: ignore[arg-type]
            ]
            tas = [by_task[str(r["task"])] for r in used]
            kinds = sorted({ta.kind or "unknown" for ta in tas})
            known = {ta.kind for ta in tas if ta.kind}
            row: dict[str, object] = {"fm": fm, "distance": dist, "reference": ref, "n_tasks": len(used)}
            row.update(layer=layer, kinds=" ".join(kinds), headline=headline)
            row["tasks"] = " ".join(str(r["task"]) for r in used)
            row.update(pearson_r=math.nan, pearson_p=math.nan, spearman_rho=math.nan, ci_low=math.nan)
            row.update(ci_high=math.nan, n_valid_resamples=0)
            why: dict[str, str] = {}
            row["_why"] = why
            warn = []
            if len(used) < MIN_TASKS:
                warn.append(f"only {len(used)} of {MIN_TASKS} tasks")
            if len(known) > 1:
                warn.append("mixes layer kinds " + ", ".join(f"{ta.task}: {ta.kind or 'unknown'}" for ta in tas))
            unknown = [ta.task for ta in tas if not ta.kind]
            if unknown:
                warn.append(f"layer kind unknown on {', '.join(unknown)}")
            zero = [ta.task for ta in tas if dist in ta.identical]
            if zero:
                warn.append(f"{dist} identically 0 on {', '.join(zero)} (layer did not train)")
            row["warning"] = "; ".join(warn)
            if len(used) < 3:
                reason = f"needs >= 3 tasks with both the distance and the RPG, has {len(used)}"
                problems.append(f"{fm} layer {layer}: {dist} vs RPG({ref}) {reason}")
                why.update({c: reason for c in ("pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high")})
                out.append(row)
                continue
            x = [float(r[dist]) for r in used]  # type: ignore[arg-type]
            y = [float(r[ycol]) for r in used]  # type: ignore[arg-type]
            row["pearson_r"], row["pearson_p"] = pearson(x, y)
            row["spearman_rho"] = spearman(x, y)
            if not math.isfinite(float(row["pearson_r"])):  # type: ignore[arg-type]
                constant = dist if np.ptp(x) == 0 else f"RPG vs {ref}"
                reason = f"{constant} is the same on every task (r is 0 / 0)"
                why.update({c: reason for c in ("pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high")})
                out.append(row)
                continue
            if all(dist in ta.resampled and ycol in ta.resampled for ta in tas):
                xr = np.stack([ta.resampled[dist] for ta in tas])
                yr = np.stack([ta.resampled[ycol] for ta in tas])
                keep = np.isfinite(xr).all(axis=0) & np.isfinite(yr).all(axis=0)
                try:
                    ci = bootstrap_correlation(x, y, xr[:, keep], yr[:, keep], method="pearson", confidence=confidence)
                    row.update(ci_low=ci.low, ci_high=ci.high, n_valid_resamples=ci.n_valid)
                except ValueError as err:
                    problems.append(f"{fm} layer {layer}: no bootstrap CI for {dist} vs RPG({ref}): {err}")
                    why.update(ci_low=f"no finite resample: {err}", ci_high=f"no finite resample: {err}")
            else:
                reasons = [
                    f"{ta.task}: {ta.no_resamples.get(k, 'no resamples')}"
                    for ta in tas
                    for k in (dist, ycol)
                    if k not in ta.resampled
                ]
                reason = "no resamples for " + "; ".join(dict.fromkeys(reasons))
                problems.append(f"{fm} layer {layer}: no bootstrap CI for {dist} vs RPG({ref}) ({reason})")
                why.update(ci_low=reason, ci_high=reason)
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
    missing); ``wall_ratio`` the same for wall seconds (what a CPU study has: its runs log 0 GPU-hours)."""

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else math.nan

    row: dict[str, object] = {"fm": fm, "task": task}
    for regime, runs in (("finetune", finetune), ("scratch", scratch)):
        row[f"gpu_hours_{regime}"] = mean([r.gpu_hours for r in runs])
        row[f"wall_seconds_{regime}"] = mean([r.wall_seconds for r in runs])
        row[f"epochs_to_95_{regime}"] = mean([r.epochs_to(fraction) for r in runs])
    row["ratio"] = _ratio(float(row["gpu_hours_finetune"]), float(row["gpu_hours_scratch"]))  # type: ignore[arg-type]
    row["wall_ratio"] = _ratio(float(row["wall_seconds_finetune"]), float(row["wall_seconds_scratch"]))  # type: ignore[arg-type]
    return row


def _ratio(finetune: float, scratch: float) -> float:
    return finetune / scratch if math.isfinite(finetune) and math.isfinite(scratch) and scratch > 0 else math.nan


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
