"""Building blocks of the networks in :mod:`common.networks` (one block family per file)."""

from __future__ import annotations

from .convnext import ConvNeXtV2Block, LayerNormChannelsFirst
from .grn import GRN
from .refinement import FullResolutionRefinement

__all__ = ["GRN", "ConvNeXtV2Block", "FullResolutionRefinement", "LayerNormChannelsFirst"]
