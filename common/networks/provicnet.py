"""ProViCNet: a DINOv2 ViT applied slice-wise (2.5D) to prostate MRI, with dense, classification and
super-resolution heads, checkpoint converters and the fine-tuning freeze.

Lee et al., "Prostate-Specific Foundation Models with Patch-Level Contrast for Cancer Detection", arXiv 2502.00366;
code: pimed/ProViCNet (``ProViCNet/ModelArchitectures/ProViCNet/ProViCNet.py``, ``Models.py``,
``util_functions/Prostate_DataGenerator.py``). Transfer study: Huang et al., "Understanding the Transfer Limits of
Vision Foundation Models", ISBI 2026 (arXiv 2601.15888), sections 2.1-2.2.

Facts taken from the official code:

- Top-level modules ``backbone`` (the hub ``dinov2_vits14_reg``), ``head`` and ``axis_pos``/``axis_max``
  (``nn.Linear(1, E)``, weights N(0, 0.02), zero bias); the contrastive variants add ``CL_Head`` (the pretraining
  projection head, dropped when a checkpoint is loaded here). The dense head is ``conv_head8`` ("conv1"):
  ``head.segmentation_conv`` = [Upsample x2, Conv3x3 E->128, BN, ReLU, Upsample x2, Conv3x3 128->64, BN, ReLU,
  Upsample x2, Conv3x3 64->K], nearest upsampling, no activation.
- Token order ``[cls, registers, axis_pos, axis_max, patches]``: cls and patches get position embeddings first, then
  the registers and the two slice-position tokens are inserted after cls.
- Slice-position inputs are raw floats: ``axis_pos`` gets the slice index j (0-based), ``axis_max`` the number of
  slices of the volume.
- The input channels are ``nChannel = 3`` consecutive slices of one sequence (one model per sequence), centred on
  the labelled slice; at the volume edges the window is shifted inward (slice 0 sees slices 0, 1, 2), not padded.
- Slices are resized (bilinear) to 448 x 448 (``GetModel`` asserts ``img_size == 448``); the head upsamples the
  32 x 32 patch grid by 8, so predictions are 256 x 256 (the label resolution there).
- No freezing in the official training (the backbone trains at 0.05 x the head's learning rate); the fine-tuning
  protocol here is the study's (section 2.2): last two blocks, the norm layers and the head.

Choices of this implementation (documented where they act):

- Input channels are neighbouring slices x modalities, modality-major: ``[m0 s-1, m0 s, m0 s+1, m1 s-1, ...]``, so a
  3-channel pretrained patch embedding tiles over modalities (divided by M) when loaded.
- Volumes ``(B, M, H, W, D)`` are cut into ``B * D`` slice stacks, each resized to ``slice_size`` (a multiple of the
  patch size; ``None`` requires H and W to be multiples already), run in batches of ``slice_batch_size``, and
  predictions are resized back to ``(H, W)`` bilinearly and stacked to ``(B, C_out, H, W, D)``.
- Volume-level pooling (classification and the representations) is the mean over slices of per-slice vectors; the
  encoder representation is the mean of the per-slice cls tokens.
- The models compile with ``torch.jit.script`` (MONAI's ``ckpt_export``): ``forward`` only;
  ``forward_representations`` and the checkpoint functions stay eager.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.checks import check_int
from common.networks._state import load_weights, state_dict_problems, unwrap_state_dict
from common.networks.dinov2 import DinoVisionTransformer, interpolate_pos_embed, provicnet_backbone
from common.networks.heads import MLPHead, SubpixelUpsample3dHead

__all__ = [
    "PROVICNET_FORMATS",
    "ConvUpsampleHead",
    "ProViCNet",
    "ProViCNetClassifier",
    "SLICE_POOLINGS",
    "SliceAttentionPool",
    "ProViCNetDense",
    "ProViCNetSuperRes",
    "convert_dinov2_hub",
    "convert_provicnet_official",
    "detect_provicnet_format",
    "freeze_provicnet_finetune",
    "PROVICNET_NORMS",
    "load_provicnet_checkpoint",
    "neighbour_slice_indices",
]

PROVICNET_FORMATS = ("dinov2_hub", "provicnet_official")
_EDGE_MODES = ("shift", "replicate")
# Official modules that are not part of the downstream network: the contrastive pretraining projection head.
_OFFICIAL_DROPPED_PREFIXES = ("CL_Head.",)


def neighbour_slice_indices(depth: int, n_slices: int = 3, edge_mode: str = "shift") -> torch.Tensor:
    """Indices of the slices stacked as channels for each slice: ``-> (depth, n_slices)`` long, ascending per row.

    ``"shift"`` (official ``getNChannel``) keeps the window inside the volume by moving its centre inward, so the
    edge slices see the same stack as their neighbours (depth 5, 3 slices: [0,1,2], [0,1,2], [1,2,3], [2,3,4],
    [2,3,4]); when ``depth < n_slices`` it falls back to ``"replicate"``, which clamps indices to the volume
    ([0,0,1], [0,1,2], ..., [3,4,4]).
    """
    check_int(depth, "depth")
    check_int(n_slices, "n_slices")
    if n_slices % 2 == 0:
        raise ValueError(f"n_slices must be odd (centred window), got {n_slices}.")
    if edge_mode not in _EDGE_MODES:
        raise ValueError(f"edge_mode must be one of {_EDGE_MODES}, got {edge_mode!r}.")
    return _neighbour_slice_indices(depth, n_slices, edge_mode)


def _neighbour_slice_indices(depth: int, n_slices: int, edge_mode: str) -> torch.Tensor:
    """:func:`neighbour_slice_indices` after its argument checks; TorchScript-compatible (the models call it)."""
    r = n_slices // 2
    offsets = torch.arange(-r, r + 1)
    centres = torch.arange(depth)
    if edge_mode == "shift" and depth >= n_slices:
        centres = centres.clamp(r, depth - 1 - r)
    return (centres[:, None] + offsets[None, :]).clamp(0, depth - 1)


class ConvUpsampleHead(nn.Module):
    """ProViCNet's convolutional upsampling head (official ``conv_head8``): ``(N, E, h, w) -> (N, K, 8h, 8w)``.

    Three nearest x2 upsamplings, each followed by a 3x3 convolution (E -> 128 -> 64 -> K), with BatchNorm and ReLU
    after the first two; parameter names ``segmentation_conv.{1,2,5,6,9}`` as in the official checkpoints.

    Args:
        embed_dim: input channels E. Default 384.
        out_channels: output channels K. Default 4 (official: background, gland, indolent, csPCa).
    """

    def __init__(self, embed_dim: int = 384, out_channels: int = 4) -> None:
        super().__init__()
        check_int(embed_dim, "embed_dim")
        check_int(out_channels, "out_channels")
        self.feature_channels = 64
        self.num_feature_layers = 9  # all but the final convolution
        self.segmentation_conv = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(embed_dim, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, out_channels, 3, padding=1),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the final convolution: ``(N, E, h, w) -> (N, 64, 8h, 8w)``."""
        for i, layer in enumerate(self.segmentation_conv):  # not [:-1]: TorchScript cannot call a Sequential slice
            if i < self.num_feature_layers:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, E, h, w) -> (N, K, 8h, 8w)`` logits."""
        return self.segmentation_conv[-1](self.forward_features(x))


def make_provicnet_backbone(
    backbone: DinoVisionTransformer | None,
    backbone_size: str,
    in_chans: int,
    patch_size: int,
    num_register_tokens: int,
    backbone_img_size: int,
    drop_path_rate: float,
) -> DinoVisionTransformer:
    """The given backbone (checked to take ``in_chans`` channels), or a new one of ``backbone_size``; shared
    by the downstream ProViCNet models and the ProViCNet pretraining branches (``common.pretraining.dino``)."""
    if backbone is None:
        return provicnet_backbone(
            backbone_size,
            patch_size=patch_size,
            num_register_tokens=num_register_tokens,
            img_size=backbone_img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )
    if not isinstance(backbone, DinoVisionTransformer):
        raise ValueError(f"backbone must be a DinoVisionTransformer or None, got {type(backbone).__name__}.")
    if backbone.patch_embed.in_chans != in_chans:
        raise ValueError(f"backbone takes {backbone.patch_embed.in_chans} input channels, the model needs {in_chans}.")
    return backbone


class ProViCNetBase(nn.Module):
    """Backbone and slice-position tokens shared by all ProViCNet models and the pretraining branches (official names
    ``backbone``, ``axis_pos``, ``axis_max``), with the token preparation of the official
    ``prepare_tokens_with_axispos``."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone
        # Downstream models never mask patches; a trainable but unused mask_token would make DDP fail (no gradient).
        self.backbone.mask_token.requires_grad_(False)
        self.embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_size
        self.num_position_tokens = 2
        self.axis_pos = nn.Linear(1, self.embed_dim)
        self.axis_max = nn.Linear(1, self.embed_dim)
        for layer in (self.axis_pos, self.axis_max):
            nn.init.normal_(layer.weight, mean=0.0, std=0.02)
            nn.init.zeros_(layer.bias)

    def prepare_tokens_with_axispos(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w), (N, 2) -> (N, 1 + R + 2 + n, E)``: ``[cls, registers, axis_pos, axis_max, patches]``.

        ``pos[:, 0]`` is the slice index, ``pos[:, 1]`` the number of slices (raw floats, as official).
        """
        if pos.ndim != 2 or pos.shape[0] != x.shape[0] or pos.shape[1] != 2:
            raise ValueError(f"pos must have shape ({x.shape[0]}, 2), got {list(pos.shape)}.")
        tokens = self.backbone.prepare_tokens_with_masks(x)  # (N, 1 + R + n, E)
        pos = pos.to(tokens.dtype)
        slice_tokens = torch.stack((self.axis_pos(pos[:, 0:1]), self.axis_max(pos[:, 1:2])), dim=1)  # (N, 2, E)
        split = self.backbone.num_prefix_tokens
        return torch.cat((tokens[:, :split], slice_tokens, tokens[:, split:]), dim=1)

    def forward_features_pos(self, x: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tokens with slice-position tokens (official ``forward_features_pos``): ``(N, C, h, w), (N, 2) ->``
        ``x_norm_clstoken (N, E)``, ``x_norm_regtokens (N, R, E)``, ``x_norm_postokens (N, 2, E)``,
        ``x_norm_patchtokens (N, n, E)``, ``x_prenorm (N, 1 + R + 2 + n, E)``."""
        x = self.prepare_tokens_with_axispos(x, pos)
        for blk in self.backbone.blocks:
            x = blk(x)
        x_norm = self.backbone.norm(x)
        r = self.backbone.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_postokens": x_norm[:, r + 1 : r + 3],
            "x_norm_patchtokens": x_norm[:, r + 3 :],
            "x_prenorm": x,
        }

    def _patch_grid(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(N, n, E) -> (N, E, h/p, w/p)`` (row-major patches)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h // self.patch_size, -1)


class ProViCNet(ProViCNetBase):
    """ProViCNet on 2D slice stacks (official ``ProViCNet`` with the "conv1" head): ``(N, C, h, w) -> (N, K, 8h/p,
    8w/p)`` where C = stacked slices (x modalities) and p the patch size (official: 3 x 448 x 448 -> K x 256 x 256).

    Args:
        out_channels: head output channels K. Default 4.
        in_chans: input channels C. Default 3 (three neighbouring slices).
        backbone_size: DINOv2 size (small, base, large, giant) when ``backbone`` is None. Default ``"small"``.
        patch_size: patch size. Default 14.
        num_register_tokens: registers. Default 4.
        backbone_img_size: native position-embedding size of the backbone. Default 518 (hub).
        drop_path_rate: backbone stochastic depth. Default 0.0.
        backbone: a prebuilt :class:`DinoVisionTransformer` with ``in_chans`` inputs (overrides the four above).
    """

    def __init__(
        self,
        out_channels: int = 4,
        in_chans: int = 3,
        backbone_size: str = "small",
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        backbone: DinoVisionTransformer | None = None,
    ) -> None:
        check_int(in_chans, "in_chans")
        super().__init__(
            make_provicnet_backbone(
                backbone, backbone_size, in_chans, patch_size, num_register_tokens, backbone_img_size, drop_path_rate
            )
        )
        self.head = ConvUpsampleHead(self.embed_dim, out_channels)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, h, w)`` and optional ``pos (N, 2)`` (slice index, slice count) ``-> (N, K, 8h/p, 8w/p)``; without
        ``pos`` the plain backbone tokens are used (official behaviour)."""
        _, _, h, w = x.shape
        if pos is None:
            tokens = self.backbone.forward_features(x)["x_norm_patchtokens"]
        else:
            tokens = self.forward_features_pos(x, pos)["x_norm_patchtokens"]
        return self.head(self._patch_grid(tokens, h, w))


class _ProViCNetVolume(ProViCNetBase):
    """Volume plumbing: ``(B, M, H, W, D)`` -> slice stacks -> per-slice encoding -> volume outputs."""

    def __init__(
        self,
        n_modalities: int = 1,
        n_slices: int = 3,
        slice_size: int | None = 448,
        backbone_size: str = "small",
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        edge_mode: str = "shift",
        slice_batch_size: int | None = None,
        backbone: DinoVisionTransformer | None = None,
    ) -> None:
        check_int(n_modalities, "n_modalities")
        neighbour_slice_indices(1, n_slices, edge_mode)  # validates n_slices and edge_mode
        check_int(patch_size, "patch_size")
        super().__init__(
            make_provicnet_backbone(
                backbone,
                backbone_size,
                n_modalities * n_slices,
                patch_size,
                num_register_tokens,
                backbone_img_size,
                drop_path_rate,
            )
        )
        if slice_size is not None:
            check_int(slice_size, "slice_size")
            if slice_size % self.patch_size:
                raise ValueError(f"slice_size ({slice_size}) must be a multiple of the patch size ({self.patch_size}).")
        if slice_batch_size is not None:
            check_int(slice_batch_size, "slice_batch_size")
        self.n_modalities = n_modalities
        self.n_slices = n_slices
        self.slice_size = slice_size
        self.edge_mode = edge_mode
        self.slice_batch_size = slice_batch_size

    def _volume_shape(self, x: torch.Tensor) -> tuple[int, int, int, int, int]:
        if x.ndim != 5 or x.shape[1] != self.n_modalities:
            raise ValueError(f"expected input (B, {self.n_modalities}, H, W, D), got {list(x.shape)}.")
        return x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]

    def slice_stack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour stacks and slice positions of a volume batch: ``(B, M, H, W, D) -> (B*D, M*S, H, W), (B*D, 2)``.

        Row ``b * D + k`` is slice k of volume b; its channels are modality-major (``m * S + j`` is modality m,
        window slice j, see :func:`neighbour_slice_indices`); its position is ``(k, D)``.
        """
        b, m, h, w, d = self._volume_shape(x)
        idx = _neighbour_slice_indices(d, self.n_slices, self.edge_mode).to(x.device)  # (D, S)
        stacks = x[:, :, :, :, idx]  # (B, M, H, W, D, S)
        stacks = stacks.permute(0, 4, 1, 5, 2, 3).reshape(b * d, m * self.n_slices, h, w)
        k = torch.arange(d, device=x.device, dtype=x.dtype)
        pos = torch.stack((k, torch.full_like(k, float(d))), dim=1).repeat(b, 1)  # (B*D, 2)
        return stacks, pos

    def _to_slice_size(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, s, s)``: bilinear resize to ``slice_size`` (official: 448), or a check that H and W
        are multiples of the patch size when ``slice_size`` is None."""
        h, w = x.shape[-2], x.shape[-1]
        side = self.slice_size
        if side is None:
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(
                    f"slices of {h} x {w} are not multiples of the patch size {self.patch_size}; set slice_size "
                    "to resize them."
                )
            return x
        if h == side and w == side:
            return x
        return F.interpolate(x, size=[side, side], mode="bilinear", align_corners=False)

    def _encode(self, x: torch.Tensor, need_grid: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-slice cls tokens ``(B*D, E)`` and, if ``need_grid``, patch grids ``(B*D, E, s/p, s/p)``."""
        stacks, pos = self.slice_stack(x)
        stacks = self._to_slice_size(stacks)
        size = self.slice_batch_size
        if size is None:
            size = stacks.shape[0]
        cls_parts: list[torch.Tensor] = []
        grid_parts: list[torch.Tensor] = []
        for start in range(0, stacks.shape[0], size):
            feats = self.forward_features_pos(stacks[start : start + size], pos[start : start + size])
            cls_parts.append(feats["x_norm_clstoken"])
            if need_grid:
                grid_parts.append(self._patch_grid(feats["x_norm_patchtokens"], stacks.shape[-2], stacks.shape[-1]))
        return torch.cat(cls_parts), (torch.cat(grid_parts) if need_grid else None)

    def _forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction for a volume batch ``(B, M, H, W, D)``; see the class docstring for the output shape."""
        return self._forward_all(x)[0]

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One vector per volume (study section 3.2): ``"head_input"`` ``(B, d)``, the input of the final prediction
        layer pooled over pixels and slices, and ``"encoder"`` ``(B, E)``, the mean of the per-slice cls tokens."""
        return self._forward_all(x)[1]


