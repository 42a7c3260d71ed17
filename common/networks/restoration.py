"""Residual formulation of the image-to-image (restoration) networks: super-resolution and distortion correction.

A deviation from the paper (Huang et al., ISBI 2026, section 2.2), which does not say how its restoration heads are
formulated (DESIGN.md section 2). Measured before it, on the smoke cohort: ProFound super-resolution finetune with the
default UperNet decoder reached SSIM 0.44 after 400 steps, where trilinear upsampling of the input gives 0.99; its
decoder predicts at stride 4 and resizes, and average-pooling the target by (4, 4, 8) and upsampling it again gives
0.53, the best such a head can do; UNETR reached 0.63. Distortion correction: models 0.11, the distorted input 0.94.
Predicting a correction over the trivial baseline, through a full-resolution refinement whose last layer starts at
zero, makes step 0 equal the baseline exactly and lets no head predict at a coarser resolution than its target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks.refinement import FullResolutionRefinement
from .wrapper import WrappedNetwork

__all__ = ["ResidualRestoration"]


class ResidualRestoration(WrappedNetwork):
    """A restoration network as a correction of the trivial baseline:
    ``y = baseline(x) + refine(cat[baseline(x), network(x)])``.

    ``baseline(x)`` is the degraded input on the target grid: ``F.interpolate(x, size=(H * s0, W * s1, D * s2),
    mode="trilinear", align_corners=False)`` for super-resolution (the task's trivial baseline, trilinear upsampling
    of the input), the input itself when ``scale == (1, 1, 1)`` (distortion correction: the distorted input).
    ``refine`` is a :class:`~common.networks.blocks.FullResolutionRefinement`: ``refine_layers`` 3x3x3
    convolutions of width ``refine_channels`` at the target resolution, reading the baseline image and the wrapped
    network's output, then a 3x3x3 convolution with zero weight and bias. So at step 0 the output is ``baseline(x) +
    0``, bit for bit; the first optimiser step moves the last layer away from zero, and from then on gradients reach
    the refinement's hidden layers and the wrapped network. No dense head predicts only at a coarser resolution than
    its target: the refinement sees the full-resolution baseline.

    The wrapped network is kept as :attr:`network` (parameter names ``network.<its names>``): the bundles' network
    initialisation (``common.bundle.init_network``) loads the pretrained encoder into it and applies the FM's freezing
    protocol to it (``freeze_profound_finetune`` / ``freeze_provicnet_finetune`` find its ``encoder`` / ``backbone``),
    so the refinement, outside it, always trains. :meth:`forward_representations` and :meth:`representation_kinds`
    are the wrapped network's: the recorded representations stay the FM's (``head_input`` is the input of the
    wrapped network's own final prediction layer, not of the refinement). Compiles with ``torch.jit.script`` when the
    wrapped network does (``forward`` only).

    This residual formulation is a deviation from the paper (see the module docstring for why); ``residual=False``
    gives the plain wrapped network, ``y = network(x)``, with no refinement built (the paper's unspecified
    formulation, for comparison).

    Args:
        network: the restoration network, ``(B, C, H, W, D) -> (B, C, H * s0, W * s1, D * s2)``, e.g.
            :class:`~common.networks.ProFoundSuperRes`, :class:`~common.networks.ProViCNetDense`.
        scale: integer factor per axis of ``(H, W, D)`` from the input to the target grid. Default ``(1, 1, 1)``
            (distortion correction); ``(1, 1, 2)`` for the study's super-resolution (48 -> 96 slices).
        channels: image channels ``C`` of input and output (the baseline is added channel-wise). Default 1.
        residual: predict a correction of the baseline (True) or return the plain network (False). Default True.
        refine_channels: width of the refinement's hidden layers. Default 8.
        refine_layers: hidden 3x3x3 convolutions of the refinement before its zero-initialised one. Default 1 (at
            64 x 64 x 32, batch 2, one CPU thread, a training step of the refinement takes 0.14 s at (8, 1) and 0.43 s
            at (16, 2), more than the frozen-encoder ProFound network it wraps).

    Shapes: ``(B, C, H, W, D) -> (B, C, H * s0, W * s1, D * s2)``; the wrapped network's output must have that shape.

    Raises:
        ValueError: on arguments out of range; in ``forward``, on an input without ``C`` channels or a network output
            not on the target grid.
    """

    def __init__(
        self,
        network: nn.Module,
        scale: Sequence[int] = (1, 1, 1),
        channels: int = 1,
        residual: bool = True,
        refine_channels: int = 8,
        refine_layers: int = 1,
    ) -> None:
        super().__init__(network)
        values = tuple(int(s) for s in scale)
        if len(values) != 3 or min(values) < 1:
            raise ValueError(f"ResidualRestoration: scale must be three positive integers, got {tuple(scale)}.")
        if channels < 1:
            raise ValueError(f"ResidualRestoration: channels must be >= 1, got {channels}.")
        if not isinstance(residual, bool):  # a command-line "false" would otherwise read as True
            raise ValueError(f"ResidualRestoration: residual must be True or False, got {residual!r}.")
        self.scale: tuple[int, int, int] = (values[0], values[1], values[2])
        self.channels = channels
        self.residual = residual
        self.refine: FullResolutionRefinement | None = None
        if self.residual:
            self.refine = FullResolutionRefinement(2 * channels, channels, refine_channels, refine_layers)

    def baseline(self, x: torch.Tensor) -> torch.Tensor:
        """The trivial baseline on the target grid: ``(B, C, H, W, D) -> (B, C, H * s0, W * s1, D * s2)``, trilinear
        (``align_corners=False``), or ``x`` itself when ``scale == (1, 1, 1)``."""
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(f"ResidualRestoration: expected (B, {self.channels}, H, W, D), got {list(x.shape)}.")
        s0, s1, s2 = self.scale
        if s0 == 1 and s1 == 1 and s2 == 1:
            return x
        size = [x.shape[2] * s0, x.shape[3] * s1, x.shape[4] * s2]
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D) -> (B, C, H * s0, W * s1, D * s2)``."""
        refine = self.refine
        if refine is None:
            return self.network(x)
        base = self.baseline(x)
        out = self.network(x)
        if out.shape != base.shape:
            raise ValueError(
                f"ResidualRestoration: the network's output {list(out.shape)} is not on the target grid "
                f"{list(base.shape)} (input {list(x.shape)}, scale {self.scale})."
            )
        return base + refine(torch.cat([base, out.to(base.dtype)], dim=1))
