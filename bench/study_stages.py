"""Time the stages of a study run by the study runner (``python -m tools.study``, README "The study"): cohort,
pretraining, downstream (finetune and scratch), random-weight, specialised and analysis.

The runner records every run's wall seconds, status and start / end offsets in ``<study_dir>/study_timing.json``;
this script runs a fresh study (or reads the record of one already run) and tabulates it per stage:

- ``runs``: how many runs the stage has; ``failed``: how many failed or did not start;
- ``run-seconds``: the runs' summed wall seconds (what the stage costs on one worker);
- ``span``: from the first start to the last end of the stage's runs (stages overlap when runs are parallel);
- ``mean``: seconds per run.

Usage (from the repository root)::

    python bench/study_stages.py                      # a fresh smoke study in results/bench/study-smoke-<time>
    python bench/study_stages.py --timing results/study-smoke/study_timing.json   # tabulate a study already run
    python bench/study_stages.py -- --only '*_pretrain' --override '*' epochs=1   # runner options after --

With the study's analysis there, its headline table (``analysis/alignment.csv``, P beside the trivial baseline) is
printed and kept too. Writes ``bench/results/study_stages_<profile>_<machine>.json`` (``--machine``; default the
GPU's name, else ``cpu<cores>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

from tools.study import cpu_count, memory_gb  # noqa: E402

#: runner stage -> the table's stage (finetune and scratch are the twenty downstream bundles)
STAGES = {"pretrain": "pretraining", "finetune": "downstream", "scratch": "downstream", "random": "random-weight",
          "specialised": "specialised", "analysis": "analysis"}  # fmt: skip
ORDER = ("cohort", "pretraining", "downstream", "random-weight", "specialised", "analysis")


def stage_table(timing: dict) -> list[dict]:
    """One row per stage from a ``study_timing.json`` record (runs skipped as already done are left out)."""
    rows = [{"stage": "cohort", "runs": 0, "failed": 0, "run_seconds": timing.get("cohort_seconds", 0.0),
             "span_seconds": timing.get("cohort_seconds", 0.0), "mean_seconds": None}]  # fmt: skip
    for stage in ORDER[1:]:
        runs = [r for r in timing["runs"] if STAGES.get(r["stage"]) == stage and r["status"] != "done"]
        if not runs:
            continue
        ran = [r for r in runs if r.get("start_s") is not None and r.get("end_s") is not None]
        finished = [r for r in runs if r["status"] == "finished"]
        span = max(r["end_s"] for r in ran) - min(r["start_s"] for r in ran) if ran else 0.0
        rows.append({
            "stage": stage, "runs": len(runs), "failed": len(runs) - len(finished),
            "run_seconds": round(sum(r["seconds"] for r in runs), 1), "span_seconds": round(span, 1),
            "mean_seconds": round(sum(r["seconds"] for r in finished) / len(finished), 1) if finished else None,
        })  # fmt: skip
    return rows


def format_table(rows: list[dict], total: float) -> str:
    lines = ["| stage | runs | failed | run-seconds | span (s) | mean per run (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mean = "" if r["mean_seconds"] is None else f"{r['mean_seconds']:.0f}"
        runs = "" if r["stage"] == "cohort" else str(r["runs"])
        failed = "" if r["stage"] == "cohort" else str(r["failed"])
        lines.append(
            f"| {r['stage']} | {runs} | {failed} | {r['run_seconds']:.0f} | {r['span_seconds']:.0f} | {mean} |"
        )
    lines.append(f"| **whole study (wall)** | | | | {total:.0f} | |")
    return "\n".join(lines)


#: the columns of the report's headline table that the benchmark keeps (``tools/docs/README.md``, alignment.csv)
HEADLINE_COLUMNS = (
    "fm",
    "task",
    "layer",
    "baseline_name",
    "p_baseline",
    "p_finetune",
    "p_random",
    "p_specialised",
    "p_scratch",
    "below_baseline",
    "d2r",
    "d2p",
    "d2s",
    "rpg_random",
    "rpg_specialised",
    "rpg_scratch",
)


def headline_rows(path: Path) -> list[dict]:
    """The headline-layer rows of the analysis's ``alignment.csv`` (empty when the study has no analysis)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("headline", "True") in ("True", "true", "1")]
    return [{c: r.get(c, "") for c in HEADLINE_COLUMNS} for r in rows]


def _cell(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def format_headline(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADLINE_COLUMNS) + " |", "|" + "---|" * len(HEADLINE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(str(r[c])) for c in HEADLINE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def machine_info(timing: dict) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    recorded = timing.get("machine", {})
    return {"cpu": cpu, "cores": recorded.get("cores", cpu_count()), "memory_available_gb": recorded.get("memory_gb",
            round(memory_gb(), 1)), "gpus": recorded.get("gpu_names", []), "torch": torch.__version__,
            "python": platform.python_version(), "jobs": timing.get("jobs"),
            "threads_per_run": timing.get("threads_per_run")}  # fmt: skip


def machine_slug(info: dict) -> str:
    """``cpu<cores>`` or a short name of the first GPU (``h100``, ``a100``...)."""
    if info["gpus"]:
        name = info["gpus"][0]
        found = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name)
        return (found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()
    return f"cpu{info['cores']}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    runner_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python bench/study_stages.py")
    p.add_argument("--profile", default="smoke", help="the study's profile (default smoke)")
    p.add_argument("--study_dir", help="folder of the fresh study (default results/bench/study-<profile>-<time>)")
    p.add_argument("--timing", help="tabulate this study_timing.json instead of running a study")
    p.add_argument("--machine", help="name in the results file (default: GPU name or cpu<cores>)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder (default bench/results)")
    args = p.parse_args(own)

    code = 0
    if args.timing:
        timing_path = Path(args.timing)
        command = ["(read from)", str(timing_path)]
        timing = json.loads(timing_path.read_text())
        total = timing["wall_seconds"]
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        study_dir = Path(args.study_dir or REPO / "results" / "bench" / f"study-{args.profile}-{stamp}").resolve()
        if (study_dir / "study_timing.json").exists():
            print(f"{study_dir} already holds a study: give a new --study_dir, or --timing to read it", file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "tools.study", "--profile", args.profile, "--study_dir", str(study_dir),
                   *runner_args]  # fmt: skip
        print("$ " + " ".join(command), flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=REPO).returncode
        total = time.perf_counter() - start  # includes the runner's own start-up
        timing_path = study_dir / "study_timing.json"
        if not timing_path.is_file():
            print(f"the runner wrote no {timing_path} (exit {code})", file=sys.stderr)
            return code or 1
        timing = json.loads(timing_path.read_text())

    rows = stage_table(timing)
    info = machine_info(timing)
    name = args.machine or machine_slug(info)
    device = ", ".join(info["gpus"]) if info["gpus"] else f"{info['cores']} CPU cores ({info['cpu']})"
    print(f"\nStudy stages, profile {timing['profile']}, {timing['jobs']} runs at once on {device}:\n")
    print(format_table(rows, total))
    headline = headline_rows(timing_path.parent / "analysis" / "alignment.csv")
    if headline:
        print(f"\nThe report's headline table ({len(headline)} rows, P beside its trivial baseline):\n")
        print(format_headline(headline))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": info, "command": command, "profile": timing["profile"],
              "seeds": timing["seeds"], "total_wall_seconds": round(total, 1), "runner_exit_code": code,
              "stages": rows, "headline": headline, "runs": timing["runs"]}  # fmt: skip
    out = Path(args.out) / f"study_stages_{timing['profile']}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n-> {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
