"""Tests for common.alignment.pairing.pair_by_ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.alignment import pair_by_ids


def test_reorders_b_to_the_order_of_a() -> None:
    feat_a = np.array([[1.0], [2.0], [3.0]])
    feat_b = np.array([[30.0, 0.3], [10.0, 0.1], [20.0, 0.2]])  # widths may differ
    a, b, ids = pair_by_ids(feat_a, ["img1", "img2", "img3"], feat_b, ["img3", "img1", "img2"])
    np.testing.assert_array_equal(a, [[1.0], [2.0], [3.0]])
    np.testing.assert_array_equal(b, [[10.0, 0.1], [20.0, 0.2], [30.0, 0.3]])
    assert ids == ["img1", "img2", "img3"]


def test_same_order_and_torch_inputs() -> None:
    feat_a = torch.arange(6.0).reshape(3, 2)
    feat_b = torch.arange(6.0).reshape(3, 2) * 10
    a, b, ids = pair_by_ids(feat_a, ("a", "b", "c"), feat_b, np.array(["a", "b", "c"]))
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(b, [[0.0, 10.0], [20.0, 30.0], [40.0, 50.0]])
    assert ids == ["a", "b", "c"]


def test_ids_compared_as_strings() -> None:
    _, b, ids = pair_by_ids(np.zeros((2, 1)), [7, 8], np.array([[8.0], [7.0]]), ["8", "7"])
    np.testing.assert_array_equal(b, [[7.0], [8.0]])
    assert ids == ["7", "8"]


def test_inputs_not_modified() -> None:
    feat_b = np.array([[2.0], [1.0]])
    ids_b = ["y", "x"]
    _, b, _ = pair_by_ids(np.zeros((2, 1)), ["x", "y"], feat_b, ids_b)
    b[0, 0] = 99.0
    np.testing.assert_array_equal(feat_b, [[2.0], [1.0]])
    assert ids_b == ["y", "x"]


@pytest.mark.parametrize(
    ("ids_a", "ids_b", "match"),
    [
        (["a", "b", "c"], ["a", "b", "zz"], r"1 only in ids_a \(e.g. \['c'\]\), 1 only in ids_b \(e.g. \['zz'\]\)"),
        (["a", "a", "b"], ["a", "b", "c"], r"ids_a has duplicate image ids \(1\), e.g. \['a'\]"),
        (["a", "b", "c"], ["c", "c", "c"], r"ids_b has duplicate image ids \(1\), e.g. \['c'\]"),
        (["a", "b"], ["a", "b", "c"], "ids_a has 2 ids for 3 feature rows"),
        ("abc", ["a", "b", "c"], "not a single string"),
    ],
)
def test_rejects_mismatched_ids(ids_a: list[str], ids_b: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pair_by_ids(np.zeros((3, 2)), ids_a, np.ones((3, 2)), ids_b)


def test_error_names_at_most_five_ids() -> None:
    ids_a = [f"a{i}" for i in range(8)]
    ids_b = [f"b{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"8 only in ids_a \(e.g. \['a0', 'a1', 'a2', 'a3', 'a4'\]\)") as err:
        pair_by_ids(np.zeros((8, 1)), ids_a, np.zeros((8, 1)), ids_b)
    assert "a5" not in str(err.value)


def test_rejects_non_2d_features() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pair_by_ids(np.zeros(3), ["a", "b", "c"], np.zeros((3, 1)), ["a", "b", "c"])
