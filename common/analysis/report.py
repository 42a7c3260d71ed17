"""``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG) of a study analysis.

The report is what a person reads first: the headline table (P, D2R/D2P/D2S, RPG per FM and task), the
correlations, the cost, the figures, the selected runs and everything that was missing or excluded, and why.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_value", "write_report"]

_HEADLINE = ("fm", "task", "metric_name", "p_finetune", "p_random", "p_specialised", "p_scratch", "d2r", "d2p", "d2s",
             "rpg_random", "rpg_specialised", "rpg_scratch", "cka_d2r", "cka_d2p", "cka_d2s", "n_seeds")  # fmt: skip
_CORRELATION = ("fm", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high",
                "n_tasks")  # fmt: skip
_COST = ("fm", "task", "gpu_hours_finetune", "gpu_hours_scratch", "ratio", "wall_seconds_finetune",
         "wall_seconds_scratch", "epochs_to_95_finetune", "epochs_to_95_scratch")  # fmt: skip
_SELECTED = ("run_id", "run_name", "model", "task", "regime", "seed", "profile", "bundle", "bundle_version",
             "git_commit", "test_metric")  # fmt: skip
_EXCLUDED = ("run_id", "run_name", "model", "task", "regime", "seed", "status", "reason")
_FIGURES = (
    ("fig1b_scratch_vs_finetune", "Finetune vs scratch, marker area by D2S (paper Fig. 1b)"),
    ("fig2_distance_vs_rpg", "Distances vs RPG with least-squares lines and Pearson r per FM (paper Fig. 2)"),
    ("fig3_curves", "Training loss and validation metric, finetune vs scratch (paper Fig. 3)"),
    ("d2p_trajectory", "D2P over the finetune runs' epoch snapshots"),
)


def format_value(value: object) -> str:
    """Numbers to 4 significant digits (``nan`` shown as ``-``), everything else as ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _rows(items: Sequence[Mapping[str, object]], columns: Sequence[str]) -> list[list[str]]:
    return [[format_value(item.get(c, "")) for c in columns] for item in items]


def _md_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(columns: Sequence[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    out_dir: Path,
    study: str,
    experiment: str,
    tracking_uri: str,
    profiles: Sequence[str],
    settings: Mapping[str, object],
    result: Any,
    selection: Any,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (figures must already be there as PNG).

    Args:
        out_dir: the analysis output folder.
        study, experiment, tracking_uri: where the runs came from.
        profiles: the ``profile`` tags of the selected runs (a note is added for ``smoke``).
        settings: the analysis options (snapshot, bootstrap size, ...).
        result: the :class:`~common.analysis.analyze.AnalysisResult`.
        selection: the :class:`~common.analysis.runs.Selection` (selected and excluded runs).

    Returns:
        ``(report.md, report.html)`` paths.
    """
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    selected = selection.rows()
    excluded = [vars(e) for e in selection.excluded]
    notes = [
        f"Study `{study}`, experiment `{experiment}`, tracking URI `{tracking_uri}`; generated {when}.",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + ".",
        "D2R = MMD^2(finetune, random-weight FM at step 0), D2P = MMD^2(finetune, its own step 0), D2S = "
        "MMD^2(finetune, scratch) (paper Eq. 1, Gaussian kernel); RPG in percent (paper Eq. 2). cka_* columns are "
        "1 - linear CKA (a distance: 0 = identical representations). Several seeds: seed means (std in alignment.csv).",
        "Correlation CIs: percentile bootstrap of Pearson r over resamples of each task's test images, recomputing "
        "the three distances and the four P's on every resample.",
    ]
    if "smoke" in profiles:
        notes.insert(0, "**Smoke profile: small-data numbers from a few CPU minutes; they test the pipeline, "
                     "not the paper's claims.**")  # fmt: skip
    sections: list[tuple[str, Sequence[str], list[list[str]]]] = [
        ("Alignment and relative performance gain", _HEADLINE, _rows(result.alignment, _HEADLINE)),
        ("Correlations across tasks", _CORRELATION, _rows(result.correlations, _CORRELATION)),
        ("Cost and convergence (paper Table 1)", _COST, _rows(result.cost, _COST)),
    ]
    tail: list[tuple[str, Sequence[str], list[list[str]]]] = [
        ("Selected runs", _SELECTED, _rows(selected, _SELECTED)),
        ("Missing or excluded runs", _EXCLUDED, _rows(excluded, _EXCLUDED)),
    ]
    problems = list(dict.fromkeys(result.problems))
    figures = [(stem, caption) for stem, caption in _FIGURES if (out_dir / f"{stem}.png").is_file()]

    md = [f"# Transfer-limits analysis: {study}\n"] + [f"{n}\n" for n in notes]
    for title, cols, rows in sections:
        md += [f"## {title}\n", _md_table(cols, rows)]
    md.append("## Figures\n")
    md += [f"![{caption}]({stem}.png)\n\n{caption} ([SVG]({stem}.svg))\n" for stem, caption in figures]
    for title, cols, rows in tail:
        md += [f"## {title}\n", _md_table(cols, rows)]
    md.append("## What could not be computed\n")
    md.append("\n".join(f"- {p}" for p in problems) + "\n" if problems else "_nothing_\n")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.85em;margin-bottom:1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
        "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #ddd}"
        ".note{background:#fff4d6;padding:0.5em}"
    )
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Analysis {html.escape(study)}</title>"
         f"<style>{style}</style></head><body><h1>Transfer-limits analysis: {html.escape(study)}</h1>"]  # fmt: skip
    for n in notes:
        text = html.escape(n.replace("**", "").replace("`", ""))
        h.append(f"<p class='note'>{text}</p>" if n.startswith("**") else f"<p>{text}</p>")
    for title, cols, rows in sections:
        h.append(f"<h2>{html.escape(title)}</h2>{_html_table(cols, rows)}")
    h.append("<h2>Figures</h2>")
    for stem, caption in figures:
        data = base64.b64encode((out_dir / f"{stem}.png").read_bytes()).decode("ascii")
        h.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    for title, cols, rows in tail:
        h.append(f"<h2>{html.escape(title)}</h2>{_html_table(cols, rows)}")
    h.append("<h2>What could not be computed</h2>")
    h.append(
        "<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>" if problems else "<p>nothing</p>"
    )
    h.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("".join(h))
    return md_path, html_path
