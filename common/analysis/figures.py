"""The study's figures (matplotlib, Agg canvas, PNG + SVG), after Huang et al., ISBI 2026 (arXiv 2601.15888).

- ``fig1b_scratch_vs_finetune``: P(scratch) vs P(finetune) per FM and task, marker area by D2S, one panel per metric,
  each task's trivial baseline as a star on the diagonal with dotted lines (paper Fig. 1b).
- ``fig2_distance_vs_rpg``: each distance vs each RPG on the headline layer, one colour per FM, least-squares line
  and Pearson r (Fig. 2).
- ``fig3_curves``: training loss and validation metric per epoch, finetune vs scratch, per task (Fig. 3).
- ``d2p_trajectory``: D2P over the finetune run's epoch snapshots.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot's global state; legends sit outside
the axes. :func:`empty_figures` says which figure has nothing to show, why, and what fills it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.tasks import TASKS

__all__ = [
    "SNAPSHOT_EPOCHS_OPTION",
    "empty_figures",
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
#: how to get the epoch snapshots the D2P trajectory needs (the bundles' ``snapshot_epochs`` key)
SNAPSHOT_EPOCHS_OPTION = (
    "`./vfm run --override '*_finetune' snapshot_epochs=[1,2,5]` (a bundle alone: `--snapshot_epochs [1,2,5]`)"
)
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


def _short(task: str) -> str:
    entry = TASKS.get(task)
    return entry.short if entry is not None else task


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _fms(rows: Sequence[Mapping[str, object]]) -> list[str]:
    return list(dict.fromkeys(str(r["fm"]) for r in rows))


def plot_scratch_vs_finetune(rows: Sequence[Mapping[str, object]], out_dir: Path) -> dict[str, Path]:
    """Paper Fig. 1b: x = P(scratch), y = P(finetune), one point per FM and task, marker area proportional to D2S;
    one panel per metric; each task's trivial baseline B is a star at (B, B) with dotted lines x = B and y = B
    (a point left of or below them is a model that did not beat it)."""
    metrics = list(dict.fromkeys(str(r.get("metric_name", "")) for r in rows)) or [""]
    fig = _figure(4.6 * len(metrics) + 1.8, 4.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    fms = _fms(rows)
    d2s = np.array([_num(r["d2s"]) for r in rows]) if rows else np.array([np.nan])
    d2s_max = np.nanmax(d2s) if np.isfinite(d2s).any() else 1.0
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, metrics, strict=True):
        panel = [r for r in rows if str(r.get("metric_name", "")) == metric]
        panel_tasks = list(dict.fromkeys(str(r["task"]) for r in panel))
        values = []
        for fm in fms:
            pts = [r for r in panel if r["fm"] == fm]
            x = np.array([_num(r["p_scratch"]) for r in pts])
            y = np.array([_num(r["p_finetune"]) for r in pts])
            s = np.array([_num(r["d2s"]) for r in pts])
            size = np.where(np.isfinite(s), 40 + 460 * s / (d2s_max if d2s_max > 0 else 1.0), 40)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                handles[fm] = ax.scatter(x[ok], y[ok], s=size[ok], color=_color(fm, fms), alpha=0.6, edgecolor="k")
            for r, xi, yi, good in zip(pts, x, y, ok, strict=True):
                if good:  # tasks of one metric can sit on one spot (SR and DC near SSIM 0.93): labels stacked by task
                    up = 4 + 9 * panel_tasks.index(str(r["task"]))
                    label = _short(str(r["task"]))
                    ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(6, up), fontsize=8)
            values.extend(np.concatenate([x[ok], y[ok]]).tolist())
        baselines = {str(r["task"]): _num(r.get("p_baseline")) for r in panel}
        for task, b in baselines.items():
            if not math.isfinite(b):
                continue
            ax.axhline(b, color="0.45", lw=0.8, ls=":")
            ax.axvline(b, color="0.45", lw=0.8, ls=":")
            handles["trivial baseline (per task)"] = ax.scatter([b], [b], marker="*", s=160, color="gold",
                                                                 edgecolor="k", zorder=4)  # fmt: skip
            down = -10 - 9 * panel_tasks.index(task)
            ax.annotate(f"{_short(task)} baseline", (b, b), textcoords="offset points", xytext=(6, down), fontsize=7)
            values.append(b)
        if values:
            lo, hi = min(values), max(values)
            pad = 0.08 * (hi - lo or 1.0)
            (handles["finetune = scratch"],) = ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey",
                                                       lw=1, ls="--")  # fmt: skip
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
        else:
            ax.text(0.5, 0.5, "no FM and task with both P", ha="center", va="center", transform=ax.transAxes)
        label = metric or "test metric"
        ax.set_xlabel(f"P(scratch): {label}")
        ax.set_ylabel(f"P(finetune): {label}")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, markerscale=0.6)
    fig.suptitle("Finetune vs scratch per metric (marker area ∝ D2S; star = the task's trivial baseline)")
    return _save(fig, out_dir, "fig1b_scratch_vs_finetune")


def plot_distance_vs_rpg(
    rows: Sequence[Mapping[str, object]], correlations: Sequence[Mapping[str, object]], out_dir: Path
) -> dict[str, Path]:
    """Paper Fig. 2: rows D2R, D2P, D2S; columns RPG vs random, specialised, scratch; a line and r per FM (the rows
    and correlations of one layer per FM, the headline layer)."""
    fig = _figure(14.0, 11.0)
    axes = fig.subplots(3, 3, squeeze=False)
    fms = _fms(rows)
    r_of = {(c["fm"], c["distance"], c["reference"]): _num(c["pearson_r"]) for c in correlations}
    handles: dict[str, Any] = {}
    for i, dist in enumerate(_DIST_LABEL):
        for j, ref in enumerate(_REF_LABEL):
            ax = axes[i][j]
            title = []
            for fm in fms:
                pts = [r for r in rows if r["fm"] == fm]
                x = np.array([_num(r[dist]) for r in pts])
                y = np.array([_num(r[f"rpg_{ref}"]) for r in pts])
                ok = np.isfinite(x) & np.isfinite(y)
                color = _color(fm, fms)
                r = r_of.get((fm, dist, ref), math.nan)
                title.append(f"{fm} r = {r:.2f}" if math.isfinite(r) else f"{fm} r = n/a")
                layer = str(pts[0].get("layer", "")) if pts else ""
                handles[f"{fm} ({layer})" if layer else fm] = ax.scatter(
                    x[ok], y[ok], color=color, edgecolor="k", s=36, zorder=3
                )
                for rr, xi, yi, good in zip(pts, x, y, ok, strict=True):
                    if good:
                        ax.annotate(_short(str(rr["task"])), (xi, yi), textcoords="offset points", xytext=(4, 3),
                                    fontsize=7)  # fmt: skip
                if ok.sum() >= 3 and np.ptp(x[ok]) > 0:  # as for r: no line through fewer than 3 tasks
                    slope, intercept = np.polyfit(x[ok], y[ok], 1)
                    xs = np.linspace(x[ok].min(), x[ok].max(), 20)
                    ax.plot(xs, slope * xs + intercept, color=color, lw=1.2)
            ax.axhline(0.0, color="grey", lw=0.8, ls=":")
            ax.margins(0.15)  # room for the task labels
            ax.grid(alpha=0.3)
            ax.set_title("; ".join(title), fontsize=8)
            ax.set_xlabel(_DIST_LABEL[dist], fontsize=8)
            ax.set_ylabel(_REF_LABEL[ref], fontsize=8)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles), fontsize=8,
                   title="FM (headline layer)")  # fmt: skip
    tasks = ", ".join(f"{t.short} {t.title}" for t in TASKS.values())
    fig.suptitle(f"Alignment distance vs relative performance gain, per FM across tasks (Pearson r)\n{tasks}")
    return _save(fig, out_dir, "fig2_distance_vs_rpg")


def plot_curves(curves: Curves, out_dir: Path, metric_names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Paper Fig. 3: per task, training loss (top) and validation metric (bottom, named from ``metric_names`` by task)
    per epoch; solid finetune, dashed scratch, one colour per FM."""
    from matplotlib.ticker import MaxNLocator

    tasks = sorted({k[1] for k in curves})
    fms = list(dict.fromkeys(k[0] for k in sorted(curves)))
    ncol = max(len(tasks), 1)
    fig = _figure(max(3.6 * ncol, 5.0), 6.0)
    axes = fig.subplots(2, ncol, squeeze=False)
    handles: dict[str, Any] = {}
    for j, task in enumerate(tasks):
        for i, metric in enumerate(("train_loss", "val_metric")):
            ax = axes[i][j]
            for (fm, t, regime), series in sorted(curves.items()):
                if t != task or metric not in series or not series[metric][0]:
                    continue
                steps, values = series[metric]
                (handles[f"{fm} {regime}"],) = ax.plot(steps, values, color=_color(fm, fms), marker="o", ms=2.5,
                                                       ls="-" if regime == "finetune" else "--")  # fmt: skip
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            name = (metric_names or {}).get(task, "") or "metric"
            ax.set_ylabel("training loss" if metric == "train_loss" else f"validation {name}")
            if i == 0:
                ax.set_title(task.replace("_", " "))
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 6),
                   fontsize=8)  # fmt: skip
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
            _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        else:
            ax.text(0.5, 0.5, "no epoch snapshots logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("D2P trajectory during fine-tuning")
    return _save(fig, out_dir, "d2p_trajectory")


def make_all(result: Any, out_dir: Path) -> dict[str, Path]:
    """Draw every figure of an :class:`~common.analysis.analyze.AnalysisResult` into ``out_dir``; returns the paths."""
    files: dict[str, Path] = {}
    files.update(plot_scratch_vs_finetune(result.headline, out_dir))
    files.update(plot_distance_vs_rpg(result.headline, result.headline_correlations, out_dir))
    names = {str(r["task"]): str(r.get("metric_name", "")) for r in result.headline}
    files.update(plot_curves(result.curves, out_dir, names))
    files.update(plot_d2p_trajectories(result.trajectory, out_dir))
    return files


def empty_figures(result: Any) -> dict[str, str]:
    """Figure stem -> why it shows nothing and what fills it, for every figure of :func:`make_all` that is empty."""
    rows = result.headline
    out: dict[str, str] = {}
    if not any(math.isfinite(_num(r["p_scratch"])) and math.isfinite(_num(r["p_finetune"])) for r in rows):
        out["fig1b_scratch_vs_finetune"] = (
            "no FM and task has both a finetune and a scratch test_metric; run the scratch bundles "
            "(./vfm run --only '*_scratch')"
        )
    if not any(
        math.isfinite(_num(r[d])) and math.isfinite(_num(r[f"rpg_{ref}"])) for r in rows for d in _DIST_LABEL
        for ref in _REF_LABEL
    ):  # fmt: skip
        out["fig2_distance_vs_rpg"] = "no FM and task has both a distance and an RPG (see the headline table's '-')"
    if not any(series.get(m, ((), ()))[0] for series in result.curves.values() for m in ("train_loss", "val_metric")):
        out["fig3_curves"] = "no finetune or scratch run logged train_loss or val_metric per epoch"
    if not result.trajectory:
        out["d2p_trajectory"] = (
            "no finetune run logged epoch snapshots on its headline layer (the bundles' snapshot_epochs is [] by "
            f"default); fill it with {SNAPSHOT_EPOCHS_OPTION}"
        )
    return out
