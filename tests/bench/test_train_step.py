"""bench/train_step.py: the ``--official DIR`` option, its error for a directory that is not an official checkout, and
(when ``VFM_OFFICIAL_DIR`` names a checkout, see bench/README.md) the real comparison of ours and the official
networks: identical forward outputs, then both timed in one run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench import official, train_step

OFFICIAL_DIR = os.environ.get("VFM_OFFICIAL_DIR")
needs_checkout = pytest.mark.skipif(
    not OFFICIAL_DIR, reason="VFM_OFFICIAL_DIR is not set (a checkout of the official code, see bench/README.md)"
)


def test_the_parser_accepts_official(tmp_path: Path) -> None:
    args = train_step.parse_args(["--official", str(tmp_path), "--threads", "1", "--small"])
    assert args.official == tmp_path and args.threads == 1 and args.small
    assert train_step.parse_args([]).official is None


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ([], "ProFound/models/convnextv2.py"),
        (["ProFound/models/convnextv2.py", "ProFound/models/convnext_unter.py"], "ProFound/models/upernet_module.py"),
        (list(official.REQUIRED_FILES)[:4], "ProViCNet/ProViCNet/ModelArchitectures/ProViCNet/ProViCNet.py"),
    ],
)
def test_a_directory_that_is_not_a_checkout_names_the_missing_file(
    tmp_path: Path, present: list[str], missing: str
) -> None:
    for rel in present:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    with pytest.raises(official.OfficialCheckoutError, match=f"missing {missing} "):
        train_step.main(["--official", str(tmp_path), "--small", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # it stopped before timing anything


def test_without_dinov2_it_says_where_dinov2_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rel in official.REQUIRED_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no torch hub cache of dinov2 either
    with pytest.raises(official.OfficialCheckoutError, match="missing dinov2/hubconf.py"):
        official.check_layout(tmp_path)


@needs_checkout
@pytest.mark.parametrize("model_name", train_step.MODELS)
def test_official_networks_give_our_outputs_with_our_trainable_set(model_name: str) -> None:
    torch.set_num_threads(1)
    mods = official.import_official(Path(OFFICIAL_DIR))
    runner, diff, state = train_step.official_runner(mods, model_name, "small", torch.device("cpu"))
    assert diff < 1e-5  # same operations on the same weights: 0.0 on the machines measured so far
    ours = train_step.build(model_name, "small").model
    assert runner.trainable_params == sum(p.numel() for p in ours.parameters() if p.requires_grad) > 0
    assert runner.variant == "official fp32" and set(state) == set(ours.state_dict())
    assert "torchvision" not in __import__("sys").modules or mods.notes == []  # the placeholder was removed


@needs_checkout
def test_the_torchvision_placeholder_raises_when_used() -> None:
    mods = official.import_official(Path(OFFICIAL_DIR))
    if not mods.notes:
        pytest.skip("torchvision is installed: no placeholder")
    assert "unused by the networks timed" in mods.notes[0]
    from timm.layers import create_norm  # imported by import_official, holds the placeholder class

    with pytest.raises(RuntimeError, match="torchvision absent"):
        create_norm.FrozenBatchNorm2d(8)


@needs_checkout
def test_ours_and_official_are_timed_in_one_run(tmp_path: Path) -> None:
    argv = ["--official", OFFICIAL_DIR, "--small", "--threads", "1", "--steps", "2", "--warmup", "1",
            "--variants", "fp32", "--model", "profound", "--model", "provicnet", "--out", str(tmp_path)]  # fmt: skip
    assert train_step.main(argv) == 0
    result = json.loads((tmp_path / "train_step_official_cpu1_small.json").read_text())
    differences = result["official"]["max_abs_output_difference"]
    assert set(differences) == {"profound", "provicnet"} and max(differences.values()) < 1e-5
    rows = {(r["model"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {(m, v) for m in ("profound", "provicnet") for v in ("official fp32", "fp32")}
    for model_name in ("profound", "provicnet"):
        theirs, ours = rows[model_name, "official fp32"], rows[model_name, "fp32"]
        assert theirs["vs_official"] == 1.0 and theirs["steps"] == ours["steps"] == 2
        assert ours["vs_official"] == pytest.approx(theirs["ms_per_step"] / ours["ms_per_step"], abs=0.01)
        assert ours["trainable_params"] == theirs["trainable_params"]
    # the official ProFound takes the same volumes in its own axis order (B, C, D, W, H)
    assert rows["profound", "official fp32"]["input_shape"] == [1, 3, 16, 32, 32]
    assert rows["profound", "fp32"]["input_shape"] == [1, 3, 32, 32, 16]
