"""A dense prediction network with a full-resolution refinement of its output: the segmentation networks of the study.

A deviation from the paper (Huang et al., ISBI 2026, section 2.2), which does not say how its segmentation heads reach
the input resolution (DESIGN.md section 2: no dense head predicts only at a coarser resolution than its target).
ProFound's UperNet decoder predicts at stride 4 and ProViCNet's head at 8/14 of the resized slice, and both resize
their logits to the input grid. The lesions of the study are small: on the demo cohort most cover 6-30 voxels of a
64 x 64 x 32 volume, about the size of one stride-4 cell, where thresholding the high-b DWI alone reaches Dice
0.74-0.83.
Measured before this wrapper, demo profile: the FM finetunes reached Dice 0.04 on lesion cases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks.refinement import FullResolutionRefinement
from .wrapper import WrappedNetwork

__all__ = ["RefinedDense"]


class RefinedDense(WrappedNetwork):
    """``y = network(x) + refine(cat[x, network(x)])``: the wrapped network's output (e.g. segmentation logits) plus a
    correction computed at the input resolution from the input itself.

    ``refine`` is a :class:`~common.networks.blocks.FullResolutionRefinement` (``refine_layers`` 3x3x3 convolutions of
    width ``refine_channels``, then a zero-initialised 3x3x3 convolution), so at step 0 the output is the wrapped
    network's, bit for bit. It sits outside :attr:`network`: the bundles' network initialisation loads the pretrained
    encoder into :attr:`network` and applies the FM's freezing protocol to it, so the refinement, like the task head,
    always trains. :meth:`forward_representations` and :meth:`representation_kinds` are the wrapped network's (the
    recorded layers stay the FM's). With ``refine_channels=0`` no refinement is built and the wrapper returns the
    plain network's output (the paper's heads).

    Args:
        network: the dense network, ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``, e.g.
            :class:`~common.networks.ProFoundDense`, :class:`~common.networks.ProViCNetDense`.
        in_channels: ``C_in``. Default 2 (T2W and a diffusion map).
        out_channels: ``C_out``. Default 2 (background and lesion logits).
        refine_channels: width of the refinement's hidden layers; 0 builds none. Default 8.
        refine_layers: hidden 3x3x3 convolutions before the zero-initialised one. Default 1.
        foreground_prior: None (default) or ``pi`` in (0, 1): the zero-initialised layer's bias starts at
            ``log(pi / (1 - pi))`` on every channel but the first (background), so that at step 0 the output is the
            wrapped network's logits plus that constant, and a two-class softmax gives each voxel about ``pi``
            foreground (the prior initialisation of Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
            section 3.3). Measured on the demo cohort with ``pi = 0.01`` and the Tversky loss (single runs): at 720
            steps it kept the ProFound finetune from collapsing to the empty mask (Dice 0.176 on lesion cases, 0
            without); at 240 steps it hurt (ProFound scratch collapsed, ProViCNet finetune 0.134 -> 0.086): through
            a softmax at ``pi`` a probability loss's gradient is ``pi (1 - pi)`` of its own, a 25th of that at 0.5.
            Off by default.

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``.

    Raises:
        ValueError: on arguments out of range; in ``forward``, on an input without ``C_in`` channels or a network
            output not of shape ``(B, C_out, H, W, D)``.
    """

    def __init__(
        self,
        network: nn.Module,
        in_channels: int = 2,
        out_channels: int = 2,
        refine_channels: int = 8,
        refine_layers: int = 1,
        foreground_prior: float | None = None,
    ) -> None:
        super().__init__(network)
        if in_channels < 1 or out_channels < 1 or refine_channels < 0 or refine_layers < 1:
            raise ValueError(
                "RefinedDense: need in_channels, out_channels, refine_layers >= 1 and refine_channels >= 0, got "
                f"{in_channels}, {out_channels}, {refine_layers}, {refine_channels}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.refine: FullResolutionRefinement | None = None
        if refine_channels > 0:
            self.refine = FullResolutionRefinement(
                in_channels + out_channels, out_channels, refine_channels, refine_layers
            )
        self.foreground_prior = foreground_prior
        if foreground_prior is not None:
            if not 0.0 < foreground_prior < 1.0 or self.refine is None or out_channels < 2:
                raise ValueError(
                    "RefinedDense: foreground_prior needs 0 < prior < 1, a refinement and out_channels >= 2, got "
                    f"{foreground_prior}, refine_channels={refine_channels}, out_channels={out_channels}."
                )
            with torch.no_grad():
                self.refine.out.bias[1:] = math.log(foreground_prior / (1.0 - foreground_prior))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"RefinedDense: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}.")
        out = self.network(x)
        refine = self.refine
        if refine is None:
            return out
        expected = [x.shape[0], self.out_channels] + list(x.shape[2:])
        if list(out.shape) != expected:
            raise ValueError(f"RefinedDense: the network's output {list(out.shape)} is not {expected}.")
        return out + refine(torch.cat([x.to(out.dtype), out], dim=1))
