"""Tests for common.networks.provicnet: slice stacking, token layout, volume models, freezing, checkpoints."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.networks.dinov2 import DinoVisionTransformer
from common.networks.provicnet import (
    ProViCNet,
    ProViCNetClassifier,
    ProViCNetDense,
    ProViCNetSuperRes,
    SliceAttentionPool,
    convert_dinov2_hub,
    convert_provicnet_official,
    detect_provicnet_format,
    freeze_provicnet_finetune,
    load_provicnet_checkpoint,
    neighbour_slice_indices,
)

E, DEPTH = 48, 4


def _backbone(in_chans: int = 3, img_size: int = 56) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=img_size, in_chans=in_chans, embed_dim=E, depth=DEPTH, num_heads=3)


def _model(cls, n_modalities: int = 1, n_slices: int = 3, **kwargs):
    kwargs.setdefault("slice_size", 28)
    bb = _backbone(n_modalities * n_slices)
    return cls(n_modalities=n_modalities, n_slices=n_slices, backbone=bb, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Slice stacking and tokens


@pytest.mark.parametrize(
    "depth, n_slices, mode, expected",
    [
        (5, 3, "shift", [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]),
        (5, 3, "replicate", [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]),
        (2, 3, "shift", [[0, 0, 1], [0, 1, 1]]),  # window does not fit: replicate fallback
        (6, 5, "shift", [[0, 1, 2, 3, 4]] * 3 + [[1, 2, 3, 4, 5]] * 3),
        (3, 1, "shift", [[0], [1], [2]]),
    ],
)
def test_neighbour_slice_indices(depth, n_slices, mode, expected):
    assert neighbour_slice_indices(depth, n_slices, mode).tolist() == expected


@pytest.mark.parametrize("args", [(4, 2, "shift"), (4, 3, "wrap"), (0, 3, "shift")])
def test_neighbour_slice_indices_bad_args(args):
    with pytest.raises(ValueError):
        neighbour_slice_indices(*args)


def test_slice_stack_layout_and_positions():
    model = _model(ProViCNetDense, n_modalities=2)
    b, m, d = 2, 2, 4
    code = torch.tensor([[[100.0 * bi + 10.0 * mi + k for k in range(d)] for mi in range(m)] for bi in range(b)])
    x = code[:, :, None, None, :].expand(b, m, 5, 6, d).contiguous()  # x[b, m, :, :, k] = 100 b + 10 m + k
    stacks, pos = model.slice_stack(x)
    assert stacks.shape == (b * d, m * 3, 5, 6)
    windows = [[0, 1, 2], [0, 1, 2], [1, 2, 3], [1, 2, 3]]  # official shift rule, D = 4
    for bi in range(b):
        for k in range(d):
            for mi in range(m):
                for j in range(3):
                    assert stacks[bi * d + k, mi * 3 + j, 0, 0] == 100 * bi + 10 * mi + windows[k][j]
    assert pos.tolist() == [[k, d] for _ in range(b) for k in range(d)]


def test_token_layout_with_slice_positions():
    torch.manual_seed(0)
    model = ProViCNet(backbone=_backbone())
    x = torch.randn(2, 3, 28, 28)
    pos = torch.tensor([[3.0, 7.0], [0.0, 20.0]])
    tokens = model.prepare_tokens_with_axispos(x, pos)
    assert tokens.shape == (2, 1 + 4 + 2 + 4, E)
    w_pos, b_pos = model.axis_pos.weight[:, 0], model.axis_pos.bias
    w_max, b_max = model.axis_max.weight[:, 0], model.axis_max.bias
    torch.testing.assert_close(tokens[0, 5], 3.0 * w_pos + b_pos)
    torch.testing.assert_close(tokens[1, 6], 20.0 * w_max + b_max)
    torch.testing.assert_close(tokens[0, 1:5], model.backbone.register_tokens[0])  # registers carry no pos embed
    plain = model.backbone.prepare_tokens_with_masks(x)
    torch.testing.assert_close(tokens[:, 7:], plain[:, 5:])
    feats = model.forward_features_pos(x, pos)
    assert feats["x_norm_postokens"].shape == (2, 2, E) and feats["x_norm_patchtokens"].shape == (2, 4, E)


def test_slice_model_matches_official_output_size_and_uses_positions():
    torch.manual_seed(1)
    model = ProViCNet(out_channels=4, backbone=_backbone()).eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        a = model(x, torch.tensor([[0.0, 5.0], [1.0, 5.0]]))
        b = model(x, torch.tensor([[4.0, 5.0], [1.0, 5.0]]))
        c = model(x)
    assert a.shape == (2, 4, 16, 24)  # 8 x the 2 x 3 patch grid (official: 448 -> 256)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert c.shape == a.shape


# ---------------------------------------------------------------------------------------------------------------------
# Volume models


@pytest.mark.parametrize(
    "cls, kwargs, hw, slice_size, out_shape, head_dim",
    [
        (ProViCNetDense, {"out_channels": 3}, (20, 24), 28, (2, 3, 20, 24, 5), 64),
        (ProViCNetDense, {"out_channels": 1}, (28, 42), None, (2, 1, 28, 42, 5), 64),
        (ProViCNetClassifier, {"num_classes": 4, "hidden_dim": 16}, (20, 24), 28, (2, 4), 16),
        (ProViCNetSuperRes, {"out_channels": 1}, (20, 24), 28, (2, 1, 20, 24, 10), E),
        (ProViCNetSuperRes, {"out_channels": 2, "depth_factor": 3}, (28, 28), None, (2, 2, 28, 28, 15), E),
    ],
)
def test_volume_model_shapes(cls, kwargs, hw, slice_size, out_shape, head_dim):
    torch.manual_seed(2)
    model = _model(cls, n_modalities=2, slice_size=slice_size, slice_batch_size=3, **kwargs).eval()
    x = torch.randn(2, 2, *hw, 5)
    with torch.no_grad():
        y = model(x)
        reps = model.forward_representations(x)
    assert y.shape == out_shape and torch.isfinite(y).all()
    assert reps["head_input"].shape == (2, head_dim) and reps["encoder"].shape == (2, E)


def test_dense_volume_equals_slice_model_per_slice():
    torch.manual_seed(3)
    dense = _model(ProViCNetDense, out_channels=2, slice_size=28).eval()
    sliced = ProViCNet(out_channels=2, backbone=_backbone()).eval()
    sliced.load_state_dict(dense.state_dict(), strict=True)  # same names as the official class
    d = 4
    x = torch.randn(1, 1, 20, 22, d)
    with torch.no_grad():
        y = dense(x)
        for k in range(d):
            c = min(max(k, 1), d - 2)  # official window centre
            stack = x[0, 0, :, :, c - 1 : c + 2].permute(2, 0, 1)[None]  # (1, 3, H, W)
            stack = F.interpolate(stack, size=(28, 28), mode="bilinear", align_corners=False)
            ref = sliced(stack, torch.tensor([[float(k), float(d)]]))
            ref = F.interpolate(ref, size=(20, 22), mode="bilinear", align_corners=False)
            torch.testing.assert_close(y[..., k], ref, atol=1e-5, rtol=1e-5)


def test_classifier_pools_cls_over_slices():
    torch.manual_seed(4)
    model = _model(ProViCNetClassifier, slice_size=None, hidden_dim=8).eval()
    x = torch.randn(2, 1, 28, 28, 3)
    with torch.no_grad():
        stacks, pos = model.slice_stack(x)
        cls = model.forward_features_pos(stacks, pos)["x_norm_clstoken"]  # (6, E)
        reps = model.forward_representations(x)
        logits = model(x)
    torch.testing.assert_close(reps["encoder"], torch.stack([cls[:3].mean(0), cls[3:].mean(0)]))
    torch.testing.assert_close(logits, model.head(reps["encoder"]))


def _slice_cls(model, x):
    with torch.no_grad():
        stacks, pos = model.slice_stack(x)
        return model.forward_features_pos(stacks, pos)["x_norm_clstoken"].reshape(x.shape[0], x.shape[-1], -1)


def test_classifier_max_pooling_takes_each_feature_maximum_over_slices():
    torch.manual_seed(4)
    model = _model(ProViCNetClassifier, slice_size=None, hidden_dim=8, slice_pooling="max").eval()
    x = torch.randn(2, 1, 28, 28, 4)
    cls = _slice_cls(model, x)  # (B, D, E)
    with torch.no_grad():
        reps = model.forward_representations(x)
        logits = model(x)
    torch.testing.assert_close(logits, model.head(torch.stack([cls[b].max(dim=0).values for b in range(2)])))
    torch.testing.assert_close(reps["encoder"], cls.mean(dim=1))  # the comparable layer stays the slice mean


def test_slice_attention_pool_against_a_direct_computation():
    torch.manual_seed(8)
    pool = SliceAttentionPool(6, 5)
    h = torch.randn(2, 4, 6)
    torch.testing.assert_close(pool(h), h.mean(dim=1))  # zero-initialised score: the slice mean
    torch.nn.init.normal_(pool.score.weight)
    v, u, w = pool.value, pool.gate, pool.score
    ref = torch.zeros(2, 6)
    with torch.no_grad():
        for b in range(2):
            scores = [
                float(
                    w.weight[0] @ (torch.tanh(v.weight @ h[b, k] + v.bias) * torch.sigmoid(u.weight @ h[b, k] + u.bias))
                )
                + float(w.bias)
                for k in range(4)
            ]
            a = np.exp(scores) / np.exp(scores).sum()
            ref[b] = sum(float(a[k]) * h[b, k] for k in range(4))
    with torch.no_grad():
        torch.testing.assert_close(pool(h), ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(pool.weights(h).sum(dim=1), torch.ones(2))


def test_classifier_attention_pool_trains_under_the_finetune_protocol():
    torch.manual_seed(9)
    model = _model(ProViCNetClassifier, hidden_dim=8, slice_pooling="attention")
    names = freeze_provicnet_finetune(model)
    assert {n for n in names if n.startswith("slice_pool.")} == {
        n for n, _ in model.slice_pool.named_parameters(prefix="slice_pool")
    }
    torch.nn.init.normal_(model.slice_pool.score.weight)
    _backward(model)
    assert all(p.grad is not None for p in model.slice_pool.parameters())
    with pytest.raises(ValueError, match="slice_pooling must be one of"):
        _model(ProViCNetClassifier, slice_pooling="sum")


def test_super_resolution_slice_order():
    torch.manual_seed(5)
    model = _model(ProViCNetSuperRes, n_slices=1, slice_size=None, kernel_size=1).eval()
    x = torch.randn(1, 1, 28, 28, 4)
    x2 = x.clone()
    x2[..., 2] += 1.0
    with torch.no_grad():
        diff = (model(x2) - model(x)).abs().amax(dim=(0, 1, 2, 3))
    assert diff.shape == (8,)
    assert (diff[[4, 5]] > 1e-4).all() and (diff[[0, 1, 2, 3, 6, 7]] == 0).all()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ProViCNetDense, {"n_slices": 2}),
        (ProViCNetDense, {"edge_mode": "wrap"}),
        (ProViCNetDense, {"slice_size": 30}),
        (ProViCNetClassifier, {"slice_batch_size": 0}),
        (ProViCNetSuperRes, {"depth_factor": 0}),
    ],
)
def test_bad_constructor_arguments(cls, kwargs):
    with pytest.raises(ValueError):
        cls(backbone=_backbone(), **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="input channels"):
        ProViCNetDense(n_modalities=2, backbone=_backbone(3))
    model = _model(ProViCNetDense, slice_size=None)
    with pytest.raises(ValueError, match="patch size"):
        model(torch.zeros(1, 1, 20, 28, 3))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(1, 2, 28, 28, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Gradients and freezing


def _all_models():
    return [
        _model(ProViCNetDense, n_modalities=2, out_channels=2),
        _model(ProViCNetClassifier, hidden_dim=8),
        _model(ProViCNetSuperRes),
    ]


def _backward(model) -> None:
    out = model(torch.randn(2, model.n_modalities, 20, 20, 3))
    out.square().mean().backward()


@pytest.mark.parametrize("index", range(3))
def test_backward_reaches_every_trainable_parameter(index):
    torch.manual_seed(6)
    model = _all_models()[index].train()
    _backward(model)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not model.backbone.mask_token.requires_grad  # unused downstream; frozen so that DDP sees no idle parameter
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _block_params(e: int, hidden: int) -> int:
    # norm1, qkv, proj, ls1, norm2, fc1, fc2, ls2
    return 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + e + 2 * e + (e * hidden + hidden) + (hidden * e + e) + e


@pytest.mark.parametrize("index", range(3))
def test_freeze_finetune_counts(index):
    torch.manual_seed(7)
    model = _all_models()[index]
    names = freeze_provicnet_finetune(model, norms="all")
    head = sum(p.numel() for p in model.head.parameters())
    expected_count = 2 * _block_params(E, 4 * E) + 2 * (4 * E) + 2 * E + head  # 2 blocks, 2 blocks' norms, final norm
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count
    pattern = re.compile(r"^head\.|^backbone\.blocks\.[23]\.|^backbone\.blocks\.[01]\.norm[12]\.|^backbone\.norm\.")
    assert names == sorted(n for n, _ in model.named_parameters() if pattern.search(n))
    _backward(model)
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_freeze_options():
    model = _model(ProViCNetDense)
    names = freeze_provicnet_finetune(model, n_trainable_blocks=0, norms="none", train_position_tokens=True)
    assert {n.split(".")[0] for n in names} == {"head", "axis_pos", "axis_max"}
    names = freeze_provicnet_finetune(model, norms="final")
    pattern = re.compile(r"^head\.|^backbone\.blocks\.[23]\.|^backbone\.norm\.")
    assert names == sorted(n for n, _ in model.named_parameters() if pattern.search(n))
    with pytest.raises(ValueError, match="norms must be one of"):
        freeze_provicnet_finetune(model, norms="some")
    with pytest.raises(ValueError):
        freeze_provicnet_finetune(model, n_trainable_blocks=5)
    with pytest.raises(ValueError):
        freeze_provicnet_finetune(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _official_state(out_channels: int = 4) -> dict[str, torch.Tensor]:
    """An official-layout ProViCNet_contrastive checkpoint: our dense model's keys plus the contrastive head."""
    torch.manual_seed(8)
    sd = {k: v.clone() for k, v in _model(ProViCNetDense, out_channels=out_channels).state_dict().items()}
    sd["CL_Head.mlp.0.weight"] = torch.randn(16, E)
    sd["CL_Head.last_layer.weight_g"] = torch.ones(32, 1)
    return sd


