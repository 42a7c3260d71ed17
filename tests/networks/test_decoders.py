from __future__ import annotations

import pytest
import torch

from common.networks.decoders import UnetrDecoder3d, UperNetDecoder3d

STAGES = (8, 12, 16, 20)
STRIDES = (4, 8, 16, 16)


def _inputs(size=(32, 32, 16), in_channels=2, batch=2):
    x = torch.randn(batch, in_channels, *size)
    feats = [torch.randn(batch, c, *(n // s for n in size)) for c, s in zip(STAGES, STRIDES, strict=True)]
    return x, feats


def _upernet_param_count(c, h, a, k, scales=4):
    hidden_norm = 2 * sum(c)
    psp = scales * (c[3] * h + 2 * h)
    bottleneck = (c[3] + scales * h) * h * 27 + 2 * h
    laterals = sum(ci * h + 2 * h for ci in c[:3])
    fpn = 3 * (h * h * 27 + 2 * h)
    fpn_bottleneck = 4 * h * h * 27 + 2 * h
    classifier = h * k + k
    aux = c[2] * a * 27 + 2 * a + a * k + k
    return hidden_norm + psp + bottleneck + laterals + fpn + fpn_bottleneck + classifier + aux


def test_upernet_official_names_and_shapes():
    with torch.device("meta"):
        dec = UperNetDecoder3d(in_channels=(96, 192, 384, 768), out_channels=3)
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    expected = {
        "hidden_norm.3.weight": (768,),
        "decode_head.classifier.weight": (3, 512, 1, 1, 1),
        "decode_head.psp_modules.0.1.conv.weight": (512, 768, 1, 1, 1),
        "decode_head.psp_modules.3.1.batch_norm.bias": (512,),
        "decode_head.bottleneck.conv.weight": (512, 768 + 4 * 512, 3, 3, 3),
        "decode_head.lateral_convs.2.conv.weight": (512, 384, 1, 1, 1),
        "decode_head.fpn_convs.0.conv.weight": (512, 512, 3, 3, 3),
        "decode_head.fpn_bottleneck.conv.weight": (512, 2048, 3, 3, 3),
        "auxiliary_head.convs.0.conv.weight": (256, 384, 3, 3, 3),
        "auxiliary_head.convs.0.batch_norm.weight": (256,),
        "auxiliary_head.classifier.bias": (3,),
    }
    for k, v in expected.items():
        assert shapes[k] == v, k
    assert "decode_head.psp_modules.3.1.conv.bias" not in shapes  # official convs have no bias
    assert sum(p.numel() for p in dec.parameters()) == _upernet_param_count((96, 192, 384, 768), 512, 256, 3)


@pytest.mark.parametrize("use_aux", [True, False])
def test_upernet_forward_shapes(use_aux):
    dec = UperNetDecoder3d(STAGES, out_channels=3, hidden_size=8, auxiliary_channels=4, use_auxiliary_head=use_aux)
    assert sum(p.numel() for p in dec.parameters()) == _upernet_param_count(STAGES, 8, 4, 3) - (
        0 if use_aux else 16 * 4 * 27 + 2 * 4 + 4 * 3 + 3
    )
    x, feats = _inputs()
    assert dec(x, feats).shape == (2, 3, 32, 32, 16)
    assert dec.forward_features(x, feats).shape == (2, 8, 8, 8, 4)  # first stage, stride 4
    if use_aux:
        assert dec.forward_auxiliary(x, feats).shape == (2, 3, 32, 32, 16)
    else:
        with pytest.raises(ValueError, match="auxiliary"):
            dec.forward_auxiliary(x, feats)


def test_upernet_forward_head_is_classifier_then_resize():
    dec = UperNetDecoder3d(STAGES, out_channels=2, hidden_size=8, auxiliary_channels=4)
    x, feats = _inputs(batch=1)
    fmap = dec.forward_features(x, feats)
    logits = dec.decode_head.classifier(fmap)
    # trilinear resize of the classifier output: every output voxel is a convex combination of logits
    out = dec(x, feats)
    assert out.shape[2:] == x.shape[2:]
    assert out.min() >= logits.min() - 1e-5 and out.max() <= logits.max() + 1e-5


@pytest.mark.parametrize(
    ("norm_name", "norm_params"), [("instance", 0), ("batch", 1), (("group", {"num_groups": 2}), 1)]
)
def test_unetr_shapes_names_and_norm(norm_name, norm_params):
    f = 4
    dec = UnetrDecoder3d(in_channels=2, out_channels=3, stage_channels=STAGES, feature_size=f, norm_name=norm_name)
    x, feats = _inputs()
    assert dec(x, feats).shape == (2, 3, 32, 32, 16)
    fmap = dec.forward_features(x, feats)
    assert fmap.shape == (2, f, 32, 32, 16)
    # the head is one 1x1x1 conv: the mean of the output is the conv of the mean of its input map
    w, b = dec.out.conv.conv.weight.flatten(1), dec.out.conv.conv.bias
    torch.testing.assert_close(dec(x, feats).mean((2, 3, 4)), fmap.mean((2, 3, 4)) @ w.T + b, atol=1e-5, rtol=1e-5)
    keys = dec.state_dict().keys()
    for k in (
        "norm1.weight",
        "norm3.bias",
        "encoder1.layer.conv1.conv.weight",
        "encoder2.transp_conv_init.conv.weight",
        "encoder4.transp_conv_init.conv.weight",
        "decoder5.transp_conv.conv.weight",
        "decoder2.conv_block.conv1.conv.weight",
        "out.conv.conv.weight",
    ):
        assert k in keys, k
    has_norm_params = any(".norm1.weight" in k for k in keys)
    assert has_norm_params == bool(norm_params)
    assert tuple(dec.state_dict()["decoder5.transp_conv.conv.weight"].shape) == (STAGES[3], 8 * f, 2, 2, 2)


@pytest.mark.parametrize(
    ("dec_cls", "kwargs"),
    [
        (UperNetDecoder3d, {"in_channels": STAGES, "hidden_size": 8, "auxiliary_channels": 4}),
        (UnetrDecoder3d, {"in_channels": 2, "stage_channels": STAGES, "feature_size": 4}),
    ],
)
def test_decoders_reject_wrong_features(dec_cls, kwargs):
    dec = dec_cls(**kwargs)
    x, feats = _inputs()
    with pytest.raises(ValueError, match="stage"):
        dec(x, feats[:3])
    bad = list(feats)
    bad[1] = torch.randn(2, STAGES[1] + 1, 4, 4, 2)
    with pytest.raises(ValueError, match="stage 1"):
        dec(x, bad)


@pytest.mark.parametrize(
    ("dec_cls", "kwargs"),
    [
        (UperNetDecoder3d, {"in_channels": (8, 12, 16)}),
        (UperNetDecoder3d, {"pool_scales": ()}),
        (UperNetDecoder3d, {"auxiliary_in_index": 4}),
        (UnetrDecoder3d, {"in_channels": 0}),
        (UnetrDecoder3d, {"in_channels": 1, "feature_size": 0}),
    ],
)
def test_decoders_reject_bad_args(dec_cls, kwargs):
    with pytest.raises(ValueError):
        dec_cls(**kwargs)
