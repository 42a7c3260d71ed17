"""Per-case random generators: evaluation degradations that are identical in every run and every order."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def case_rng(seed: int, case_id: str, salt: str = "") -> np.random.Generator:
    """A generator derived only from ``(seed, case_id, salt)``.

    The same case gets the same draws whatever the run, the worker or the order of the dataset; ``salt`` (the
    transform's name) keeps two transforms seeded alike from drawing correlated numbers.
    """
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), zlib.crc32(str(case_id).encode()), zlib.crc32(salt.encode())])


def case_id_of(data: Mapping[str, Any], id_key: str, owner: str) -> str:
    """``data[id_key]`` as a string; a ``ValueError`` naming ``owner`` when the sample has no id."""
    if id_key not in data or data[id_key] is None:
        raise ValueError(
            f"{owner}: deterministic_per_case needs the case id under {id_key!r}, but the sample has keys "
            f"{sorted(data)}"
        )
    case_id = data[id_key]
    # a collated or listed id (one case) still names the case
    if isinstance(case_id, list | tuple) and len(case_id) == 1:
        case_id = case_id[0]
    return str(case_id)


def describe_case(data: Mapping[str, Any], key: str, id_key: str = "id") -> str:
    """``"'adc' of case 'case_0003' (/data/case_0003_adc.nii.gz)"``: what error messages name."""
    text = f"{key!r}"
    if id_key in data:
        text += f" of case {str(data[id_key])!r}"
    meta = getattr(data.get(key), "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        text += f" ({meta['filename_or_obj']})"
    return text
