"""ProFound: a 3D ConvNeXt V2 encoder pretrained by FCMAE on prostate MRI, and its downstream networks.

Paper: Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026 (arXiv 2601.15888),
section 2.2. Architecture: Woo et al., "ConvNeXt V2", CVPR 2023, in the 3D form of the official ProFound code
(github pipiwang/ProFound, branch ``demo``: ``models/convnextv2.py``, ``models/fcmae.py``,
``models/convnextv2_sparse.py``, ``models/upernet_module.py``, ``models/convnext_unter.py``, ``models/classifier.py``).

Encoder facts from the official code:

- stem ``Conv3d(k=4, s=4)`` + channels-first LayerNorm; then three downsampling layers (LayerNorm + Conv3d) with
  kernel = stride = 2, 2 and **1**: the last one only widens channels. All kernels and strides are isotropic, so the
  four stage maps have strides ``(4, 8, 16, 16)`` along every spatial axis and inputs must be divisible by 16;
- 4 stages of :class:`~common.networks.blocks.ConvNeXtV2Block` (depthwise 7x7x7); a final ``nn.LayerNorm``
  ``norm`` applied to the global average of the last stage (``forward_pooled``);
- sizes atto .. huge, :data:`PROFOUND_SIZES`; the paper uses ``tiny`` with 3 input channels (T2W, DWI, ADC).

Axis order. The official datasets transpose each NIfTI array ``(i, j, k)`` with ``[2, 1, 0]`` and feed
``(B, C, k, j, i)``: slice axis first (e.g. ``64 x 224 x 224``). MONAI pipelines here give ``(B, C, H, W, D)`` =
``(i, j, k)``. With ``official_axis_order=True`` (default) every network in this module reverses the three spatial
axes on entry and back on exit, so official weights (encoder and decoders) act on the orientation they were trained
with. Shapes are unaffected (all strides are isotropic); all inputs and outputs are ``(B, C, H, W, D)``.

The downstream networks compile with ``torch.jit.script`` (MONAI's ``ckpt_export``): ``forward`` only;
``forward_representations``, ``forward_auxiliary`` and the checkpoint functions stay eager.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._state import load_weights, state_dict_problems, unwrap_state_dict
from .blocks.convnext import ConvNeXtV2Block, LayerNormChannelsFirst
from .decoders import UnetrDecoder3d, UperNetDecoder3d
from .heads import MLPHead, SubpixelUpsample3dHead

__all__ = [
    "PROFOUND_SIZES",
    "ProFoundClassifier",
    "ProFoundDense",
    "ProFoundEncoder",
    "ProFoundSuperRes",
    "adapt_profound_stem",
    "convert_profound_dense",
    "convert_profound_fcmae",
    "detect_profound_format",
    "enable_feature_cache",
    "freeze_profound_finetune",
    "load_profound_checkpoint",
    "profound_encoder",
]

#: Official ConvNeXt V2 sizes (``models/convnextv2.py``): blocks per stage and stage widths.
PROFOUND_SIZES: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "atto": {"depths": (2, 2, 6, 2), "dims": (40, 80, 160, 320)},
    "femto": {"depths": (2, 2, 6, 2), "dims": (48, 96, 192, 384)},
    "pico": {"depths": (2, 2, 6, 2), "dims": (64, 128, 256, 512)},
    "nano": {"depths": (2, 2, 8, 2), "dims": (80, 160, 320, 640)},
    "tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
    "huge": {"depths": (3, 3, 27, 3), "dims": (352, 704, 1408, 2816)},
}

_STEM_STRIDE = 4
_DOWNSAMPLE_STRIDES = (2, 2, 1)
_ENCODER_PREFIXES = ("downsample_layers.", "stages.", "norm.")
_OFFICIAL_DECODER_PREFIXES = ("decode_head.", "auxiliary_head.", "hidden_norm.", "norm1.", "norm2.", "norm3.")


def _reverse_spatial(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 1, 4, 3, 2)  # (B, C, H, W, D) <-> (B, C, D, W, H); an involution


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(2, x.ndim)))


class ProFoundEncoder(nn.Module):
    """3D ConvNeXt V2 encoder of ProFound, parameter-compatible with the official ``ConvNeXtV2``.

    State-dict names: ``downsample_layers.{0..3}.{0,1}.*``, ``stages.{s}.{b}.{dwconv,norm,pwconv1,grn,pwconv2}.*``,
    ``norm.*``; an official dense checkpoint loads with ``strict=True``. ConvNeXt uses LayerNorm only (no running
    statistics); train/eval mode matters only for stochastic depth.

    Args:
        in_channels: image channels. Default 3 (official: T2W, DWI, ADC).
        depths: blocks per stage. Default ``(3, 3, 9, 3)`` (tiny).
        dims: stage widths. Default ``(96, 192, 384, 768)`` (tiny).
        drop_path_rate: stochastic depth, linearly increasing over all blocks. Default 0.0.
        official_axis_order: reverse the spatial axes of ``(B, C, H, W, D)`` inputs to the official
            ``(B, C, D, W, H)`` before the stem and back for every returned map (see the module docstring).
            Default True.

    Shapes (``s = (4, 8, 16, 16)``): ``forward_features``: ``(B, C_in, H, W, D) -> [(B, dims[i], H / s_i, W / s_i,
    D / s_i)] * 4``; ``forward_pooled`` and ``forward``: ``(B, C_in, H, W, D) -> (B, dims[3])`` (global average of
    stage 4, then ``norm``, as the official forward). Sizes not divisible by 16 are floored by the strided convs.
    """

    __constants__ = ("total_stride",)  # lets TorchScript read the class attribute
    total_stride = 16

    def __init__(
        self,
        in_channels: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        official_axis_order: bool = True,
    ) -> None:
        super().__init__()
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if in_channels < 1:
            raise ValueError(f"ProFoundEncoder: in_channels must be >= 1, got {in_channels}.")
        if len(depths) != 4 or len(dims) != 4 or min(depths) < 1 or min(dims) < 1:
            raise ValueError(f"ProFoundEncoder: need four positive depths and dims, got {depths} and {dims}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ProFoundEncoder: drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        self.in_channels = in_channels
        self.depths = depths
        self.dims = dims
        self.official_axis_order = official_axis_order
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv3d(in_channels, dims[0], kernel_size=_STEM_STRIDE, stride=_STEM_STRIDE),
                    LayerNormChannelsFirst(dims[0], eps=1e-6),
                )
            ]
        )
        for i, stride in enumerate(_DOWNSAMPLE_STRIDES):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNormChannelsFirst(dims[i], eps=1e-6),
                    nn.Conv3d(dims[i], dims[i + 1], kernel_size=stride, stride=stride),
                )
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims, strict=True):
            self.stages.append(nn.Sequential(*(ConvNeXtV2Block(dim, drop_path=rates[start + j]) for j in range(depth))))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.apply(self._init_weights)
        #: a :class:`~common.networks.feature_cache.FeatureCache` while the encoder is frozen
        #: (:func:`enable_feature_cache`); eager mode only, TorchScript computes every time
        self.feature_cache = None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv3d, nn.Linear)):  # official: trunc_normal_(std=0.02), zero bias
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> int:
        """Width of the pooled output, ``dims[3]``."""
        return self.dims[-1]

    def to_native(self, x: torch.Tensor) -> torch.Tensor:
        """Caller layout ``(B, C, H, W, D)`` -> the layout the weights act on (reversed spatial axes or unchanged)."""
        return _reverse_spatial(x) if self.official_axis_order else x

    def from_native(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_native` for any ``(B, C, ., ., .)`` map."""
        return _reverse_spatial(x) if self.official_axis_order else x

    def forward_native_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps in the native layout: ``(B, C_in, X, Y, Z) -> [(B, dims[i], X / s_i, Y / s_i, Z / s_i)] * 4``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ProFoundEncoder: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}.")
        if min(x.shape[2:]) < self.total_stride:
            raise ValueError(f"ProFoundEncoder: every spatial size must be >= 16, got {list(x.shape[2:])}.")
        if not torch.jit.is_scripting():
            return self._cached_stages(x)
        return self._stages(x)

    @torch.jit.unused
    def _cached_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.feature_cache is None or self.training:  # stochastic depth in training mode: nothing repeats
            return self._stages(x)
        return self.feature_cache.features(x, self._stages)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
            maps.append(x)
        return maps

    def pool(self, stage4: torch.Tensor) -> torch.Tensor:
        """Official pooling: global average, then ``norm``: ``(B, dims[3], ., ., .) -> (B, dims[3])``."""
        return self.norm(_spatial_mean(stage4))

    def norm_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final ``norm`` applied voxel-wise to a channels-first map: ``(B, dims[3], X, Y, Z) -> same``."""
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C_in, H, W, D) -> [(B, dims[i], H / s_i, W / s_i, D / s_i)] * 4`` with ``s = (4, 8, 16, 16)``."""
        return [self.from_native(m) for m in self.forward_native_features(self.to_native(x))]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, dims[3])``: official pooled features (mean over space, then LayerNorm)."""
        return self.pool(self.forward_native_features(self.to_native(x))[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, dims[3])``, same as :meth:`forward_pooled` (the official forward)."""
        return self.forward_pooled(x)

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, dims[3]), "encoder": (B, dims[3])}``; both are the pooled output here."""
        pooled = self.forward_pooled(x)
        return {"head_input": pooled, "encoder": pooled}

    def representation_kinds(self) -> dict[str, str]:
        """Both recorded layers are the encoder's pooled output (kinds of ``common.contract.LAYER_KINDS``)."""
        return {"head_input": "encoder_pooled", "encoder": "encoder_pooled"}


