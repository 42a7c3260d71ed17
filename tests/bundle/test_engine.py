"""common.bundle.engine: atomic checkpoints and resuming from them with a real Ignite engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine

from common.bundle import ResumeCheckpoint, SaveCheckpoints, resume_checkpoint


def _training(model: torch.nn.Linear) -> tuple[Engine, torch.optim.Optimizer]:
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine: Engine, batch: torch.Tensor) -> float:
        optimiser.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimiser.step()
        return float(loss)

    return Engine(step), optimiser


def test_checkpoints_keep_the_newest_and_resume_restores_weights_and_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    engine, optimiser = _training(model)
    SaveCheckpoints({"network": model, "optimizer": optimiser}, tmp_path / "models", n_saved=2).attach(engine)
    data = [torch.randn(4, 3) for _ in range(2)]
    engine.run(data, max_epochs=3)
    names = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert names == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # no temporary file left behind
    assert resume_checkpoint(tmp_path) == str(tmp_path / "models" / "checkpoint_epoch=3.pt")

    restored = torch.nn.Linear(3, 1)
    engine2, optimiser2 = _training(restored)
    ResumeCheckpoint({"network": restored, "optimizer": optimiser2}, resume_checkpoint(tmp_path)).attach(engine2)
    engine2.run(data, max_epochs=3)  # already at epoch 3: nothing left to train
    assert engine2.state.epoch == 3 and engine2.state.iteration == 6
    assert torch.equal(restored.weight, model.weight)


def test_a_finished_run_trains_anew_and_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models" / "checkpoint_epoch=4.pt")
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"status": "FINISHED"}))
    assert resume_checkpoint(tmp_path) is None
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"status": "RUNNING"}))
    assert resume_checkpoint(tmp_path).endswith("checkpoint_epoch=4.pt")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SaveCheckpoints({}, "x", n_saved=0)


def test_an_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    from common.bundle.engine import atomic_save

    path = tmp_path / "checkpoint_epoch=1.pt"
    atomic_save({"w": torch.ones(2)}, path)

    def interrupted(obj, f) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
