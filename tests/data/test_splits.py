from __future__ import annotations

from collections import Counter

import pytest

from common.data.splits import FEW_SHOT_PROPORTIONS, PROMIS_PROPORTIONS, split_counts, split_ids


@pytest.mark.parametrize(
    ("n", "proportions", "expected"),
    [
        (740, PROMIS_PROPORTIONS, [555, 37, 148]),
        (589, FEW_SHOT_PROPORTIONS, [330, 82, 177]),
        # 18.0 / 1.2 / 4.8: floors 18, 1, 4; the spare id goes to the largest remainder (test, 0.8).
        (24, PROMIS_PROPORTIONS, [18, 1, 5]),
        # 7.5 / 0.5 / 2.0: floors 7, 0, 2; tie 0.5 / 0.5 goes to training -> 8, 0, 2; validation takes one back.
        (10, PROMIS_PROPORTIONS, [7, 1, 2]),
        # 3.0 / 0.2 / 0.8: 3, 0, 1 after rounding, validation takes one from training.
        (4, PROMIS_PROPORTIONS, [2, 1, 1]),
        (3, PROMIS_PROPORTIONS, [1, 1, 1]),
        # 100 * (330, 82, 177) / 589 = 56.03 / 13.92 / 30.05: floors 56, 13, 30, spare to validation (0.92).
        (100, FEW_SHOT_PROPORTIONS, [56, 14, 30]),
        (5, (1, 1), [3, 2]),
    ],
)
def test_split_counts_largest_remainder(n: int, proportions: tuple[int, ...], expected: list[int]) -> None:
    assert split_counts(n, proportions) == expected


@pytest.mark.parametrize(
    ("n", "proportions", "match"),
    [
        (2, PROMIS_PROPORTIONS, "at least 3"),
        (0, PROMIS_PROPORTIONS, "at least 3"),
        (10, (555, 0, 148), "positive"),
        (10, (555, -1, 148), "positive"),
        (10, (), "at least one"),
    ],
)
def test_split_counts_rejects(n: int, proportions: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_counts(n, proportions)


def _ids(n: int) -> list[str]:
    return [f"case_{i:04d}" for i in range(n)]


@pytest.mark.parametrize("n", [3, 7, 24, 740])
def test_split_ids_partition_and_counts(n: int) -> None:
    ids = _ids(n)
    parts = split_ids(ids, seed=5)
    assert [len(p) for p in parts] == split_counts(n)
    assert all(parts)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == ids and len(set(flat)) == n
    for part in parts:  # each split keeps the input order
        assert part == sorted(part, key=ids.index)


def test_split_ids_deterministic_and_seeded() -> None:
    ids = _ids(60)
    assert split_ids(ids, seed=1) == split_ids(list(ids), seed=1)
    assert split_ids(ids, seed=1) != split_ids(ids, seed=2)


def test_split_ids_other_proportions() -> None:
    parts = split_ids(_ids(589), FEW_SHOT_PROPORTIONS, seed=0)
    assert [len(p) for p in parts] == [330, 82, 177]


@pytest.mark.parametrize("seed", [0, 3])
def test_split_ids_stratified_740(seed: int) -> None:
    # Four PI-RADS classes of 222, 185, 185, 148 cases; each is split 75 / 5 / 20 % up to one case per split.
    sizes = [222, 185, 185, 148]
    strata = [c for c, size in enumerate(sizes) for _ in range(size)]
    ids = _ids(sum(sizes))
    label = dict(zip(ids, strata, strict=True))
    parts = split_ids(ids, seed=seed, strata=strata)
    assert [len(p) for p in parts] == [555, 37, 148]
    for part, share in zip(parts, (0.75, 0.05, 0.20), strict=True):
        counts = Counter(label[i] for i in part)
        for c, size in enumerate(sizes):
            assert abs(counts[c] - share * size) <= 1.0, (c, counts[c], share * size)


def test_split_ids_stratified_small() -> None:
    # 40 ids -> 30 / 2 / 8; two strata of 20 -> 15 / 1 / 4 each.
    strata = ["low"] * 20 + ["high"] * 20
    ids = _ids(40)
    parts = split_ids(ids, seed=11, strata=strata)
    for part, expected in zip(parts, (15, 1, 4), strict=True):
        assert Counter(strata[ids.index(i)] for i in part) == {"low": expected, "high": expected}


def test_split_ids_unstratified_can_be_unbalanced() -> None:
    # Without strata a split is a plain shuffle: over seeds, the 8-case test split of 20 "low" + 20 "high" ids is
    # not always 4 + 4, while stratified it always is.
    strata = ["low"] * 20 + ["high"] * 20
    ids = _ids(40)
    plain = {sum(ids.index(i) < 20 for i in split_ids(ids, seed=s)[2]) for s in range(20)}
    stratified = {sum(ids.index(i) < 20 for i in split_ids(ids, seed=s, strata=strata)[2]) for s in range(20)}
    assert len(plain) > 1
    assert stratified == {4}


def test_split_ids_unorderable_strata() -> None:
    parts = split_ids(_ids(12), seed=0, strata=[None, 1, "a"] * 4)
    assert sum(len(p) for p in parts) == 12


@pytest.mark.parametrize(
    ("ids", "kwargs", "match"),
    [
        (["a", "b"], {}, "at least 3"),
        (["a", "b", "a", "c"], {}, "unique"),
        (["a", "b", "c"], {"strata": [0, 1]}, "one label per id"),
        (["a", "b", "c"], {"proportions": (1, 0, 1)}, "positive"),
    ],
)
def test_split_ids_rejects(ids: list[str], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_ids(ids, **kwargs)
