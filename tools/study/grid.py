"""The study grid as data: the runs of a study (pretraining, finetune, random-weight, scratch, specialised, analysis),
derived from the task and FM registries, their selection and overrides."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.foundation_models import fm_ids, get_fm
from common.tasks import get_task, task_ids

REPO = Path(__file__).resolve().parents[2]
#: the grid derives from the two registries (common.foundation_models, common.tasks)
FMS = fm_ids()
TASKS = task_ids()
#: task -> the specialised task model's bundle (DESIGN.md section 2)
SPECIALISED = {task: get_task(task).specialised_bundle for task in TASKS}
ANALYSIS = "analysis"
#: params a finished run must share with the planned run to count as done (when the finished run recorded them)
IDENTITY_PARAMS = ("datalist", "pretrained_ckpt")
#: what a run's outcome can be; "done" = finished before this invocation (skipped)
STATUSES = ("pending", "running", "done", "finished", "failed", "blocked", "interrupted")


# ------------------------------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class Study:
    """What identifies a study on disk and in the store.

    Args:
        profile: ``smoke``, ``demo``, ``gpu`` or ``paper`` (``common/profiles.py``).
        seeds: the seeds every run is repeated with.
        name: the study (MLflow experiment and ``study`` tag). Default ``vfm-study``.
        study_dir: absolute output folder (cohort, runs, logs, analysis, SQLite store).
        datalist: absolute path of the cohort's datalist (the synthetic one under ``study_dir`` or a real one).
        weights: FM -> official pretrained weights; that FM's pretraining runs are left out. Default none.
    """

    profile: str
    seeds: tuple[int, ...]
    study_dir: Path
    datalist: str
    name: str = "vfm-study"
    weights: Mapping[str, str] = field(default_factory=dict)

    @property
    def analysis_dir(self) -> Path:
        return self.study_dir / ANALYSIS

    @property
    def logs_dir(self) -> Path:
        return self.study_dir / "logs"


@dataclass(frozen=True)
class Run:
    """One run of the study grid: a bundle, its overrides and the runs it needs.

    Args:
        name: ``<bundle>/seed<k>``, ``<bundle>/random/seed<k>`` for a random-weight run (the run's folder under
            ``<study_dir>/runs``), or ``analysis``.
        bundle: the bundle's folder under ``bundles/``; ``tools`` for the analysis.
        stage: ``pretrain``, ``finetune``, ``random``, ``scratch``, ``specialised`` or ``analysis``.
        regime: the run's MLflow ``regime`` tag.
        seed: the run's seed; None for the analysis.
        args: the bundle's overrides as ``(key, value)`` pairs, passed as ``--key value``.
        depends: names of the runs that must have finished first. Default none.
        output_dir: the run's output folder. Default ``""`` (the analysis: its ``output_dir`` arg).
        task: the task id of a downstream or specialised run (``common.tasks``); None for pretraining and the
            analysis. The progress line estimates a run's duration from finished runs of its task.
    """

    name: str
    bundle: str
    stage: str
    regime: str
    seed: int | None
    args: tuple[tuple[str, str], ...]
    depends: tuple[str, ...] = ()
    output_dir: str = ""
    task: str | None = None

    @property
    def key(self) -> str:
        """The name without its seed (``profound_pretrain``, ``provicnet_segmentation_finetune/random``)."""
        return re.sub(r"/seed\d+$", "", self.name)

    @property
    def log_name(self) -> str:
        return self.name.replace("/", ".") + ".log"

    def matches(self, pattern: str) -> bool:
        """Whether the glob ``pattern`` matches the run's name or its name without the seed."""
        return fnmatch.fnmatchcase(self.name, pattern) or fnmatch.fnmatchcase(self.key, pattern)

    def config_file(self, multi_gpu: bool = False) -> str:
        """The ``--config_file`` value, repository-relative; with ``multi_gpu`` the list that merges the bundle's
        ``multi_gpu_train.json`` over ``train.json`` (the MONAI model-zoo convention)."""
        if self.stage == ANALYSIS:
            return "tools/configs/analyze.json"
        folder = bundle_folder(self.bundle)
        train = f"{folder}/{self.bundle}/configs/train.json"
        if not multi_gpu:
            return train
        return f"['{train}','{folder}/{self.bundle}/configs/multi_gpu_train.json']"

    @property
    def has_multi_gpu(self) -> bool:
        overlay = REPO / bundle_folder(self.bundle) / self.bundle / "configs" / "multi_gpu_train.json"
        return self.stage != ANALYSIS and overlay.is_file()

    def overrides(self) -> list[str]:
        """``--key value`` for every arg, in order."""
        return [item for key, value in self.args for item in (f"--{key}", value)]