def test_hub_checkpoint_round_trip(tmp_path):
    torch.manual_seed(9)
    hub = _backbone()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(hub.state_dict(), path)
    assert detect_provicnet_format(torch.load(path, weights_only=True)) == "dinov2_hub"
    model = _model(ProViCNetDense)
    head_before = model.head.segmentation_conv[1].weight.clone()
    report = load_provicnet_checkpoint(model, path)
    for k, v in hub.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)
    assert torch.equal(model.head.segmentation_conv[1].weight, head_before)
    assert "axis_pos.weight" in report["kept"] and "backbone.blocks.3.ls2.gamma" in report["loaded"]
    bare = _backbone()
    load_provicnet_checkpoint(bare, path)
    assert torch.equal(bare.pos_embed, hub.pos_embed)


def test_hub_patch_embedding_tiles_over_modalities():
    torch.manual_seed(10)
    hub = _backbone(3)
    model = _model(ProViCNetDense, n_modalities=2)
    load_provicnet_checkpoint(model, hub.state_dict())
    w3 = hub.patch_embed.proj.weight
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, torch.cat([w3, w3], 1) / 2)
    x3 = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.patch_embed(torch.cat([x3, x3], 1)), hub.patch_embed(x3))
    converted = convert_dinov2_hub(hub.state_dict(), in_chans=9, prefix="backbone.")
    assert converted["backbone.patch_embed.proj.weight"].shape == (E, 9, 14, 14)
    with pytest.raises(ValueError, match="multiple"):
        convert_dinov2_hub(hub.state_dict(), in_chans=4)