#: ways :class:`ProViCNetClassifier` pools its per-slice cls tokens (``"mean"`` is the paper's)
SLICE_POOLINGS: tuple[str, ...] = ("mean", "max", "attention")


class SliceAttentionPool(nn.Module):
    """Gated attention pooling over a volume's slices (Ilse et al., "Attention-based Deep Multiple Instance
    Learning", ICML 2018, eq. 9): ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, pooled ``sum_k a_k h_k``.

    ``w`` starts at zero, so at initialisation every slice weighs ``1/D`` and the pool equals the slice mean.

    Shapes: ``forward``: ``(B, D, E) -> (B, E)``; ``weights``: ``(B, D, E) -> (B, D)``, rows summing to 1.
    """

    def __init__(self, dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        check_int(dim, "dim")
        check_int(hidden_dim, "hidden_dim")
        self.value = nn.Linear(dim, hidden_dim)
        self.gate = nn.Linear(dim, hidden_dim)
        self.score = nn.Linear(hidden_dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, D)`` of the slices ``h`` ``(B, D, E)``."""
        scores = self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))).squeeze(-1)
        return scores.softmax(dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bde->be", self.weights(h), h)


def _slice_mean(per_slice: torch.Tensor, b: int) -> torch.Tensor:
    """``(B*D, ...) -> (B, ...)``: mean over the slices of each volume."""
    return per_slice.reshape([b, -1] + list(per_slice.shape[1:])).mean(dim=1)


def _resize_out(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(N, K, h', w') -> (N, K, h, w)``, bilinear unless already that size."""
    if y.shape[-2] == h and y.shape[-1] == w:
        return y
    return F.interpolate(y, size=[h, w], mode="bilinear", align_corners=False)


class ProViCNetDense(_ProViCNetVolume):
    """ProViCNet for dense volume tasks (segmentation, distortion correction, modality translation) with the
    official convolutional upsampling head: ``(B, M, H, W, D) -> (B, K, H, W, D)`` logits / intensities.

    Each slice's head output (8/p of the resized slice) is resized bilinearly to ``(H, W)``.

    Args:
        out_channels: K. Default 1.
        n_modalities: input modalities M. Default 1.
        n_slices: neighbouring slices S per stack (odd). Default 3 (official).
        slice_size: side each slice is resized to before the backbone (a multiple of the patch size), or None to
            require H and W to be multiples of the patch size. Default 448 (official).
        backbone_size: DINOv2 size when ``backbone`` is None. Default ``"small"``.
        patch_size: patch size. Default 14.
        num_register_tokens: registers. Default 4.
        backbone_img_size: native position-embedding size. Default 518 (hub).
        drop_path_rate: backbone stochastic depth. Default 0.0.
        edge_mode: ``"shift"`` (official) or ``"replicate"``, see :func:`neighbour_slice_indices`. Default "shift".
        slice_batch_size: slices per backbone pass, or None for all at once. Default None.
        backbone: a prebuilt :class:`DinoVisionTransformer` with ``M * S`` inputs (overrides the size arguments).
    """

    def __init__(
        self,
        out_channels: int = 1,
        n_modalities: int = 1,
        n_slices: int = 3,
        slice_size: int | None = 448,
        backbone_size: str = "small",
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        edge_mode: str = "shift",
        slice_batch_size: int | None = None,
        backbone: DinoVisionTransformer | None = None,
    ) -> None:
        super().__init__(
            n_modalities,
            n_slices,
            slice_size,
            backbone_size,
            patch_size,
            num_register_tokens,
            backbone_img_size,
            drop_path_rate,
            edge_mode,
            slice_batch_size,
            backbone,
        )
        self.head = ConvUpsampleHead(self.embed_dim, out_channels)

    def _forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, _, h, w, d = self._volume_shape(x)
        cls, grid = self._encode(x, need_grid=True)
        if grid is None:  # cannot happen (need_grid); refines the type for TorchScript
            raise RuntimeError("ProViCNetDense: no patch grid.")
        hidden = self.head.forward_features(grid)  # (B*D, 64, 8s/p, 8s/p)
        y = _resize_out(self.head.segmentation_conv[-1](hidden), h, w)  # (B*D, K, H, W)
        y = y.reshape([b, d] + list(y.shape[1:])).permute(0, 2, 3, 4, 1)  # (B, D, K, H, W) -> (B, K, H, W, D)
        reps = {"head_input": _slice_mean(hidden.mean(dim=(2, 3)), b), "encoder": _slice_mean(cls, b)}
        return y, reps

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the conv head's last-layer input; ``encoder``: the mean cls token (trainable blocks)."""
        return {"head_input": "conv_head_input", "encoder": "backbone_pooled"}


class ProViCNetClassifier(_ProViCNetVolume):
    """ProViCNet for volume classification: ``(B, M, H, W, D) -> (B, K)`` logits.

    The per-slice cls tokens are pooled over the D slices of each volume and fed to a three-layer MLP
    (study section 2.2): :class:`~common.networks.heads.MLPHead` with two hidden layers of ``hidden_dim``, GELU,
    no normalisation (so batches of one volume train). The paper averages the slices (``slice_pooling="mean"``);
    ``"max"`` takes each feature's maximum over the slices and ``"attention"`` a learned softmax weighting of them
    (gated attention, :class:`SliceAttentionPool`), so that a lesion on 2 of 32 slices is not diluted 16-fold
    (a deviation from the paper, bundle docs). The ``encoder`` representation stays the slice mean whatever the
    pooling, the same kind of layer as the other tasks' (DESIGN.md section 4).

    Args:
        num_classes: K. Default 4.
        hidden_dim: width of both hidden layers. Default 256.
        dropout: dropout after each hidden activation. Default 0.0.
        slice_pooling: ``"mean"`` (paper), ``"max"`` or ``"attention"``: how the D per-slice cls tokens of a volume
            become the head's input. Default ``"mean"``.
        n_modalities: input modalities M. Default 1.
        n_slices: neighbouring slices S per stack (odd). Default 3 (official).
        slice_size: side each slice is resized to before the backbone (a multiple of the patch size), or None to
            require H and W to be multiples of the patch size. Default 448 (official).
        backbone_size: DINOv2 size when ``backbone`` is None. Default ``"small"``.
        patch_size: patch size. Default 14.
        num_register_tokens: registers. Default 4.
        backbone_img_size: native position-embedding size. Default 518 (hub).
        drop_path_rate: backbone stochastic depth. Default 0.0.
        edge_mode: ``"shift"`` (official) or ``"replicate"``, see :func:`neighbour_slice_indices`. Default "shift".
        slice_batch_size: slices per backbone pass, or None for all at once. Default None.
        backbone: a prebuilt :class:`DinoVisionTransformer` with ``M * S`` inputs (overrides the size arguments).
    """

    def __init__(
        self,
        num_classes: int = 4,
        hidden_dim: int = 256,
        dropout: float = 0.0,
        slice_pooling: str = "mean",
        n_modalities: int = 1,
        n_slices: int = 3,
        slice_size: int | None = 448,
        backbone_size: str = "small",
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        edge_mode: str = "shift",
        slice_batch_size: int | None = None,
        backbone: DinoVisionTransformer | None = None,
    ) -> None:
        super().__init__(
            n_modalities,
            n_slices,
            slice_size,
            backbone_size,
            patch_size,
            num_register_tokens,
            backbone_img_size,
            drop_path_rate,
            edge_mode,
            slice_batch_size,
            backbone,
        )
        check_int(num_classes, "num_classes")
        check_int(hidden_dim, "hidden_dim")
        if slice_pooling not in SLICE_POOLINGS:
            raise ValueError(f"slice_pooling must be one of {SLICE_POOLINGS}, got {slice_pooling!r}.")
        self.slice_pooling = slice_pooling
        # the attention pool's own width: hidden_dim, like the head's layers
        self.slice_pool = SliceAttentionPool(self.embed_dim, hidden_dim) if slice_pooling == "attention" else None
        hidden = (hidden_dim, hidden_dim)
        self.head = MLPHead(self.embed_dim, num_classes, hidden, norm=None, act="gelu", dropout=dropout)

    def _forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls, _ = self._encode(x, need_grid=False)
        b = x.shape[0]
        mean = _slice_mean(cls, b)  # (B, E): the encoder representation, and the head's input under "mean"
        pooled = mean
        if self.slice_pool is not None:
            pooled = self.slice_pool(cls.reshape(b, -1, cls.shape[-1]))
        elif self.slice_pooling == "max":
            pooled = cls.reshape(b, -1, cls.shape[-1]).amax(dim=1)
        hidden = self.head.forward_features(pooled)
        return self.head[-1](hidden), {"head_input": hidden, "encoder": mean}

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the MLP head's last hidden layer; ``encoder``: the mean cls token (trainable blocks)."""
        return {"head_input": "mlp_hidden", "encoder": "backbone_pooled"}


class ProViCNetEncoder(_ProViCNetVolume):
    """ProViCNet's encoder on volumes: ``(B, M, H, W, D) -> (B, E)``, the mean over the D slices of each slice
    stack's normalised cls token (with its slice-position tokens): the ``"encoder"`` representation of every
    volume-level ProViCNet model, without a head. Its state dict (``backbone.*``, ``axis_pos.*``, ``axis_max.*``)
    is the encoder checkpoint the ProViCNet pretraining bundle writes; the bundle's ``network_def``.

    Args: as :class:`ProViCNetClassifier`, less the head's (``num_classes``, ``hidden_dim``, ``dropout``,
    ``slice_pooling``), with the same defaults (those of the shared volume plumbing).
    """

    def _forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls, _ = self._encode(x, need_grid=False)
        pooled = _slice_mean(cls, x.shape[0])  # (B, E)
        return pooled, {"encoder": pooled}

    def representation_kinds(self) -> dict[str, str]:
        """``encoder``: the mean cls token over slices."""
        return {"encoder": "backbone_pooled"}


class ProViCNetSuperRes(_ProViCNetVolume):
    """ProViCNet for through-plane super-resolution with a sub-pixel head: ``(B, M, H, W, D) -> (B, K, H, W,
    f*D)``.

    The per-slice patch grids are stacked along the slice axis, ``(B, E, s/p, s/p, D)``, and a
    :class:`~common.networks.heads.SubpixelUpsample3dHead` with scale ``(p, p, f)`` maps them to
    ``(B, K, s, s, f*D)`` (input slice k yields output slices ``f*k .. f*k + f - 1``); each output slice is then
    resized bilinearly to ``(H, W)``.

    Args:
        out_channels: K. Default 1.
        depth_factor: f, output slices per input slice. Default 2 (48 -> 96 slices).
        kernel_size: kernel of the head's 3D convolution. Default 3.
        n_modalities: input modalities M. Default 1.
        n_slices: neighbouring slices S per stack (odd). Default 3 (official).
        slice_size: side each slice is resized to before the backbone (a multiple of the patch size), or None to
            require H and W to be multiples of the patch size. Default 448 (official).
        backbone_size: DINOv2 size when ``backbone`` is None. Default ``"small"``.
        patch_size: patch size. Default 14.
        num_register_tokens: registers. Default 4.
        backbone_img_size: native position-embedding size. Default 518 (hub).
        drop_path_rate: backbone stochastic depth. Default 0.0.
        edge_mode: ``"shift"`` (official) or ``"replicate"``, see :func:`neighbour_slice_indices`. Default "shift".
        slice_batch_size: slices per backbone pass, or None for all at once. Default None.
        backbone: a prebuilt :class:`DinoVisionTransformer` with ``M * S`` inputs (overrides the size arguments).
    """

    def __init__(
        self,
        out_channels: int = 1,
        depth_factor: int = 2,
        kernel_size: int = 3,
        n_modalities: int = 1,
        n_slices: int = 3,
        slice_size: int | None = 448,
        backbone_size: str = "small",
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        edge_mode: str = "shift",
        slice_batch_size: int | None = None,
        backbone: DinoVisionTransformer | None = None,
    ) -> None:
        super().__init__(
            n_modalities,
            n_slices,
            slice_size,
            backbone_size,
            patch_size,
            num_register_tokens,
            backbone_img_size,
            drop_path_rate,
            edge_mode,
            slice_batch_size,
            backbone,
        )
        check_int(out_channels, "out_channels")
        check_int(depth_factor, "depth_factor")
        self.out_channels = out_channels
        self.depth_factor = depth_factor
        self.head = SubpixelUpsample3dHead(
            self.embed_dim, out_channels, (self.patch_size, self.patch_size, depth_factor), kernel_size=kernel_size
        )

    def _forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, _, h, w, d = self._volume_shape(x)
        cls, grid = self._encode(x, need_grid=True)
        if grid is None:  # cannot happen (need_grid); refines the type for TorchScript
            raise RuntimeError("ProViCNetSuperRes: no patch grid.")
        grid = grid.reshape([b, d] + list(grid.shape[1:])).permute(0, 2, 3, 4, 1)  # (B*D, E, g, g) -> (B, E, g, g, D)
        y = self.head(grid)  # (B, K, s, s, f*D)
        n_out = d * self.depth_factor
        y = y.permute(0, 4, 1, 2, 3).reshape(b * n_out, self.out_channels, y.shape[2], y.shape[3])  # one per slice
        y = _resize_out(y, h, w).reshape(b, n_out, self.out_channels, h, w).permute(0, 2, 3, 4, 1)
        reps = {"head_input": grid.mean(dim=(2, 3, 4)), "encoder": _slice_mean(cls, b)}
        return y, reps

    def representation_kinds(self) -> dict[str, str]:
        """``head_input``: the backbone's own patch tokens (a one-conv head); ``encoder``: the mean cls token."""
        return {"head_input": "backbone_tokens", "encoder": "backbone_pooled"}


# --------------------------------------------------------------------------------------------------------------------
# Freezing (study section 2.2)

#: which LayerNorms of the backbone the ProViCNet finetune protocol trains (:func:`freeze_provicnet_finetune`)
PROVICNET_NORMS = ("all", "final", "none")


def freeze_provicnet_finetune(
    model: nn.Module, n_trainable_blocks: int = 2, norms: str = "final", train_position_tokens: bool = False
) -> list[str]:
    """Apply the ProViCNet fine-tuning protocol in place and return the sorted names of the trainable parameters.

    Trainable: the last ``n_trainable_blocks`` transformer blocks, the backbone's LayerNorms that ``norms`` names,
    the ``head`` (and a classifier's ``slice_pool``, new like the head), and the slice-position tokens
    ``axis_pos``/``axis_max`` only if ``train_position_tokens`` (they belong to the pretrained encoder, so they stay
    frozen by default). Everything else is frozen.

    The paper (section 2.2) unfreezes "the last two transformer blocks and the norm layers", which reads two ways
    (DESIGN.md section 3), so ``norms`` names the choice:

    - ``"final"`` (default): the final ``norm`` only (besides the norms inside the trainable blocks); the backward
      pass stops at the first trainable block. The official ProViCNet training code fine-tunes every parameter
      (pimed/ProViCNet ``ModelArchitectures/Models.py``; only its LoRA variant freezes the backbone), so it does not
      settle the paper's protocol; this reading keeps every frozen block exactly pretrained.
    - ``"all"``: every LayerNorm of the backbone (``norm1``/``norm2`` of all blocks and the final ``norm``). The
      backward pass then runs through all blocks: on one CPU thread at the demo profile a ProViCNetDense training
      step takes 2.0x the ``"final"`` one (1.09 s against 0.55 s at batch 2 of 64 x 64 x 32; 1.6x on an H100 at the
      paper's sizes, issue 15), and every block's normalisation moves away from the pretrained encoder.
    - ``"none"``: no LayerNorm outside the trainable blocks.
    """
    backbone = getattr(model, "backbone", None)
    head = getattr(model, "head", None)
    if not isinstance(backbone, DinoVisionTransformer) or not isinstance(head, nn.Module):
        raise ValueError("model must have a DinoVisionTransformer `backbone` and a `head` (a ProViCNet model).")
    check_int(n_trainable_blocks, "n_trainable_blocks", minimum=0)
    if n_trainable_blocks > len(backbone.blocks):
        raise ValueError(f"n_trainable_blocks ({n_trainable_blocks}) exceeds the depth ({len(backbone.blocks)}).")
    if norms not in PROVICNET_NORMS:
        raise ValueError(f"norms must be one of {PROVICNET_NORMS}, got {norms!r}.")
    model.requires_grad_(False)
    head.requires_grad_(True)
    pool = getattr(model, "slice_pool", None)
    if isinstance(pool, nn.Module):
        pool.requires_grad_(True)
    for blk in backbone.blocks[len(backbone.blocks) - n_trainable_blocks :]:
        blk.requires_grad_(True)
    if norms == "all":
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    elif norms == "final":
        backbone.norm.requires_grad_(True)
    if train_position_tokens:
        for name in ("axis_pos", "axis_max"):
            getattr(model, name).requires_grad_(True)
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def detect_provicnet_format(state_dict: Mapping[str, object]) -> str:
    """Format of a checkpoint's state dict, one of :data:`PROVICNET_FORMATS`.

    ``"dinov2_hub"``: a bare DINOv2 ViT (``cls_token``, ``patch_embed.proj.weight`` at the top level).
    ``"provicnet_official"``: the official ProViCNet layout (``backbone.*``, ``axis_pos``, ``axis_max``, ``head.*``,
    possibly ``CL_Head.*``), which this project's models share.
    """
    sd = unwrap_state_dict(state_dict)
    if "backbone.cls_token" in sd and "axis_pos.weight" in sd and "axis_max.weight" in sd:
        return "provicnet_official"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        return "dinov2_hub"
    raise ValueError(f"unrecognised checkpoint format; first keys: {sorted(sd)[:8]}.")


def _adapt_patch_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``(E, c, p, p) -> (E, in_chans, p, p)``: tile over ``in_chans / c`` modality groups and divide by their number,
    so an input whose modality groups are equal embeds as the original ``c``-channel input did."""
    c = weight.shape[1]
    if in_chans == c:
        return weight
    if in_chans % c:
        raise ValueError(f"cannot adapt a {c}-channel patch embedding to {in_chans} channels (not a multiple).")
    groups = in_chans // c
    return weight.repeat(1, groups, 1, 1) / groups


def _adapt_pos_embed(pos_embed: torch.Tensor, n_target: int, antialias: bool, offset: float) -> torch.Tensor:
    """``(1, 1 + M*M, E) -> (1, n_target, E)`` by bicubic resampling of the square patch grid."""
    if pos_embed.shape[1] == n_target:
        return pos_embed
    side = math.isqrt(n_target - 1)
    if side * side != n_target - 1:
        raise ValueError(f"target position embedding has {n_target - 1} grid positions, not a square grid.")
    return interpolate_pos_embed(pos_embed, (side, side), 1, antialias=antialias, offset=offset)


def convert_dinov2_hub(
    state_dict: Mapping[str, object],
    img_size: int | None = None,
    in_chans: int | None = None,
    prefix: str = "",
    antialias: bool = True,
    offset: float = 0.0,
) -> dict[str, torch.Tensor]:
    """DINOv2 hub checkpoint -> :class:`DinoVisionTransformer` state dict (names are identical), with ``prefix``
    prepended (``"backbone."`` for a ProViCNet model).

    ``img_size`` resamples ``pos_embed`` to that image size's grid (bicubic, ``antialias``/``offset`` as dinov2);
    ``in_chans`` tiles the patch embedding over modality groups (see ``_adapt_patch_weight``). None keeps either.
    """
    sd = unwrap_state_dict(state_dict)
    if detect_provicnet_format(sd) != "dinov2_hub":
        raise ValueError("convert_dinov2_hub expects a bare DINOv2 state dict (keys like 'cls_token', 'blocks.0.').")
    sd = dict(sd)
    if img_size is not None:
        patch = sd["patch_embed.proj.weight"].shape[-1]
        check_int(img_size, "img_size")
        if img_size % patch:
            raise ValueError(f"img_size ({img_size}) must be a multiple of the checkpoint's patch size ({patch}).")
        sd["pos_embed"] = _adapt_pos_embed(sd["pos_embed"], (img_size // patch) ** 2 + 1, antialias, offset)
    if in_chans is not None:
        check_int(in_chans, "in_chans")
        sd["patch_embed.proj.weight"] = _adapt_patch_weight(sd["patch_embed.proj.weight"], in_chans)
    return {prefix + k: v for k, v in sd.items()}


def convert_provicnet_official(state_dict: Mapping[str, object], include_head: bool = True) -> dict[str, torch.Tensor]:
    """Official ProViCNet checkpoint -> this project's ProViCNet models (same names): drops the contrastive
    pretraining head ``CL_Head.*`` and, unless ``include_head``, the task head ``head.*``."""
    sd = unwrap_state_dict(state_dict)
    if detect_provicnet_format(sd) != "provicnet_official":
        raise ValueError("convert_provicnet_official expects keys 'backbone.*', 'axis_pos.*' and 'axis_max.*'.")
    dropped = _OFFICIAL_DROPPED_PREFIXES + (() if include_head else ("head.",))
    return {k: v for k, v in sd.items() if not k.startswith(dropped)}


def load_provicnet_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, object],
    strict: bool = True,
    encoder_only: bool = False,
) -> dict[str, list[str]]:
    """Load a DINOv2 hub or ProViCNet checkpoint into a ProViCNet model or a bare :class:`DinoVisionTransformer`.

    Files are read with ``torch.load(..., weights_only=True)``. The format is detected
    (:func:`detect_provicnet_format`); a hub checkpoint fills only the backbone, a ProViCNet checkpoint fills the
    backbone, the slice-position tokens and (unless ``encoder_only``) the head and a classifier's ``slice_pool``.
    ``pos_embed`` is resampled and the patch embedding tiled over modalities when the model's shapes require it.
    With ``strict``, any model key in the loaded scope that the checkpoint lacks, and any checkpoint key the model
    lacks, raise ``ValueError`` listing them; shape mismatches always raise. Returns ``{"loaded": [...], "kept":
    [...], "ignored": [...]}``: model keys loaded, model keys left at their current values, checkpoint keys not used.
    """
    state = load_weights(path_or_state)
    is_backbone = isinstance(model, DinoVisionTransformer)
    backbone = model if is_backbone else getattr(model, "backbone", None)
    if not isinstance(backbone, DinoVisionTransformer):
        raise ValueError("model must be a DinoVisionTransformer or have one as `backbone` (a ProViCNet model).")
    target = model.state_dict()
    fmt = detect_provicnet_format(state)
    bb = "" if is_backbone else "backbone."
    if fmt == "dinov2_hub":
        source = convert_dinov2_hub(state, prefix=bb)
        scope = {k for k in target if k.startswith(bb)}
    else:
        source = convert_provicnet_official(state, include_head=not encoder_only)
        if is_backbone:
            source = {k[len("backbone.") :]: v for k, v in source.items() if k.startswith("backbone.")}
        # with encoder_only the task's new modules keep their initialisation: the head, a classifier's slice pool
        scope = {k for k in target if not (encoder_only and k.startswith(("head.", "slice_pool.")))}
    pe, pw = bb + "pos_embed", bb + "patch_embed.proj.weight"
    if pe in source and pe in target:
        source[pe] = _adapt_pos_embed(
            source[pe], target[pe].shape[1], backbone.interpolate_antialias, backbone.interpolate_offset
        )
    if pw in source and pw in target and source[pw].ndim == 4:
        source[pw] = _adapt_patch_weight(source[pw], target[pw].shape[1])
    problems = state_dict_problems(target, source, strict, scope=scope)
    if problems:
        raise ValueError(f"cannot load the {fmt} checkpoint into {type(model).__name__}:\n" + "\n".join(problems))
    loaded = sorted(scope & set(source))
    model.load_state_dict({k: source[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "kept": sorted(set(target) - set(loaded)), "ignored": sorted(set(source) - set(loaded))}
