"""Tests for common.networks.dinov2: hub-identical names and shapes, position-embedding resampling, token API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from common.networks.dinov2 import (
    DinoVisionTransformer,
    dinov2_vitb14_reg,
    dinov2_vitg14_reg,
    dinov2_vitl14_reg,
    dinov2_vits14_reg,
    interpolate_pos_embed,
    provicnet_backbone,
)

# Key order and shapes of the hub's dinov2_vits14_reg checkpoint, from facebookresearch/dinov2
# (vision_transformer.py: own parameters cls_token, pos_embed, register_tokens, mask_token; then patch_embed.proj,
# unchunked blocks, norm; 518 px / 14 = 37 -> 1 + 37 * 37 = 1370 positions).
_VITS14_REG_PREFIX = [
    ("cls_token", (1, 1, 384)),
    ("pos_embed", (1, 1370, 384)),
    ("register_tokens", (1, 4, 384)),
    ("mask_token", (1, 384)),
    ("patch_embed.proj.weight", (384, 3, 14, 14)),
    ("patch_embed.proj.bias", (384,)),
]
_VITS14_REG_BLOCK = [
    ("norm1.weight", (384,)),
    ("norm1.bias", (384,)),
    ("attn.qkv.weight", (1152, 384)),
    ("attn.qkv.bias", (1152,)),
    ("attn.proj.weight", (384, 384)),
    ("attn.proj.bias", (384,)),
    ("ls1.gamma", (384,)),
    ("norm2.weight", (384,)),
    ("norm2.bias", (384,)),
    ("mlp.fc1.weight", (1536, 384)),
    ("mlp.fc1.bias", (1536,)),
    ("mlp.fc2.weight", (384, 1536)),
    ("mlp.fc2.bias", (384,)),
    ("ls2.gamma", (384,)),
]
_VITS14_REG_SUFFIX = [("norm.weight", (384,)), ("norm.bias", (384,))]


def _tiny(**kwargs) -> DinoVisionTransformer:
    args = {"img_size": 56, "patch_size": 14, "in_chans": 3, "embed_dim": 48, "depth": 4, "num_heads": 3}
    args.update(kwargs)
    return DinoVisionTransformer(**args)


def test_vits14_reg_state_dict_matches_hub_list():
    expected = list(_VITS14_REG_PREFIX)
    for i in range(12):
        expected += [(f"blocks.{i}.{name}", shape) for name, shape in _VITS14_REG_BLOCK]
    expected += _VITS14_REG_SUFFIX
    with torch.device("meta"):
        model = provicnet_backbone("small", patch_size=14, num_register_tokens=4, img_size=518, in_chans=3)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected
    assert sum(math.prod(s) for _, s in expected) == 22_058_112


@pytest.mark.parametrize(
    "factory, size, embed_dim, depth, ffn_shapes",
    [
        (dinov2_vits14_reg, "small", 384, 12, {"mlp.fc1.weight": (1536, 384), "mlp.fc2.weight": (384, 1536)}),
        (dinov2_vitb14_reg, "base", 768, 12, {"mlp.fc1.weight": (3072, 768), "mlp.fc2.weight": (768, 3072)}),
        (dinov2_vitl14_reg, "large", 1024, 24, {"mlp.fc1.weight": (4096, 1024), "mlp.fc2.weight": (1024, 4096)}),
        # ViT-g: SwiGLU hidden (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096, packed w12.
        (dinov2_vitg14_reg, "giant", 1536, 40, {"mlp.w12.weight": (8192, 1536), "mlp.w3.weight": (1536, 4096)}),
    ],
)
def test_size_factories(factory, size, embed_dim, depth, ffn_shapes):
    with torch.device("meta"):
        model = factory()
        same = provicnet_backbone(size)
    sd = model.state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in same.state_dict().items()]
    assert sd["cls_token"].shape == (1, 1, embed_dim)
    assert sd["register_tokens"].shape == (1, 4, embed_dim)
    assert (
        len(model.blocks) == depth and f"blocks.{depth - 1}.ls2.gamma" in sd and f"blocks.{depth}.ls1.gamma" not in sd
    )
    for name, shape in ffn_shapes.items():
        assert sd[f"blocks.0.{name}"].shape == shape


def _pil_bicubic(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Independent reference: PIL's antialiased bicubic resize (a = -0.5), channel by channel; grid (C, M, M)."""
    out = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(size[::-1], Image.BICUBIC)) for c in grid]
    return np.stack(out)


def test_pos_embed_identity_at_native_size():
    model = _tiny()
    x = torch.zeros(1, 1 + 16, 48)
    assert model.interpolate_pos_encoding(x, 56, 56) is model.pos_embed


