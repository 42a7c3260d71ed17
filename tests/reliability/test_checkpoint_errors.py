"""A file given as a checkpoint that is none says what it is, instead of PyTorch's unpickling error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.networks._state import load_weights


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_text("version https://git-lfs\n"), "not a PyTorch checkpoint: looks like text, starting 'v"),
        (lambda p: p.write_text("<!DOCTYPE html><html>"), "not a PyTorch checkpoint: looks like HTML"),
        (lambda p: np.save(p.open("wb"), np.zeros(3)), "not a PyTorch checkpoint: looks like a NumPy .npy array"),
        (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint: the file is empty"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_what_it_looks_like(tmp_path: Path, write, message: str) -> None:
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as caught:
        load_weights(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_real_checkpoint_still_loads(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(3.0)}, tmp_path / "model.pt")
    assert torch.equal(load_weights(tmp_path / "model.pt")["w"], torch.arange(3.0))