def bundle_folder(bundle: str) -> str:
    """The folder that holds ``bundle``: its FM's ``bundles`` (``common.foundation_models``; an FM registered from
    outside the repository keeps its bundles there), else the repository's ``bundles``. Relative paths are relative
    to the repository, the runner's working directory."""
    fm = bundle.split("_", 1)[0]
    folder = get_fm(fm).bundles if fm in FMS else None
    return folder or "bundles"


def _pretrain_name(fm: str, seed: int) -> str:
    return f"{get_fm(fm).pretrain_bundle}/seed{seed}"


def build_grid(study: Study, tracking_uri: str) -> list[Run]:
    """Every run of ``study`` in the order they are started when ready: the pretraining runs of every seed, then per
    seed the specialised, finetune, random-weight and scratch runs, and last the analysis, reading ``tracking_uri``.
    The specialised runs come first because they need nothing and hold the longest single run (the DDPM: 21 of the
    demo study's 86 minutes, which it ended alone on one core when it started last).

    Per seed that is 2 pretraining runs (fewer with official weights), 10 finetune, 10 random-weight, 10 scratch and
    5 specialised runs. A finetune run needs its FM's pretraining run of the same seed unless official weights are
    given; the others need nothing (a random-weight run does not read the pretrained weights)."""
    runs_dir = study.study_dir / "runs"

    def run(bundle: str, stage: str, regime: str, seed: int, *extra: tuple[str, str], depends=(), task=None) -> Run:
        sub = f"{bundle}/random/seed{seed}" if stage == "random" else f"{bundle}/seed{seed}"
        common = (("profile", study.profile), ("seed", str(seed)), ("study", study.name),
                  ("study_dir", str(study.study_dir)), ("datalist", study.datalist))  # fmt: skip
        return Run(sub, bundle, stage, regime, seed, common + extra, tuple(depends), str(runs_dir / sub), task)

    grid = []
    for seed in study.seeds:
        grid += [run(get_fm(fm).pretrain_bundle, "pretrain", "pretrain", seed) for fm in FMS
                 if fm not in study.weights and get_fm(fm).pretrain_bundle]  # fmt: skip
    for seed in study.seeds:
        grid += [run(SPECIALISED[t], "specialised", "specialised", seed, task=t) for t in TASKS]
        for fm in FMS:
            for task in TASKS:
                if fm in study.weights:
                    ckpt, depends = study.weights[fm], ()
                else:
                    ckpt = str(runs_dir / _pretrain_name(fm, seed) / "models" / "model.pt")
                    depends = (_pretrain_name(fm, seed),)
                grid.append(run(f"{fm}_{task}_finetune", "finetune", "finetune", seed, ("pretrained_ckpt", ckpt),
                                depends=depends, task=task))  # fmt: skip
        grid += [run(f"{fm}_{t}_finetune", "random", "random", seed, ("init", "random"), task=t)
                 for fm in FMS for t in TASKS]  # fmt: skip
        grid += [run(f"{fm}_{t}_scratch", "scratch", "scratch", seed, task=t) for fm in FMS for t in TASKS]
    analysis_args = (("tracking_uri", tracking_uri), ("study", study.name), ("output_dir", str(study.analysis_dir)))
    grid.append(Run(ANALYSIS, "tools", ANALYSIS, ANALYSIS, None, analysis_args))
    return grid


def apply_overrides(runs: Sequence[Run], overrides: Iterable[tuple[str, str]]) -> list[Run]:
    """``runs`` with each ``(glob, "key=value")`` applied to the runs the glob matches (:meth:`Run.matches`): the
    key's value is replaced, or the key added. A ``ValueError`` names a malformed override or a glob that matches
    nothing."""
    out = list(runs)
    for pattern, assignment in overrides:
        key, sep, value = assignment.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value:
            raise ValueError(f"--override {pattern} {assignment!r}: expected KEY=VALUE with a non-empty value")
        hit = False
        for i, r in enumerate(out):
            if r.matches(pattern):
                hit = True
                args = dict(r.args)
                args[key] = value
                out[i] = replace(r, args=tuple(args.items()))
        if not hit:
            raise ValueError(f"--override {pattern}: no run of the grid matches (names look like {out[0].name})")
    return out


def select(runs: Sequence[Run], only: Sequence[str] | None, analysis: bool = True) -> list[Run]:
    """The runs matching any glob of ``only`` (all when None or empty), keeping the analysis when ``analysis``.
    A ``ValueError`` names a glob that matches no run."""
    chosen = [r for r in runs if r.stage != ANALYSIS]
    if only:
        for pattern in only:
            if not any(r.matches(pattern) for r in chosen):
                names = ", ".join(sorted({r.key for r in chosen})[:6])
                raise ValueError(f"--only {pattern}: no run of the grid matches it (runs are named like {names}, ...)")
        chosen = [r for r in chosen if any(r.matches(p) for p in only)]
    return chosen + ([r for r in runs if r.stage == ANALYSIS] if analysis else [])
