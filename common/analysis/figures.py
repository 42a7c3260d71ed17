"""The study's figures (matplotlib, Agg canvas, PNG + SVG), after Huang et al., ISBI 2026 (arXiv 2601.15888).

- ``fig1b_scratch_vs_finetune``: P(scratch) vs P(finetune) per FM and task, marker area by D2S (paper Fig. 1b).
- ``fig2_distance_vs_rpg``: each distance vs each RPG, one colour per FM, least-squares line and Pearson r (Fig. 2).
- ``fig3_curves``: training loss and validation metric per epoch, finetune vs scratch, per task (Fig. 3).
- ``d2p_trajectory``: D2P over the finetune run's epoch snapshots.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "make_all",
    "plot_curves",
    "plot_d2p_trajectories",
    "plot_distance_vs_rpg",
    "plot_scratch_vs_finetune",
]

_FM_COLORS = {"profound": "#1f77b4", "provicnet": "#d62728"}
_EXTRA_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")
_DIST_LABEL = {"d2r": "D2R = MMD$^2$(ft, random)", "d2p": "D2P = MMD$^2$(ft, pretrained)",
               "d2s": "D2S = MMD$^2$(ft, scratch)"}  # fmt: skip
_TASK_SHORT = {"classification": "cls", "segmentation": "seg", "super_resolution": "SR",
               "distortion_correction": "DC", "modality_translation": "MT"}  # fmt: skip
_REF_LABEL = {"random": "RPG vs random-weight FM (%)", "specialised": "RPG vs specialised (%)",
              "scratch": "RPG vs scratch (%)"}  # fmt: skip

Curves = Mapping[tuple[str, str, str], Mapping[str, tuple[Sequence[int], Sequence[float]]]]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_dir: Path, stem: str) -> dict[str, Path]:
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png)
    fig.savefig(svg)
    return {f"{stem}_png": png, f"{stem}_svg": svg}


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only where something is labelled (an empty one draws a warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _color(fm: str, order: Sequence[str]) -> str:
    return _FM_COLORS.get(fm, _EXTRA_COLORS[order.index(fm) % len(_EXTRA_COLORS)])


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _fms(rows: Sequence[Mapping[str, object]]) -> list[str]:
    return list(dict.fromkeys(str(r["fm"]) for r in rows))


def plot_scratch_vs_finetune(rows: Sequence[Mapping[str, object]], out_dir: Path) -> dict[str, Path]:
    """Paper Fig. 1b: x = P(scratch), y = P(finetune), one point per FM and task, marker area proportional to D2S."""
    fig = _figure(6.0, 5.2)
    ax = fig.add_subplot()
    fms = _fms(rows)
    d2s = np.array([_num(r["d2s"]) for r in rows])
    d2s_max = np.nanmax(d2s) if np.isfinite(d2s).any() else 1.0
    values = []
    for fm in fms:
        pts = [r for r in rows if r["fm"] == fm]
        x = np.array([_num(r["p_scratch"]) for r in pts])
        y = np.array([_num(r["p_finetune"]) for r in pts])
        s = np.array([_num(r["d2s"]) for r in pts])
        size = np.where(np.isfinite(s), 40 + 460 * s / (d2s_max if d2s_max > 0 else 1.0), 40)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=size[ok], color=_color(fm, fms), alpha=0.6, edgecolor="k", label=fm)
        for r, xi, yi, good in zip(pts, x, y, ok, strict=True):
            if good:
                ax.annotate(str(r["task"]), (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
        values.extend(np.concatenate([x[ok], y[ok]]).tolist())
    if values:
        lo, hi = min(values), max(values)
        pad = 0.08 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--", label="finetune = scratch")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("P(scratch): test metric of the same network trained from scratch")
    ax.set_ylabel("P(finetune)")
    ax.set_title("Finetune vs scratch (marker area ∝ D2S)")
    _legend(ax, loc="upper left", fontsize=8, markerscale=0.5)
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "fig1b_scratch_vs_finetune")


def plot_distance_vs_rpg(
    rows: Sequence[Mapping[str, object]], correlations: Sequence[Mapping[str, object]], out_dir: Path
) -> dict[str, Path]:
    """Paper Fig. 2: rows D2R, D2P, D2S; columns RPG vs random, specialised, scratch; a line and r per FM."""
    fig = _figure(13.0, 11.0)
    axes = fig.subplots(3, 3, squeeze=False)
    fms = _fms(rows)
    r_of = {(c["fm"], c["distance"], c["reference"]): _num(c["pearson_r"]) for c in correlations}
    for i, dist in enumerate(_DIST_LABEL):
        for j, ref in enumerate(_REF_LABEL):
            ax = axes[i][j]
            for fm in fms:
                pts = [r for r in rows if r["fm"] == fm]
                x = np.array([_num(r[dist]) for r in pts])
                y = np.array([_num(r[f"rpg_{ref}"]) for r in pts])
                ok = np.isfinite(x) & np.isfinite(y)
                color = _color(fm, fms)
                r = r_of.get((fm, dist, ref), math.nan)
                label = f"{fm}: r = {r:.2f}" if math.isfinite(r) else f"{fm}: r = n/a"
                ax.scatter(x[ok], y[ok], color=color, edgecolor="k", s=36, label=label, zorder=3)
                for rr, xi, yi, good in zip(pts, x, y, ok, strict=True):
                    if good:
                        name = _TASK_SHORT.get(str(rr["task"]), str(rr["task"]))
                        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
                if ok.sum() >= 3 and np.ptp(x[ok]) > 0:  # as for r: no line through fewer than 3 tasks
                    slope, intercept = np.polyfit(x[ok], y[ok], 1)
                    xs = np.linspace(x[ok].min(), x[ok].max(), 20)
                    ax.plot(xs, slope * xs + intercept, color=color, lw=1.2)
            ax.axhline(0.0, color="grey", lw=0.8, ls=":")
            ax.margins(0.15)  # room for the task labels
            ax.grid(alpha=0.3)
            _legend(ax, fontsize=7, loc="best")
            ax.set_xlabel(_DIST_LABEL[dist], fontsize=8)
            ax.set_ylabel(_REF_LABEL[ref], fontsize=8)
    fig.suptitle(
        "Alignment distance vs relative performance gain, per FM across tasks (Pearson r)\n"
        "cls classification, seg segmentation, SR super-resolution, DC distortion correction, MT modality translation"
    )
    return _save(fig, out_dir, "fig2_distance_vs_rpg")


def plot_curves(curves: Curves, out_dir: Path) -> dict[str, Path]:
    """Paper Fig. 3: per task, training loss (top) and validation metric (bottom) per epoch; solid finetune, dashed
    scratch, one colour per FM."""
    from matplotlib.ticker import MaxNLocator

    tasks = sorted({k[1] for k in curves})
    fms = list(dict.fromkeys(k[0] for k in sorted(curves)))
    ncol = max(len(tasks), 1)
    fig = _figure(max(3.6 * ncol, 5.0), 6.0)
    axes = fig.subplots(2, ncol, squeeze=False)
    for j, task in enumerate(tasks):
        for i, metric in enumerate(("train_loss", "val_metric")):
            ax = axes[i][j]
            for (fm, t, regime), series in sorted(curves.items()):
                if t != task or metric not in series or not series[metric][0]:
                    continue
                steps, values = series[metric]
                ax.plot(steps, values, color=_color(fm, fms), ls="-" if regime == "finetune" else "--",
                        marker="o", ms=2.5, label=f"{fm} {regime}")  # fmt: skip
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel("training loss" if metric == "train_loss" else "validation metric")
            if i == 0:
                ax.set_title(task.replace("_", " "))
            _legend(ax, fontsize=7)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no curves logged", ha="center", va="center")
    fig.suptitle("Convergence: finetune (solid) vs scratch (dashed)")
    return _save(fig, out_dir, "fig3_curves")


def plot_d2p_trajectories(trajectory: Sequence[Mapping[str, object]], out_dir: Path) -> dict[str, Path]:
    """D2P = MMD^2(epoch k, step0) of each finetune run over its epoch snapshots, one panel per FM."""
    from matplotlib.ticker import MaxNLocator

    fms = _fms(trajectory) or ["(none)"]
    fig = _figure(max(5.0 * len(fms), 5.0), 4.2)
    axes = fig.subplots(1, len(fms), squeeze=False)[0]
    for ax, fm in zip(axes, fms, strict=True):
        keys = sorted({(str(r["task"]), int(r["seed"])) for r in trajectory if r["fm"] == fm})  # type: ignore[call-overload]
        for task, seed in keys:
            pts = sorted(
                (int(r["epoch"]), _num(r["d2p"]))
                for r in trajectory  # type: ignore[call-overload]
                if r["fm"] == fm and r["task"] == task and int(r["seed"]) == seed
            )  # type: ignore[call-overload]
            label = task.replace("_", " ") + (f" (seed {seed})" if len({s for t, s in keys if t == task}) > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(fm)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = before the first step)")
        ax.set_ylabel("D2P = MMD$^2$(epoch k, pretrained)")
        ax.grid(alpha=0.3)
        if keys:
            _legend(ax, fontsize=7)
        else:
            ax.text(0.5, 0.5, "no epoch snapshots logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("D2P trajectory during fine-tuning")
    return _save(fig, out_dir, "d2p_trajectory")


def make_all(result: Any, out_dir: Path) -> dict[str, Path]:
    """Draw every figure of an :class:`~common.analysis.analyze.AnalysisResult` into ``out_dir``; returns the paths."""
    files: dict[str, Path] = {}
    files.update(plot_scratch_vs_finetune(result.alignment, out_dir))
    files.update(plot_distance_vs_rpg(result.alignment, result.correlations, out_dir))
    files.update(plot_curves(result.curves, out_dir))
    files.update(plot_d2p_trajectories(result.trajectory, out_dir))
    return files
