"""Seeded, stratified train/validation/test splits with exact largest-remainder counts.

The paper's PROMIS tasks use 555/37/148 cases (75 % / 5 % / 20 %, Huang et al., ISBI 2026, section 3.1) and the
distortion-correction task the few-shot cohort's 330/82/177; :func:`split_ids` reproduces those proportions on a
cohort of any size.

Counts: split ``j`` gets ``floor(n * p_j / sum(p))`` ids, the remaining ids go one each to the splits with the
largest fractional parts (ties to the earlier split), and a split left empty takes one id from the largest split,
so that every split is non-empty whenever ``n >= len(proportions)``.

Stratification: the ids are shuffled within each stratum, the strata are concatenated in a shuffled order, and the
concatenation is dealt to the splits by a low-discrepancy sequence (at each position the split furthest behind its
quota takes the id). Any contiguous run of ids, and so every stratum, is then divided in the global proportions up
to about one id per split.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["PROMIS_PROPORTIONS", "FEW_SHOT_PROPORTIONS", "split_counts", "split_ids"]

PROMIS_PROPORTIONS: tuple[int, int, int] = (555, 37, 148)
"""PROMIS training/validation/test cases in the paper (section 3.1)."""
FEW_SHOT_PROPORTIONS: tuple[int, int, int] = (330, 82, 177)
"""Few-shot prostate cohort of the distortion-correction task (section 3.1)."""


def split_counts(n: int, proportions: Sequence[float] = PROMIS_PROPORTIONS) -> list[int]:
    """Number of ids per split for ``n`` ids: largest-remainder rounding, then at least one per split.

    ``split_counts(740, (555, 37, 148)) == [555, 37, 148]``; ``split_counts(24) == [18, 1, 5]``.
    Raises ``ValueError`` if a proportion is not positive or ``n < len(proportions)``.
    """
    props = [float(p) for p in proportions]
    if not props:
        raise ValueError("proportions must name at least one split")
    if any(not np.isfinite(p) or p <= 0 for p in props):
        raise ValueError(f"proportions must be finite and positive, got {tuple(proportions)}")
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"n must be an integer, got {n!r}")
    n = int(n)
    if n < len(props):
        raise ValueError(f"{n} ids cannot fill {len(props)} non-empty splits; need at least {len(props)}")
    total = sum(props)
    quotas = [n * p / total for p in props]
    counts = [int(np.floor(q)) for q in quotas]
    # Python's sort is stable, so equal fractional parts go to the earlier split.
    order = sorted(range(len(props)), key=lambda j: -(quotas[j] - counts[j]))
    for j in order[: n - sum(counts)]:
        counts[j] += 1
    for j in range(len(counts)):
        if counts[j] == 0:
            donor = max(range(len(counts)), key=lambda i: counts[i])
            counts[donor] -= 1
            counts[j] += 1
    return counts


def _deal(counts: Sequence[int]) -> list[int]:
    """Split index for each position ``0..sum(counts)-1``: the split furthest behind its quota takes the position."""
    n = sum(counts)
    taken = [0] * len(counts)
    sequence = []
    for t in range(1, n + 1):
        lag = [(c * t / n - k) if k < c else -np.inf for c, k in zip(counts, taken, strict=True)]
        j = int(np.argmax(lag))
        taken[j] += 1
        sequence.append(j)
    return sequence


def split_ids(
    ids: Sequence[str],
    proportions: Sequence[float] = PROMIS_PROPORTIONS,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
) -> tuple[list[str], ...]:
    """Split ``ids`` into ``len(proportions)`` disjoint lists (training, validation, test by default).

    Args:
        ids: unique case ids.
        proportions: relative split sizes, default the paper's PROMIS 555/37/148; counts as in :func:`split_counts`.
        seed: seed of the shuffle; the same arguments give the same split.
        strata: one label per id (e.g. the PI-RADS class); each stratum is divided in the global proportions up to
            about one id per split. ``None``: one stratum.

    Returns:
        One list per split, each in the order the ids were given.

    Raises:
        ValueError: duplicate ids, ``strata`` of the wrong length, non-positive proportions, or fewer ids than
            splits.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"ids must be unique; repeated: {dupes[:10]}")
    if strata is None:
        labels: list[Hashable] = [0] * len(ids)
    else:
        labels = list(strata)
        if len(labels) != len(ids):
            raise ValueError(f"strata must have one label per id: {len(labels)} labels for {len(ids)} ids")
    counts = split_counts(len(ids), proportions)
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(label, []).append(position)
    # Strata in first-seen order, so that the result does not depend on how labels sort.
    keys = list(groups)
    ordered: list[int] = []
    for g in rng.permutation(len(keys)):
        members = groups[keys[int(g)]]
        ordered.extend(members[int(m)] for m in rng.permutation(len(members)))
    assignment = [0] * len(ids)
    for position, split in zip(ordered, _deal(counts), strict=True):
        assignment[position] = split
    return tuple([i for i, a in zip(ids, assignment, strict=True) if a == j] for j in range(len(counts)))
