"""TransUNet in 3D: the specialised super-resolution model of the study (paper section 3.1, table of tasks).

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", arXiv 2102.04306 (2021):
a CNN encoder whose deepest feature map is cut into tokens for a ViT, a "cascaded upsampler" (CUP) decoder with skip
connections from the CNN stages, and a prediction head. Built here from MONAI blocks (``UnetResBlock``,
``TransformerBlock``, ``UnetrUpBlock``); the super-resolution head is
:class:`~common.networks.heads.SubpixelUpsample3dHead`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock, UnetResBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from .heads import SubpixelUpsample3dHead

__all__ = ["TransUNet3d"]


def _as_triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or any(v < 1 for v in values):
        raise ValueError(f"TransUNet3d: {name} must be a positive int or three positive ints, got {value!r}.")
    return values  # type: ignore[return-value]


class TransUNet3d(nn.Module):
    """3D TransUNet (Chen et al., arXiv 2102.04306) with an optional sub-pixel super-resolution head.

    Layout (``n = len(channels)`` CNN stages, stage ``i`` has stride ``strides[i]``, cumulative stride ``S_i``):

    - CNN encoder: stage ``i`` is a strided ``UnetResBlock`` (3x3x3, ``channels[i]`` wide) followed by
      ``blocks_per_stage - 1`` unstrided ones; stages ``0 .. n-2`` are the skips (paper: the R50 root and stages at
      1/2, 1/4, 1/8), stage ``n-1`` (stride ``S = S_{n-1}``, paper 1/16) is tokenised.
    - Transformer (paper section 3.1, Eq. 1-3): every voxel of the last CNN map is one token (patch size 1, as the
      paper's hybrid), linear projection (1x1x1 conv) to ``hidden_size``, learned position embeddings, ``num_layers``
      MONAI ``TransformerBlock`` (pre-norm MSA + MLP) and a final ``LayerNorm``. MONAI's blocks always hold a
      ``norm_cross_attn`` LayerNorm that is unused without cross attention; it is frozen (``requires_grad=False``).
    - Cascaded upsampler (paper section 3.2): tokens reshaped to ``(B, hidden, H/S, W/S, D/S)``, a 3x3x3 conv block to
      ``channels[-1]`` (paper's ``conv_more``), then for ``i = n-1 .. 1`` an ``UnetrUpBlock`` (transposed conv by
      ``strides[i]``, concatenation with skip ``i-1``, residual block) to ``channels[i-1]``, then a last up block
      without skip (transposed conv by ``strides[0]`` + residual block) to ``head_channels`` at input resolution.
    - Head (the final prediction layer): a 3x3x3 conv when ``scale == (1, 1, 1)`` (paper's segmentation head), else
      :class:`~common.networks.heads.SubpixelUpsample3dHead` by ``scale``.

    Adapted to 3D (the paper is 2D): the R50-ViT hybrid's ResNet-50 becomes a narrow 3D residual CNN (MONAI
    ``UnetResBlock``, widths ``channels``; a 3D R50 at 1024 channels is impractical); 2D patches of the 1/16 map
    become 3D tokens of the ``1/S`` volume; strides may be anisotropic per stage (e.g. ``(2, 2, 1)``) so volumes with
    few slices keep enough tokens along ``D``; position embeddings are trilinearly interpolated when the token grid
    differs from the one of ``img_size``; instance norm by default instead of batch norm; the sub-pixel head for
    through-plane super-resolution is ours.

    Args:
        in_channels: input channels. Default 1.
        out_channels: output channels. Default 1.
        img_size: ``(H, W, D)`` of the input that sets the position-embedding grid ``img_size / S``; each entry must
            be divisible by the total stride ``S`` of its axis. Default ``(96, 96, 48)`` (SR input: 48 slices).
        channels: CNN stage widths, at least 2 stages. Default ``(32, 64, 128, 256)``.
        strides: per-stage stride, an int or ``(sH, sW, sD)`` each; same length as ``channels``.
            Default ``(2, 2, 2, 2)`` (paper: 1/2 .. 1/16, total stride 16 on every axis).
        blocks_per_stage: residual blocks per CNN stage. Default 1.
        hidden_size: transformer width. Default 768 (ViT-B, paper).
        mlp_dim: transformer MLP width. Default 3072.
        num_layers: transformer blocks. Default 12.
        num_heads: attention heads (must divide ``hidden_size``). Default 12.
        head_channels: width of the last decoder block, the input of the head. Default 16 (paper).
        scale: output upsampling per axis of ``(H, W, D)``. Default ``(1, 1, 2)`` (48 -> 96 slices); ``(1, 1, 1)``
            gives a plain segmentation / image-to-image TransUNet.
        norm_name: MONAI norm of the conv blocks. Default ``"instance"``.
        dropout_rate: transformer dropout. Default 0.0.
        qkv_bias: bias of the attention projections. Default False.

    Shapes: ``forward``: ``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``; ``H, W, D`` divisible by the
    total stride per axis (:attr:`total_stride`, product of ``strides``). ``forward_representations``:
    ``{"head_input": (B, head_channels), "encoder": (B, hidden_size)}``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: Sequence[int] = (96, 96, 48),
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int | Sequence[int]] = (2, 2, 2, 2),
        blocks_per_stage: int = 1,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        head_channels: int = 16,
        scale: Sequence[int] = (1, 1, 2),
        norm_name: str | tuple = "instance",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or head_channels < 1:
            raise ValueError(
                f"TransUNet3d: in_channels, out_channels and head_channels must be >= 1, got {in_channels}, "
                f"{out_channels}, {head_channels}."
            )
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"TransUNet3d: channels needs at least two positive widths, got {channels}.")
        if len(strides) != len(channels):
            raise ValueError(f"TransUNet3d: strides needs one entry per stage ({len(channels)}), got {strides!r}.")
        stage_strides = [_as_triple(s, "each stride") for s in strides]
        if blocks_per_stage < 1 or num_layers < 1 or hidden_size < 1 or mlp_dim < 1 or num_heads < 1:
            raise ValueError("TransUNet3d: blocks_per_stage, num_layers, hidden_size, mlp_dim, num_heads must be >= 1.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"TransUNet3d: hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"TransUNet3d: dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.scale = _as_triple(scale, "scale")
        self.total_stride: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            math.prod(s[a] for s in stage_strides) for a in range(3)
        )
        self.img_size = _as_triple(img_size, "img_size")
        self._check_divisible(list(self.img_size), "img_size")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.head_channels = head_channels
        self.grid_size: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            i // s for i, s in zip(self.img_size, self.total_stride, strict=True)
        )

        # CNN encoder (paper: R50 root + stages)
        self.encoder = nn.ModuleList()
        width = in_channels
        for c, s in zip(channels, stage_strides, strict=True):
            blocks = [UnetResBlock(3, width, c, kernel_size=3, stride=s, norm_name=norm_name)]
            for _ in range(blocks_per_stage - 1):
                blocks.append(UnetResBlock(3, c, c, kernel_size=3, stride=1, norm_name=norm_name))
            self.encoder.append(nn.Sequential(*blocks))
            width = c

        # transformer on the bottleneck tokens (patch size 1 on the last CNN map)
        self.patch_embedding = nn.Conv3d(channels[-1], hidden_size, kernel_size=1)
        self.position_embedding = nn.Parameter(torch.zeros(1, math.prod(self.grid_size), hidden_size))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.embedding_dropout = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias) for _ in range(num_layers)]
        )
        for blk in self.blocks:  # MONAI builds it even without cross attention; frozen so DDP sees no unused params
            blk.norm_cross_attn.requires_grad_(False)
        self.norm = nn.LayerNorm(hidden_size)

        # cascaded upsampler
        self.conv_more = UnetResBlock(3, hidden_size, channels[-1], kernel_size=3, stride=1, norm_name=norm_name)
        self.decoder = nn.ModuleList(
            [
                UnetrUpBlock(
                    3,
                    channels[i],
                    channels[i - 1],
                    kernel_size=3,
                    upsample_kernel_size=stage_strides[i],
                    norm_name=norm_name,
                    res_block=True,
                )
                for i in range(len(channels) - 1, 0, -1)
            ]
        )
        self.final_up = get_conv_layer(
            3,
            channels[0],
            head_channels,
            kernel_size=stage_strides[0],
            stride=stage_strides[0],
            conv_only=True,
            is_transposed=True,
        )
        self.final_block = UnetResBlock(3, head_channels, head_channels, kernel_size=3, stride=1, norm_name=norm_name)
        self.head: nn.Module
        if self.scale == (1, 1, 1):
            self.head = nn.Conv3d(head_channels, out_channels, kernel_size=3, padding=1)
        else:
            self.head = SubpixelUpsample3dHead(head_channels, out_channels, scale=self.scale, kernel_size=3)

    def _check_divisible(self, size: list[int], what: str) -> None:
        for a in range(3):
            if size[a] < self.total_stride[a] or size[a] % self.total_stride[a] != 0:
                raise ValueError(
                    f"TransUNet3d: {what} {size} must be divisible by the total stride {self.total_stride} "
                    "(product of the per-stage strides, per axis); pad or crop the input, or change strides."
                )

    def _position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(1, N, hidden)`` for a token grid; trilinear interpolation from :attr:`grid_size` when it differs."""
        if grid == self.grid_size:
            return self.position_embedding
        g0, g1, g2 = self.grid_size
        pe = self.position_embedding.transpose(1, 2).reshape(1, self.hidden_size, g0, g1, g2)
        pe = F.interpolate(pe, size=grid, mode="trilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward_feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unpooled representations: ``(B, C_in, H, W, D) -> {"head_input": (B, head_channels, H, W, D), "encoder":
        (B, hidden_size, H/S0, W/S1, D/S2)}`` (the normalised transformer tokens on their grid)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"TransUNet3d: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}.")
        self._check_divisible(list(x.shape[2:]), "input spatial size")
        skips: list[torch.Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        tokens = self.patch_embedding(skips[-1])  # (B, hidden, h, w, d)
        b, c, g0, g1, g2 = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, hidden)
        tokens = self.embedding_dropout(tokens + self._position_embedding((g0, g1, g2)))
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        grid = tokens.transpose(1, 2).reshape(b, c, g0, g1, g2)
        h = self.conv_more(grid)
        for i, up in enumerate(self.decoder):
            h = up(h, skips[len(skips) - 2 - i])
        h = self.final_block(self.final_up(h))
        return {"head_input": h, "encoder": grid}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``."""
        return self.head(self.forward_feature_maps(x)["head_input"])

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, head_channels), "encoder": (B, hidden_size)}``: the global average of the head's
        input map and the mean of the normalised transformer tokens (the encoder output)."""
        maps = self.forward_feature_maps(x)
        return {k: v.mean(dim=(2, 3, 4)) for k, v in maps.items()}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the decoder map the head reads; ``encoder``: the mean transformer token."""
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}
