"""Global Response Normalization (GRN).

Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023, section 3
(Eq. 1-3). The parameter layout follows the official 3D ProFound code (github pipiwang/ProFound, ``models/util.py``):
``gamma`` and ``beta`` have shape ``(1, 1, 1, 1, C)`` for channels-last 3D maps, so its state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GRN"]


class GRN(nn.Module):
    """Global Response Normalization on a channels-last map.

    ``y = gamma * (x * N(x)) + beta + x`` with ``G(x)_c = ||x_c||_2`` over all spatial positions of one image and
    ``N(x)_c = G(x)_c / (mean_c' G(x)_c' + eps)`` (ConvNeXt V2, Eq. 1-3). ``gamma`` and ``beta`` start at zero, so a
    fresh GRN is the identity.

    Args:
        dim: number of channels ``C``.
        spatial_dims: number of spatial axes (3 for ``(B, H, W, D, C)``). Default 3.
        eps: added to the channel mean of ``G(x)``. Default 1e-6 (official).

    Shapes: ``(B, *spatial, C) -> (B, *spatial, C)``.
    """

    def __init__(self, dim: int, spatial_dims: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"GRN: dim must be >= 1, got {dim}.")
        if spatial_dims < 1:
            raise ValueError(f"GRN: spatial_dims must be >= 1, got {spatial_dims}.")
        if eps <= 0:
            raise ValueError(f"GRN: eps must be > 0, got {eps}.")
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.spatial_axes = list(range(1, spatial_dims + 1))  # built here: TorchScript cannot build it in forward
        param_shape = (1,) * (spatial_dims + 1) + (dim,)
        self.gamma = nn.Parameter(torch.zeros(param_shape))
        self.beta = nn.Parameter(torch.zeros(param_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *spatial, C) -> (B, *spatial, C)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"GRN: expected a {self.spatial_dims + 2}-D channels-last tensor, got shape {list(x.shape)}."
            )
        gx = torch.linalg.vector_norm(x, ord=2, dim=self.spatial_axes, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x