@pytest.mark.parametrize("grid", [(2, 2), (6, 6), (3, 5), (7, 2)])
def test_pos_embed_bicubic_matches_pil(grid):
    torch.manual_seed(0)
    model = _tiny()
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.zeros(1, 1 + grid[0] * grid[1], 48)
    out = model.interpolate_pos_encoding(x, grid[0] * 14, grid[1] * 14)
    assert out.shape == (1, 1 + grid[0] * grid[1], 48)
    assert torch.equal(out[:, 0], model.pos_embed[:, 0])
    native = model.pos_embed[0, 1:].detach().numpy().reshape(4, 4, 48).transpose(2, 0, 1)
    expected = _pil_bicubic(native, grid).transpose(1, 2, 0).reshape(-1, 48)
    np.testing.assert_allclose(out[0, 1:].detach().numpy(), expected, atol=1e-5)


def test_pos_embed_offset_variant_shape():
    model = _tiny(interpolate_antialias=False, interpolate_offset=0.1)
    for grid in [(3, 3), (5, 2), (8, 8)]:
        x = torch.zeros(1, 1 + grid[0] * grid[1], 48)
        assert model.interpolate_pos_encoding(x, grid[0] * 14, grid[1] * 14).shape == x.shape
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.zeros(1, 1 + 6, 4), (2, 2))


def _manual_forward(model: DinoVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Reference ViT forward written with explicit unfold, matmuls and softmax (pre-norm blocks with LayerScale)."""
    p, e, heads = model.patch_size, model.embed_dim, model.num_heads
    b = x.shape[0]
    patches = torch.nn.functional.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*p*p)
    tokens = patches @ model.patch_embed.proj.weight.reshape(e, -1).T + model.patch_embed.proj.bias
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], 1) + model.pos_embed
    tokens = torch.cat([tokens[:, :1], model.register_tokens.expand(b, -1, -1), tokens[:, 1:]], 1)

    def ln(t, mod):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * mod.weight + mod.bias

    for blk in model.blocks:
        h = ln(tokens, blk.norm1)
        q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, e // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(b, -1, e) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        tokens = tokens + a * blk.ls1.gamma
        h = ln(tokens, blk.norm2)
        f = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T
        tokens = tokens + (f + blk.mlp.fc2.bias) * blk.ls2.gamma
    return ln(tokens, model.norm)


def test_forward_features_matches_manual_reference():
    torch.manual_seed(1)
    model = _tiny(img_size=28, in_chans=2, embed_dim=8, depth=2, num_heads=2, num_register_tokens=2).eval()
    with torch.no_grad():  # move off the defaults so that LayerScale and norms matter
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name or "token" in name:
                p.copy_(torch.randn_like(p))
    x = torch.randn(3, 2, 28, 28)
    with torch.no_grad():
        out = model.forward_features(x)
        ref = _manual_forward(model, x)
    torch.testing.assert_close(out["x_norm_clstoken"], ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], ref[:, 1:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], ref[:, 3:], atol=1e-5, rtol=1e-5)
    assert out["x_prenorm"].shape == (3, 1 + 2 + 4, 8)
    torch.testing.assert_close(model(x), ref[:, 0], atol=1e-5, rtol=1e-5)


def test_get_intermediate_layers():
    torch.manual_seed(2)
    model = _tiny().eval()
    x = torch.randn(2, 3, 28, 42)  # 2 x 3 patch grid
    with torch.no_grad():
        last = model.forward_features(x)["x_norm_patchtokens"]
        flat = model.get_intermediate_layers(x, n=2)
        grids = model.get_intermediate_layers(x, n=[1, 3], reshape=True)
        raw = model.get_intermediate_layers(x, n=1, norm=False)
    assert len(flat) == 2 and flat[0].shape == (2, 6, 48)
    torch.testing.assert_close(flat[1], last)
    assert not torch.allclose(flat[0], flat[1])
    assert grids[1].shape == (2, 48, 2, 3)
    torch.testing.assert_close(grids[1][:, :, 1, 2], last[:, 1 * 3 + 2])  # row-major patch order
    torch.testing.assert_close(model.norm(raw[0]), last)
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=5)


def test_masked_patches_use_mask_token():
    torch.manual_seed(3)
    model = _tiny().eval()
    masks = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        a = model.forward_features(torch.randn(2, 3, 56, 56), masks=masks)["x_prenorm"]
        b = model.forward_features(torch.randn(2, 3, 56, 56), masks=masks)["x_prenorm"]
    torch.testing.assert_close(a, b)  # the image no longer matters when every patch is masked


@pytest.mark.parametrize(
    "kwargs",
    [
        {"embed_dim": 50},  # not divisible by 3 heads
        {"img_size": 50},  # not a multiple of 14
        {"ffn_layer": "swiglu3"},
        {"depth": 0},
        {"drop_path_rate": 1.5},
        {"num_register_tokens": -1},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        _tiny(**kwargs)


def test_bad_size_and_input_raise():
    with pytest.raises(ValueError, match="size must be one of"):
        provicnet_backbone("huge")
    with pytest.raises(ValueError, match="multiples of 14"):
        _tiny()(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match="input"):
        _tiny()(torch.zeros(1, 2, 28, 28))


def test_backward_reaches_parameters():
    torch.manual_seed(4)
    model = _tiny(drop_path_rate=0.2).train()
    out = model.forward_features(torch.randn(2, 3, 28, 28))
    (out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].square().sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == ["mask_token"]  # only used with masks
