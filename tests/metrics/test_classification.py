from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from common.metrics import (
    AUCMetric,
    SpecificityAtSensitivityMetric,
    compute_auc,
    compute_pirads_auc,
    compute_pirads_positive_probability,
    compute_pirads_specificity_at_sensitivity,
    compute_specificity_at_sensitivity,
)

# hand example: P = N = 4; thresholds 0.9, 0.8, 0.7, 0.6, 0.4, 0.3 give (TP, FP) = (1,0) (2,1) (3,1) (4,2) (4,3) (4,4)
HAND_SCORES = [0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.4, 0.3]
HAND_LABELS = [1, 1, 0, 1, 0, 1, 0, 0]


def _random_case(seed: int, ties: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 200))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[:2] = [0, 1]  # both classes present
    s = rng.normal(size=n) + y * rng.uniform(0.0, 2.0)
    if ties == "rounded":
        s = np.round(s, 1)
    elif ties == "heavy":
        s = np.round(s).clip(-1, 1)  # three distinct scores
    elif ties == "constant":
        s = np.zeros(n)
    return s, y


def _sklearn_spec_at_sens(s: np.ndarray, y: np.ndarray, sensitivity: float) -> float:
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.max(1.0 - fpr[tpr >= sensitivity]))


@pytest.mark.parametrize(
    ("sensitivity", "expected"),
    [(0.9, 0.5), (1.0, 0.5), (0.75, 0.75), (0.5, 0.75), (0.3, 0.75), (0.25, 1.0), (0.0, 1.0)],
)
def test_specificity_hand_example(sensitivity: float, expected: float) -> None:
    assert compute_specificity_at_sensitivity(HAND_SCORES, HAND_LABELS, sensitivity) == pytest.approx(expected)


def test_tied_samples_are_called_positive_together() -> None:
    # the only threshold reaching sensitivity 1 calls both tied samples at 0.5 positive: TN = 1 of 2
    assert compute_specificity_at_sensitivity([0.9, 0.5, 0.5], [0, 1, 0], 1.0) == pytest.approx(0.0)
    assert compute_specificity_at_sensitivity([0.5, 0.5, 0.1], [1, 0, 0], 1.0) == pytest.approx(0.5)


def test_auc_hand_example() -> None:
    # positive-negative pairs: 4 + (3 + 1/2) + 3 + (2 + 1/2) = 13 of 16
    assert compute_auc(HAND_SCORES, HAND_LABELS) == pytest.approx(13 / 16)


