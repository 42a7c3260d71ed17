"""The five specialised task models of the study (paper section 3.1; DESIGN.md section 2, last column).

Each is the MONAI network named by the paper's table, subclassed only to add the representation contract
``forward_representations(x) -> {"head_input": (B, d), "encoder": (B, e)}`` (paper section 3.2: global average of
the input of the final prediction layer, and of the encoder output). Subclassing keeps the MONAI parameter names
exactly (the documented prefix is empty), so MONAI-format state dicts load with ``strict=True``.

- classification: :class:`ResNet50Classifier` (MONAI ``ResNet`` as built by ``resnet50``);
- segmentation: :class:`UNetSegmenter` (MONAI ``UNet``);
- super-resolution: :class:`~common.networks.transunet.TransUNet3d`;
- distortion correction: :class:`ViTImageToImage` (MONAI ``ViTAutoEnc``);
- modality translation: :class:`ConditionalDiffusionUNet` (MONAI ``DiffusionModelUNet``, the DDPM noise predictor).

:data:`SPECIALISED_MODELS` maps task ids to model names; :func:`specialised_network` builds one.
MONAI's ``TransformerBlock`` / ``SABlock`` (ViT, TransUNet, diffusion attention) need the ``einops`` package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import UNet, ViTAutoEnc
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, get_timestep_embedding
from monai.networks.nets.resnet import ResNet, ResNetBottleneck, get_inplanes
from torch import nn

from common.tasks import TASKS

from .transunet import TransUNet3d

__all__ = [
    "SPECIALISED_MODELS",
    "ConditionalDiffusionUNet",
    "ResNet50Classifier",
    "UNetSegmenter",
    "ViTImageToImage",
    "specialised_network",
]


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)))


def _check_5d(name: str, x: torch.Tensor, channels: int) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected (B, {channels}, H, W, D), got {list(x.shape)}.")


class ResNet50Classifier(ResNet):
    """3D ResNet-50 classifier (He et al., CVPR 2016; 3D form of Hara et al. / MedicalNet as in MONAI).

    Identical to ``monai.networks.nets.resnet50(spatial_dims=3, n_input_channels=..., num_classes=...)``: bottleneck
    blocks ``[3, 4, 6, 3]``, widths ``(64, 128, 256, 512) * widen_factor`` (x4 expansion), global average pooling and
    a linear ``fc``. Parameter names are MONAI's (no prefix).

    Args:
        n_input_channels: image channels. Default 1 (T2W).
        num_classes: ``K``. Default 4 (PI-RADS groups).
        conv1_t_size: stem kernel size. Default 7.
        conv1_t_stride: stem stride. Default 1 (MONAI default).
        no_max_pool: skip the stem max-pool. Default False.
        shortcut_type: ``"A"`` or ``"B"``. Default ``"B"``.
        widen_factor: width multiplier. Default 1.0.
        bias_downsample: bias in the shortcut convs (MedicalNet weights need False). Default True (MONAI default).
        act: MONAI activation. Default ``("relu", {"inplace": True})``.
        norm: MONAI norm. Default ``"batch"``.

    Shapes: ``(B, C_in, H, W, D) -> (B, K)``; ``forward_representations``: ``head_input`` = ``encoder`` =
    ``(B, 2048 * widen_factor)``, the pooled ``layer4`` output, which is the input of ``fc`` (the ResNet has no
    separate head, so both keys hold the same vector).
    """

    def __init__(
        self,
        n_input_channels: int = 1,
        num_classes: int = 4,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        shortcut_type: str = "B",
        widen_factor: float = 1.0,
        bias_downsample: bool = True,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        if n_input_channels < 1 or num_classes < 1:
            raise ValueError(
                f"ResNet50Classifier: n_input_channels and num_classes must be >= 1, got {n_input_channels}, "
                f"{num_classes}."
            )
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"ResNet50Classifier: shortcut_type must be 'A' or 'B', got {shortcut_type!r}.")
        if widen_factor <= 0:
            raise ValueError(f"ResNet50Classifier: widen_factor must be > 0, got {widen_factor}.")
        super().__init__(
            block=ResNetBottleneck,
            layers=[3, 4, 6, 3],
            block_inplanes=get_inplanes(),
            spatial_dims=3,
            n_input_channels=n_input_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            no_max_pool=no_max_pool,
            shortcut_type=shortcut_type,
            widen_factor=widen_factor,
            num_classes=num_classes,
            feed_forward=True,
            bias_downsample=bias_downsample,
            act=act,
            norm=norm,
        )
        self.n_input_channels = n_input_channels

    def forward_feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C_in, H, W, D) -> {"head_input": m, "encoder": m}``, ``m`` the ``layer4`` map ``(B, F, h, w, d)``."""
        _check_5d("ResNet50Classifier", x, self.n_input_channels)
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return {"head_input": x, "encoder": x}

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, F), "encoder": (B, F)}``, ``F = 2048 * widen_factor``: the pooled features fed to
        ``fc`` (both keys)."""
        pooled = _spatial_mean(self.forward_feature_maps(x)["head_input"])
        return {"head_input": pooled, "encoder": pooled}

    def representation_kinds(self) -> dict[str, str]:
        """Both recorded layers are the pooled ``layer4`` output, which the single linear ``fc`` reads."""
        return {"head_input": "encoder_pooled", "encoder": "encoder_pooled"}


class UNetSegmenter(UNet):
    """MONAI residual 3D UNet (Kerfoot et al., "Left-Ventricle Quantification Using Residual U-Net", STACOM 2018).

    The MONAI ``UNet`` with the study's defaults; parameter names are MONAI's (no prefix). MONAI builds it
    recursively: ``model = Sequential(down, SkipConnection(sub), up)``, the bottleneck innermost; with residual units
    the top ``up`` is ``Sequential(ConvTranspose + norm/act, ResidualUnit(last_conv_only=True))`` whose single conv
    (plus identity shortcut) is the final prediction layer.

    Args:
        in_channels: input channels. Default 2 (T2W + one diffusion map).
        out_channels: output channels. Default 2 (background, lesion).
        channels: widths per level. Default ``(16, 32, 64, 128, 256)``.
        strides: stride per down level (``len(channels) - 1``). Default ``(2, 2, 2, 2)``.
        kernel_size: conv kernel. Default 3.
        up_kernel_size: transposed conv kernel. Default 3.
        num_res_units: residual units per block. Default 2.
        act: MONAI activation. Default ``"PRELU"``.
        norm: MONAI norm. Default ``"INSTANCE"``.
        dropout: dropout. Default 0.0.
        bias: conv bias. Default True.
        head_layer: which map is ``head_input``: ``"final_conv"`` (default), the input of the final conv, which has
            ``out_channels`` channels when ``num_res_units > 0`` (MONAI's top up layer maps to ``out_channels`` before
            its residual unit; ``2 * channels[0]`` otherwise); or ``"last_up"``, the input of the top up layer
            (skip and decoder features concatenated, ``2 * channels[0]`` channels at stride ``strides[0]``), a richer
            representation.

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``, sizes divisible by ``prod(strides)``;
    ``forward_representations``: ``{"head_input": (B, out_channels or 2 * channels[0]), "encoder":
    (B, channels[-1])}`` (``encoder`` = pooled bottleneck output).
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        num_res_units: int = 2,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        bias: bool = True,
        head_layer: str = "final_conv",
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"UNetSegmenter: in/out channels must be >= 1, got {in_channels}, {out_channels}.")
        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"UNetSegmenter: need len(strides) == len(channels) - 1, got {len(strides)} and {len(channels)}."
            )
        if num_res_units < 0:
            raise ValueError(f"UNetSegmenter: num_res_units must be >= 0, got {num_res_units}.")
        if head_layer not in ("final_conv", "last_up"):
            raise ValueError(f"UNetSegmenter: head_layer must be 'final_conv' or 'last_up', got {head_layer!r}.")
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=bias,
        )
        self.head_layer = head_layer
        self.total_stride = math.prod(int(s) for s in strides)

    def final_layer(self) -> nn.Module:
        """The module that maps the unpooled ``head_input`` map to the output."""
        top_up = self.model[2]
        if self.head_layer == "final_conv" and isinstance(top_up, nn.Sequential) and len(top_up) == 2:
            if isinstance(top_up[1], ResidualUnit):
                return top_up[1]  # conv + identity shortcut
        return top_up

    def forward_feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C_in, H, W, D) -> {"head_input": (B, F, ...), "encoder": (B, channels[-1], H / S, W / S, D / S)}``;
        ``final_layer()(head_input) == forward(x)``."""
        _check_5d("UNetSegmenter", x, self.in_channels)
        if any(s % self.total_stride != 0 for s in x.shape[2:]):
            raise ValueError(
                f"UNetSegmenter: spatial sizes {tuple(x.shape[2:])} must be divisible by prod(strides) = "
                f"{self.total_stride}; pad or crop the input."
            )
        blocks: list[nn.Module] = []
        skips: list[torch.Tensor] = []
        block: nn.Module = self.model
        h = x
        for _ in range(len(self.channels) - 1):  # descend: Sequential(down, SkipConnection(sub), up) per level
            h = block[0](h)
            blocks.append(block)
            skips.append(h)
            block = block[1].submodule
        bottleneck = block(h)  # the innermost submodule is the bottom layer
        h = bottleneck
        for level in range(len(blocks) - 1, 0, -1):  # ascend, SkipConnection concatenates [skip, sub-output]
            h = blocks[level][2](torch.cat([skips[level], h], dim=1))
        h = torch.cat([skips[0], h], dim=1)  # input of the top up layer
        top_up = self.model[2]
        if self.final_layer() is not top_up:
            h = top_up[0](h)
        return {"head_input": h, "encoder": bottleneck}

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, F), "encoder": (B, channels[-1])}``: the pooled input of the final layer (see
        ``head_layer``) and the pooled bottleneck output."""
        return {k: _spatial_mean(v) for k, v in self.forward_feature_maps(x).items()}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the decoder map before the final layer; ``encoder``: the pooled bottleneck."""
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


class ViTImageToImage(ViTAutoEnc):
    """MONAI ``ViTAutoEnc`` (Dosovitskiy et al., ICLR 2021, ViT; MONAI's image-to-image variant) for distortion
    correction.

    Parameter names are MONAI's (no prefix). Patches are embedded, ``num_layers`` transformer blocks and a LayerNorm
    follow, the token grid is upsampled back by two transposed convs with kernel = stride = ``sqrt(patch_size)``
    (MONAI's design, hence every patch side must be a perfect square: 1, 4, 9, 16, ...). Unlike ``ViTAutoEnc``,
    ``forward`` returns only the image (not the hidden states), so it plugs into MONAI trainers and inferers.
    The unused ``blocks.*.norm_cross_attn`` LayerNorms (MONAI builds them even without cross attention) are frozen.

    Args:
        in_channels: input channels. Default 1 (warped T2W).
        out_channels: output channels. Default 1.
        img_size: ``(H, W, D)``; inputs must have exactly this size (fixed position embeddings). Default
            ``(192, 192, 96)`` (paper 200 x 200 x 96 cropped to a multiple of the patch).
        patch_size: ``(pH, pW, pD)``, perfect squares dividing ``img_size``. Default ``(16, 16, 16)``.
        deconv_chns: channels between the two transposed convs. Default 16.
        hidden_size: transformer width. Default 768.
        mlp_dim: MLP width. Default 3072.
        num_layers: transformer blocks. Default 12.
        num_heads: attention heads. Default 12.
        proj_type: patch embedding, ``"conv"`` or ``"perceptron"``. Default ``"conv"``.
        dropout_rate: dropout. Default 0.0.
        qkv_bias: bias of the qkv projection. Default False.

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``; ``forward_representations``: ``{"head_input":
    (B, deconv_chns), "encoder": (B, hidden_size)}``: the pooled input of the final transposed conv
    (``conv3d_transpose_1``) and the mean of the normalised transformer tokens.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: Sequence[int] = (192, 192, 96),
        patch_size: Sequence[int] = (16, 16, 16),
        deconv_chns: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        img, patch = tuple(int(s) for s in img_size), tuple(int(p) for p in patch_size)
        if len(img) != 3 or len(patch) != 3 or min(img + patch) < 1:
            raise ValueError(f"ViTImageToImage: img_size and patch_size need 3 positive ints, got {img}, {patch}.")
        if any(math.isqrt(p) ** 2 != p for p in patch):
            raise ValueError(f"ViTImageToImage: every patch side must be a perfect square (1, 4, 9, 16), got {patch}.")
        if any(i % p for i, p in zip(img, patch, strict=True)):
            raise ValueError(f"ViTImageToImage: img_size {img} must be divisible by patch_size {patch}.")
        if in_channels < 1 or out_channels < 1 or deconv_chns < 1:
            raise ValueError("ViTImageToImage: in_channels, out_channels and deconv_chns must be >= 1.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"ViTImageToImage: hidden_size {hidden_size} not divisible by num_heads {num_heads}.")
        super().__init__(
            in_channels=in_channels,
            img_size=img,
            patch_size=patch,
            out_channels=out_channels,
            deconv_chns=deconv_chns,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            qkv_bias=qkv_bias,
        )
        self.in_channels = in_channels
        for blk in self.blocks:  # built by MONAI, unused without cross attention; frozen so DDP sees no unused params
            blk.norm_cross_attn.requires_grad_(False)

    def forward_feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C_in, H, W, D) -> {"head_input": (B, deconv_chns, H / sqrt(pH), ...), "encoder": (B, hidden,
        H / pH, W / pW, D / pD)}`` (the normalised tokens on their grid)."""
        _check_5d("ViTImageToImage", x, self.in_channels)
        size, img, patch = x.shape[2:], self.img_size, self.patch_size
        if size[0] != img[0] or size[1] != img[1] or size[2] != img[2]:
            raise ValueError(f"ViTImageToImage: input size {list(size)} must equal img_size {img}.")
        tokens = self.patch_embedding(x)  # (B, N, hidden)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        # (B, N, hidden) -> (B, hidden, H / pH, W / pW, D / pD)
        grid_map = tokens.transpose(1, 2).reshape(
            tokens.shape[0], tokens.shape[2], img[0] // patch[0], img[1] // patch[1], img[2] // patch[2]
        )
        return {"head_input": self.conv3d_transpose(grid_map), "encoder": grid_map}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, C_in, H, W, D) -> (B, C_out, H, W, D)``; the image only (``ViTAutoEnc`` also returns hidden states)."""
        return self.conv3d_transpose_1(self.forward_feature_maps(x)["head_input"])

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, deconv_chns), "encoder": (B, hidden_size)}`` (see the class docstring)."""
        return {k: _spatial_mean(v) for k, v in self.forward_feature_maps(x).items()}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the map before the final transposed conv; ``encoder``: the mean transformer token."""
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


