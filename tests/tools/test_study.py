"""The study runner (``python -m tools.study``): the grid as data, selection and overrides, skip rules, the Slurm
scripts, and one reduced study end to end through the real command line with a forced failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from tools.study import (
    FMS,
    SPECIALISED,
    TASKS,
    Run,
    Study,
    analysis_is_current,
    apply_overrides,
    build_grid,
    default_jobs,
    emit_slurm,
    is_done,
    last_error,
    main,
    resumable,
    select,
)

REPO = Path(__file__).resolve().parents[2]
URI = "sqlite:////tmp/study/mlflow.db"


def make_study(tmp_path: Path, seeds=(0,), weights=None) -> Study:
    return Study("smoke", tuple(seeds), tmp_path / "study", str(tmp_path / "cohort" / "datalist.json"),
                 weights=weights or {})  # fmt: skip


def by_stage(runs: list[Run]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.stage] = counts.get(r.stage, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------------------------
# the grid


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_grid_counts_per_seed(tmp_path: Path, seeds: tuple[int, ...]) -> None:
    grid = build_grid(make_study(tmp_path, seeds), URI)
    n = len(seeds)
    # 2 pretraining + 20 downstream (10 finetune, 10 scratch) + 10 random-weight + 5 specialised per seed, 1 analysis
    assert by_stage(grid) == {"pretrain": 2 * n, "finetune": 10 * n, "random": 10 * n, "scratch": 10 * n,
                              "specialised": 5 * n, "analysis": 1}  # fmt: skip
    assert len(grid) == 37 * n + 1
    assert len({r.name for r in grid}) == len(grid)
    assert len({r.output_dir for r in grid if r.output_dir}) == len(grid) - 1
    assert grid[-1].name == "analysis" and all(r.stage == "pretrain" for r in grid[: 2 * n])
    downstream = {r.bundle for r in grid if r.stage in ("finetune", "scratch")}
    assert downstream == {f"{fm}_{t}_{regime}" for fm in FMS for t in TASKS for regime in ("finetune", "scratch")}
    assert {r.bundle for r in grid if r.stage == "specialised"} == set(SPECIALISED.values())


def test_grid_dependencies_and_arguments(tmp_path: Path) -> None:
    study = make_study(tmp_path, (0, 1))
    grid = {r.name: r for r in build_grid(study, URI)}
    ft = grid["provicnet_segmentation_finetune/seed1"]
    assert ft.depends == ("provicnet_pretrain/seed1",) and ft.regime == "finetune"
    args = dict(ft.args)
    assert args["pretrained_ckpt"] == str(study.study_dir / "runs/provicnet_pretrain/seed1/models/model.pt")
    assert (args["profile"], args["seed"], args["study"], args["study_dir"]) == ("smoke", "1", "vfm-study",
                                                                              str(study.study_dir))  # fmt: skip
    assert args["datalist"] == study.datalist
    rand = grid["provicnet_segmentation_finetune/random/seed1"]
    assert rand.bundle == "provicnet_segmentation_finetune" and rand.regime == "random" and rand.depends == ()
    assert dict(rand.args)["init"] == "random" and "pretrained_ckpt" not in dict(rand.args)
    assert rand.output_dir == str(study.study_dir / "runs/provicnet_segmentation_finetune/random/seed1")
    for name in ("profound_classification_scratch/seed0", "unet_segmentation/seed0", "profound_pretrain/seed1"):
        assert grid[name].depends == ()
    analysis = dict(grid["analysis"].args)
    assert analysis == {"tracking_uri": URI, "study": "vfm-study", "output_dir": str(study.study_dir / "analysis")}


def test_official_weights_replace_the_pretraining_runs(tmp_path: Path) -> None:
    grid = build_grid(make_study(tmp_path, weights={"profound": "/w/profound.pt"}), URI)
    assert [r.name for r in grid if r.stage == "pretrain"] == ["provicnet_pretrain/seed0"]
    ft = {r.name: r for r in grid}["profound_modality_translation_finetune/seed0"]
    assert ft.depends == () and dict(ft.args)["pretrained_ckpt"] == "/w/profound.pt"
    assert len(grid) == 37


def test_only_selects_by_name_glob_and_keeps_the_analysis(tmp_path: Path) -> None:
    grid = build_grid(make_study(tmp_path, (0, 1)), URI)
    profound = select(grid, ["profound_*"])
    assert len(profound) == 2 * (1 + 5 + 5 + 5) + 1 and profound[-1].name == "analysis"
    assert by_stage(select(grid, ["*/random"], analysis=False)) == {"random": 20}
    # the plain bundle name means its own runs, not the random-weight runs made from it
    assert [r.name for r in select(grid, ["profound_pretrain", "unet_segmentation/seed1"], analysis=False)] == [
        "profound_pretrain/seed0", "profound_pretrain/seed1", "unet_segmentation/seed1"]  # fmt: skip
    assert [r.name for r in select(grid, ["provicnet_classification_finetune"], analysis=False)] == [
        "provicnet_classification_finetune/seed0", "provicnet_classification_finetune/seed1"]  # fmt: skip
    with pytest.raises(ValueError, match="no run of the grid matches"):
        select(grid, ["resnet18_*"])


def test_overrides_replace_or_add_a_key(tmp_path: Path) -> None:
    grid = build_grid(make_study(tmp_path), URI)
    out = apply_overrides(grid, [("*", "epochs=1"), ("*_pretrain", "seed=7"), ("analysis", "n_bootstrap=40")])
    pre = {r.name: dict(r.args) for r in out}
    assert pre["profound_pretrain/seed0"]["seed"] == "7" and pre["unet_segmentation/seed0"]["seed"] == "0"
    assert all(dict(r.args)["epochs"] == "1" for r in out)
    assert pre["analysis"]["n_bootstrap"] == "40"
    r = {r.name: r for r in out}["profound_pretrain/seed0"]
    assert r.overrides()[r.overrides().index("--seed") + 1] == "7"  # replaced in place, passed once
    assert r.overrides().count("--seed") == 1
    for bad in [("*", "epochs"), ("*", "=1"), ("*", "epochs=")]:
        with pytest.raises(ValueError, match="KEY=VALUE"):
            apply_overrides(grid, [bad])
    with pytest.raises(ValueError, match="no run of the grid matches"):
        apply_overrides(grid, [("nothing*", "epochs=1")])


def test_grid_runs_know_their_task(tmp_path: Path) -> None:
    grid = build_grid(make_study(tmp_path), URI)
    for r in grid:
        if r.stage in ("pretrain", "analysis"):
            assert r.task is None, r.name
        else:
            assert r.task in TASKS and (r.task in r.bundle or SPECIALISED[r.task] == r.bundle), r.name


def test_progress_estimate_takes_each_run_from_its_own_bundle_or_task(tmp_path: Path) -> None:
    import io

    from tools.study.executor import Executor, Outcome, Progress

    def run(bundle: str, stage: str, task: str | None) -> Run:
        name = f"{bundle}/random/seed0" if stage == "random" else f"{bundle}/seed0"
        return Run(name, bundle, stage, stage, 0, (), task=task)

    outcomes = [
        Outcome(run("profound_classification_finetune", "finetune", "classification"), "finished", seconds=10.0),
        Outcome(
            run("profound_modality_translation_finetune", "finetune", "modality_translation"), "finished", seconds=400.0
        ),
        Outcome(run("profound_classification_finetune", "random", "classification"), "pending"),  # its bundle: 10
        Outcome(run("provicnet_modality_translation_scratch", "scratch", "modality_translation"), "pending"),  # 400
        Outcome(run("unet_segmentation", "specialised", "segmentation"), "pending"),  # nothing alike: the mean, 205
        Outcome(
            run("provicnet_modality_translation_finetune", "finetune", "modality_translation"),
            "running",
            started=1000.0 - 100.0,
        ),  # its task, 400, of which 100 s done
    ]
    executor = Executor(outcomes, jobs=2, threads=1, gpus=[], tracking_uri=URI, logs_dir=tmp_path,
                        progress=Progress(io.StringIO()))  # fmt: skip
    assert executor.remaining_work(1000.0) == pytest.approx(10 + 400 + 205 + 300)
    for o in outcomes[2:]:
        o.status = "finished"
    assert executor.remaining_work(1000.0) is None  # nothing left
    executor.outcomes = {o.run.name + str(i): o for i, o in enumerate(outcomes[2:])}
    for o in executor.outcomes.values():
        o.status = "pending"
    assert executor.remaining_work(1000.0) is None  # nothing finished: no estimate


def test_config_files_and_multi_gpu_overlay() -> None:
    run = Run("profound_pretrain/seed0", "profound_pretrain", "pretrain", "pretrain", 0, ())
    assert run.config_file() == "bundles/profound_pretrain/configs/train.json"
    assert run.has_multi_gpu
    assert run.config_file(True) == ("['bundles/profound_pretrain/configs/train.json',"
                                     "'bundles/profound_pretrain/configs/multi_gpu_train.json']")  # fmt: skip
    assert run.log_name == "profound_pretrain.seed0.log" and run.key == "profound_pretrain"


@pytest.mark.parametrize(
    ("profile", "gpus", "cores", "memory", "expected"),
    [
        ("smoke", 0, 2, 24.0, 2),  # this project's reference machine
        ("smoke", 0, 16, 128.0, 16),
        ("smoke", 0, 16, 10.0, 3),  # memory-bound: 10 GB / 3 GB per run
        ("smoke", 0, 4, 2.0, 1),  # never below one
        ("gpu", 0, 16, 60.0, 5),
        ("paper", 4, 64, 512.0, 4),  # one per GPU
    ],
)
def test_default_jobs(profile: str, gpus: int, cores: int, memory: float, expected: int) -> None:
    assert default_jobs(profile, gpus, cores, memory) == expected


# ------------------------------------------------------------------------------------------------------------------
# what counts as done


def fake_run(tags: dict, params: dict | None = None, start: int = 0, end: int = 0) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params or {}),
                           info=SimpleNamespace(start_time=start, end_time=end))  # fmt: skip


def test_is_done_matches_tags_and_recorded_identity(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    grid = {r.name: r for r in build_grid(study, URI)}
    ft = grid["profound_segmentation_finetune/seed0"]
    tags = {"study": "vfm-study", "bundle": ft.bundle, "regime": "finetune", "seed": "0", "profile": "smoke"}
    ckpt = dict(ft.args)["pretrained_ckpt"]
    assert is_done(ft, [fake_run(tags)], study)  # params not recorded: tags decide
    assert is_done(ft, [fake_run(tags, {"datalist": study.datalist, "pretrained_ckpt": ckpt})], study)
    assert not is_done(ft, [fake_run(tags, {"datalist": "/other/datalist.json"})], study)
    assert not is_done(ft, [fake_run(tags, {"pretrained_ckpt": "/official/weights.pt"})], study)
    for key, value in [("regime", "random"), ("seed", "1"), ("profile", "gpu"), ("study", "other")]:
        assert not is_done(ft, [fake_run({**tags, key: value})], study), key
    rand = grid["profound_segmentation_finetune/random/seed0"]
    assert not is_done(rand, [fake_run(tags)], study)
    assert is_done(rand, [fake_run({**tags, "regime": "random"}, {"pretrained_ckpt": "None"})], study)


def test_analysis_is_current_only_when_newer_than_every_run(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    report = tmp_path / "report.html"
    runs = [fake_run({"regime": "finetune"}, start=10, end=100), fake_run({"regime": "scratch"}, start=5, end=150)]
    analysis = fake_run({"regime": "analysis", "study": "vfm-study"}, start=200, end=210)
    assert not analysis_is_current(runs + [analysis], study, report)  # no report file
    report.write_text("<html/>")
    assert analysis_is_current(runs + [analysis], study, report)
    assert not analysis_is_current(runs, study, report)
    assert not analysis_is_current(
        runs + [fake_run({"regime": "scratch"}, start=190, end=250), analysis], study, report
    )


def test_resumable_means_checkpoints_of_an_unfinished_run(tmp_path: Path) -> None:
    run = Run("x/seed0", "x", "scratch", "scratch", 0, (), (), str(tmp_path))
    assert not resumable(run)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "checkpoint_epoch=1.pt").write_bytes(b"")
    assert resumable(run)
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"status": "FINISHED"}))
    assert not resumable(run)


def test_last_error_names_the_cause(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text(
        "epoch 1\nTraceback (most recent call last):\n  File 'a.py', line 1\n    raise ValueError('x')\n"
        "ValueError: datalist '/x.json' does not exist\n\nThe above exception was the direct cause of the following "
        "exception:\n\nTraceback (most recent call last):\n  File 'b.py'\nRuntimeError: Failed to evaluate cfg\n"
    )
    assert last_error(log) == ("ValueError: datalist '/x.json' does not exist (raised as RuntimeError: Failed to "
                               "evaluate cfg)")  # fmt: skip
    log.write_text("loading\nKilled\n")
    assert last_error(log) == "Killed"
    assert last_error(tmp_path / "missing.log") == ""


# ------------------------------------------------------------------------------------------------------------------
# Slurm


def test_emit_slurm_writes_arrays_with_dependencies(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    uri = "http://mlflow.cluster:5000"
    runs = apply_overrides(build_grid(study, uri), [("*", "epochs=5")])
    written = emit_slurm(runs, study, tmp_path / "slurm", uri, gpus=4, partition="gpu")
    assert {p.name for p in written} == {"pretrain.tsv", "runs.tsv", "finetune.tsv", "study.sbatch",
                                         "analysis.sbatch", "submit.sh"}  # fmt: skip
    tables = {name: (tmp_path / "slurm" / f"{name}.tsv").read_text().splitlines()[1:]
              for name in ("pretrain", "runs", "finetune")}  # fmt: skip
    assert [len(t) for t in tables.values()] == [2, 25, 10]  # 10 random + 10 scratch + 5 specialised need nothing
    fields = tables["finetune"][0].split("\t")
    assert fields[0] == "profound_classification_finetune/seed0"
    assert fields[3].endswith("multi_gpu_train.json']") and fields[4:6] == ["--tracking", "mlflow_config/server.json"]
    assert "--epochs\t5" in tables["finetune"][0] and "--pretrained_ckpt" in fields
    sbatch = (tmp_path / "slurm" / "study.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=4" in sbatch and "#SBATCH --partition=gpu" in sbatch
    assert 'torch.distributed.run --standalone --nproc_per_node="$gpus"' in sbatch
    assert 'MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://mlflow.cluster:5000}"' in sbatch
    submit = (tmp_path / "slurm" / "submit.sh").read_text()
    assert '--dependency=afterok:"$pretrain"' in submit and "--dependency=afterok:$deps" in submit
    assert "ensure_experiment" in submit
    analysis = (tmp_path / "slurm" / "analysis.sbatch").read_text()
    assert "tools/configs/analyze.json" in analysis and '--tracking_uri "$MLFLOW_TRACKING_URI"' in analysis
    for script in ("study.sbatch", "analysis.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(tmp_path / "slurm" / script)], check=True)
    with pytest.raises(ValueError, match="tracking server"):
        emit_slurm(runs, study, tmp_path / "x", "sqlite:////tmp/x.db")


# ------------------------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "huge"], "unknown profile"),
        (["--only", "resnet18_*"], "no run of the grid matches"),
        (["--emit", "slurm"], "needs a tracking server"),
        (["--seeds", "0", "0"], "distinct"),
        (["--profound_weights", "/no/such.pt"], "no such file"),
        (["--tracking_uri", "bogus://x"], "tracking URI 'bogus://x': unknown kind of store"),
        (["--tracking_uri", "http://127.0.0.1:9"], "tracking URI http://127.0.0.1:9: no MLflow server answers"),
        (["--tracking_uri", "sqlite:////no/such/folder/mlflow.db"], "the folder /no/such/folder does not exist"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--study_dir", str(tmp_path), "--dry_run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_every_command(tmp_path: Path, capsys) -> None:
    assert main(["--study_dir", str(tmp_path / "study"), "--seeds", "0", "1", "--dry_run"]) == 0
    text = capsys.readouterr().out
    assert "75 runs" in text
    assert text.count("python -m monai.bundle run --config_file bundles/") == 74
    assert "run    provicnet_modality_translation_finetune/seed1  (after provicnet_pretrain/seed1)" in text
    assert "--init random" in text and "tools/configs/analyze.json" in text
    assert not (tmp_path / "study" / "mlflow.db").exists()  # a dry run makes nothing


# ------------------------------------------------------------------------------------------------------------------
# end to end


def _store_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("vfm-study").experiment_id])


@pytest.mark.slow
def test_reduced_study_with_a_failure_then_resume_then_nothing_to_do(tmp_path: Path) -> None:
    """Both pretraining bundles and one finetune bundle per FM (where they exist), one epoch each; the ProFound
    pretraining is made to fail through a bad datalist, so its finetune run is blocked. The second invocation skips
    what finished and runs the rest and the analysis; the third has nothing to do."""
    from common.data.phantom import make_cohort

    datalist = make_cohort(tmp_path / "cohort", cases=10, seed=0, size=(32, 64, 64))
    study_dir = tmp_path / "study"
    downstream = [b for b in ("provicnet_classification_finetune", "profound_classification_finetune")
                  if (REPO / "bundles" / b / "configs" / "train.json").is_file()]  # fmt: skip
    base = [sys.executable, "-m", "tools.study", "--profile", "smoke", "--study_dir", str(study_dir),
            "--datalist", str(datalist), "--jobs", "2", "--only", "*_pretrain", *downstream,
            "--override", "*", "epochs=1", "--override", "provicnet_pretrain", "out_dim=64",
            "--override", "provicnet_pretrain", "patch_out_dim=256",
            "--override", "analysis", "n_bootstrap=20", "--override", "analysis", "n_permutations=20"]  # fmt: skip
    env = {**os.environ, "MPLBACKEND": "Agg"}

    def study(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    # 1: one forced failure; the other runs go on, its dependent is not started, the summary says where to look
    first = study("--override", "profound_pretrain", f"datalist={tmp_path / 'missing.json'}", "--no_analysis")
    out = first.stdout
    assert first.returncode == 1, out + first.stderr[-3000:]
    failed_log = study_dir / "logs" / "profound_pretrain.seed0.log"
    assert "Failed (the log of each says why):" in out
    assert f"profound_pretrain/seed0  exit 1  log: {failed_log}" in out
    assert "missing.json' does not exist" in out and failed_log.is_file()
    if "profound_classification_finetune" in downstream:
        assert "profound_classification_finetune/seed0: needs profound_pretrain/seed0, which failed" in out
    uri = "sqlite:///" + str(study_dir / "mlflow.db")
    finished = {r.data.tags["bundle"] for r in _store_runs(uri) if r.info.status == "FINISHED"}
    assert finished == {"provicnet_pretrain"} | ({"provicnet_classification_finetune"} & set(downstream))
    timing = json.loads((study_dir / "study_timing.json").read_text())
    status = {r["name"]: r["status"] for r in timing["runs"]}
    assert status["profound_pretrain/seed0"] == "failed" and status["provicnet_pretrain/seed0"] == "finished"
    assert all(r["seconds"] > 0 for r in timing["runs"] if r["status"] == "finished")

    # 2: finished runs are skipped, the failed one and its dependent run, then the analysis
    second = study()
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "start   provicnet_pretrain/seed0" not in second.stdout
    assert "start   profound_pretrain/seed0" in second.stdout and "start   analysis" in second.stdout
    assert (study_dir / "logs" / "provicnet_pretrain.seed0.log").read_text().count("tools.study, ") == 1
    runs = _store_runs(uri)
    bundles = [r.data.tags["bundle"] for r in runs if r.data.tags.get("regime") != "analysis"]
    assert sorted(bundles) == sorted(["profound_pretrain", "provicnet_pretrain", *downstream])  # none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    report = study_dir / "analysis" / "report.md"
    assert report.is_file() and (study_dir / "analysis" / "report.html").is_file()
    assert "small-data numbers" in report.read_text()
    assert f"Report: {study_dir / 'analysis' / 'report.html'}" in second.stdout
    assert f"ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" in second.stdout

    # 3: everything is done, the analysis too: nothing starts, and it takes seconds
    start = time.monotonic()
    third = study()
    took = time.monotonic() - start
    assert third.returncode == 0, third.stdout + third.stderr[-3000:]
    assert "start " not in third.stdout and "0 finished now" in third.stdout
    assert took < 60, took


# ------------------------------------------------------------------------------------------------------------------
# the runner's children (DESIGN.md section 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone
        return f.read().split(") ", 1)[1][0] != "Z"


def test_a_child_gets_sigterm_when_its_runner_is_killed() -> None:
    code = ("import os, subprocess, sys, tools.study as s; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, "
            "preexec_fn=s._die_with(os.getpid())); print(p.pid, flush=True); p.wait()")  # fmt: skip
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(runner.stdout.readline())
    assert _alive(child)
    runner.kill()  # SIGKILL: the runner runs no clean-up code
    runner.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_the_study_lock_lasts_while_a_child_of_the_runner_runs(tmp_path: Path) -> None:
    from tools.study import UsageError, _study_lock

    with _study_lock(tmp_path) as fd:
        child = subprocess.Popen(["sleep", "60"], pass_fds=(fd,), start_new_session=True)
    try:
        with pytest.raises(UsageError, match="or a bundle it started that still runs"), _study_lock(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()
    with _study_lock(tmp_path):
        pass
