from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedEvaluator
from monai.handlers import from_engine

from common.metrics import (
    AUCHandler,
    BinaryDiceHandler,
    SpecificityAtSensitivityHandler,
    SSIM3DHandler,
    compute_dice,
    compute_pirads_auc,
    compute_pirads_specificity_at_sensitivity,
    compute_ssim_3d,
)


def _classification() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 1, 0, 3, 2])
    logits[torch.arange(10), labels] += 1.0  # informative but imperfect: specificity 2/3, AUC (>= 2) 0.6
    return logits, labels


def _segmentation() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    target = (torch.rand(4, 1, 8, 8, 4, generator=gen) < 0.3).float()
    pred = (torch.rand(4, 1, 8, 8, 4, generator=gen) < 0.3).float()
    target[1] = 0
    pred[1] = 0  # one lesion-free case predicted empty
    return pred, target


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(4, 1, 10, 10, 6, generator=gen)
    pred = target + 0.1 * torch.randn(target.shape, generator=gen)
    return pred, target


CASES = {
    "spec": (
        lambda: SpecificityAtSensitivityHandler(sensitivity=0.8, output_transform=from_engine(["pred", "label"])),
        _classification,
        lambda p, y: compute_pirads_specificity_at_sensitivity(p, y, 0.8),
    ),
    "auc": (
        lambda: AUCHandler(positive_class=2, output_transform=from_engine(["pred", "label"])),
        _classification,
        lambda p, y: compute_pirads_auc(p, y, positive_class=2),
    ),
    "dice": (
        lambda: BinaryDiceHandler(output_transform=from_engine(["pred", "label"])),
        _segmentation,
        lambda p, y: compute_dice(p, y).mean().item(),
    ),
    "dice_lesion_cases": (
        lambda: BinaryDiceHandler(lesion_cases_only=True, output_transform=from_engine(["pred", "label"])),
        _segmentation,
        lambda p, y: compute_dice(p, y)[y.flatten(1).any(dim=1)].mean().item(),
    ),
    "ssim": (
        lambda: SSIM3DHandler(win_size=(5, 5, 3), output_transform=from_engine(["pred", "label"])),
        _images,
        lambda p, y: compute_ssim_3d(p, y, win_size=(5, 5, 3)).mean().item(),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ignite_engine_two_batches(name: str) -> None:
    make_handler, make_data, reference = CASES[name]
    pred, label = make_data()
    half = pred.shape[0] // 2
    batches = [{"pred": pred[:half], "label": label[:half]}, {"pred": pred[half:], "label": label[half:]}]
    engine = Engine(lambda _engine, batch: batch)
    make_handler().attach(engine, name)
    engine.run(batches, max_epochs=1)
    expected = reference(pred, label)
    assert not np.isnan(expected)
    assert engine.state.metrics[name] == pytest.approx(expected, abs=1e-6)


class _PassThrough(torch.nn.Module):
    """Returns the batch's precomputed prediction, stored as the image, so the evaluator runs end to end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@pytest.mark.parametrize("name", list(CASES))
def test_supervised_evaluator_two_batches(name: str) -> None:
    make_handler, make_data, reference = CASES[name]
    pred, label = make_data()
    half = pred.shape[0] // 2
    loader = [{"image": pred[:half], "label": label[:half]}, {"image": pred[half:], "label": label[half:]}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        epoch_length=2,
        network=_PassThrough(),
        key_val_metric={name: make_handler()},
    )
    evaluator.run()
    assert evaluator.state.metrics[name] == pytest.approx(reference(pred, label), abs=1e-6)
    if name in ("dice", "ssim"):
        assert evaluator.state.metric_details[name].shape == (pred.shape[0], 1)
