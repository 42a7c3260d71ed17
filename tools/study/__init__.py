"""The study in one command (DESIGN.md sections 5, 6 and 8): every run of the transfer-limits study for a profile,
resumable, in parallel, reported to one MLflow store, and analysed at the end.

    python -m tools.study --profile smoke --seeds 0        # what ./vfm run does
    python -m tools.study --profile gpu --seeds 0 1 2 --profound_weights profound_tiny.pt
    python -m tools.study --profile paper --emit slurm --tracking_uri http://mlflow-host:5000

The grid (:func:`build_grid`), per seed: the two pretraining bundles (left out for an FM whose official weights are
given), the twenty downstream bundles (a finetune run after its FM's pretraining run of the same seed), the ten
random-weight runs (each finetune bundle with ``--init random``, DESIGN.md section 1), the five specialised bundles;
then the tools bundle reads the store and writes the report. A run is one ``python -m monai.bundle run`` of a bundle
from the repository root, which the bundles need (their configs name shared fragments by repository-relative paths).

- Resume: a run is done when the store holds a FINISHED run with its tags (study, bundle, regime, seed, profile)
  and, where that run recorded them as params, the same datalist and pretrained weights. Done runs are skipped;
  ``--force`` runs them again into new MLflow runs (the analysis uses the latest). An interrupted run is started with
  the same command and continues from its checkpoints into its own MLflow run: the bundles do that themselves. A
  run left RUNNING by a process that is gone (SIGKILL, the OOM killer) is marked KILLED before the grid starts. The
  analysis is skipped while its report is newer than every finished run of the study.
- Life cycle (DESIGN.md section 10): the tracking URI is checked before any work; each bundle runs in its own
  process group and gets SIGTERM when the runner dies (even by SIGKILL), so no bundle outlives it; the bundles hold
  the study lock's file too, so a second runner cannot start while a bundle of the first one still runs.
- Parallel: ``--jobs`` runs at once (default one per GPU; on CPU as many as the cores and the memory bear), each with
  ``cores / jobs`` torch threads and its own log ``<study_dir>/logs/<run>.log``. A failed run does not stop the
  others; the runs that need it are not started. The synthetic cohort and the tracking store are made once before
  any run starts, because parallel first-time creation races (DESIGN.md section 5).
- Cluster: ``--emit slurm`` writes job arrays, one task per run (``torchrun`` over the node's GPUs for bundles with a
  ``multi_gpu_train.json``), and the analysis job, all reporting to one tracking server (DESIGN.md section 8).

The package: :mod:`.grid` (the runs as data), :mod:`.store` (what the tracking store says), :mod:`.machine` (cores,
memory, GPUs), :mod:`.executor` (running the grid here), :mod:`.slurm` (job arrays, templates in ``templates/``) and
:mod:`.cli` (the command line).
"""

from __future__ import annotations

from .cli import UsageError, main
from .cli import _study_lock as _study_lock  # the runner tests reach these two
from .executor import Executor, Outcome, last_error
from .executor import _die_with as _die_with
from .grid import (
    ANALYSIS,
    FMS,
    REPO,
    SPECIALISED,
    STATUSES,
    TASKS,
    Run,
    Study,
    apply_overrides,
    build_grid,
    bundle_folder,
    select,
)
from .machine import cpu_count, default_jobs, filesystem_type, memory_gb, visible_gpus
from .slurm import emit_slurm
from .store import analysis_is_current, finished_runs, is_done, resumable, tracking_setup

__all__ = [
    "ANALYSIS",
    "FMS",
    "REPO",
    "SPECIALISED",
    "STATUSES",
    "TASKS",
    "Executor",
    "Outcome",
    "Run",
    "Study",
    "UsageError",
    "analysis_is_current",
    "apply_overrides",
    "build_grid",
    "bundle_folder",
    "cpu_count",
    "default_jobs",
    "emit_slurm",
    "filesystem_type",
    "finished_runs",
    "is_done",
    "last_error",
    "main",
    "memory_gb",
    "resumable",
    "select",
    "tracking_setup",
    "visible_gpus",
]
