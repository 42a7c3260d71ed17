"""A cluster: the grid as Slurm job arrays (``--emit slurm``). The job scripts are ``str.format`` templates in
``tools/study/templates/``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .grid import ANALYSIS, REPO, Run, Study
from .store import tracking_setup


def _table(runs: Sequence[Run], tracking_args: Sequence[str]) -> str:
    lines = ["#name\toutput_dir\tconfig_file\tmulti_gpu_config_file\targuments..."]
    for r in runs:
        fields = [r.name, r.output_dir, r.config_file(), r.config_file(True) if r.has_multi_gpu else "-",
                  *tracking_args, *r.overrides()]  # fmt: skip
        for f in fields:
            if not f or any(c in f for c in "\t\n\r"):
                raise ValueError(f"{r.name}: argument {f!r} is empty or holds a tab or newline; Slurm tables need none")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"


def _template(name: str) -> str:
    """A job-script template of ``templates/``."""
    return (Path(__file__).resolve().parent / "templates" / name).read_text()


def emit_slurm(
    runs: Sequence[Run],
    study: Study,
    out_dir: Path,
    tracking_uri: str,
    *,
    gpus: int = 1,
    cpus: int = 8,
    time_limit: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
) -> list[Path]:
    """Write the Slurm job scripts of ``runs`` to ``out_dir`` and return their paths.

    ``pretrain.tsv``, ``runs.tsv`` (no dependency) and ``finetune.tsv`` (needs the pretraining) list one run per
    line: name, output folder, config file, multi-GPU config file (``-`` when the bundle has none) and the bundle's
    arguments. ``study.sbatch`` runs line ``SLURM_ARRAY_TASK_ID`` of the table it is given; ``analysis.sbatch`` runs
    the tools bundle; ``submit.sh`` submits the arrays and the analysis with their dependencies. Every run reports to
    ``tracking_uri`` (a tracking server: ``--tracking mlflow_config/server.json`` and ``MLFLOW_TRACKING_URI``).
    """
    if tracking_uri.startswith("sqlite:"):
        raise ValueError("--emit slurm needs a tracking server that every node reaches (--tracking_uri "
                         "http://HOST:5000; README, 'Tracking server'): SQLite is not safe across nodes")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = [r for r in runs if r.stage == ANALYSIS]
    work = [r for r in runs if r.stage != ANALYSIS]
    names = {r.name for r in work}
    groups = {
        "pretrain": [r for r in work if r.stage == "pretrain"],
        "runs": [r for r in work if r.stage != "pretrain" and not any(d in names for d in r.depends)],
        "finetune": [r for r in work if r.stage != "pretrain" and any(d in names for d in r.depends)],
    }
    tracking_args, _ = tracking_setup(tracking_uri)
    # the analysis reads the URI from the job's environment, so that MLFLOW_TRACKING_URI can redirect it
    analysis_args = [a for r in analysis for k, v in r.args if k != "tracking_uri" for a in (f"--{k}", v)]
    q = shlex.quote
    slurm_logs = study.logs_dir / "slurm"
    extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in (("partition", partition), ("account", account)) if v)
    common = {"job": study.name, "repo": q(str(REPO)), "python": q(sys.executable), "uri": tracking_uri,
              "slurm_logs": slurm_logs, "extra": extra, "report": study.analysis_dir / "report.html"}  # fmt: skip
    if any(c in tracking_uri for c in '"$`\\\n'):
        raise ValueError(f"tracking URI {tracking_uri!r} holds characters a shell script cannot carry safely")
    if any(c.isspace() for c in str(study.study_dir) + str(REPO)):
        raise ValueError("the study folder and the repository path must hold no spaces for #SBATCH lines")
    written = []
    body = ""
    for group, members in groups.items():
        if not members:
            continue
        path = out_dir / f"{group}.tsv"
        path.write_text(_table(members, tracking_args))
        written.append(path)
        dependency = '--dependency=afterok:"$pretrain" ' if group == "finetune" and groups["pretrain"] else ""
        body += (f'{group}="$(submit --array=0-{len(members) - 1} {dependency}"$here/study.sbatch" '
                 f'"$here/{group}.tsv")"\n'
                 f'echo "{group}: job ${group} ({len(members)} runs)"; after+=("${group}")\n')  # fmt: skip
    missing = sorted({d for r in work for d in r.depends if d not in names})
    if missing:
        body = f"# not in this submission, must have finished before: {' '.join(missing)}\n" + body
    scripts = {
        "study.sbatch": _template("study.sbatch").format(gpus=gpus, cpus=cpus, time=time_limit, **common),
        "analysis.sbatch": _template("analysis.sbatch").format(args=shlex.join(analysis_args), **common),
        "submit.sh": _template("submit.sh").format(study=q(study.name), body=body, **common),
    }
    for name, text in scripts.items():
        path = out_dir / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written
