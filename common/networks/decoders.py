"""3D dense decoders on the four stage maps of a hierarchical encoder (ProFound, paper section 2.2).

Both follow the official ProFound repository (github pipiwang/ProFound, branch ``demo``), whose demo selects them by
``--model``:

- :class:`UperNetDecoder3d` (``profound_conv``, the demo default; ``models/upernet_module.py``): per-stage
  channels-first LayerNorm (``hidden_norm``), a UPerNet head (``decode_head``: pyramid pooling on the last stage, FPN
  over all four, fused by ``fpn_bottleneck``, then a 1x1x1 ``classifier``) and an FCN auxiliary head
  (``auxiliary_head``) on the third stage. Xiao et al., "Unified Perceptual Parsing for Scene Understanding",
  ECCV 2018.
- :class:`UnetrDecoder3d` (``profound_conv_unetr3d``, feature size 32 in the demo; ``models/convnext_unter.py``):
  UNETR-style skip path from the image and the four stages, built from MONAI's ``UnetrBasicBlock``,
  ``UnetrPrUpBlock``, ``UnetrUpBlock`` and ``UnetOutBlock``. Hatamizadeh et al., "UNETR: Transformers for 3D Medical
  Image Segmentation", WACV 2022.

Sub-module names equal the official ones below the model prefix, so an official finetuned checkpoint loads after
:func:`common.networks.profound.convert_profound_dense` adds the ``decoder.`` prefix.

Both decoders share one interface: ``forward_features(x, features)`` returns the map that feeds the final 1x1x1
convolution, ``forward_head(x, feature_map)`` applies that convolution (and, for UperNet, the official trilinear
resize to the input size), ``forward(x, features) = forward_head(x, forward_features(x, features))``. ``x`` is the
network input, ``(B, C_in, X, Y, Z)``; ``features`` are the four stage maps ``(B, C_i, X / s_i, Y / s_i, Z / s_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from .blocks.convnext import LayerNormChannelsFirst

__all__ = ["UnetrDecoder3d", "UperNetConvModule", "UperNetDecoder3d", "UperNetFCNHead", "UperNetHead"]


def _check_stage_channels(channels: Sequence[int], name: str) -> tuple[int, ...]:
    values = tuple(int(c) for c in channels)
    if len(values) != 4 or any(c < 1 for c in values):
        raise ValueError(f"{name}: expected four positive stage widths, got {tuple(channels)}.")
    return values


def _check_features(features: list[torch.Tensor], channels: list[int], name: str) -> None:
    if len(features) != len(channels):
        raise ValueError(f"{name}: expected {len(channels)} stage maps, got {len(features)}.")
    for i in range(len(channels)):
        f, c = features[i], channels[i]
        if f.ndim != 5 or f.shape[1] != c:
            raise ValueError(f"{name}: stage {i} must be (B, {c}, X, Y, Z), got {list(f.shape)}.")


class UperNetConvModule(nn.Module):
    """Conv3d (no bias) -> channels-first LayerNorm -> GELU, as the official ``UperNetConvModule``.

    The official attribute of the norm is ``batch_norm`` although it is a LayerNorm; the name is kept for
    checkpoint compatibility.

    Shapes: ``(B, C_in, X, Y, Z) -> (B, C_out, X', Y', Z')`` (same size for ``padding = kernel_size // 2``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=False)
        self.batch_norm = LayerNormChannelsFirst(out_channels, eps=1e-6)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, X, Y, Z) -> (B, C_out, X', Y', Z')``."""
        return self.activation(self.batch_norm(self.conv(x)))


class UperNetHead(nn.Module):
    """UPerNet head: PPM on the last stage, top-down FPN, fusion of all levels at the first stage's resolution.

    Args:
        in_channels: the four stage widths.
        out_channels: output classes of the 1x1x1 ``classifier``.
        pool_scales: output sizes of the pyramid-pooling branches. Default ``(1, 2, 3, 6)``.
        hidden_size: width of every internal map. Default 512.

    Shapes: ``forward_features``: four maps -> ``(B, hidden_size, X1, Y1, Z1)`` (the first stage's size);
    ``forward``: four maps -> ``(B, out_channels, X1, Y1, Z1)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        hidden_size: int = 512,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.classifier = nn.Conv3d(hidden_size, out_channels, kernel_size=1)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool3d(s), UperNetConvModule(self.in_channels[-1], hidden_size))
            for s in self.pool_scales
        )
        self.bottleneck = UperNetConvModule(
            self.in_channels[-1] + len(self.pool_scales) * hidden_size, hidden_size, kernel_size=3, padding=1
        )
        self.lateral_convs = nn.ModuleList(UperNetConvModule(c, hidden_size) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            UperNetConvModule(hidden_size, hidden_size, kernel_size=3, padding=1) for _ in self.in_channels[:-1]
        )
        self.fpn_bottleneck = UperNetConvModule(
            len(self.in_channels) * hidden_size, hidden_size, kernel_size=3, padding=1
        )

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        maps = [x]
        for m in self.psp_modules:  # explicit loops over module lists throughout: TorchScript unrolls them
            maps.append(F.interpolate(m(x), size=size, mode="trilinear", align_corners=False))
        return self.bottleneck(torch.cat(maps, dim=1))

    def forward_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Four stage maps -> fused map ``(B, hidden_size, X1, Y1, Z1)``, the input of ``classifier``."""
        laterals: list[torch.Tensor] = []
        for i, conv in enumerate(self.lateral_convs):
            laterals.append(conv(features[i]))
        laterals.append(self._psp(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="trilinear", align_corners=False
            )
        outs: list[torch.Tensor] = []
        for i, conv in enumerate(self.fpn_convs):
            outs.append(conv(laterals[i]))
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="trilinear", align_corners=False) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Four stage maps -> ``(B, out_channels, X1, Y1, Z1)``."""
        return self.classifier(self.forward_features(features))


class UperNetFCNHead(nn.Module):
    """FCN auxiliary head on one stage: 3x3x3 ``UperNetConvModule`` then a 1x1x1 ``classifier``.

    Shapes: ``features[in_index]`` ``(B, C, X, Y, Z) -> (B, out_channels, X, Y, Z)``.
    """

    def __init__(self, in_channels: int, hidden_size: int, out_channels: int, in_index: int = 2) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(UperNetConvModule(in_channels, hidden_size, kernel_size=3, padding=1))
        self.classifier = nn.Conv3d(hidden_size, out_channels, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Four stage maps -> ``(B, out_channels, X, Y, Z)`` at the resolution of stage ``in_index``."""
        return self.classifier(self.convs(features[self.in_index]))


class UperNetDecoder3d(nn.Module):
    """UperNet 3D decoder of ProFound (official ``profound_conv``, the demo default).

    Each stage map is normalised by its own channels-first LayerNorm (``hidden_norm``), decoded by
    :class:`UperNetHead` at the first stage's resolution (stride 4 for ProFound) and resized trilinearly to the input
    size, as in the official ``UperNet.forward``. The auxiliary FCN head is trained in the official code with weight
    0.4 (``engine/segment.py``); here it is reached through :meth:`forward_auxiliary` only, so ``forward`` always
    returns one tensor.

    Args:
        in_channels: the four stage widths. Default ``(96, 192, 384, 768)`` (ProFound tiny).
        out_channels: output channels. Default 1.
        hidden_size: width of the UPerNet maps. Default 512 (official).
        pool_scales: pyramid-pooling output sizes. Default ``(1, 2, 3, 6)`` (official).
        auxiliary_channels: width of the auxiliary head. Default 256 (official).
        use_auxiliary_head: build the auxiliary head. Default True (official; needed to load official finetuned
            checkpoints strictly). Set False when the training loop never calls :meth:`forward_auxiliary`.
        auxiliary_in_index: stage read by the auxiliary head. Default 2 (official).

    Shapes: ``forward(x, features)``: ``x`` ``(B, C_in, X, Y, Z)``, ``features`` four maps
    ``(B, C_i, X / s_i, Y / s_i, Z / s_i)`` -> ``(B, out_channels, X, Y, Z)``; ``forward_features`` ->
    ``(B, hidden_size, X / s_1, Y / s_1, Z / s_1)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (96, 192, 384, 768),
        out_channels: int = 1,
        hidden_size: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        auxiliary_channels: int = 256,
        use_auxiliary_head: bool = True,
        auxiliary_in_index: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = _check_stage_channels(in_channels, "UperNetDecoder3d")
        if out_channels < 1 or hidden_size < 1 or auxiliary_channels < 1:
            raise ValueError(
                "UperNetDecoder3d: out_channels, hidden_size and auxiliary_channels must be >= 1, got "
                f"{out_channels}, {hidden_size}, {auxiliary_channels}."
            )
        if len(pool_scales) == 0 or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"UperNetDecoder3d: pool_scales must be positive integers, got {tuple(pool_scales)}.")
        if not 0 <= auxiliary_in_index < 4:
            raise ValueError(f"UperNetDecoder3d: auxiliary_in_index must be in 0..3, got {auxiliary_in_index}.")
        self.out_channels = out_channels
        self.feature_channels = hidden_size
        self.hidden_norm = nn.ModuleList(LayerNormChannelsFirst(c, eps=1e-6) for c in self.in_channels)
        self.decode_head = UperNetHead(self.in_channels, out_channels, pool_scales, hidden_size)
        self.auxiliary_head = (
            UperNetFCNHead(self.in_channels[auxiliary_in_index], auxiliary_channels, out_channels, auxiliary_in_index)
            if use_auxiliary_head
            else None
        )

    def _normed(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        _check_features(features, list(self.in_channels), "UperNetDecoder3d")
        normed: list[torch.Tensor] = []
        for i, norm in enumerate(self.hidden_norm):
            normed.append(norm(features[i]))
        return normed

    def forward_features(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Map that feeds the final 1x1x1 conv: ``(B, hidden_size, X / s_1, Y / s_1, Z / s_1)``. ``x`` is unused."""
        return self.decode_head.forward_features(self._normed(features))

    def forward_head(self, x: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        """Final 1x1x1 conv, then trilinear resize to ``x``'s size: ``-> (B, out_channels, X, Y, Z)``."""
        logits = self.decode_head.classifier(feature_map)
        return F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """``x`` ``(B, C_in, X, Y, Z)`` and four stage maps -> ``(B, out_channels, X, Y, Z)``."""
        return self.forward_head(x, self.forward_features(x, features))

    def forward_auxiliary(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Auxiliary FCN logits resized to ``x``'s size: ``-> (B, out_channels, X, Y, Z)``."""
        if self.auxiliary_head is None:
            raise ValueError("UperNetDecoder3d: built with use_auxiliary_head=False; there is no auxiliary output.")
        logits = self.auxiliary_head(self._normed(features))
        return F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)


class UnetrDecoder3d(nn.Module):
    """UNETR-style 3D decoder of ProFound (official ``profound_conv_unetr3d``).

    Skip path (official ``ConvnextUNETR_Decoder``): ``encoder1`` on the image (full resolution); ``encoder2..4`` lift
    stages 1-3 (after ``norm1..3``) by one transposed convolution each (stride 4 -> 2, 8 -> 4, 16 -> 8); ``decoder5``
    upsamples stage 4 (16 -> 8) and merges ``encoder4``, then ``decoder4..2`` climb to full resolution; ``out`` is the
    final 1x1x1 convolution. This wiring assumes stage strides ``(4, 8, 16, 16)`` as in ProFound, so every input size
    must be divisible by 16. Stage 4 is expected already normalised: ProFound applies its encoder's final LayerNorm
    (the official code uses ``encoder.norm``).

    The official default normalisation is MONAI ``"instance"`` (``InstanceNorm3d`` without affine, hence no
    parameters). It is the slow part of the official training step on GPU (about 43 %); ``norm_name`` accepts any
    MONAI norm (e.g. ``"batch"``, ``("group", {"num_groups": 8})``), at the price of strict loading of official
    checkpoints where the new norm has parameters.

    Args:
        in_channels: channels of the image ``x``.
        out_channels: output channels. Default 1.
        stage_channels: the four stage widths. Default ``(96, 192, 384, 768)``.
        feature_size: base width ``f``; the skip path uses ``f, 2f, 4f, 8f``. Default 16 (official class default;
            the demo and :class:`~common.networks.profound.ProFoundDense` use 32).
        norm_name: MONAI norm of the blocks. Default ``"instance"`` (official).
        conv_block: extra convolution block in ``UnetrPrUpBlock``. Default True (official).
        res_block: residual blocks. Default True (official).

    Shapes: ``x`` ``(B, in_channels, X, Y, Z)``, stage maps ``(B, C_i, X / s_i, ...)`` with ``s = (4, 8, 16, 16)``
    -> ``(B, out_channels, X, Y, Z)``; ``forward_features`` -> ``(B, f, X, Y, Z)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        stage_channels: Sequence[int] = (96, 192, 384, 768),
        feature_size: int = 16,
        norm_name: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
    ) -> None:
        super().__init__()
        self.stage_channels = _check_stage_channels(stage_channels, "UnetrDecoder3d")
        if in_channels < 1 or out_channels < 1 or feature_size < 1:
            raise ValueError(
                "UnetrDecoder3d: in_channels, out_channels and feature_size must be >= 1, got "
                f"{in_channels}, {out_channels}, {feature_size}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = feature_size
        c, f = self.stage_channels, feature_size
        self.norm1 = LayerNormChannelsFirst(c[0], eps=1e-6)
        self.norm2 = LayerNormChannelsFirst(c[1], eps=1e-6)
        self.norm3 = LayerNormChannelsFirst(c[2], eps=1e-6)
        self.encoder1 = UnetrBasicBlock(
            3, in_channels, f, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
        )

        def pr_up(cin: int, cout: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(
                3, cin, cout, num_layer=0, kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm_name,
                conv_block=conv_block, res_block=res_block,
            )  # fmt: skip

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block
            )

        self.encoder2 = pr_up(c[0], 2 * f)
        self.encoder3 = pr_up(c[1], 4 * f)
        self.encoder4 = pr_up(c[2], 8 * f)
        self.decoder5 = up(c[3], 8 * f)
        self.decoder4 = up(8 * f, 4 * f)
        self.decoder3 = up(4 * f, 2 * f)
        self.decoder2 = up(2 * f, f)
        self.out = UnetOutBlock(3, f, out_channels)

    def forward_features(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Map that feeds the final 1x1x1 conv: ``(B, feature_size, X, Y, Z)``."""
        _check_features(features, list(self.stage_channels), "UnetrDecoder3d")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UnetrDecoder3d: x must be (B, {self.in_channels}, X, Y, Z), got {list(x.shape)}.")
        x1, x2, x3, x4 = features
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.norm1(x1))
        enc3 = self.encoder3(self.norm2(x2))
        enc4 = self.encoder4(self.norm3(x3))
        dec = self.decoder5(x4, enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        return self.decoder2(dec, enc1)

    def forward_head(self, x: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        """Final 1x1x1 conv: ``(B, feature_size, X, Y, Z) -> (B, out_channels, X, Y, Z)``. ``x`` is unused."""
        return self.out(feature_map)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """``x`` ``(B, C_in, X, Y, Z)`` and four stage maps -> ``(B, out_channels, X, Y, Z)``."""
        return self.forward_head(x, self.forward_features(x, features))
