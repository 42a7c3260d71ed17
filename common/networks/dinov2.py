"""DINOv2 vision transformer with register tokens and LayerScale: the image backbone of ProViCNet.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024 (arXiv 2304.07193);
Darcet et al., "Vision Transformers Need Registers", ICLR 2024 (arXiv 2309.16588). ProViCNet (Lee et al.,
arXiv 2502.00366) uses the ``dinov2_vits14_reg`` hub model as its backbone; the transfer-limits study (Huang et al.,
ISBI 2026, section 2.1) fine-tunes that model.

Parameter names and shapes follow facebookresearch/dinov2 (``dinov2/models/vision_transformer.py``,
``dinov2/layers/*``, ``dinov2/hub/backbones.py``) so that the hub checkpoints load with ``strict=True``:
``cls_token, pos_embed, register_tokens, mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm`` (giant: ``mlp.w12, mlp.w3``, SwiGLU). Hub settings reproduced here: image
size 518 (a 37 x 37 position grid), patch 14, LayerScale init 1.0, unchunked blocks, LayerNorm eps 1e-6; the register
variants interpolate position embeddings with bicubic antialiasing and no offset (the plain variants: no antialias,
offset 0.1). Attention uses ``torch.nn.functional.scaled_dot_product_attention`` instead of xFormers. Stochastic depth
is the usual per-sample drop path on both residual branches (dinov2's batch-subset variant is equal in expectation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.checks import check_float, check_int

__all__ = [
    "DINOV2_SIZES",
    "DinoVisionTransformer",
    "dinov2_vitb14_reg",
    "dinov2_vitg14_reg",
    "dinov2_vitl14_reg",
    "dinov2_vits14_reg",
    "interpolate_pos_embed",
    "provicnet_backbone",
]

# Architecture of each DINOv2 size (dinov2/models/vision_transformer.py: vit_small, vit_base, vit_large, vit_giant2;
# the giant hub model uses the fused SwiGLU feed-forward).
DINOV2_SIZES: dict[str, dict[str, int | str]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "ffn_layer": "mlp"},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_layer": "mlp"},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_layer": "mlp"},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_layer": "mlp"},
    "giant": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglufused"},
}

_FFN_LAYERS = ("mlp", "swiglufused")


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    grid_hw: tuple[int, int],
    num_prefix_tokens: int = 1,
    antialias: bool = True,
    offset: float = 0.0,
) -> torch.Tensor:
    """Resample a square position-embedding grid bicubically, as dinov2's ``interpolate_pos_encoding``.

    ``(1, P + M*M, E) -> (1, P + h*w, E)`` with ``P = num_prefix_tokens`` kept unchanged. With ``offset == 0`` the
    output size is requested directly; with ``offset > 0`` (the non-register hub models use 0.1) the scale factors
    ``(h + offset) / M`` and ``(w + offset) / M`` are passed instead, reproducing dinov2's historical kludge.
    Computed in float32 and cast back to the input dtype.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, E), got {tuple(pos_embed.shape)}.")
    h, w = (check_int(int(v), "grid size") for v in grid_hw)
    return _interpolate_pos_embed(pos_embed, h, w, num_prefix_tokens, antialias, offset)


def _isqrt(n: int) -> int:
    """``math.isqrt`` for ``n >= 0`` in a form TorchScript compiles."""
    r = int(math.sqrt(n))
    while r * r > n:
        r -= 1
    while (r + 1) * (r + 1) <= n:
        r += 1
    return r


