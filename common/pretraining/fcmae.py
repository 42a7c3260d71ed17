"""FCMAE: ProFound's fully convolutional masked-autoencoder pretraining, with dense (sparse-equivalent) masking.

Papers: Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", CVPR 2023, section 3.1
(FCMAE; sparse convolutions and their dense equivalent); Huang et al., "Understanding the Transfer Limits of Vision
Foundation Models", ISBI 2026, section 2.2 (ProFound, pretrained by FCMAE on prostate MRI). Facts taken from the
official ProFound code (github pipiwang/ProFound, branch ``demo``, ``models/fcmae.py``,
``models/convnextv2_sparse.py``, ``demo_pretrain.sh``):

- random masking of the ``16^3`` patch grid (patch size = encoder total stride, one decoder position per patch),
  mask ratio 0.6, ``1`` = masked (removed), ``0`` = visible;
- encoder: dense stem (``Conv3d(k=4, s=4)`` + LayerNorm), its output multiplied by the mask upsampled by 4, then
  sparse (MinkowskiEngine) stages, densified with zeros at masked sites;
- decoder: ``proj`` = ``Conv3d(dims[-1], decoder_embed_dim, 1)``; masked positions replaced by ``mask_token``
  ``(1, decoder_embed_dim, 1, 1, 1)``; ``decoder_depth`` dense ConvNeXt V2 blocks (default 1, width 512);
  ``pred`` = ``Conv3d(decoder_embed_dim, p^3 * C, 1)``;
- loss: per-patch MSE (mean over the ``p^3 * C`` values), averaged over masked patches only; with
  ``norm_pix_loss`` (``--norm_pix_loss`` in the demo) the target patch is standardised by its own mean and unbiased
  variance, ``(t - mean) / sqrt(var + 1e-6)`` (as MAE);
- initialisation (``FCMAE._init_weights``, applied after the encoder's own): truncated normal with std 1 (cut at
  +-2, timm's default) and zero bias for the stem convolution, every depthwise convolution and every pointwise
  linear layer of the encoder, and for ``proj``, ``pred`` and the decoder's depthwise convolutions; std 0.02 for
  the encoder's downsampling convolutions (``MinkowskiConvolution``); PyTorch defaults for the decoder's linear
  layers; ``mask_token`` normal with std 0.02. ``official_init=False`` uses std 0.02 everywhere (the dense
  encoder's init).

Dense masking (what this module does instead of sparse convolution). A sparse convolution only computes at visible
sites and only reads visible sites. The dense network reproduces that exactly when (ConvNeXt V2, section 3.1) every
operation that mixes positions sees zeros at masked sites, and every per-position operation's output at masked sites
is discarded. Here, with ``keep = 1 - mask`` upsampled to each resolution:

1. the input is multiplied by ``keep`` (redundant: the stem kernel equals its stride, 4, which divides the patch
   size, so no stem output mixes two patches; kept so that masked voxels are provably never read);
2. the stem output (after its LayerNorm) is multiplied by ``keep``, as the official code does;
3. every downsampling layer's output is multiplied by ``keep`` (its LayerNorm turns a zero vector into the bias;
   its kernel = stride = 2 or 1 never mixes patches, because the patch grid is aligned with every stage grid);
4. inside every block, the GRN input is multiplied by ``keep``, so its global L2 norm runs over visible positions
   only (like the sparse GRN, which sees visible sites only), and the block output is multiplied by ``keep``, so the
   next depthwise ``7^3`` convolution reads zeros at masked sites.

Consequence (tested): the encoder output at visible positions, and hence every ``pred`` vector, does not depend on
the content of masked patches; with nothing masked the masked encoder equals the plain dense encoder. One
deliberate difference: the commented-out official sparse GRN takes its norm over all visible sites of the whole
batch; here it is per sample (the dense GRN's definition, which the downstream encoder uses).

Layouts. Inputs are ``(B, C, H, W, D)``. With ``official_axis_order=True`` the encoder and decoder act on the
reversed spatial axes (see :mod:`common.networks.profound`), but masks, patches and predictions are always in the
caller's layout: patch index ``l = (gh * G_W + gw) * G_D + gd`` (row-major over ``(H/p, W/p, D/p)``), patch vector
index ``((ph * p + pw) * p + pd) * C + c`` (channel fastest, as the official ``patchify``). Hence the ``pred``
channels of an official FCMAE checkpoint (native order) are a fixed permutation of these; pretraining here learns
its own decoder, and only the encoder is transferred.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from common.networks.blocks.convnext import ConvNeXtV2Block
from common.networks.checkpoint import atomic_save
from common.networks.profound import PROFOUND_SIZES, ProFoundEncoder, profound_encoder

__all__ = [
    "FCMAEPretrainer",
    "fcmae_loss",
    "patchify",
    "random_patch_mask",
    "save_encoder_checkpoint",
    "unpatchify",
    "upsample_patch_mask",
]

_NORM_PIX_EPS = 1e-6  # official / MAE


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut volumes into non-overlapping cubic patches: ``(B, C, H, W, D) -> (B, L, p^3 * C)``.

    ``L = (H/p) * (W/p) * (D/p)`` with patch index ``l = (gh * G_W + gw) * G_D + gd`` and patch vector index
    ``((ph * p + pw) * p + pd) * C + c`` (channel fastest, as the official FCMAE ``patchify``).
    """
    if x.ndim != 5:
        raise ValueError(f"patchify: expected (B, C, H, W, D), got shape {tuple(x.shape)}.")
    if patch_size < 1 or any(s % patch_size for s in x.shape[2:]):
        raise ValueError(f"patchify: spatial sizes {tuple(x.shape[2:])} must be divisible by patch_size {patch_size}.")
    b, c, h, w, d = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p, d // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gh, gw, gd, ph, pw, pd, C)
    return x.reshape(b, (h // p) * (w // p) * (d // p), p**3 * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p^3 * C) -> (B, C, G_H * p, G_W * p, G_D * p)``.

    ``grid_size = (G_H, G_W, G_D)`` with ``L = G_H * G_W * G_D``; ``C`` is inferred from the last axis.
    """
    grid = tuple(int(g) for g in grid_size)
    p = patch_size
    if patches.ndim != 3 or len(grid) != 3 or p < 1:
        raise ValueError(
            f"unpatchify: expected (B, L, p^3 * C) patches and a 3-D grid, got {tuple(patches.shape)} and {grid}."
        )
    b, n, dim = patches.shape
    if n != grid[0] * grid[1] * grid[2] or dim % p**3:
        raise ValueError(f"unpatchify: shape {tuple(patches.shape)} does not fit grid {grid} and patch_size {p}.")
    c = dim // p**3
    x = patches.reshape(b, *grid, p, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gh, ph, gw, pw, gd, pd)
    return x.reshape(b, c, grid[0] * p, grid[1] * p, grid[2] * p)


def random_patch_mask(
    batch_size: int,
    n_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random patch mask, ``1`` = masked: ``-> (B, L)`` float, exactly ``floor(mask_ratio * L + 0.5)`` ones per row.

    Each row masks the patches with the smallest of ``L`` uniform draws (official ``gen_random_mask``). Draws come
    from ``generator`` (a CPU generator) or the global RNG, on the CPU, so a seed gives the same mask on any device.
    """
    if batch_size < 1 or n_patches < 1:
        raise ValueError(f"random_patch_mask: need batch_size, n_patches >= 1, got {batch_size}, {n_patches}.")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"random_patch_mask: mask_ratio must be in (0, 1), got {mask_ratio}.")
    n_masked = int(mask_ratio * n_patches + 0.5)
    if not 0 < n_masked < n_patches:
        raise ValueError(
            f"random_patch_mask: mask_ratio {mask_ratio} of {n_patches} patches masks {n_masked}; at least one patch "
            "must be masked and one visible (use a larger input or another ratio)."
        )
    noise = torch.rand(batch_size, n_patches, generator=generator)
    masked = torch.argsort(noise, dim=1)[:, :n_masked]
    mask = torch.zeros(batch_size, n_patches).scatter_(1, masked, 1.0)
    return mask.to(device) if device is not None else mask


def upsample_patch_mask(mask: torch.Tensor, grid_size: Sequence[int], scale: int) -> torch.Tensor:
    """``(B, L)`` patch mask -> ``(B, 1, G_H * scale, G_W * scale, G_D * scale)`` voxel mask (nearest)."""
    grid = tuple(int(g) for g in grid_size)
    if mask.ndim != 2 or len(grid) != 3 or mask.shape[1] != grid[0] * grid[1] * grid[2] or scale < 1:
        raise ValueError(f"upsample_patch_mask: mask {tuple(mask.shape)} does not fit grid {grid} (scale {scale}).")
    m = mask.reshape(mask.shape[0], 1, *grid)
    for axis in (2, 3, 4):
        m = m.repeat_interleave(scale, dim=axis)
    return m


def fcmae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """Masked-patch MSE: ``pred, target (B, L, P), mask (B, L) -> scalar``.

    ``target`` is standardised per patch first when ``norm_pix_loss`` (mean and unbiased variance over its ``P``
    values, eps 1e-6, as MAE); the squared error is averaged over ``P``, then over masked patches (``mask == 1``).
    """
    if pred.shape != target.shape or pred.ndim != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"fcmae_loss: need pred == target (B, L, P) and mask (B, L), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}."
        )
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + _NORM_PIX_EPS) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _masked_block(block: ConvNeXtV2Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One ConvNeXt V2 block restricted to visible sites; ``x`` is zero where ``keep`` is 0.

    ``(B, C, X, Y, Z), keep (B, 1, X, Y, Z) -> (B, C, X, Y, Z)``, zero at masked sites.
    """
    h = block.dwconv(x).permute(0, 2, 3, 4, 1)  # (B, C, X, Y, Z) -> (B, X, Y, Z, C)
    h = block.act(block.pwconv1(block.norm(h)))
    h = block.grn(h * keep.permute(0, 2, 3, 4, 1))  # global norm over visible sites only
    h = block.pwconv2(h).permute(0, 4, 1, 2, 3)  # (B, X, Y, Z, C) -> (B, C, X, Y, Z)
    return (x + block.drop_path(h)) * keep


def _official_init(module: nn.Module) -> None:
    """Official ``FCMAE._init_weights`` for dense layers: truncated normal std 1 (+-2), zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=1.0, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)