class ConditionalDiffusionUNet(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` as a conditional DDPM noise predictor (Ho et al., NeurIPS 2020) for T2W -> DWI.

    Conditioning is by channel concatenation (Saharia et al., "Palette", SIGGRAPH 2022): the input is
    ``cat([noisy DWI, T2W], dim=1)``; the output is the predicted noise (or whatever the scheduler's prediction type
    says). Parameter names are MONAI's (no prefix). ``forward(x, timesteps)`` is MONAI's. Note that MONAI
    zero-initialises the final conv (``out.2``), so a fresh network predicts 0.

    Args:
        in_channels: input channels. Default 2 (noisy DWI, T2W).
        out_channels: output channels. Default 1.
        channels: widths per level (multiples of ``norm_num_groups``). Default ``(32, 64, 64)``.
        attention_levels: self-attention per level. Default ``(False, False, True)``.
        num_res_blocks: residual blocks per level. Default 1.
        norm_num_groups: GroupNorm groups. Default 32.
        num_head_channels: channels per attention head. Default 32.
        resblock_updown: residual blocks for up/down sampling. Default False.
        representation_timestep: timestep used by :meth:`forward_representations` when none is given. Default 0
            (the least noisy step, so the representation is of the nearly clean input).

    Shapes: ``forward``: ``(B, C_in, H, W, D), (B,) -> (B, C_out, H, W, D)``, sizes divisible by
    ``2 ** (len(channels) - 1)``; ``forward_representations``: ``{"head_input": (B, channels[0]), "encoder":
    (B, channels[-1])}``: the pooled input of the final conv ``out.2`` (after ``out``'s GroupNorm and SiLU) and the
    pooled middle-block output.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        norm_num_groups: int = 32,
        num_head_channels: int | Sequence[int] = 32,
        resblock_updown: bool = False,
        representation_timestep: int = 0,
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"ConditionalDiffusionUNet: in/out channels must be >= 1, got {in_channels}, {out_channels}."
            )
        if representation_timestep < 0:
            raise ValueError(
                f"ConditionalDiffusionUNet: representation_timestep must be >= 0, got {representation_timestep}."
            )
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            resblock_updown=resblock_updown,
            num_head_channels=num_head_channels,
        )
        self.representation_timestep = representation_timestep
        self.total_stride = 2 ** (len(channels) - 1)

    def forward_feature_maps(self, x: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C_in, H, W, D), (B,) -> {"head_input": (B, channels[0], H, W, D), "encoder": (B, channels[-1],
        H / S, W / S, D / S)}``; ``out[2](head_input) == forward(x, timesteps)``."""
        _check_5d("ConditionalDiffusionUNet", x, self.in_channels)
        if any(s % self.total_stride != 0 for s in x.shape[2:]):
            raise ValueError(
                f"ConditionalDiffusionUNet: spatial sizes {tuple(x.shape[2:])} must be divisible by "
                f"{self.total_stride}; pad or crop the input."
            )
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        h = self.conv_in(x)
        residuals: list[torch.Tensor] = [h]
        for down in self.down_blocks:
            h, res = down(hidden_states=h, temb=emb, context=None)
            residuals.extend(res)
        middle = self.middle_block(hidden_states=h, temb=emb, context=None)
        h = middle
        for up in self.up_blocks:
            n = len(up.resnets)
            h = up(hidden_states=h, res_hidden_states_list=residuals[-n:], temb=emb, context=None)
            residuals = residuals[:-n]
        return {"head_input": self.out[1](self.out[0](h)), "encoder": middle}

    def forward_representations(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, channels[0]), "encoder": (B, channels[-1])}``; ``timesteps`` ``(B,)`` defaults to
        ``representation_timestep`` for every image."""
        if timesteps is None:
            timesteps = torch.full((x.shape[0],), self.representation_timestep, dtype=torch.long, device=x.device)
        return {k: _spatial_mean(v) for k, v in self.forward_feature_maps(x, timesteps).items()}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the map before the final conv; ``encoder``: the pooled middle block."""
        return {"head_input": "decoder_features", "encoder": "diffusion_bottleneck"}


#: Task id -> specialised model name (paper section 3.1; DESIGN.md section 2), from the task registry.
SPECIALISED_MODELS: dict[str, str] = {task.id: task.specialised_model for task in TASKS.values()}

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "resnet50": ResNet50Classifier,
    "unet": UNetSegmenter,
    "transunet": TransUNet3d,
    "vit": ViTImageToImage,
    "ddpm": ConditionalDiffusionUNet,
}


def specialised_network(task: str, **kwargs: object) -> nn.Module:
    """Build the specialised model of ``task`` (a key of :data:`SPECIALISED_MODELS`) with constructor ``kwargs``."""
    if task not in SPECIALISED_MODELS:
        raise ValueError(f"specialised_network: unknown task {task!r}; choose one of {list(SPECIALISED_MODELS)}.")
    return _MODEL_CLASSES[SPECIALISED_MODELS[task]](**kwargs)