def _interpolate_pos_embed(
    pos_embed: torch.Tensor, h: int, w: int, num_prefix_tokens: int, antialias: bool, offset: float
) -> torch.Tensor:
    """:func:`interpolate_pos_embed` after its argument checks; TorchScript-compatible (the backbone calls it)."""
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    m = _isqrt(n_grid)
    if m * m != n_grid:
        raise ValueError(f"pos_embed holds {n_grid} grid positions, which is not a square grid.")
    dim = pos_embed.shape[-1]
    prefix = pos_embed[:, :num_prefix_tokens].float()
    grid = pos_embed[:, num_prefix_tokens:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, E, M, M)
    if offset != 0.0:
        scale = [(h + offset) / m, (w + offset) / m]
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=[h, w], mode="bicubic", antialias=antialias)
    if grid.shape[-2] != h or grid.shape[-1] != w:
        raise ValueError(f"interpolation gave a {list(grid.shape[-2:])} grid, expected {[h, w]}.")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # (1, E, h, w) -> (1, h*w, E)
    return torch.cat((prefix, grid), dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``(B, C, H, W) -> (B, (H/p) * (W/p), E)``, row-major patch order."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.img_size = check_int(img_size, "img_size")
        self.patch_size = check_int(patch_size, "patch_size")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size}).")
        self.in_chans = check_int(in_chans, "in_chans")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, E)``; H and W must be multiples of the patch size."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {list(x.shape)}.")
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"H and W must be multiples of {self.patch_size}, got {list(x.shape[2:])}.")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, E, h, w) -> (B, h*w, E)


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` projection: ``(B, N, E) -> (B, N, E)``."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, E) -> (B, N, E)``, softmax(q k^T / sqrt(E / heads)) v per head."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, E/heads)
        dropout = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel residual scaling ``x * gamma`` (Touvron et al., CaiT, ICCV 2021); ``gamma`` starts at a constant."""

    def __init__(self, dim: int, init_values: float = 1.0) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E) -> (..., E)``."""
        return x * self.gamma


class Mlp(nn.Module):
    """Transformer feed-forward ``fc2(GELU(fc1(x)))``: ``(..., E) -> (..., E)``."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E) -> (..., E)``."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of the giant model: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``; ``(..., E) -> (..., E)``.

    The hidden width is dinov2's ``SwiGLUFFNFused`` rule: ``(int(hidden * 2 / 3) + 7) // 8 * 8`` (4096 for ViT-g).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E) -> (..., E)``."""
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training, rescale the rest."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, ...)``."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1(attn(norm1(x)))``, then ``+ ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = 1.0,
        ffn_layer: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, E) -> (B, N, E)``."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with register tokens (Oquab et al. 2024; Darcet et al. 2024), hub-compatible parameter names.

    Token sequence: ``[cls, registers (R), patches (h*w)]``; position embeddings cover ``cls`` and the patches only
    (registers carry none), resampled bicubically when the patch grid differs from the native ``img_size`` grid.

    Args:
        img_size: side of the square image the position embeddings are stored for. Default 518 (hub: 37 x 37 grid).
        patch_size: patch side. Default 14.
        in_chans: input channels. Default 3.
        embed_dim: token width E. Default 384 (ViT-S).
        depth: number of blocks. Default 12.
        num_heads: attention heads. Default 6.
        mlp_ratio: feed-forward hidden width / E. Default 4.0.
        num_register_tokens: register tokens R. Default 4.
        init_values: LayerScale init; ``None`` or 0 disables LayerScale (then no ``ls1``/``ls2`` parameters).
            Default 1.0 (hub).
        ffn_layer: ``"mlp"`` or ``"swiglufused"`` (giant). Default ``"mlp"``.
        drop_path_rate: stochastic-depth rate, linearly increasing over blocks from 0. Default 0.0.
        interpolate_antialias: antialias in the position-embedding resampling. Default True (register hub models).
        interpolate_offset: dinov2's resampling offset. Default 0.0 (register hub models; 0.1 for the plain ones).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float | None = 1.0,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
    ) -> None:
        super().__init__()
        check_int(embed_dim, "embed_dim")
        check_int(depth, "depth")
        check_int(num_heads, "num_heads")
        check_int(num_register_tokens, "num_register_tokens", minimum=0)
        check_float(mlp_ratio, "mlp_ratio", 0.0)
        check_float(drop_path_rate, "drop_path_rate", 0.0, 1.0)
        check_float(interpolate_offset, "interpolate_offset", 0.0, 1.0)
        if init_values is not None:
            check_float(init_values, "init_values", 0.0)
        if ffn_layer not in _FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {_FFN_LAYERS}, got {ffn_layer!r}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if not isinstance(interpolate_antialias, bool):
            raise ValueError(f"interpolate_antialias must be a bool, got {interpolate_antialias!r}.")
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        # Registration order gives the hub checkpoint's key order: own parameters first, then submodules.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_path=r, init_values=init_values, ffn_layer=ffn_layer)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """dinov2 initialisation: truncated-normal (std 0.02) position embeddings and Linear weights, zero biases,
        ``N(0, 1e-6)`` cls and register tokens, zero mask token; LayerNorm, LayerScale and the patch conv keep
        their defaults."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: cls + registers."""
        return 1 + self.num_register_tokens

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h x w`` pixel input: ``(B, 1 + N, E) -> (1, 1 + N, E)``.

        Returned unchanged when the patch grid is the native square grid (dinov2's shortcut), else resampled with
        :func:`interpolate_pos_embed`.
        """
        gh, gw = h // self.patch_size, w // self.patch_size
        native = _isqrt(self.pos_embed.shape[1] - 1)
        if x.shape[1] - 1 == native * native and gh == gw:
            return self.pos_embed
        return _interpolate_pos_embed(
            self.pos_embed, gh, gw, 1, self.interpolate_antialias, self.interpolate_offset
        ).to(x.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 1 + R + N, E)``: patch embedding, masked patches replaced by ``mask_token``
        (``masks``: bool ``(B, N)``), cls token, position embeddings, then the registers after cls."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape {list(x.shape[:2])}, got {list(masks.shape)}.")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named tokens of ``(B, C, H, W)``: ``x_norm_clstoken (B, E)``, ``x_norm_regtokens (B, R, E)``,
        ``x_norm_patchtokens (B, N, E)`` (final LayerNorm applied) and ``x_prenorm (B, 1 + R + N, E)``."""
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
        }

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False, norm: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Patch tokens after the last ``n`` blocks (int) or after the listed block indices (sequence), in block order.

        ``(B, C, H, W) -> tuple of (B, N, E)``, or of ``(B, E, H/p, W/p)`` with ``reshape=True``; the final LayerNorm
        is applied to each when ``norm`` (dinov2's default).
        """
        if isinstance(n, int):
            check_int(n, "n")
            if n > len(self.blocks):
                raise ValueError(f"n ({n}) exceeds the number of blocks ({len(self.blocks)}).")
            take = set(range(len(self.blocks) - n, len(self.blocks)))
        else:
            take = set(n)
            if not take or not all(isinstance(i, int) and 0 <= i < len(self.blocks) for i in take):
                raise ValueError(f"block indices must lie in [0, {len(self.blocks)}), got {list(n)}.")
        b, _, h, w = x.shape
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        outputs = [out[:, self.num_prefix_tokens :] for out in outputs]
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            outputs = [out.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        return tuple(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, E)``: the normalised cls token (dinov2's ``forward`` with an identity head)."""
        return self.forward_features(x)["x_norm_clstoken"]


def _build_dinov2(
    size: str,
    patch_size: int,
    num_register_tokens: int,
    img_size: int,
    in_chans: int,
    drop_path_rate: float,
    init_values: float | None,
    interpolate_antialias: bool,
    interpolate_offset: float,
) -> DinoVisionTransformer:
    if size not in DINOV2_SIZES:
        raise ValueError(f"size must be one of {sorted(DINOV2_SIZES)}, got {size!r}.")
    arch = DINOV2_SIZES[size]
    return DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=int(arch["embed_dim"]),
        depth=int(arch["depth"]),
        num_heads=int(arch["num_heads"]),
        ffn_layer=str(arch["ffn_layer"]),
        num_register_tokens=num_register_tokens,
        init_values=init_values,
        drop_path_rate=drop_path_rate,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
    )


def provicnet_backbone(
    size: str = "small",
    patch_size: int = 14,
    num_register_tokens: int = 4,
    img_size: int = 518,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    init_values: float | None = 1.0,
    interpolate_antialias: bool = True,
    interpolate_offset: float = 0.0,
) -> DinoVisionTransformer:
    """DINOv2 ViT of ``size`` in {small, base, large, giant} with hub settings; the defaults are ProViCNet's
    ``dinov2_vits14_reg`` (ViT-S/14, 4 registers, 518 px position grid)."""
    return _build_dinov2(
        size,
        patch_size,
        num_register_tokens,
        img_size,
        in_chans,
        drop_path_rate,
        init_values,
        interpolate_antialias,
        interpolate_offset,
    )


def dinov2_vits14_reg(*, in_chans: int = 3, img_size: int = 518, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    """ViT-S/14 with 4 registers, as the hub's ``dinov2_vits14_reg`` (E=384, 12 blocks, 6 heads)."""
    return provicnet_backbone("small", in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate)


def dinov2_vitb14_reg(*, in_chans: int = 3, img_size: int = 518, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    """ViT-B/14 with 4 registers, as the hub's ``dinov2_vitb14_reg`` (E=768, 12 blocks, 12 heads)."""
    return provicnet_backbone("base", in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate)


def dinov2_vitl14_reg(*, in_chans: int = 3, img_size: int = 518, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    """ViT-L/14 with 4 registers, as the hub's ``dinov2_vitl14_reg`` (E=1024, 24 blocks, 16 heads)."""
    return provicnet_backbone("large", in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate)


def dinov2_vitg14_reg(*, in_chans: int = 3, img_size: int = 518, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    """ViT-g/14 with 4 registers, as the hub's ``dinov2_vitg14_reg`` (E=1536, 40 blocks, 24 heads, SwiGLU)."""
    return provicnet_backbone("giant", in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path_rate)
