"""Segmentation input: T2W plus one diffusion map chosen at random per sample (paper section 3.1)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from common.contract import DIFFUSION_KEY
from common.transforms._random import case_id_of, case_rng

__all__ = ["RandDiffusionChoiced"]


class RandDiffusionChoiced(Randomizable, MapTransform):
    """Concatenate ``[t2w, chosen]`` into one 2-channel image, ``chosen`` drawn among ``diffusion_keys``.

    ``data[t2w_key]`` ``(1, H, W, D)`` and each ``data[diffusion_key]`` ``(1, H, W, D)`` ->
    ``data[output_key]`` ``(2, H, W, D)``; ``data[choice_key]`` holds the chosen key's name (e.g. ``"adc"``).

    Args:
        t2w_key: the first channel (default ``"t2w"``).
        diffusion_keys: candidates for the second channel, drawn with equal probability (default ADC and
            high-b DWI, ``("adc", "dwi")``).
        output_key: where the 2-channel image goes (default ``"image"``).
        choice_key: where the chosen key's name goes (default ``"diffusion"``).
        seed: seed of the per-case generators and of the transform's own generator (default 0).
        deterministic_per_case: draw from ``(seed, case id)`` (evaluation; default False draws from the
            transform's own generator, training augmentation).
        id_key: the case id (default ``"id"``).
    """

    def __init__(
        self,
        t2w_key: str = "t2w",
        diffusion_keys: Sequence[str] = ("adc", "dwi"),
        output_key: str = "image",
        choice_key: str = DIFFUSION_KEY,
        seed: int = 0,
        deterministic_per_case: bool = False,
        id_key: str = "id",
    ) -> None:
        diffusion_keys = (diffusion_keys,) if isinstance(diffusion_keys, str) else tuple(diffusion_keys)
        if not diffusion_keys:
            raise ValueError("diffusion_keys must name at least one key")
        MapTransform.__init__(self, (t2w_key, *diffusion_keys))
        case_rng(seed, "")  # validates seed
        self.t2w_key = t2w_key
        self.diffusion_keys = diffusion_keys
        self.output_key = output_key
        self.choice_key = choice_key
        self.seed = int(seed)
        self.deterministic_per_case = bool(deterministic_per_case)
        self.id_key = id_key
        self.choice = diffusion_keys[0]
        self.set_random_state(seed=seed)

    def randomize(self, data: Mapping[Hashable, Any] | None = None) -> None:
        """Draw ``self.choice`` for the sample ``data``."""
        if self.deterministic_per_case:
            rng = case_rng(self.seed, case_id_of(data or {}, self.id_key, type(self).__name__), type(self).__name__)
        else:
            rng = self.R
        # uniform() exists on both the per-case Generator and MONAI's RandomState
        n = len(self.diffusion_keys)
        self.choice = self.diffusion_keys[min(int(rng.uniform() * n), n - 1)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Writes ``data[output_key]`` ``(2, H, W, D)`` and ``data[choice_key]``."""
        d = dict(data)
        missing = [k for k in self.keys if k not in d]
        if missing:
            raise ValueError(f"RandDiffusionChoiced: keys {missing} are missing; the sample has {sorted(d)}")
        self.randomize(d)
        t2w, chosen = d[self.t2w_key], d[self.choice]
        if tuple(t2w.shape[1:]) != tuple(chosen.shape[1:]):
            raise ValueError(
                f"{self.t2w_key!r} {tuple(t2w.shape)} and {self.choice!r} {tuple(chosen.shape)} must share a grid "
                "(align them first)"
            )
        image = torch.cat([torch.as_tensor(t2w), torch.as_tensor(chosen).to(t2w.dtype)], dim=0)
        if isinstance(t2w, MetaTensor):
            image = MetaTensor(image, meta=dict(t2w.meta))
        d[self.output_key] = image
        d[self.choice_key] = self.choice
        return d
