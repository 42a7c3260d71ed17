"""ConvNeXt V2 building blocks in 3D.

Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023 (Fig. 2 block with
GRN), in the 3D form of ProFound (github pipiwang/ProFound, branch ``demo``, ``models/convnextv2.py``). Parameter
names (``dwconv``, ``norm``, ``pwconv1``, ``grn``, ``pwconv2``) and shapes are the official ones, so official state
dicts load with ``strict=True``.
"""

from __future__ import annotations

import torch
from monai.networks.layers import DropPath
from torch import nn

from .grn import GRN

__all__ = ["ConvNeXtV2Block", "LayerNormChannelsFirst"]


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of a channels-first map.

    Normalises each voxel's channel vector (biased variance), then applies a per-channel affine. Same parameters
    (``weight``, ``bias`` of shape ``(C,)``) and arithmetic as the official ``LayerNorm(data_format="channels_first")``.

    Args:
        num_channels: ``C``.
        eps: added to the variance. Default 1e-6 (official).

    Shapes: ``(B, C, *spatial) -> (B, C, *spatial)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"LayerNormChannelsFirst: num_channels must be >= 1, got {num_channels}.")
        if eps <= 0:
            raise ValueError(f"LayerNormChannelsFirst: eps must be > 0, got {eps}.")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        affine_shape = [1, -1] + [1] * (x.ndim - 2)
        return self.weight.view(affine_shape) * x + self.bias.view(affine_shape)


class ConvNeXtV2Block(nn.Module):
    """One 3D ConvNeXt V2 residual block.

    ``x + DropPath(pwconv2(GRN(GELU(pwconv1(LN(dwconv(x)))))))`` with a depthwise ``k x k x k`` convolution
    (``padding = k // 2``), a channels-last LayerNorm, a 4x inverted bottleneck of linear layers and GRN (ConvNeXt V2,
    section 3 and Fig. 2). Resolution and channels are unchanged.

    Args:
        dim: channels ``C``.
        drop_path: stochastic-depth probability of the residual branch. Default 0.0.
        kernel_size: depthwise kernel size, odd. Default 7 (official).
        mlp_ratio: hidden width of the pointwise bottleneck as a multiple of ``C``. Default 4 (official).

    Shapes: ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kernel_size: int = 7, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"ConvNeXtV2Block: dim must be >= 1, got {dim}.")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ConvNeXtV2Block: drop_path must be in [0, 1), got {drop_path}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvNeXtV2Block: kernel_size must be a positive odd integer, got {kernel_size}.")
        if mlp_ratio < 1:
            raise ValueError(f"ConvNeXtV2Block: mlp_ratio must be >= 1, got {mlp_ratio}.")
        hidden = mlp_ratio * dim
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden, spatial_dims=3)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``."""
        residual = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 4, 1)  # (B, C, X, Y, Z) -> (B, X, Y, Z, C)
        x = self.norm(x)
        x = self.act(self.pwconv1(x))
        x = self.pwconv2(self.grn(x))
        x = x.permute(0, 4, 1, 2, 3)  # (B, X, Y, Z, C) -> (B, C, X, Y, Z)
        return residual + self.drop_path(x)
