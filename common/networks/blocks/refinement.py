"""A small full-resolution convolutional refinement whose last layer starts at zero.

Used by the image-to-image networks of the study (:class:`~common.networks.ResidualRestoration`, and the DDPM
denoiser :class:`~common.networks.TimestepConditioned`) so that no dense head predicts only at a coarser resolution
than its target (DESIGN.md section 2). The zero-initialised last layer follows the "zero module" of Nichol and
Dhariwal, "Improved Denoising Diffusion Probabilistic Models", ICML 2021 (also ControlNet's zero convolution): the
refinement adds exactly 0 at initialisation, so the model it is added to starts where it would without it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FullResolutionRefinement"]


class FullResolutionRefinement(nn.Module):
    """``hidden_layers`` 3x3x3 convolutions with GELU, then a zero-initialised 3x3x3 convolution, all at the input's
    resolution (no striding, padding 1).

    Layers: ``Conv3d(C_in, R) -> GELU -> [Conv3d(R, R) -> GELU] * (hidden_layers - 1) -> Conv3d(R, C_out)``, the
    last with zero weight and bias, so :meth:`forward` returns exactly zero (every element ``0.0``) until it is
    trained; gradients reach the hidden layers (and whatever produced the input) from the first optimiser step on,
    once the last layer is no longer zero. With ``hidden_layers=0`` it is the single zero-initialised convolution.
    No normalisation layer: batches of one volume train.

    An optional condition vector ``(B, cond_channels)`` (e.g. a diffusion timestep embedding) is projected by a
    Linear layer to ``R`` channels and added to the first hidden layer's output, broadcast over space (as the
    timestep enters a DDPM residual block).

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        channels: width ``R`` of the hidden layers. Default 8.
        hidden_layers: number of hidden convolutions before the zero-initialised one. Default 1.
        cond_channels: width of the optional condition vector; 0 for none. Default 0.

    Shapes: ``(B, C_in, H, W, D)``, optional ``(B, cond_channels)`` -> ``(B, C_out, H, W, D)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, channels: int = 8, hidden_layers: int = 1, cond_channels: int = 0
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or channels < 1:
            raise ValueError(
                "FullResolutionRefinement: in_channels, out_channels and channels must be >= 1, got "
                f"{in_channels}, {out_channels}, {channels}."
            )
        if hidden_layers < 0 or cond_channels < 0:
            raise ValueError(
                f"FullResolutionRefinement: hidden_layers and cond_channels must be >= 0, got {hidden_layers}, "
                f"{cond_channels}."
            )
        if cond_channels and not hidden_layers:
            raise ValueError("FullResolutionRefinement: a condition needs at least one hidden layer to enter.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.cond_channels = cond_channels
        widths = [in_channels] + [channels] * hidden_layers
        self.hidden = nn.ModuleList(nn.Conv3d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.act = nn.GELU()
        self.cond: nn.Linear | None = nn.Linear(cond_channels, channels) if cond_channels else None
        self.out = nn.Conv3d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C_in, H, W, D)``, optional ``(B, cond_channels)`` -> ``(B, C_out, H, W, D)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FullResolutionRefinement: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}."
            )
        if cond is None and self.cond_channels > 0:
            raise ValueError(f"FullResolutionRefinement: needs a condition (B, {self.cond_channels}), got None.")
        h = x
        for i, conv in enumerate(self.hidden):
            h = conv(h)
            if i == 0 and cond is not None:
                proj = self.cond
                if proj is None:
                    raise ValueError("FullResolutionRefinement: got a condition but was built with cond_channels=0.")
                h = h + proj(cond.to(h.dtype))[:, :, None, None, None]
            h = self.act(h)
        return self.out(h)