def profound_encoder(
    size: str = "tiny", in_channels: int = 3, drop_path_rate: float = 0.0, official_axis_order: bool = True
) -> ProFoundEncoder:
    """Build a :class:`ProFoundEncoder` of an official size (``PROFOUND_SIZES``: atto, femto, pico, nano, tiny,
    base, large, huge; the paper uses tiny)."""
    if size not in PROFOUND_SIZES:
        raise ValueError(f"profound_encoder: unknown size {size!r}; choose one of {list(PROFOUND_SIZES)}.")
    spec = PROFOUND_SIZES[size]
    return ProFoundEncoder(
        in_channels=in_channels,
        depths=spec["depths"],
        dims=spec["dims"],
        drop_path_rate=drop_path_rate,
        official_axis_order=official_axis_order,
    )


class _ProFoundModel(nn.Module):
    """Shared parts of the downstream networks: the encoder, freezing-aware ``train`` and input checks."""

    def __init__(self, encoder_size: str, in_channels: int, drop_path_rate: float, official_axis_order: bool) -> None:
        super().__init__()
        self.encoder = profound_encoder(encoder_size, in_channels, drop_path_rate, official_axis_order)
        self.encoder_frozen = False
        self.model_name = type(self).__name__  # for error messages; TorchScript has no type(self)

    def train(self, mode: bool = True) -> _ProFoundModel:
        """As ``nn.Module.train``, but a frozen encoder (:func:`freeze_profound_finetune`) stays in eval mode."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"{self.model_name}: expected (B, C, H, W, D), got shape {list(x.shape)}.")
        stride = self.encoder.total_stride
        if x.shape[2] % stride or x.shape[3] % stride or x.shape[4] % stride:
            raise ValueError(
                f"{self.model_name}: spatial sizes {list(x.shape[2:])} must be divisible by 16 (stage strides "
                "4, 8, 16, 16); pad or crop the input."
            )


class ProFoundDense(_ProFoundModel):
    """ProFound encoder with a dense decoder on its four stages (segmentation, distortion correction, translation).

    ``decoder="upernet"`` is the official ``profound_conv`` (demo default), :class:`UperNetDecoder3d`;
    ``decoder="unetr"`` is ``profound_conv_unetr3d``, :class:`UnetrDecoder3d` with stage 4 normalised by the
    encoder's final ``norm`` (official). Encoder and decoder run in the native axis order, so official finetuned
    checkpoints reproduce their outputs. Outputs are raw logits / intensities; softmax or output scaling belongs to
    the loss or post-processing.

    Args:
        encoder_size: key of :data:`PROFOUND_SIZES`. Default ``"tiny"``.
        in_channels: image channels. Default 3.
        out_channels: output channels. Default 1.
        decoder: ``"upernet"`` or ``"unetr"``. Default ``"upernet"``.
        drop_path_rate: encoder stochastic depth. Default 0.0.
        official_axis_order: see the module docstring. Default True.
        hidden_size, pool_scales, auxiliary_channels, use_auxiliary_head: UperNet only; defaults 512,
            ``(1, 2, 3, 6)``, 256, True (official).
        feature_size, norm_name: UNETR only; defaults 32 (official demo) and ``"instance"`` (official; slow on GPU,
            configurable).

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``, ``H, W, D`` divisible by 16.
    """

    def __init__(
        self,
        encoder_size: str = "tiny",
        in_channels: int = 3,
        out_channels: int = 1,
        decoder: str = "upernet",
        drop_path_rate: float = 0.0,
        official_axis_order: bool = True,
        hidden_size: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        auxiliary_channels: int = 256,
        use_auxiliary_head: bool = True,
        feature_size: int = 32,
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__(encoder_size, in_channels, drop_path_rate, official_axis_order)
        if decoder not in ("upernet", "unetr"):
            raise ValueError(f"ProFoundDense: decoder must be 'upernet' or 'unetr', got {decoder!r}.")
        self.decoder_name = decoder
        self.decoder: UperNetDecoder3d | UnetrDecoder3d
        if decoder == "upernet":
            self.decoder = UperNetDecoder3d(
                in_channels=self.encoder.dims,
                out_channels=out_channels,
                hidden_size=hidden_size,
                pool_scales=pool_scales,
                auxiliary_channels=auxiliary_channels,
                use_auxiliary_head=use_auxiliary_head,
            )
        else:
            self.decoder = UnetrDecoder3d(
                in_channels=in_channels,
                out_channels=out_channels,
                stage_channels=self.encoder.dims,
                feature_size=feature_size,
                norm_name=norm_name,
            )

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_input(x)
        xn = self.encoder.to_native(x)
        stages = self.encoder.forward_native_features(xn)
        return xn, stages

    def _decoder_inputs(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.decoder_name == "unetr":
            return stages[:3] + [self.encoder.norm_map(stages[3])]
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``."""
        xn, stages = self._trunk(x)
        return self.encoder.from_native(self.decoder(xn, self._decoder_inputs(stages)))

    def forward_auxiliary(self, x: torch.Tensor) -> torch.Tensor:
        """UperNet auxiliary logits (official loss weight 0.4): ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``."""
        if not isinstance(self.decoder, UperNetDecoder3d):
            raise ValueError("ProFoundDense: only the UperNet decoder has an auxiliary head.")
        xn, stages = self._trunk(x)
        return self.encoder.from_native(self.decoder.forward_auxiliary(xn, stages))

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, F), "encoder": (B, dims[3])}``: the global average of the map feeding the final
        1x1x1 conv (``F`` = 512 for UperNet, ``feature_size`` for UNETR) and the encoder's pooled output."""
        xn, stages = self._trunk(x)
        feature_map = self.decoder.forward_features(xn, self._decoder_inputs(stages))
        return {"head_input": _spatial_mean(feature_map), "encoder": self.encoder.pool(stages[-1])}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the decoder map before its final conv; ``encoder``: the pooled (finetune: frozen) encoder."""
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


class ProFoundClassifier(_ProFoundModel):
    """ProFound encoder with an MLP head on its pooled features (classification, paper section 2.2).

    The head is the official ``Classifier`` head: ``Linear(dims[3], hidden) -> BatchNorm1d -> ReLU ->
    Linear(hidden, num_classes)``, with the official parameter names (``head.0``, ``head.1``, ``head.3``).
    ``BatchNorm1d`` needs at least 2 images per training batch.

    Args:
        encoder_size: key of :data:`PROFOUND_SIZES`. Default ``"tiny"``.
        in_channels: image channels. Default 3.
        num_classes: ``K``. Default 4 (PI-RADS groups of the paper).
        hidden: hidden width of the head. Default 256 (official).
        drop_path_rate: encoder stochastic depth. Default 0.0 (the official finetuning script uses 0.1).
        official_axis_order: see the module docstring. Default True.

    Shapes: ``(B, C_in, H, W, D) -> (B, K)`` logits.
    """

    def __init__(
        self,
        encoder_size: str = "tiny",
        in_channels: int = 3,
        num_classes: int = 4,
        hidden: int = 256,
        drop_path_rate: float = 0.0,
        official_axis_order: bool = True,
    ) -> None:
        super().__init__(encoder_size, in_channels, drop_path_rate, official_axis_order)
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"ProFoundClassifier: num_classes and hidden must be >= 1, got {num_classes}, {hidden}.")
        self.head = MLPHead(self.encoder.out_channels, num_classes, hidden_channels=hidden, norm="batch", act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, K)``."""
        self._check_input(x)
        return self.head(self.encoder.forward_pooled(x))

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, hidden), "encoder": (B, dims[3])}``: input of the last linear layer and the
        encoder's pooled output."""
        self._check_input(x)
        pooled = self.encoder.forward_pooled(x)
        return {"head_input": self.head.forward_features(pooled), "encoder": pooled}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the MLP head's hidden layer; ``encoder``: the pooled encoder (frozen in finetune)."""
        return {"head_input": "mlp_hidden", "encoder": "encoder_pooled"}