@pytest.mark.parametrize("ties", ["none", "rounded", "heavy", "constant"])
@pytest.mark.parametrize("seed", range(8))
def test_against_sklearn(seed: int, ties: str) -> None:
    s, y = _random_case(seed, ties)
    assert compute_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    for sensitivity in (0.0, 0.5, 0.8, 0.9, 0.95, 1.0):
        expected = _sklearn_spec_at_sens(s, y, sensitivity)
        assert compute_specificity_at_sensitivity(s, y, sensitivity) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auc_against_pair_count(seed: int) -> None:
    s, y = _random_case(seed, "heavy")
    diff = s[y == 1][:, None] - s[y == 0][None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert compute_auc(torch.tensor(s), torch.tensor(y)[:, None]) == pytest.approx(expected, abs=1e-12)


def test_infinite_scores_rank_like_finite_extremes() -> None:
    s = np.array([np.inf, np.inf, 2.0, 1.0, -np.inf, 0.5, -np.inf])
    y = np.array([1, 0, 1, 0, 1, 0, 0])
    finite = np.where(np.isposinf(s), 100.0, np.where(np.isneginf(s), -100.0, s))
    assert compute_auc(s, y) == pytest.approx(roc_auc_score(y, finite))
    assert compute_specificity_at_sensitivity(s, y, 0.9) == pytest.approx(_sklearn_spec_at_sens(finite, y, 0.9))


@pytest.mark.parametrize(("labels", "missing"), [([0, 0, 0], "positive"), ([1, 1, 1], "negative")])
def test_one_class_absent_gives_nan(labels: list[int], missing: str) -> None:
    with pytest.warns(UserWarning, match=f"no {missing}"):
        assert np.isnan(compute_auc([0.1, 0.2, 0.3], labels))
    with pytest.warns(UserWarning, match=f"no {missing}"):
        assert np.isnan(compute_specificity_at_sensitivity([0.1, 0.2, 0.3], labels))


@pytest.mark.parametrize(
    ("scores", "labels", "sensitivity", "match"),
    [
        ([0.1, np.nan], [0, 1], 0.9, "NaN"),
        ([0.1, 0.2], [0, 2], 0.9, "only 0 and 1"),
        ([0.1, 0.2, 0.3], [0, 1], 0.9, "same N"),
        ([0.1, 0.2], [0, 1], 1.5, "sensitivity"),
    ],
)
def test_invalid_binary_inputs(scores: list[float], labels: list[int], sensitivity: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_specificity_at_sensitivity(scores, labels, sensitivity)


PROBS = torch.tensor(
    [
        [0.70, 0.10, 0.10, 0.10],  # P(>=1) = 0.3, P(>=2) = 0.2, P(>=3) = 0.1
        [0.20, 0.50, 0.20, 0.10],  # 0.8, 0.3, 0.1
        [0.40, 0.05, 0.05, 0.50],  # 0.6, 0.55, 0.5
        [0.10, 0.20, 0.60, 0.10],  # 0.9, 0.7, 0.1
    ],
    dtype=torch.float64,
)
PIRADS = torch.tensor([0, 1, 3, 2])


@pytest.mark.parametrize(
    ("positive_class", "expected"), [(1, [0.3, 0.8, 0.6, 0.9]), (2, [0.2, 0.3, 0.55, 0.7]), (3, [0.1, 0.1, 0.5, 0.1])]
)
@pytest.mark.parametrize("logits", [False, True])
def test_positive_probability(positive_class: int, expected: list[float], logits: bool) -> None:
    y_pred = torch.log(PROBS) + 3.0 if logits else PROBS  # logits up to an additive constant
    got = compute_pirads_positive_probability(y_pred, positive_class=positive_class, logits=logits)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("positive_class", "auc", "spec"),
    [
        # labels >= 1: [0,1,1,1]; scores 0.3 | 0.8 0.6 0.9 -> AUC 1, spec 1
        (1, 1.0, 1.0),
        # labels >= 2: [0,0,1,1]; scores 0.2 0.3 | 0.55 0.7 -> AUC 1
        (2, 1.0, 1.0),
        # labels >= 3: [0,0,1,0]; scores 0.1 0.1 0.1 | 0.5 -> AUC 1
        (3, 1.0, 1.0),
    ],
)
def test_pirads_wrappers_hand(positive_class: int, auc: float, spec: float) -> None:
    one_hot = torch.nn.functional.one_hot(PIRADS, 4)
    for labels in (PIRADS, PIRADS[:, None], one_hot):
        got_auc = compute_pirads_auc(PROBS, labels, positive_class=positive_class, logits=False)
        got_spec = compute_pirads_specificity_at_sensitivity(PROBS, labels, 0.9, positive_class, logits=False)
        assert got_auc == pytest.approx(auc)
        assert got_spec == pytest.approx(spec)


def test_pirads_wrappers_non_trivial() -> None:
    # positive_class=1 with labels [0, 0, 1, 1]: negatives 0.3, 0.8; positives 0.6, 0.9
    labels = torch.tensor([0, 0, 3, 2])
    assert compute_pirads_auc(PROBS, labels, logits=False) == pytest.approx(0.75)
    assert compute_pirads_specificity_at_sensitivity(PROBS, labels, 0.9, logits=False) == pytest.approx(0.5)
    assert compute_pirads_specificity_at_sensitivity(PROBS, labels, 0.5, logits=False) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_pirads_matches_binary_on_probabilities(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, 4, generator=gen) * 2
    labels = torch.randint(0, 4, (60,), generator=gen)
    labels[:2] = torch.tensor([0, 3])
    for c in (1, 2, 3):
        score = torch.softmax(logits.double(), dim=1)[:, c:].sum(dim=1).numpy()
        binary = (labels >= c).numpy().astype(int)
        assert compute_pirads_auc(logits, labels, positive_class=c) == pytest.approx(roc_auc_score(binary, score))
        expected = _sklearn_spec_at_sens(score, binary, 0.9)
        assert compute_pirads_specificity_at_sensitivity(logits, labels, 0.9, c) == pytest.approx(expected)


def test_saturated_logits_stay_ranked() -> None:
    # P(>=1) rounds to 1.0 in float64 for both samples; their log-odds (50 vs 40) still rank the positive first
    logits = torch.tensor([[0.0, 50.0, 0.0, 0.0], [0.0, 40.0, 0.0, 0.0]], dtype=torch.float64)
    prob = torch.softmax(logits, dim=1)[:, 1:].sum(dim=1)
    assert prob[0] == prob[1] == 1.0
    assert compute_pirads_auc(logits, torch.tensor([1, 0])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("y_pred", "y", "kwargs", "match"),
    [
        (PROBS, PIRADS, {"positive_class": 0}, "positive_class"),
        (PROBS, PIRADS, {"positive_class": 4}, "positive_class"),
        (PROBS * 2, PIRADS, {"logits": False}, "summing to 1"),
        (PROBS, torch.tensor([0, 1, 4, 2]), {}, r"\[0, 3\]"),
        (PROBS, torch.tensor([0, 1, 2]), {}, "one-hot"),
        (PROBS[:, 0], PIRADS, {}, r"\(B, K\)"),
    ],
)
def test_pirads_invalid(y_pred: torch.Tensor, y: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_pirads_auc(y_pred, y, **kwargs)


def test_bf16_logits_accepted() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.5]], dtype=torch.bfloat16)
    # positive log-odds: -2, 1, 3, -0.5 with labels 0, 0, 1, 1 -> pairs won 1 + 1 + 0 + 1 = 3 of 4
    assert compute_pirads_auc(logits, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_cumulative_metrics_over_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 4, generator=gen)
    labels = torch.randint(0, 4, (30,), generator=gen)
    labels[:2] = torch.tensor([0, 2])
    auc, spec = AUCMetric(positive_class=2), SpecificityAtSensitivityMetric(sensitivity=0.8, positive_class=2)
    for metric in (auc, spec):
        metric(logits[:12], labels[:12])
        metric([x for x in logits[12:]], [y for y in labels[12:, None]])  # decollated channel-first items
    assert auc.aggregate() == pytest.approx(compute_pirads_auc(logits, labels, positive_class=2))
    assert spec.aggregate() == pytest.approx(compute_pirads_specificity_at_sensitivity(logits, labels, 0.8, 2))
    auc.reset()
    with pytest.raises(ValueError, match="no data"):
        auc.aggregate()


@pytest.mark.parametrize("kwargs", [{"sensitivity": -0.1}, {"positive_class": 0}])
def test_metric_constructor_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SpecificityAtSensitivityMetric(**kwargs)