def test_hub_pos_embed_resampled_to_model_grid():
    torch.manual_seed(11)
    hub = _backbone(img_size=56)  # 4 x 4 grid
    model = ProViCNetDense(backbone=_backbone(img_size=28), slice_size=28)  # 2 x 2 grid
    load_provicnet_checkpoint(model, hub.state_dict())
    pe = model.backbone.pos_embed.detach()
    assert pe.shape == (1, 5, E)
    torch.testing.assert_close(pe[:, 0], hub.pos_embed[:, 0].detach())
    native = hub.pos_embed[0, 1:].detach().numpy().reshape(4, 4, E).transpose(2, 0, 1)
    ref = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((2, 2), Image.BICUBIC)) for c in native])
    np.testing.assert_allclose(pe[0, 1:].numpy(), ref.transpose(1, 2, 0).reshape(4, E), atol=1e-5)
    assert convert_dinov2_hub(hub.state_dict(), img_size=28)["pos_embed"].shape == (1, 5, E)


def test_official_checkpoint_round_trip(tmp_path):
    sd = _official_state()
    path = tmp_path / "T2_best.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    assert detect_provicnet_format(torch.load(path, weights_only=True)) == "provicnet_official"
    model = _model(ProViCNetDense, out_channels=4)
    report = load_provicnet_checkpoint(model, path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert report["kept"] == [] and report["ignored"] == []
    assert not any(k.startswith("CL_Head") for k in convert_provicnet_official(sd))
    assert not any(k.startswith("head.") for k in convert_provicnet_official(sd, include_head=False))


def test_official_encoder_into_classifier_and_backbone():
    sd = _official_state()
    model = _model(ProViCNetClassifier, hidden_dim=8)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_provicnet_checkpoint(model, sd, encoder_only=True)
    assert torch.equal(model.axis_max.weight, sd["axis_max.weight"])
    assert torch.equal(model.backbone.blocks[2].attn.qkv.weight, sd["backbone.blocks.2.attn.qkv.weight"])
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    assert sorted(report["kept"]) == sorted("head." + k for k in head_before)
    bare = _backbone()
    load_provicnet_checkpoint(bare, sd)
    assert torch.equal(bare.norm.weight, sd["backbone.norm.weight"])


def test_checkpoint_errors_list_keys(tmp_path):
    sd = _official_state(out_channels=4)
    missing = {k: v for k, v in sd.items() if k != "backbone.blocks.1.ls1.gamma"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['backbone.blocks.1.ls1.gamma'\]"):
        load_provicnet_checkpoint(_model(ProViCNetDense, out_channels=4), missing)
    report = load_provicnet_checkpoint(_model(ProViCNetDense, out_channels=4), missing, strict=False)
    assert report["kept"] == ["backbone.blocks.1.ls1.gamma"]
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['modal.weight'\]"):
        load_provicnet_checkpoint(_model(ProViCNetDense, out_channels=4), {**sd, "modal.weight": torch.zeros(E, 4)})
    with pytest.raises(ValueError, match=r"head.segmentation_conv.9.weight: checkpoint \(4, 64, 3, 3\) vs model"):
        load_provicnet_checkpoint(_model(ProViCNetDense, out_channels=2), sd, strict=False)
    with pytest.raises(ValueError, match="unrecognised"):
        detect_provicnet_format({"encoder.weight": torch.zeros(2)})


class _NotATensor:
    pass


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": _official_state(), "extra": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_provicnet_checkpoint(_model(ProViCNetDense, out_channels=4), path)
