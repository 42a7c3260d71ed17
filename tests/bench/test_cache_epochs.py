"""bench/cache_epochs.py: the ProFound finetune bundles run through their documented entry point with and without the
frozen-encoder cache, their per-epoch training times read back from MLflow (no timing is asserted: the ratio is
what the benchmark measures, at the demo profile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cache_epochs


def test_the_command_is_the_documented_bundle_command(tmp_path: Path) -> None:
    command = cache_epochs.bundle_command("segmentation", "off", "demo", 3, tmp_path)
    assert command[1:5] == ["-m", "monai.bundle", "run", "--config_file"]
    assert command[5] == "bundles/profound_segmentation_finetune/configs/train.json"
    options = dict(zip(command[6::2], command[7::2], strict=True))
    assert options["--encoder_cache"] == "off" and options["--epochs"] == "3" and options["--profile"] == "demo"
    assert options["--tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert options["--study_dir"] == str(tmp_path) and options["--output_dir"] == str(tmp_path / "segmentation-off")


def test_ratios_compare_the_epochs_after_the_first() -> None:
    uncached = {"later_epoch_seconds": 6.0, "wall_seconds": 30.0}
    cached = {"later_epoch_seconds": 2.0, "wall_seconds": 20.0}
    row = cache_epochs.compare("classification", uncached, cached)
    assert row["later_epochs_ratio"] == 3.0 and row["wall_ratio"] == 1.5
    assert row["bundle"] == "profound_classification_finetune"


def test_one_epoch_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cache_epochs.main(["--epochs", "1"])
    assert "the first epoch fills the cache" in capsys.readouterr().err


@pytest.mark.slow
def test_both_runs_train_and_report_each_epoch(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["--profile", "smoke", "--epochs", "2", "--tasks", "classification", "--threads", "1",
            "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert cache_epochs.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["uncached"]["mode"] == "off" and row["cached"]["mode"] == "all"
    for run in (row["uncached"], row["cached"]):
        assert len(run["epoch_seconds"]) == 2 and min(run["epoch_seconds"]) > 0
        assert run["later_epoch_seconds"] == run["epoch_seconds"][1]
    assert row["later_epochs_ratio"] > 0 and row["wall_ratio"] > 0
    assert row["uncached"]["cache"] is None  # --encoder_cache off: no cache, nothing reported
    cache = row["cached"]["cache"]  # the cached run's own count: every encoder pass is a hit or a miss
    assert cache["misses"] >= cache["volumes"] > 0 and cache["hits"] > 0
    for mode in ("off", "all"):  # each run finished in its own folder and store
        state = json.loads((tmp_path / "work" / f"classification-{mode}" / "mlflow_run.json").read_text())
        assert state["status"] == "FINISHED"
    assert [p.name for p in (tmp_path / "work").glob("cohort-*")] == ["cohort-smoke"]  # one cohort, made once
