from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from common.metrics import BinaryDiceMetric, compute_dice, foreground


def _numpy_dice(a: np.ndarray, b: np.ndarray, empty: float) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return empty if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def _hand_masks() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(3, 1, 4, 4, 2)
    target = torch.zeros(3, 1, 4, 4, 2)
    pred[0, 0, 0, 0:3, 0] = 1  # |A| = 3
    target[0, 0, 0, 1:3, 0] = 1  # |B| = 4, two of them shared with A
    target[0, 0, 3, 3, 0:2] = 1
    pred[2, 0, 1, 1, 1] = 1  # case 1: both empty; case 2: empty reference, one false-positive voxel
    return pred, target


@pytest.mark.parametrize("empty_value", [1.0, 0.0, float("nan")])
def test_hand_example(empty_value: float) -> None:
    pred, target = _hand_masks()
    got = compute_dice(pred, target, empty_value=empty_value)
    np.testing.assert_allclose(got.numpy(), [4 / 7, empty_value, 0.0], rtol=1e-6)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("shape", [(2, 1, 5, 6, 3), (4, 1, 8, 8, 8), (3, 1, 7, 9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_numpy_and_monai(shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = (rng.random(shape) < 0.3).astype(np.float32)
    pred = (rng.random(shape) < 0.3).astype(np.float32)
    target[0] = 0  # both empty in case 0
    pred[0] = 0
    target[1] = 0  # empty reference, non-empty prediction in case 1
    pred[1].flat[0] = 1
    got = compute_dice(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
    expected = [_numpy_dice(p, t, 1.0) for p, t in zip(pred, target, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    monai_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    ref = monai_dice(torch.from_numpy(pred), torch.from_numpy(target))[:, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_multichannel_and_threshold_rules() -> None:
    pred, target = _hand_masks()
    expected = compute_dice(pred, target).numpy()
    # two-channel logits with the lesion channel winning exactly where pred == 1, and one-hot targets
    logits = torch.cat([1.0 - 2.0 * pred, 2.0 * pred - 1.0], dim=1) * 3.0
    one_hot = torch.cat([1.0 - target, target], dim=1)
    np.testing.assert_allclose(compute_dice(logits, one_hot).numpy(), expected)
    # single-channel logits need threshold 0: lesion logit +1, background -1
    np.testing.assert_allclose(compute_dice(2.0 * pred - 1.0, target, threshold=0.0).numpy(), expected)
    # probability map thresholded at 0.5: 0.6 counts, 0.4 does not -> case 0 becomes |A| = 2, both shared
    probs = pred * 0.6
    probs[0, 0, 0, 0, 0] = 0.4
    assert compute_dice(probs, target)[0].item() == pytest.approx(2 * 2 / (2 + 4))


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 3), "spatial"),
        (torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, 1, 4, 4, 4), "batch"),
        (torch.zeros(4, 4), torch.zeros(4, 4), "B, C"),
    ],
)
def test_invalid(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_dice(pred, target)


def test_cumulative_metric_with_nan_exclusion() -> None:
    pred, target = _hand_masks()
    metric = BinaryDiceMetric(empty_value=float("nan"))
    metric(pred[:2], target[:2])
    metric(pred[2:], target[2:])
    # the both-empty case is left out: mean of 4/7 and 0
    assert metric.aggregate().item() == pytest.approx(2 / 7)
    assert torch.isnan(metric.get_buffer()[1, 0])  # the buffer is not modified by the reduction
    with pytest.raises(ValueError, match="reduction"):
        BinaryDiceMetric(reduction="median")


def test_lesion_cases_only_leaves_out_every_lesion_free_case() -> None:
    pred, target = _hand_masks()  # case 1 both empty, case 2 a false positive on an empty reference
    metric = BinaryDiceMetric(lesion_cases_only=True)
    metric(pred, target)
    values = metric.get_buffer()[:, 0]
    assert values[0].item() == pytest.approx(4 / 7)
    assert torch.isnan(values[1:]).all()  # lesion-free: nan with and without a false positive
    assert metric.aggregate().item() == pytest.approx(4 / 7)  # the Dice on lesion cases, the test P


def test_foreground_of_two_class_logits_is_the_argmax_not_the_sign() -> None:
    # lesion logit positive but below the background's: argmax says background (the rule of Dice, has_lesion and
    # the false-positive volume alike)
    logits = torch.tensor([[3.0, 1.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1, 1)
    assert foreground(logits).flatten().tolist() == [False, True]
    assert foreground(torch.tensor([0.2, 0.7]).reshape(1, 1, 2, 1, 1)).flatten().tolist() == [False, True]
