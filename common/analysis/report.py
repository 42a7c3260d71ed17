"""``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG) of a study analysis.

The report is what a person reads first: how to read it (P, the distances and RPG defined, a glossary), the headline
table (P beside its trivial baseline, D2R/D2P/D2S and RPG per FM and task on the headline layer), the runs that did
not beat their trivial baseline, the layers and their warnings, the correlations and their sensitivity to the layer,
the cost, the figures, the selected and excluded runs, and everything that could not be computed: every ``-`` in the
tables and every empty figure, with the reason and the option that fills it. Each table has one data-driven sentence
under it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.alignment.gain import NEAR_ZERO_REFERENCE
from common.analysis.figures import empty_figures
from common.analysis.tables import MIN_TASKS
from common.contract import LAYER_KINDS, METRIC_TEST_DICE_ON
from common.tasks import TASKS

__all__ = ["MARK", "Table", "format_value", "write_report"]

#: appended to a P or RPG that involves a run that did not beat its trivial baseline
MARK = " †"

_HEADLINE = ("fm", "task", "layer", "metric_name", "baseline_name", "p_baseline", "p_finetune", "p_random",
             "p_specialised", "p_scratch", "d2r", "d2p", "d2s", "rpg_random", "rpg_specialised", "rpg_scratch",
             "cka_d2r", "cka_d2p", "cka_d2s", "n_seeds")  # fmt: skip
_BELOW = ("model", "task", "regime", "seed", "test_metric", "baseline_metric", "baseline_name", "run_id")
_LAYERS = ("fm", "task", "layer", "headline", "layer_kind", "dim", "identical")
_CORRELATION = ("fm", "layer", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "ci_low", "ci_high",
                "n_tasks", "warning")  # fmt: skip
_SENSITIVITY = ("fm", "layer", "kinds", "distance", "reference", "pearson_r", "pearson_p", "spearman_rho", "n_tasks",
                "warning")  # fmt: skip
_COST = ("fm", "task", "gpu_hours_finetune", "gpu_hours_scratch", "ratio", "wall_seconds_finetune",
         "wall_seconds_scratch", "wall_ratio", "epochs_to_95_finetune", "epochs_to_95_scratch")  # fmt: skip
_SELECTED = ("run_id", "run_name", "model", "task", "regime", "seed", "test_metric", "baseline_metric",
             "baseline_name", "beats_baseline", "profile", "bundle_version", "git_commit")  # fmt: skip
_SEGMENTATION_SECONDARY = ("test_dice_all", *METRIC_TEST_DICE_ON.values(), "test_fp_volume_ml")
_SECONDARY = ("model", "task", "regime", "seed", "test_auc", *_SEGMENTATION_SECONDARY)
_EXCLUDED = ("run_id", "run_name", "model", "task", "regime", "seed", "status", "reason")
_FIGURES = (
    ("fig1b_scratch_vs_finetune", "Finetune vs scratch per metric, marker area by D2S, star = trivial baseline "
     "(paper Fig. 1b)"),
    ("fig2_distance_vs_rpg", "Distances vs RPG on the headline layer, least-squares lines and Pearson r per FM "
     "(paper Fig. 2)"),
    ("fig3_curves", "Training loss and validation metric, finetune vs scratch (paper Fig. 3)"),
    ("d2p_trajectory", "D2P over the finetune runs' epoch snapshots"),
)  # fmt: skip

_GLOSSARY = (
    ("fm, task, layer", "the foundation model, the downstream task, the recorded layer the distances use"),
    ("metric_name", "the task's test metric P"),
    ("baseline_name, p_baseline", "the task's strongest trivial baseline and its P on the same test images"),
    (
        "p_finetune, p_random, p_specialised, p_scratch",
        "P of the FM finetune, the same network with random weights (finetune protocol), the specialised task model, "
        "the same network trained from scratch",
    ),  # fmt: skip
    (
        "d2r, d2p, d2s",
        "squared MMD of the finetune features to the random-weight, pretrained (step 0), scratch features",
    ),  # fmt: skip
    ("rpg_random, rpg_specialised, rpg_scratch", "RPG of finetune over that reference, in percent"),
    (
        "cka_d2r, cka_d2p, cka_d2s",
        "1 - linear CKA of the same pairs (0 = the same representation up to rotation and scale), on the raw features",
    ),  # fmt: skip
    ("layer_kind, dim", "what sort of layer it is in this network, and its feature dimension"),
    ("identical", "distances whose two snapshots are one representation: the layer did not train"),
    ("pearson_r, pearson_p, spearman_rho", "correlation across tasks of one distance with one RPG, per FM"),
    ("ci_low, ci_high", "percentile bootstrap interval of r (test images and seeds resampled)"),
    ("n_tasks, n_seeds", "tasks in a correlation; seeds averaged in a row"),
    ("warning", "why a correlation should not be trusted: too few tasks, mixed layer kinds, a distance that is 0"),
    ("ratio", "GPU-hours finetune / scratch (paper Table 1)"),
    ("wall_ratio", "wall seconds finetune / scratch (on CPU, where the runs log 0 GPU-hours)"),
    ("epochs_to_95_*", "first epoch whose validation metric reaches 95 % of its final value (paper Fig. 3)"),
    (
        "test_dice_adc, test_dice_dwi",
        "segmentation P over the test cases given ADC, and given high-b DWI (the input draws one of the two per case)",
    ),  # fmt: skip
)
_DEFAULT_WHY = {
    "test_metric": "the run logged no test_metric",
    "baseline_metric": "the run logged no baseline_metric (a bundle from before the trivial baselines)",
    "test_auc": "the classification run logged no test_auc",
    "test_dice_all": "the segmentation run logged no test_dice_all",
    "test_fp_volume_ml": "the segmentation run logged no test_fp_volume_ml",
    **{
        key: f"the segmentation run logged no {key} (no test case with a lesion was given {name.upper()}, or a bundle "
        "from before the per-map Dice)"
        for name, key in METRIC_TEST_DICE_ON.items()
    },
}


def format_value(value: object) -> str:
    """Numbers to 4 significant digits (``nan`` shown as ``-``), everything else as ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    """One report table: its rows (dicts, a row's ``_why`` maps a column to why it is NaN), the columns shown,
    the columns that name a row in "What could not be computed", a sentence, and the columns marked with
    :data:`MARK` per row."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, object]]
    label: Sequence[str] = ("fm", "task")
    sentence: str = ""
    marks: Sequence[set[str]] = field(default_factory=list)

    @property
    def short(self) -> str:
        """The title up to its first colon or parenthesis."""
        return re.split(r" \(|:", self.title)[0]

    def cells(self) -> list[list[str]]:
        out = []
        for k, row in enumerate(self.rows):
            marked = self.marks[k] if k < len(self.marks) else set()
            out.append([format_value(row.get(c, "")) + (MARK if c in marked else "") for c in self.columns])
        return out

    def dashes(self) -> list[tuple[str, str, str]]:
        """``(column, row label, reason)`` of every ``-`` cell."""
        out = []
        for row, cells in zip(self.rows, self.cells(), strict=True):
            why = row.get("_why") or {}
            for col, cell in zip(self.columns, cells, strict=True):
                if cell.startswith("-") and cell.rstrip(MARK) == "-":
                    reason = why.get(col) if isinstance(why, Mapping) else None  # type: ignore[union-attr]
                    reason = reason or _DEFAULT_WHY.get(col, "not computed (see the problems below)")
                    out.append((col, "/".join(str(row.get(c, "")) for c in self.label), str(reason)))
        return out


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _beats(a: float, b: float, task: str) -> bool:
    entry = TASKS.get(task)
    return a > b if entry is None or entry.higher_is_better else a < b


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _headline_sentence(rows: Sequence[Mapping[str, object]]) -> str:
    parts = []
    for fm in dict.fromkeys(str(r["fm"]) for r in rows):
        fm_rows = [r for r in rows if r["fm"] == fm]
        beats = []
        for ref in ("scratch", "random", "specialised", "baseline"):
            pairs = [(_num(r["p_finetune"]), _num(r[f"p_{ref}"]), str(r["task"])) for r in fm_rows]
            pairs = [p for p in pairs if math.isfinite(p[0]) and math.isfinite(p[1])]
            if pairs:
                wins = sum(_beats(a, b, t) for a, b, t in pairs)
                name = {"random": "its random-weight network", "specialised": "the specialised model",
                        "baseline": "the trivial baseline"}.get(ref, ref)  # fmt: skip
                beats.append(f"{name} on {wins} of {_count(len(pairs), 'task')}")
        if beats:
            parts.append(f"{fm} finetune beats " + ", ".join(beats) + ".")
    return " ".join(parts) or "No FM has a finetune P beside another P."


def _below_sentence(result: Any) -> str:
    counts = result.baseline_counts
    n, with_b, beat = counts.get("runs", 0), counts.get("with_baseline", 0), counts.get("beat_baseline", 0)
    text = f"{beat} of {_count(with_b, 'run')} with a logged trivial baseline beat it"
    if with_b < n:
        text += f"; {n - with_b} of the {n} selected runs logged no baseline_metric and are not judged"
    if with_b and beat == with_b:
        text += ". Every judged run learned more than its trivial baseline"
    return text + "."


def _secondary_sentence(rows: Sequence[Mapping[str, object]]) -> str:
    """How many segmentation runs found lesions on the cases of only one diffusion map (Dice 0 on the other's)."""
    keys = tuple(METRIC_TEST_DICE_ON.values())
    both = [r for r in rows if all(math.isfinite(_num(r.get(k))) for k in keys)]
    if not both:
        return ""
    one = [r for r in both if len({_num(r[k]) > 0 for k in keys}) > 1]
    return (f"{len(one)} of {_count(len(both), 'segmentation run')} with Dice per diffusion map found lesions on the "
            "cases given one map only (Dice 0 on the other's): such a model read one of the two maps.")  # fmt: skip


def _correlation_sentence(rows: Sequence[Mapping[str, object]]) -> str:
    """How many headline correlations are significant, how many of those have a bootstrap interval clear of 0 and no
    warning (fewer than five tasks, mixed layer kinds, a distance that is 0), and how many rest on fewer than five tasks
    or mix layer kinds."""
    finite = [r for r in rows if math.isfinite(_num(r["pearson_r"]))]
    if not finite:
        return "No headline correlation could be computed."
    significant = [r for r in finite if _num(r["pearson_p"]) < 0.05]
    ci_clear = [r for r in significant if _num(r["ci_low"]) > 0 or _num(r["ci_high"]) < 0]
    few = [r for r in finite if int(_num(r["n_tasks"])) < MIN_TASKS]
    mixed = [r for r in finite if "mixes layer kinds" in str(r.get("warning", ""))]
    unflagged = [r for r in ci_clear if not str(r.get("warning") or "").strip()]
    text = (f"{len(significant)} of {_count(len(finite), 'computed correlation')} have p < 0.05, {len(ci_clear)} of "
            f"them with a bootstrap interval that excludes 0")  # fmt: skip
    if ci_clear:
        text += f" and {len(unflagged)} of those with no warning (the only ones to read as a finding)"
    if few:
        text += f"; {len(few)} rest on fewer than {MIN_TASKS} tasks"
    if mixed:
        text += f"; {len(mixed)} mix layers of different kinds"
    return text + "."


def _sensitivity_sentence(rows: Sequence[Mapping[str, object]]) -> str:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        r_value = _num(r["pearson_r"])
        if math.isfinite(r_value):
            groups.setdefault((str(r["fm"]), str(r["distance"]), str(r["reference"])), []).append(r_value)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if not multi:
        return "No correlation is computed on more than one layer, so its sensitivity to the layer is unknown."
    flips = [k for k, v in multi.items() if min(v) < 0 < max(v)]
    example = ""
    if flips:
        fm, dist, ref = flips[0]
        example = f" (e.g. {fm} {dist} vs RPG({ref}): r from {min(multi[flips[0]]):.2f} to {max(multi[flips[0]]):.2f})"
    return (f"The sign of r changes with the layer for {len(flips)} of {_count(len(multi), 'correlation')} computed "
            f"on several layers{example}.")  # fmt: skip


def _cost_sentence(rows: Sequence[Mapping[str, object]]) -> str:
    def finite(column: str) -> list[float]:
        return [x for x in (_num(r.get(column)) for r in rows) if math.isfinite(x)]

    def share(ratios: list[float], what: str) -> str:
        pairs = _count(len(ratios), "FM-task pair")
        median = statistics.median(ratios)
        return f"needs {what} than scratch on {sum(x < 1 for x in ratios)} of {pairs} (median ratio {median:.3g})"

    if gpu := finite("ratio"):
        return f"Finetune {share(gpu, 'fewer GPU-hours')}."
    if wall := finite("wall_ratio"):
        lead = "No FM and task has GPU-hours of both finetune and scratch (a CPU study); on wall time, finetune"
        return f"{lead} {share(wall, 'less time')}."
    return "No FM and task has GPU-hours or wall seconds of both finetune and scratch."


def _layer_sentence(result: Any, option: object) -> str:
    if not result.headline_layers:
        return "No FM has a row."
    chosen = "; ".join(f"{fm} `{layer}`" for fm, layer in result.headline_layers.items())
    return f"Headline layer per FM: {chosen} (option layer = {option}). {_count(len(result.warnings), 'warning')}:"


def _tables(result: Any, selection: Any, option: object) -> tuple[list[Table], list[Table]]:
    headline = result.headline
    marks = []
    for r in headline:
        below = str(r.get("below_baseline", "")).split()
        marks.append(set(str(r.get("rpg_below_baseline", "")).split()) | {f"p_{g}" for g in below})
    layers = sorted(result.alignment, key=lambda r: (str(r["fm"]), str(r["task"]), not r.get("headline")))
    selected = selection.rows()
    secondary = []
    for r in selected:
        entry = TASKS.get(str(r["task"]))
        if entry is None:
            continue
        if entry.classification:
            secondary.append({**r, **dict.fromkeys(_SEGMENTATION_SECONDARY, "")})
        elif entry.metric == "dice":
            secondary.append({**r, "test_auc": ""})
    head = [
        Table("Headline: P beside its trivial baseline, distances and RPG", _HEADLINE, headline,
              sentence=_headline_sentence(headline), marks=marks),
        Table("Runs that did not beat the trivial baseline", _BELOW, result.below_baseline,
              label=("model", "task", "regime", "seed"), sentence=_below_sentence(result)),
        Table("Layers: every recorded layer per FM and task (headline layer first)", _LAYERS, layers,
              label=("fm", "task", "layer"), sentence=_layer_sentence(result, option)),
        Table("Correlations across tasks (headline layer)", _CORRELATION, result.headline_correlations,
              label=("fm", "layer", "distance", "reference"),
              sentence=_correlation_sentence(result.headline_correlations)),
        Table("Sensitivity: every correlation on every layer", _SENSITIVITY, result.correlations,
              label=("fm", "layer", "distance", "reference"), sentence=_sensitivity_sentence(result.correlations)),
        Table("Cost and convergence (paper Table 1)", _COST, result.cost, sentence=_cost_sentence(result.cost)),
    ]  # fmt: skip
    tail = [
        Table("Selected runs", _SELECTED, selected, label=("model", "task", "regime", "seed"),
              sentence=f"{_count(len(selected), 'run')} selected; {len(selection.excluded)} left out (next table)."),
        Table("Secondary test metrics (classification AUC; segmentation Dice with the all-empty convention, Dice on "
              "the lesion cases given ADC and given DWI, false-positive volume on lesion-free cases)", _SECONDARY,
              secondary, label=("model", "task", "regime", "seed"), sentence=_secondary_sentence(secondary)),
        Table("Missing or excluded runs", _EXCLUDED, [vars(e) for e in selection.excluded],
              label=("run_id",), sentence=f"{_count(len(selection.excluded), 'run')} not used, each with its reason."),
    ]  # fmt: skip
    return head, tail


def _how_to_read(result: Any) -> list[str]:
    return [
        "**P** is a run's test metric (`test_metric`) on the task's test split: specificity at sensitivity 0.9 "
        "(classification), Dice on lesion cases (segmentation), SSIM (image-to-image tasks); higher is better for "
        "all five. Each P is shown beside **the task's trivial baseline** (`p_baseline`: the strongest of e.g. the "
        "empty mask, trilinear upsampling, the uncorrected input, the mean training DWI, a constant score), computed "
        "on the same test images with the same metric code. A model that does not beat it has not learned the task; "
        f"such a P and every RPG involving it carry the mark `{MARK.strip()}`.",
        "**D2R, D2P, D2S** (paper Eq. 1) are squared maximum mean discrepancies between the finetune model's "
        "features Φ_ft and those of the random-weight network (D2R), the pretrained FM before the first step (D2P) "
        "and the scratch model (D2S), on the same test images: MMD² = mean k(x, x') + mean k(y, y') - 2 mean k(x, y) "
        "with the Gaussian kernel k(u, v) = exp(-||u - v||² / σ²), features global-average-pooled and L2-normalised "
        "per image, so MMD² lies in [0, 2]; 0 means the two sets of features are identical in distribution. Each "
        "distance is computed on every recorded layer; the tables show the headline layer.",
        "**RPG** (paper Eq. 2) = (P(finetune) - P(ref)) / P(ref) × 100 %, with ref the random-weight network, the "
        "specialised model or scratch. Positive: finetune is better. It is not computed when P(ref) is at or near "
        f"zero (< {NEAR_ZERO_REFERENCE:g}), where it would be a ratio of noise.",
        f"**Correlations** are Pearson r across the tasks of one FM, with its p-value, Spearman ρ and a percentile "
        f"bootstrap interval (test images resampled per task, seeds resampled too when there are several). With "
        f"fewer than {MIN_TASKS} tasks, or layers of different kinds across tasks, a correlation is flagged.",
        "**`-`** marks a value that could not be computed; every one is listed with its reason under "
        '"What could not be computed".',
    ]


def _layer_kinds_text(result: Any) -> list[str]:
    used = sorted({str(r.get("layer_kind", "")) for r in result.alignment} - {""})
    return [f"`{k}`: {LAYER_KINDS.get(k, 'not in the contract')}" for k in used]


def _dash_lines(tables: Sequence[Table]) -> list[str]:
    """One line per table, reason and set of columns, naming every row with a ``-`` there."""
    lines = []
    for table in tables:
        by_row: dict[tuple[str, str], list[str]] = {}
        for col, label, reason in table.dashes():
            by_row.setdefault((label, reason), []).append(col)
        grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for (label, reason), cols in by_row.items():
            grouped.setdefault((reason, tuple(cols)), []).append(label)
        for (reason, cols), labels in grouped.items():
            names = ", ".join(f"`{c}`" for c in cols)
            lines.append(f"{table.short}: {names} for {', '.join(labels)}: {reason}")
    return lines


def _inline_html(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _md_table(table: Table, run_link: Callable[[str], str] | None = None) -> str:
    rows = _linked(table, run_link, lambda text, href: f"[{text}]({href})")
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _linked(table: Table, run_link: Callable[[str], str] | None, fmt: Callable[[str, str], str]) -> list[list[str]]:
    """The table's cells, each ``run_id`` made a link to the run's page in the MLflow UI when ``run_link`` is given
    (``fmt(text, href)`` writes the link)."""
    rows = table.cells()
    if run_link is None or "run_id" not in table.columns:
        return rows
    k = table.columns.index("run_id")
    return [[fmt(c, run_link(c)) if i == k and c else c for i, c in enumerate(row)] for row in rows]


def _html_table(table: Table, run_link: Callable[[str], str] | None = None) -> str:
    marker = "\x00"  # a link survives html.escape of the cell as a marked pair, replaced by the anchor after
    rows = _linked(table, run_link, lambda text, href: f"{marker}{href}{marker}{text}{marker}")
    if not rows:
        return "<p><em>none</em></p>"

    def cell(c: str) -> str:
        if c.count(marker) == 3:
            _, href, text, _ = c.split(marker)
            return f"<a href='{html.escape(href)}'>{html.escape(text)}</a>"
        return html.escape(c)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def write_report(
    out_dir: Path,
    study: str,
    experiment: str,
    tracking_uri: str,
    profiles: Sequence[str],
    settings: Mapping[str, object],
    result: Any,
    selection: Any,
    run_link: Callable[[str], str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (figures must already be there as PNG).

    Args:
        out_dir: the analysis output folder.
        study, experiment, tracking_uri: where the runs came from.
        profiles: the ``profile`` tags of the selected runs (a note is added for ``smoke``).
        settings: the analysis options (snapshot, layer, bootstrap size, ...).
        result: the :class:`~common.analysis.analyze.AnalysisResult`.
        selection: the :class:`~common.analysis.runs.Selection` (selected and excluded runs).
        run_link: run id -> its page in the MLflow UI; every ``run_id`` cell becomes a link when given.

    Returns:
        ``(report.md, report.html)`` paths.
    """
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = [
        f"Study `{study}`, experiment `{experiment}`, tracking URI `{tracking_uri}`; generated {when}.",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()) + ".",
    ]
    if "smoke" in profiles:
        notes.insert(0, "**Smoke profile: small-data numbers from a few CPU minutes; they test the pipeline, "
                     "not the paper's claims.**")  # fmt: skip
    head, tail = _tables(result, selection, settings.get("layer", "auto"))
    empty = empty_figures(result)
    figures = [(stem, caption) for stem, caption in _FIGURES if (out_dir / f"{stem}.png").is_file()]
    dashes = _dash_lines(head + tail)
    problems = list(dict.fromkeys(result.problems))
    warnings = list(dict.fromkeys(result.warnings))
    glossary = Table("Glossary of columns", ("column", "meaning"), [{"column": c, "meaning": m} for c, m in _GLOSSARY])
    kinds = _layer_kinds_text(result)

    md = [f"# Transfer-limits analysis: {study}\n"] + [f"{n}\n" for n in notes]
    md += ["## How to read this report\n"] + [f"{p}\n" for p in _how_to_read(result)]
    md += ["### Glossary of columns\n", _md_table(glossary, run_link)]
    if kinds:
        md += ["### Layer kinds in this study\n", "\n".join(f"- {k}" for k in kinds) + "\n"]
    for table in head:
        md += [f"## {table.title}\n", _md_table(table, run_link)]
        if table.sentence:
            md.append(f"{table.sentence}\n")
        if table.title.startswith("Layers"):
            md += ["### Layer warnings\n", "\n".join(f"- {w}" for w in warnings) + "\n" if warnings else "_none_\n"]
    md.append("## Figures\n")
    md += [f"![{caption}]({stem}.png)\n\n{caption} ([SVG]({stem}.svg))"
           + (f" — **empty**: {empty[stem]}" if stem in empty else "") + "\n" for stem, caption in figures]  # fmt: skip
    for table in tail:
        md += [f"## {table.title}\n", _md_table(table, run_link)]
        if table.sentence:
            md.append(f"{table.sentence}\n")
    md.append("## What could not be computed\n")
    sections = (
        ("Every `-` in the tables above", dashes),
        ("Empty figures", [f"`{stem}`: {why}" for stem, why in empty.items()]),
        ("Other problems", problems),
    )
    for title, items in sections:
        md.append(f"### {title}\n")
        md.append("\n".join(f"- {i}" for i in items) + "\n" if items else "_nothing_\n")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        ".scroll{overflow-x:auto;margin-bottom:0.5em}"
        "table{border-collapse:collapse;font-size:0.85em}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}th{background:#eee}"
        "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #ddd}"
        ".note{background:#fff4d6;padding:0.5em}.warn{background:#fde2e2;padding:0.2em 0.5em}"
    )
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Analysis {html.escape(study)}</title>"
         f"<style>{style}</style></head><body><h1>Transfer-limits analysis: {html.escape(study)}</h1>"]  # fmt: skip
    for n in notes:
        h.append(f"<p class='note'>{_inline_html(n)}</p>" if n.startswith("**") else f"<p>{_inline_html(n)}</p>")
    h.append("<h2>How to read this report</h2>" + "".join(f"<p>{_inline_html(p)}</p>" for p in _how_to_read(result)))
    h.append(f"<h3>Glossary of columns</h3>{_html_table(glossary, run_link)}")
    if kinds:
        h.append("<h3>Layer kinds in this study</h3><ul>" + "".join(f"<li>{_inline_html(k)}</li>" for k in kinds)
                 + "</ul>")  # fmt: skip
    for table in head:
        h.append(f"<h2>{html.escape(table.title)}</h2>{_html_table(table, run_link)}")
        if table.sentence:
            h.append(f"<p>{_inline_html(table.sentence)}</p>")
        if table.title.startswith("Layers"):
            h.append("<h3>Layer warnings</h3>")
            h.append("<ul>" + "".join(f"<li class='warn'>{_inline_html(w)}</li>" for w in warnings) + "</ul>"
                     if warnings else "<p>none</p>")  # fmt: skip
    h.append("<h2>Figures</h2>")
    for stem, caption in figures:
        data = base64.b64encode((out_dir / f"{stem}.png").read_bytes()).decode("ascii")
        note = f" — <b>empty</b>: {_inline_html(empty[stem])}" if stem in empty else ""
        h.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(caption)}{note}</figcaption></figure>")  # fmt: skip
    for table in tail:
        h.append(f"<h2>{html.escape(table.title)}</h2>{_html_table(table, run_link)}")
        if table.sentence:
            h.append(f"<p>{_inline_html(table.sentence)}</p>")
    h.append("<h2>What could not be computed</h2>")
    for title, items in sections:
        h.append(f"<h3>{_inline_html(title)}</h3>")
        h.append(
            "<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul>" if items else "<p>nothing</p>"
        )
    h.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("".join(h))
    return md_path, html_path
