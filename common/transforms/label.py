"""PI-RADS score to the classification task's K = 4 classes (paper section 3.1).

PI-RADS 1 and 2 (clinically significant cancer unlikely) share class 0; 3, 4 and 5 are classes 1, 2 and 3.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple

__all__ = ["NUM_CLASSES", "PIRADS_TO_CLASS", "PiradsToClass", "PiradsToClassd"]

PIRADS_TO_CLASS: dict[int, int] = {1: 0, 2: 0, 3: 1, 4: 2, 5: 3}
NUM_CLASSES = 4


class PiradsToClass(Transform):
    """PI-RADS score (int 1..5, or a float / one-element array with an integral value) -> class 0..3."""

    def __call__(self, pirads: Any) -> int:
        """``pirads`` -> ``PIRADS_TO_CLASS[pirads]``; anything else raises ``ValueError``."""
        value = pirads
        if isinstance(value, torch.Tensor | np.ndarray):
            n = value.numel() if isinstance(value, torch.Tensor) else value.size
            if n != 1:
                raise ValueError(f"PI-RADS must be one integer in 1..5, got an array of shape {tuple(value.shape)}")
            value = value.reshape(-1)[0].item()
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"PI-RADS must be an integer in 1..5, got {pirads!r}")
        if isinstance(value, float | np.floating) and (math.isnan(value) or not float(value).is_integer()):
            raise ValueError(f"PI-RADS must be an integer in 1..5, got {pirads!r}")
        score = int(value)
        if score not in PIRADS_TO_CLASS:
            raise ValueError(f"PI-RADS must be an integer in 1..5, got {pirads!r}")
        return PIRADS_TO_CLASS[score]


class PiradsToClassd(MapTransform):
    """Dictionary wrapper of :class:`PiradsToClass`: writes a 0-d ``torch.int64`` class tensor.

    Args:
        keys: the PI-RADS score(s) (default ``"pirads"``).
        output_keys: where the classes go, one per key; ``None`` replaces the inputs.
        id_key: the case id, named in errors (default ``"id"``).
        allow_missing_keys: skip keys absent from the sample.
    """

    def __init__(
        self,
        keys: KeysCollection = "pirads",
        output_keys: KeysCollection | None = None,
        id_key: str = "id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"need one output key per key, got keys={self.keys}, output_keys={self.output_keys}")
        self.id_key = id_key
        self.to_class = PiradsToClass()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """``data[key]`` PI-RADS -> ``data[output_key]`` 0-d int64 class tensor."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            try:
                cls = self.to_class(d[key])
            except ValueError as err:
                raise ValueError(f"case {str(d.get(self.id_key, '<no id>'))!r}, key {key!r}: {err}") from err
            d[out_key] = torch.tensor(cls, dtype=torch.int64)
        return d