class ProFoundSuperRes(_ProFoundModel):
    """ProFound encoder, dense decoder and a sub-pixel head (super-resolution, paper section 2.2).

    The decoder (UperNet or UNETR, as in :class:`ProFoundDense`) maps the input to ``decoder_channels`` features at
    the input resolution; :class:`~common.networks.heads.SubpixelUpsample3dHead` then multiplies each axis by
    ``scale`` in the caller's ``(H, W, D)`` order, e.g. ``(1, 1, 2)`` turns ``D / 2`` slices into ``D``. The official
    repository has no super-resolution model; this composition is ours.

    Args:
        encoder_size: key of :data:`PROFOUND_SIZES`. Default ``"tiny"``.
        in_channels: image channels. Default 1.
        out_channels: output channels. Default 1.
        scale: integer factor per axis of ``(H, W, D)``. Default ``(1, 1, 2)``.
        decoder: ``"upernet"`` or ``"unetr"``. Default ``"upernet"``.
        decoder_channels: channels of the decoder output fed to the sub-pixel head. Default 32.
        head_kernel_size: kernel size of the sub-pixel convolution. Default 3.
        drop_path_rate, official_axis_order, hidden_size, pool_scales, feature_size, norm_name: as in
            :class:`ProFoundDense` (the UperNet auxiliary head is not built).

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``, ``H, W, D`` divisible by 16.
    """

    def __init__(
        self,
        encoder_size: str = "tiny",
        in_channels: int = 1,
        out_channels: int = 1,
        scale: Sequence[int] = (1, 1, 2),
        decoder: str = "upernet",
        decoder_channels: int = 32,
        head_kernel_size: int = 3,
        drop_path_rate: float = 0.0,
        official_axis_order: bool = True,
        hidden_size: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        feature_size: int = 32,
        norm_name: str | tuple = "instance",
    ) -> None:
        super().__init__(encoder_size, in_channels, drop_path_rate, official_axis_order)
        if decoder not in ("upernet", "unetr"):
            raise ValueError(f"ProFoundSuperRes: decoder must be 'upernet' or 'unetr', got {decoder!r}.")
        if decoder_channels < 1:
            raise ValueError(f"ProFoundSuperRes: decoder_channels must be >= 1, got {decoder_channels}.")
        self.decoder_name = decoder
        self.decoder: UperNetDecoder3d | UnetrDecoder3d
        if decoder == "upernet":
            self.decoder = UperNetDecoder3d(
                in_channels=self.encoder.dims,
                out_channels=decoder_channels,
                hidden_size=hidden_size,
                pool_scales=pool_scales,
                use_auxiliary_head=False,
            )
        else:
            self.decoder = UnetrDecoder3d(
                in_channels=in_channels,
                out_channels=decoder_channels,
                stage_channels=self.encoder.dims,
                feature_size=feature_size,
                norm_name=norm_name,
            )
        self.head = SubpixelUpsample3dHead(decoder_channels, out_channels, scale=scale, kernel_size=head_kernel_size)

    def _head_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        xn = self.encoder.to_native(x)
        stages = self.encoder.forward_native_features(xn)
        inputs = stages[:3] + [self.encoder.norm_map(stages[3])] if self.decoder_name == "unetr" else stages
        return self.encoder.from_native(self.decoder(xn, inputs)), stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``."""
        return self.head(self._head_input(x)[0])

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, decoder_channels), "encoder": (B, dims[3])}``: the global average of the sub-pixel
        head's input and the encoder's pooled output."""
        head_input, stage4 = self._head_input(x)
        return {"head_input": _spatial_mean(head_input), "encoder": self.encoder.pool(stage4)}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the decoder output the sub-pixel head reads; ``encoder``: the pooled encoder."""
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def detect_profound_format(state_dict: Mapping[str, object]) -> str:
    """Return ``"fcmae"`` for an official FCMAE pretraining checkpoint (sparse MinkowskiEngine ``*.kernel`` weights
    under ``encoder.``, decoder / mask token) or ``"dense"`` for a dense ``ConvNeXtV2`` encoder or finetuned model
    (wrapped or not). Raise ``ValueError`` for anything else."""
    keys = list(unwrap_state_dict(state_dict))
    if any(k.endswith(".kernel") for k in keys) or "mask_token" in keys:
        return "fcmae"
    if any(k == "downsample_layers.0.0.weight" or k.endswith(".downsample_layers.0.0.weight") for k in keys):
        return "dense"
    raise ValueError(
        "Not a ProFound checkpoint: found neither FCMAE keys (*.kernel, mask_token) nor "
        f"'downsample_layers.0.0.weight'; first keys: {keys[:5]}."
    )


def _kernel_size(volume: int, key: str) -> int:
    k = round(volume ** (1 / 3))
    if k**3 != volume:
        raise ValueError(f"convert_profound_fcmae: kernel volume {volume} of {key!r} is not a cube.")
    return k


def convert_profound_fcmae(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Convert an official FCMAE checkpoint to dense :class:`ProFoundEncoder` weights (official
    ``remap_checkpoint_keys``).

    Rules: drop keys containing ``decoder``, ``mask_token``, ``proj`` or ``pred`` (pretraining decoder); strip
    ``encoder.``; ``*.kernel`` -> ``*.weight`` with MinkowskiEngine layouts converted: a convolution kernel
    ``(k^3, C_in, C_out)`` -> ``(C_out, C_in, k, k, k)``, a depthwise kernel ``(k^3, C)`` -> ``(C, 1, k, k, k)``, a
    1x1x1 kernel ``(C_in, C_out)`` -> ``(C_out, C_in, 1, 1, 1)``; the flat kernel index is ``a * k^2 + b * k + c`` for
    dense offsets ``(c, b, a)`` (first axis fastest, the official ``reshape(..., k, k, k).permute(0, 1, 4, 3, 2)``);
    drop the ``ln`` / ``linear`` wrapper level; biases ``(1, C)`` -> ``(C,)``; GRN ``(1, C)`` -> ``(1, 1, 1, 1, C)``.
    The result has no ``norm.*`` (the pretraining encoder has no final LayerNorm). The input is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in unwrap_state_dict(state_dict).items():
        if any(word in key for word in ("decoder", "mask_token", "proj", "pred")):
            continue
        k = key[len("encoder.") :] if key.startswith("encoder.") else key
        v = value
        parts = k.split(".")
        if parts[-1] == "kernel":
            k = ".".join(parts[:-1] + ["weight"])
            if v.ndim == 3:
                vol, c_in, c_out = v.shape
                ks = _kernel_size(vol, key)
                v = v.permute(2, 1, 0).reshape(c_out, c_in, ks, ks, ks).permute(0, 1, 4, 3, 2)
            elif v.ndim == 2 and parts[-2] == "dwconv":
                vol, c = v.shape
                ks = _kernel_size(vol, key)
                v = v.permute(1, 0).reshape(c, 1, ks, ks, ks).permute(0, 1, 4, 3, 2)
            elif v.ndim == 2:  # kernel volume 1: MinkowskiEngine stores (C_in, C_out)
                v = v.permute(1, 0)[:, :, None, None, None]
            else:
                raise ValueError(f"convert_profound_fcmae: unexpected kernel shape {tuple(v.shape)} for {key!r}.")
            v = v.contiguous()
        elif len(parts) >= 2 and parts[-2] in ("ln", "linear"):
            k = ".".join(parts[:-2] + parts[-1:])
        if k.endswith("bias") and v.ndim != 1:
            v = v.reshape(-1)
        elif ".grn." in f".{k}":
            v = v.reshape(1, 1, 1, 1, -1)
        out[k] = v
    return out


def convert_profound_dense(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Convert an official dense checkpoint (``ConvNeXtV2`` encoder, ``UperNet``, ``ConvnextUNETR`` or
    ``Classifier``) to this module's names.

    Unwraps ``model`` / ``state_dict`` / ``model_state_dict``, strips ``module.``, and moves the official full-model
    decoder keys ``decode_head.``, ``auxiliary_head.``, ``hidden_norm.`` (UperNet) and ``norm1..3.`` (UNETR) under
    ``decoder.``; ``encoder.*``, ``decoder.*`` (UNETR) and ``head.*`` (classifier) already match. Idempotent; the
    input is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in unwrap_state_dict(state_dict).items():
        out[f"decoder.{k}" if k.startswith(_OFFICIAL_DECODER_PREFIXES) else k] = v
    return out


def adapt_profound_stem(
    state_dict: Mapping[str, object], in_channels: int, channels: Sequence[int | None] | None = None
) -> dict[str, torch.Tensor]:
    """Adapt the stem convolution of a dense encoder or model state dict to ``in_channels`` image channels.

    ``channels`` names, for each new input channel, the pretrained input channel whose kernel it takes, or None
    for the channel-mean kernel; None (default) gives every channel the channel-mean kernel. Taking a pretrained
    channel's kernel is what the official ProFound code does when a task has fewer modalities: it feeds
    ``[T2W, 0, 0]`` into the 3-channel (T2W, DWI, ADC) stem (github pipiwang/ProFound, ``dataset/dataset_seg.py``,
    ``AnatomySet``), so the T2W channel meets its own kernel. The channel-mean kernel is the sum of the pretrained
    stem kernels over their input channels divided by ``in_channels``, so an image repeated on all channels gives
    exactly the pretrained stem response to that image repeated on the original channels. Keys
    ``downsample_layers.0.0.weight`` and ``encoder.downsample_layers.0.0.weight`` are adapted (unless they already
    have ``in_channels`` and ``channels`` is None); other entries are returned unchanged. The input is not modified.
    """
    if in_channels < 1:
        raise ValueError(f"adapt_profound_stem: in_channels must be >= 1, got {in_channels}.")
    if channels is not None and len(channels) != in_channels:
        raise ValueError(
            f"adapt_profound_stem: channels {list(channels)} name {len(channels)} channels, the network has "
            f"{in_channels}."
        )
    out = dict(unwrap_state_dict(state_dict))
    keys = [k for k in out if k in ("downsample_layers.0.0.weight", "encoder.downsample_layers.0.0.weight")]
    if not keys:
        raise ValueError("adapt_profound_stem: no stem weight 'downsample_layers.0.0.weight' in the state dict.")
    picks = [None] * in_channels if channels is None else list(channels)
    for k in keys:
        w = out[k]
        if channels is None and w.shape[1] == in_channels:
            continue
        bad = [c for c in picks if c is not None and not 0 <= c < w.shape[1]]
        if bad:
            raise ValueError(f"adapt_profound_stem: channels {bad} do not exist in a stem of {w.shape[1]} channels.")
        mean = w.sum(dim=1, keepdim=True) / in_channels
        out[k] = torch.cat([mean if c is None else w[:, c : c + 1] for c in picks], dim=1)
    return out


def load_profound_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, object],
    strict: bool = True,
    adapt_stem: bool = False,
    stem_channels: Sequence[int | None] | None = None,
) -> nn.Module:
    """Load an official or own ProFound checkpoint into ``model`` and return ``model``.

    ``path_or_state`` is a file (read with ``torch.load(..., weights_only=True)``) or an in-memory checkpoint. The
    format is detected by :func:`detect_profound_format` and converted by :func:`convert_profound_fcmae` or
    :func:`convert_profound_dense`. Routing: an encoder-only checkpoint (FCMAE, or dense keys without ``encoder.``)
    loaded into a downstream model fills ``model.encoder`` and leaves decoder / head as they are; a full-model
    checkpoint loaded into a bare :class:`ProFoundEncoder` contributes its ``encoder.*`` entries. FCMAE checkpoints
    have no final ``norm``; it keeps its initial value (identity affine) and is not reported as missing.

    With ``adapt_stem``, a stem pretrained on other input channels than the model's (the official one has three:
    T2W, DWI, ADC) is adapted by :func:`adapt_profound_stem`, after the FCMAE conversion so that both formats are;
    ``stem_channels`` (which implies it) names the pretrained channel each model channel takes.

    Raises ``ValueError`` listing missing and unexpected keys (``strict=True``) and any shape mismatch (always).
    """
    if isinstance(path_or_state, str | os.PathLike) and not os.path.isfile(path_or_state):
        raise ValueError(f"load_profound_checkpoint: no checkpoint file at {os.fspath(path_or_state)!r}.")
    raw = load_weights(path_or_state)
    fmt = detect_profound_format(raw)
    state = convert_profound_fcmae(raw) if fmt == "fcmae" else convert_profound_dense(raw)
    encoder_only = not any(k.startswith("encoder.") for k in state)
    target: nn.Module = model
    if isinstance(model, ProFoundEncoder):
        if not encoder_only:
            state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    elif encoder_only:
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"load_profound_checkpoint: {type(model).__name__} has no 'encoder' to load into.")
        target = encoder
    prefix = "" if target is model else "encoder."
    expected = target.state_dict()
    stem = next(
        (k for k in ("downsample_layers.0.0.weight", "encoder.downsample_layers.0.0.weight") if k in expected), ""
    )
    if (adapt_stem or stem_channels is not None) and stem in state:
        state = adapt_profound_stem(state, expected[stem].shape[1], stem_channels)  # no-op when the channels match
    tolerated = {"norm.weight", "norm.bias"} if fmt == "fcmae" else set()
    problems = state_dict_problems(expected, state, strict, scope=set(expected) - tolerated, prefix=prefix)
    if problems:
        raise ValueError("\n".join([f"load_profound_checkpoint: {fmt} checkpoint does not fit {type(model).__name__}.",
                                    *problems]))  # fmt: skip
    target.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


def freeze_profound_finetune(model: nn.Module) -> nn.Module:
    """ProFound finetune protocol (paper section 2.2, MAE's lightweight protocol): freeze the whole encoder, train
    the decoder / head. Returns ``model`` (modified in place).

    Sets ``requires_grad=False`` on every encoder parameter (including its final ``norm``, which the UNETR decoder
    uses) and ``True`` on every other parameter, and puts the encoder in eval mode. ConvNeXt has LayerNorm only (no
    running statistics), so eval mode only switches stochastic depth off: a frozen encoder gives deterministic
    features. ProFound models keep a frozen encoder in eval mode across later ``model.train()`` calls. (The
    official freeze mode leaves the encoder in train mode, so its ``drop_path_rate=0.1`` stays active.)
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"freeze_profound_finetune: {type(model).__name__} has no 'encoder' submodule.")
    encoder_params = {id(p) for p in encoder.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in encoder_params)
    if isinstance(model, _ProFoundModel):
        model.encoder_frozen = True
    encoder.eval()
    return model


def enable_feature_cache(model: nn.Module, max_bytes: int = 4 << 30, mode: str = "all") -> bool:
    """Give every frozen :class:`ProFoundEncoder` in ``model`` a :class:`~common.networks.feature_cache.FeatureCache`
    of ``max_bytes`` and ``mode`` (its outputs computed once per distinct input); returns whether one was given. An
    encoder with a trainable parameter, or in training mode, keeps computing (a cached output would be stale)."""
    from .feature_cache import FeatureCache

    given = False
    for module in model.modules():
        if isinstance(module, ProFoundEncoder):
            frozen = not any(p.requires_grad for p in module.parameters())
            module.feature_cache = FeatureCache(max_bytes, mode) if frozen else None
            given = given or frozen
    return given
