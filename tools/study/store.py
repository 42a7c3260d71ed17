"""The tracking store as the runner reads it: which runs finished, whether the analysis is current, which runs
resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.contract import resume_checkpoint

from .grid import ANALYSIS, IDENTITY_PARAMS, Run, Study


def tracking_setup(uri: str) -> tuple[list[str], dict[str, str]]:
    """The ``--tracking`` arguments and the extra environment of a bundle run reporting to ``uri``: a SQLite store
    through ``mlflow_config/sqlite.json``, anything else through ``mlflow_config/server.json`` and
    ``MLFLOW_TRACKING_URI``."""
    if uri.startswith("sqlite:"):
        return ["--tracking", "mlflow_config/sqlite.json", "--tracking_uri", uri], {}
    return ["--tracking", "mlflow_config/server.json"], {"MLFLOW_TRACKING_URI": uri}


def experiment_id(uri: str, experiment: str) -> str | None:
    """The id of ``experiment`` in the store at ``uri``, or None when the store or the experiment does not exist."""
    from common.bundle import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    from mlflow import MlflowClient

    found = MlflowClient(uri).get_experiment_by_name(experiment)
    return None if found is None else found.experiment_id


def finished_runs(uri: str, experiment: str) -> list:
    """Every FINISHED MLflow run of ``experiment`` (none when the store or the experiment does not exist yet)."""
    found = experiment_id(uri, experiment)
    if found is None:
        return []
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs, token = [], None
    while True:
        page = client.search_runs([found], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_done(run: Run, finished: Sequence, study: Study) -> bool:
    """Whether ``finished`` holds a run of ``run``: same tags study, bundle, regime, seed and profile, and the same
    datalist and pretrained weights where it recorded them."""
    want = {"study": study.name, "bundle": run.bundle, "regime": run.regime, "seed": str(run.seed),
            "profile": study.profile}  # fmt: skip
    args = dict(run.args)
    for candidate in finished:
        tags, params = candidate.data.tags, candidate.data.params
        if all(tags.get(k) == v for k, v in want.items()) and all(
            params.get(k, args[k]) == args[k] for k in IDENTITY_PARAMS if k in args
        ):
            return True
    return False


def analysis_is_current(finished: Sequence, study: Study, report: Path) -> bool:
    """Whether ``report`` exists and the study's latest analysis run started after every other run finished."""
    if not report.is_file():
        return False
    analyses = [r.info.start_time or 0 for r in finished
                if r.data.tags.get("regime") == ANALYSIS and r.data.tags.get("study") == study.name]  # fmt: skip
    if not analyses:
        return False
    others = [r.info.end_time or 0 for r in finished if r.data.tags.get("regime") != ANALYSIS]
    return max(others, default=0) <= max(analyses)


def resumable(run: Run) -> bool:
    """Whether ``run``'s folder holds checkpoints of an unfinished run (the bundle will continue from them): the
    bundles' own rule, :func:`common.contract.resume_checkpoint`."""
    return bool(run.output_dir) and resume_checkpoint(run.output_dir) is not None