class FCMAEPretrainer(nn.Module):
    """ProFound's FCMAE pretraining model with dense, sparse-equivalent masking (see the module docstring).

    Args:
        encoder_size: key of :data:`~common.networks.profound.PROFOUND_SIZES`. Default ``"tiny"`` (paper).
        in_channels: image channels ``C``. Default 3 (official: T2W, DWI, ADC).
        mask_ratio: fraction of patches masked, in (0, 1). Default 0.6 (official).
        patch_size: mask patch edge; must equal the encoder's total stride, 16 (one decoder position per patch, as
            the official model). Default 16.
        decoder_embed_dim: decoder width. Default 512 (official).
        decoder_depth: number of decoder ConvNeXt V2 blocks, >= 1. Default 1 (official).
        norm_pix_loss: standardise each target patch. Default True (the official demo passes ``--norm_pix_loss``).
        official_axis_order: see :mod:`common.networks.profound`. Default True.
        drop_path_rate: encoder stochastic depth. Default 0.0 (official).
        official_init: official FCMAE initialisation (mostly std 1, module docstring); False uses std 0.02 for
            every convolution and linear layer. Default True.

    Shapes: ``forward``: ``(B, C, H, W, D)`` with ``H, W, D`` divisible by 16 ->
    ``{"loss": (), "pred": (B, L, 16^3 * C), "mask": (B, L)}``, ``L = HWD / 16^3``. ``self.encoder`` is a
    :class:`~common.networks.profound.ProFoundEncoder`, so ``encoder.*`` state-dict entries carry the official dense
    names; :meth:`encoder_state_dict` / :func:`save_encoder_checkpoint` give weights that
    :func:`common.networks.load_checkpoint` loads strictly into any ProFound network.
    """

    def __init__(
        self,
        encoder_size: str = "tiny",
        in_channels: int = 3,
        mask_ratio: float = 0.6,
        patch_size: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        official_axis_order: bool = True,
        drop_path_rate: float = 0.0,
        official_init: bool = True,
    ) -> None:
        super().__init__()
        if encoder_size not in PROFOUND_SIZES:
            raise ValueError(
                f"FCMAEPretrainer: unknown encoder_size {encoder_size!r}; choose from {list(PROFOUND_SIZES)}."
            )
        if in_channels < 1:
            raise ValueError(f"FCMAEPretrainer: in_channels must be >= 1, got {in_channels}.")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"FCMAEPretrainer: mask_ratio must be in (0, 1), got {mask_ratio}.")
        if patch_size != ProFoundEncoder.total_stride:
            raise ValueError(
                f"FCMAEPretrainer: patch_size must equal the encoder's total stride {ProFoundEncoder.total_stride} "
                f"(one decoder position per patch, as the official FCMAE), got {patch_size}."
            )
        if decoder_embed_dim < 1 or decoder_depth < 1:
            raise ValueError(
                f"FCMAEPretrainer: decoder_embed_dim and decoder_depth must be >= 1, got {decoder_embed_dim}, "
                f"{decoder_depth}."
            )
        self.in_channels = in_channels
        self.mask_ratio = float(mask_ratio)
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.encoder = profound_encoder(encoder_size, in_channels, drop_path_rate, official_axis_order)
        self.proj = nn.Conv3d(self.encoder.out_channels, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1, 1))
        self.decoder = nn.Sequential(*(ConvNeXtV2Block(decoder_embed_dim) for _ in range(decoder_depth)))
        self.pred = nn.Conv3d(decoder_embed_dim, patch_size**3 * in_channels, kernel_size=1)
        if official_init:
            _official_init(self.encoder.downsample_layers[0])
            _official_init(self.encoder.stages)
            for m in self.decoder.modules():  # official: std-1 init for the decoder's convs, defaults for its linears
                if isinstance(m, nn.Conv3d):
                    _official_init(m)
            _official_init(self.proj)
            _official_init(self.pred)
        else:
            self.apply(ProFoundEncoder._init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def _grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCMAEPretrainer: expected (B, {self.in_channels}, H, W, D), got {tuple(x.shape)}.")
        if any(s % self.patch_size for s in x.shape[2:]):
            raise ValueError(
                f"FCMAEPretrainer: spatial sizes {tuple(x.shape[2:])} must be divisible by {self.patch_size}; pad or "
                "crop the input."
            )
        h, w, d = (s // self.patch_size for s in x.shape[2:])
        return h, w, d

    def random_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random patch mask for ``x``: ``(B, C, H, W, D) -> (B, L)`` float on ``x.device``, 1 = masked."""
        g = self._grid(x)
        return random_patch_mask(x.shape[0], g[0] * g[1] * g[2], self.mask_ratio, generator, x.device).to(x.dtype)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked encoding: ``(B, C, H, W, D), mask (B, L) -> (B, dims[3], H/16, W/16, D/16)``, zero at masked
        patches; visible outputs are independent of masked input content (module docstring, rules 1-4)."""
        grid = self._grid(x)
        if mask.shape != (x.shape[0], grid[0] * grid[1] * grid[2]):
            raise ValueError(f"FCMAEPretrainer: mask must be (B, L) = {(x.shape[0], grid[0] * grid[1] * grid[2])}.")
        keep = 1.0 - mask.to(x.dtype)
        enc = self.encoder
        keeps = [enc.to_native(upsample_patch_mask(keep, grid, self.patch_size // s)) for s in (4, 8, 16, 16)]
        h = enc.to_native(x) * enc.to_native(upsample_patch_mask(keep, grid, self.patch_size))
        for i, (down, stage) in enumerate(zip(enc.downsample_layers, enc.stages, strict=True)):
            h = down(h) * keeps[i]
            for block in stage:
                h = _masked_block(block, h, keeps[i])
        return enc.from_native(h)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, dims[3], G_H, G_W, G_D), mask (B, L) -> pred (B, L, p^3 * C)`` in the caller's patch order."""
        b, _, gh, gw, gd = features.shape
        enc = self.encoder
        m = enc.to_native(mask.to(features.dtype).reshape(b, 1, gh, gw, gd))
        h = self.proj(enc.to_native(features))
        h = h * (1.0 - m) + self.mask_token * m
        h = self.pred(self.decoder(h))
        return enc.from_native(h).flatten(2).transpose(1, 2)  # (B, P, G_H, G_W, G_D) -> (B, L, P)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``(B, C, H, W, D) -> {"loss": (), "pred": (B, L, p^3 * C), "mask": (B, L)}`` (ConvNeXt V2 section 3.1).

        ``mask`` (1 = masked, caller's patch order) is drawn by :meth:`random_mask` (from ``generator`` or the global
        RNG) when not given. ``pred`` is in the (normalised, if ``norm_pix_loss``) target space of :func:`patchify`;
        the loss is :func:`fcmae_loss` over the masked patches.
        """
        if mask is None:
            mask = self.random_mask(x, generator)
        mask = mask.to(x.dtype)
        pred = self.forward_decoder(self.forward_encoder(x, mask), mask)
        loss = fcmae_loss(pred, patchify(x, self.patch_size), mask, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unmasked pooled encoder output for monitoring: ``(B, C, H, W, D) -> {"encoder": (B, dims[3])}``."""
        return {"encoder": self.encoder.forward_pooled(x)}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare encoder's weights with official dense names (``downsample_layers.*``, ``stages.*``, ``norm.*``),
        detached copies. ``norm`` is unused in pretraining and keeps its initial identity affine."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}


def save_encoder_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``{"network": model.encoder_state_dict()}`` to ``path`` (``model`` may be wrapped by DDP).

    The format is an encoder-only dense ProFound checkpoint inside a MONAI ``CheckpointSaver``-style wrapper:
    :func:`common.networks.load_checkpoint` loads it strictly into a bare ``ProFoundEncoder`` and, routed to
    ``model.encoder``, into ``ProFoundDense`` / ``ProFoundClassifier`` / ``ProFoundSuperRes`` (``pretrained_ckpt``).
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, FCMAEPretrainer):
        raise ValueError(f"save_encoder_checkpoint: expected an FCMAEPretrainer, got {type(inner).__name__}.")
    atomic_save({"network": inner.encoder_state_dict()}, path)  # a temporary file renamed into place
