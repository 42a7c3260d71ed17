from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from common.networks.blocks import GRN, LayerNormChannelsFirst
from common.networks.profound import (
    PROFOUND_SIZES,
    ProFoundClassifier,
    ProFoundDense,
    ProFoundEncoder,
    ProFoundSuperRes,
    adapt_profound_stem,
    convert_profound_dense,
    convert_profound_fcmae,
    detect_profound_format,
    freeze_profound_finetune,
    load_profound_checkpoint,
    profound_encoder,
)

SIZE = (32, 32, 16)  # (H, W, D), divisible by the total stride 16
SMALL_UPERNET = {"hidden_size": 8, "auxiliary_channels": 4}
ATTO = PROFOUND_SIZES["atto"]


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Non-trivial weights everywhere (GRN and LayerNorm affine included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ---------------------------------------------------------------------------------------------------------------
# Independent re-implementation of the official ConvNeXtV2.forward_features (models/convnextv2.py, branch demo),
# written from the official code with functional ops; input in the official layout (B, C, D, W, H).
# ---------------------------------------------------------------------------------------------------------------
def _ref_ln_cf(x, w, b, eps=1e-6):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return w[:, None, None, None] * x + b[:, None, None, None]


def _ref_official_forward(sd, x, depths):
    hidden = []
    for i in range(4):
        p = f"downsample_layers.{i}."
        if i == 0:
            x = F.conv3d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=4)
            x = _ref_ln_cf(x, sd[p + "1.weight"], sd[p + "1.bias"])
        else:
            stride = 1 if i == 3 else 2
            x = _ref_ln_cf(x, sd[p + "0.weight"], sd[p + "0.bias"])
            x = F.conv3d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=stride)
        for j in range(depths[i]):
            q = f"stages.{i}.{j}."
            inp = x
            y = F.conv3d(x, sd[q + "dwconv.weight"], sd[q + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 4, 1)
            y = F.layer_norm(y, (y.shape[-1],), sd[q + "norm.weight"], sd[q + "norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[q + "pwconv1.weight"], sd[q + "pwconv1.bias"]))
            gx = torch.norm(y, p=2, dim=(1, 2, 3), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            y = sd[q + "grn.gamma"] * (y * nx) + sd[q + "grn.beta"] + y
            y = F.linear(y, sd[q + "pwconv2.weight"], sd[q + "pwconv2.bias"])
            x = inp + y.permute(0, 4, 1, 2, 3)
        hidden.append(x)
    pooled = F.layer_norm(x.mean([-3, -2, -1]), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return pooled, hidden


def _official_encoder_keys(depths):
    keys = {"norm.weight", "norm.bias"}
    for i in range(4):
        keys |= {f"downsample_layers.{i}.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")}
        for j in range(depths[i]):
            for mod, params in (
                ("dwconv", ("weight", "bias")),
                ("norm", ("weight", "bias")),
                ("pwconv1", ("weight", "bias")),
                ("grn", ("gamma", "beta")),
                ("pwconv2", ("weight", "bias")),
            ):
                keys |= {f"stages.{i}.{j}.{mod}.{p}" for p in params}
    return keys


def _encoder_param_count(depths, dims, in_channels):
    n = in_channels * dims[0] * 64 + dims[0] + 2 * dims[0]  # stem conv 4^3 and its LayerNorm
    for i, k in enumerate((2, 2, 1)):
        n += 2 * dims[i] + dims[i] * dims[i + 1] * k**3 + dims[i + 1]
    for depth, d in zip(depths, dims, strict=True):
        block = d * 343 + d + 2 * d + (d * 4 * d + 4 * d) + 2 * 4 * d + (4 * d * d + d)
        n += depth * block
    return n + 2 * dims[-1]


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
def test_grn_hand_computed():
    grn = GRN(2, spatial_dims=3)
    with torch.no_grad():
        grn.gamma.copy_(torch.tensor([1.0, 2.0]).view(1, 1, 1, 1, 2))
        grn.beta.copy_(torch.tensor([0.5, -1.0]).view(1, 1, 1, 1, 2))
    x = torch.tensor([[3.0, 6.0], [4.0, 8.0]]).view(1, 1, 1, 2, 2)  # channel norms 5 and 10, mean 7.5
    # channel 0: x * (1 + 2/3) + 0.5; channel 1: x * (1 + 2 * 4/3) - 1
    expected = torch.tensor([[3 * 5 / 3 + 0.5, 6 * 11 / 3 - 1], [4 * 5 / 3 + 0.5, 8 * 11 / 3 - 1]]).view(1, 1, 1, 2, 2)
    torch.testing.assert_close(grn(x), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_channels_first_hand_computed():
    ln = LayerNormChannelsFirst(2)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([2.0, 1.0]))
        ln.bias.copy_(torch.tensor([0.0, 10.0]))
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1)  # mean 2, biased variance 1 -> (-1, 1)
    torch.testing.assert_close(ln(x).flatten(), torch.tensor([-2.0, 11.0]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(PROFOUND_SIZES))
def test_every_size_builds_with_official_names_and_count(size):
    spec = PROFOUND_SIZES[size]
    with torch.device("meta"):
        enc = profound_encoder(size, in_channels=3)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert set(shapes) == _official_encoder_keys(spec["depths"])
    d = spec["dims"]
    assert shapes["downsample_layers.0.0.weight"] == (d[0], 3, 4, 4, 4)
    assert shapes["downsample_layers.1.1.weight"] == (d[1], d[0], 2, 2, 2)
    assert shapes["downsample_layers.3.1.weight"] == (d[3], d[2], 1, 1, 1)  # last "downsampling" has stride 1
    assert shapes["stages.2.0.dwconv.weight"] == (d[2], 1, 7, 7, 7)
    assert shapes["stages.0.0.grn.gamma"] == (1, 1, 1, 1, 4 * d[0])
    assert sum(p.numel() for p in enc.parameters()) == _encoder_param_count(spec["depths"], d, 3)


def test_tiny_parameter_count_ballpark():
    with torch.device("meta"):
        enc = profound_encoder("tiny")
    assert 29.0e6 < sum(p.numel() for p in enc.parameters()) < 29.6e6


@pytest.mark.parametrize("official_axis_order", [True, False])
def test_encoder_matches_official_reference_forward(official_axis_order):
    enc = profound_encoder("atto", in_channels=2, official_axis_order=official_axis_order).double()
    _randomise(enc)
    x = torch.randn(2, 2, 32, 48, 16, dtype=torch.float64)  # (B, C, H, W, D), anisotropic on purpose
    sd = enc.state_dict()
    x_official = x.permute(0, 1, 4, 3, 2) if official_axis_order else x
    ref_pooled, ref_hidden = _ref_official_forward(sd, x_official, ATTO["depths"])
    feats = enc.forward_features(x)
    strides = (4, 8, 16, 16)
    for f, r, s, c in zip(feats, ref_hidden, strides, ATTO["dims"], strict=True):
        assert f.shape == (2, c, 32 // s, 48 // s, 16 // s)
        r = r.permute(0, 1, 4, 3, 2) if official_axis_order else r
        torch.testing.assert_close(f, r)
    torch.testing.assert_close(enc(x), ref_pooled)


def test_axis_order_matters_for_asymmetric_weights():
    a = profound_encoder("atto", in_channels=1, official_axis_order=True)
    b = profound_encoder("atto", in_channels=1, official_axis_order=False)
    _randomise(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, *SIZE)
    assert not torch.allclose(a.forward_pooled(x), b.forward_pooled(x), atol=1e-4)
    torch.testing.assert_close(a.forward_pooled(x), b.forward_pooled(x.permute(0, 1, 4, 3, 2)))


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 0}, {"depths": (2, 2, 2)}, {"dims": (8, 8, 8, 0)}, {"drop_path_rate": 1.0}]
)
def test_encoder_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        ProFoundEncoder(**kwargs)


def test_factory_rejects_unknown_size():
    with pytest.raises(ValueError, match="unknown size"):
        profound_encoder("small")


# ---------------------------------------------------------------------------------------------------------------
# Downstream networks
# ---------------------------------------------------------------------------------------------------------------
def _dense(decoder, **kw):
    extra = SMALL_UPERNET if decoder == "upernet" else {"feature_size": 4}
    return ProFoundDense("atto", in_channels=2, out_channels=3, decoder=decoder, **extra, **kw)


@pytest.mark.parametrize("decoder", ["upernet", "unetr"])
def test_dense_shapes_representations_and_gradients(decoder):
    torch.manual_seed(0)
    model = _dense(decoder)
    x = torch.randn(2, 2, *SIZE)
    y = model(x)
    assert y.shape == (2, 3, *SIZE)
    loss = y.square().mean()
    if decoder == "upernet":
        aux = model.forward_auxiliary(x)
        assert aux.shape == (2, 3, *SIZE)
        loss = loss + 0.4 * aux.square().mean()
    loss.backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    # as in the official UperNet, the encoder's final LayerNorm feeds only the pooled output, not the decoder
    assert no_grad == ({"encoder.norm.weight", "encoder.norm.bias"} if decoder == "upernet" else set())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        reps = model.forward_representations(x)
    width = 8 if decoder == "upernet" else 4
    assert reps["head_input"].shape == (2, width)
    torch.testing.assert_close(reps["encoder"], model.encoder.forward_pooled(x))


def test_unetr_head_input_feeds_the_last_conv():
    model = _dense("unetr").eval()
    x = torch.randn(1, 2, *SIZE)
    with torch.no_grad():
        y, reps = model(x), model.forward_representations(x)
    w, b = model.decoder.out.conv.conv.weight.flatten(1), model.decoder.out.conv.conv.bias
    torch.testing.assert_close(y.mean((2, 3, 4)), reps["head_input"] @ w.T + b, atol=1e-5, rtol=1e-5)


def test_dense_axis_order_is_applied_at_the_boundary():
    a = _dense("unetr", official_axis_order=True).eval()
    b = _dense("unetr", official_axis_order=False).eval()
    _randomise(a.encoder)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, *SIZE)
    with torch.no_grad():
        expected = b(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(a(x), expected, atol=1e-5, rtol=1e-5)


def test_classifier_shapes_representations_and_gradients():
    torch.manual_seed(0)
    model = ProFoundClassifier("atto", in_channels=1, num_classes=4, hidden=16)
    x = torch.randn(2, 1, *SIZE)
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        reps = model.forward_representations(x)
        assert reps["head_input"].shape == (2, 16) and reps["encoder"].shape == (2, 320)
        torch.testing.assert_close(model.head[-1](reps["head_input"]), model(x))
    assert set(k for k in model.state_dict() if k.startswith("head.")) >= {
        "head.0.weight",
        "head.1.bias",
        "head.3.bias",
    }


@pytest.mark.parametrize(("decoder", "scale"), [("upernet", (1, 1, 2)), ("unetr", (1, 1, 2)), ("upernet", (2, 1, 1))])
def test_superres_shapes_and_gradients(decoder, scale):
    torch.manual_seed(0)
    extra = {"hidden_size": 8} if decoder == "upernet" else {"feature_size": 4}
    model = ProFoundSuperRes(
        "atto", in_channels=1, out_channels=1, scale=scale, decoder=decoder, decoder_channels=6, **extra
    )
    x = torch.randn(1, 1, *SIZE)
    y = model(x)
    assert y.shape == (1, 1, SIZE[0] * scale[0], SIZE[1] * scale[1], SIZE[2] * scale[2])
    y.abs().mean().backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert no_grad == ({"encoder.norm.weight", "encoder.norm.bias"} if decoder == "upernet" else set())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        reps = model.forward_representations(x)
    assert reps["head_input"].shape == (1, 6) and reps["encoder"].shape == (1, 320)


def test_models_reject_bad_input_and_args():
    with pytest.raises(ValueError, match="divisible by 16"):
        _dense("upernet")(torch.zeros(1, 2, 32, 32, 24))
    with pytest.raises(ValueError, match="decoder"):
        ProFoundDense("atto", decoder="fpn")
    with pytest.raises(ValueError, match="decoder"):
        ProFoundSuperRes("atto", decoder="fpn")
    with pytest.raises(ValueError, match="unknown size"):
        ProFoundClassifier("gigantic")
    with pytest.raises(ValueError, match="auxiliary"):
        _dense("unetr").forward_auxiliary(torch.zeros(1, 2, *SIZE))


# ---------------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------------
def _upernet_count(c, h, a, k):
    return (
        2 * sum(c)
        + 4 * (c[3] * h + 2 * h)
        + (c[3] + 4 * h) * h * 27
        + 2 * h
        + sum(ci * h + 2 * h for ci in c[:3])
        + 3 * (h * h * 27 + 2 * h)
        + 4 * h * h * 27
        + 2 * h
        + h * k
        + k
        + c[2] * a * 27
        + 2 * a
        + a * k
        + k
    )


@pytest.mark.parametrize("kind", ["classifier", "upernet", "superres"])
def test_freeze_counts_and_modes(kind):
    if kind == "classifier":
        model = ProFoundClassifier("atto", in_channels=1, num_classes=4, hidden=16)
        expected = (320 * 16 + 16) + 2 * 16 + (16 * 4 + 4)  # Linear, BatchNorm1d affine, Linear
        x = torch.randn(2, 1, *SIZE)
    elif kind == "upernet":
        model = ProFoundDense("atto", in_channels=1, out_channels=3, **SMALL_UPERNET)
        expected = _upernet_count(ATTO["dims"], 8, 4, 3)
        x = torch.randn(1, 1, *SIZE)
    else:
        model = ProFoundSuperRes("atto", in_channels=1, decoder="upernet", hidden_size=8, decoder_channels=6)
        aux = ATTO["dims"][2] * 4 * 27 + 2 * 4 + 4 * 6 + 6  # no auxiliary head in the super-resolution model
        expected = _upernet_count(ATTO["dims"], 8, 4, 6) - aux + (6 * 2 * 27 + 2)  # + sub-pixel conv to 1 x 2
        x = torch.randn(1, 1, *SIZE)
    assert freeze_profound_finetune(model) is model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    assert model.training and (model.head.training if hasattr(model, "head") else model.decoder.training)
    out = model(x)
    out.float().square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_freeze_rejects_module_without_encoder():
    with pytest.raises(ValueError, match="encoder"):
        freeze_profound_finetune(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _sparse_kernel(w: torch.Tensor) -> torch.Tensor:
    """Dense (C_out, C_in, k, k, k) -> MinkowskiEngine (k^3, C_in, C_out), flat index x2 * k^2 + x1 * k + x0."""
    c_out, c_in, k = w.shape[0], w.shape[1], w.shape[2]
    out = torch.empty(k**3, c_in, c_out, dtype=w.dtype)
    for x0 in range(k):
        for x1 in range(k):
            for x2 in range(k):
                out[x2 * k * k + x1 * k + x0] = w[:, :, x0, x1, x2].T
    return out


def _to_official_fcmae(dense: dict[str, torch.Tensor]) -> dict[str, object]:
    """Write an official FCMAE checkpoint (models/fcmae.py + convnextv2_sparse.py) from dense encoder weights."""
    sparse: dict[str, torch.Tensor] = {}
    for k, v in dense.items():
        if k.startswith("norm."):
            continue  # the pretraining encoder has no final LayerNorm
        parts = k.split(".")
        if k.startswith("downsample_layers.0."):
            new_k, new_v = k, v  # dense stem (nn.Conv3d + channels-first LayerNorm)
        elif k.startswith("downsample_layers."):
            if parts[2] == "0":  # MinkowskiLayerNorm
                new_k, new_v = ".".join(parts[:3] + ["ln", parts[3]]), v
            elif parts[3] == "weight":  # MinkowskiConvolution
                new_k = ".".join(parts[:3] + ["kernel"])
                new_v = _sparse_kernel(v) if v.shape[2] > 1 else v[:, :, 0, 0, 0].T.clone()
            else:
                new_k, new_v = k, v.reshape(1, -1)
        else:
            mod, p = parts[3], parts[4]
            if mod == "dwconv":
                new_k = ".".join(parts[:4] + (["kernel"] if p == "weight" else ["bias"]))
                new_v = _sparse_kernel(v)[:, 0, :] if p == "weight" else v.reshape(1, -1)
            elif mod == "norm":
                new_k, new_v = ".".join(parts[:4] + ["ln", p]), v
            elif mod in ("pwconv1", "pwconv2"):
                new_k, new_v = ".".join(parts[:4] + ["linear", p]), v
            else:  # grn
                new_k, new_v = k, v.reshape(1, -1)
        sparse["encoder." + new_k] = new_v.clone()
    sparse["proj.weight"] = torch.randn(16, dense["norm.weight"].shape[0], 1, 1, 1)
    sparse["proj.bias"] = torch.zeros(16)
    sparse["mask_token"] = torch.zeros(1, 16, 1, 1, 1)
    sparse["decoder.0.dwconv.weight"] = torch.randn(16, 1, 7, 7, 7)
    sparse["pred.weight"] = torch.randn(4096 * 3, 16, 1, 1, 1)
    return {"model": sparse, "epoch": 799, "args": argparse.Namespace(model="convnext", input_size=(64, 224, 224))}


def test_sparse_kernel_layout_hand_indices():
    w = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(3, 2, 2, 2, 2)  # (C_out, C_in, 2, 2, 2)
    s = _sparse_kernel(w)
    # dense offset (x0, x1, x2) = (1, 0, 1) -> flat index 1 * 4 + 0 * 2 + 1 = 5
    assert s[5, 1, 2] == w[2, 1, 1, 0, 1]
    converted = convert_profound_fcmae({"encoder.downsample_layers.1.1.kernel": s})
    torch.testing.assert_close(converted["downsample_layers.1.1.weight"], w, rtol=0, atol=0)


def test_fcmae_round_trip_and_strict_load(tmp_path):
    src = profound_encoder("atto", in_channels=3)
    _randomise(src, seed=1)
    dense = src.state_dict()
    ckpt = _to_official_fcmae(dense)
    assert detect_profound_format(ckpt) == "fcmae"
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    converted = convert_profound_fcmae(ckpt)
    assert all(torch.equal(before[k], v) for k, v in ckpt["model"].items())  # input untouched
    assert set(converted) == set(dense) - {"norm.weight", "norm.bias"}
    for k, v in converted.items():
        torch.testing.assert_close(v, dense[k], rtol=0, atol=0, msg=k)

    path = tmp_path / "checkpoint-799.pth"
    torch.save(ckpt, path)
    enc = load_profound_checkpoint(profound_encoder("atto", in_channels=3), path, strict=True)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x)[-1], src.forward_features(x)[-1])
    torch.testing.assert_close(enc.norm.weight, torch.ones(320))  # not pretrained: stays at its initial value

    model = load_profound_checkpoint(ProFoundDense("atto", in_channels=3, **SMALL_UPERNET), path, strict=True)
    torch.testing.assert_close(model.encoder.stages[2][5].grn.gamma, dense["stages.2.5.grn.gamma"])


def test_dense_formats_round_trip(tmp_path):
    src = ProFoundDense("atto", in_channels=3, out_channels=2, **SMALL_UPERNET)
    _randomise(src, seed=2)
    ours = src.state_dict()
    official_full = {(k[len("decoder.") :] if k.startswith("decoder.") else k): v for k, v in ours.items()}
    assert "decode_head.fpn_bottleneck.conv.weight" in official_full and "hidden_norm.0.weight" in official_full
    encoder_only = {k[len("encoder.") :]: v for k, v in ours.items() if k.startswith("encoder.")}
    variants = {
        "official_upernet": {"model": official_full, "epoch": 3, "args": argparse.Namespace(lr=1e-4)},
        "ddp": {"state_dict": {"module." + k: v for k, v in ours.items()}},
        "ours": ours,
    }
    for name, ckpt in variants.items():
        assert detect_profound_format(ckpt) == "dense", name
        assert set(convert_profound_dense(ckpt)) == set(ours), name
        path = tmp_path / f"{name}.pth.tar"
        torch.save(ckpt, path)
        dst = load_profound_checkpoint(ProFoundDense("atto", in_channels=3, out_channels=2, **SMALL_UPERNET), path)
        for k, v in dst.state_dict().items():
            torch.testing.assert_close(v, ours[k], rtol=0, atol=0, msg=f"{name}: {k}")
    # an official dense encoder loads strictly into a bare encoder and into a model's encoder
    enc = load_profound_checkpoint(profound_encoder("atto"), encoder_only, strict=True)
    torch.testing.assert_close(enc.norm.bias, encoder_only["norm.bias"])
    cls = load_profound_checkpoint(ProFoundClassifier("atto", hidden=8), {"model": encoder_only})
    torch.testing.assert_close(cls.encoder.stages[3][1].pwconv2.weight, encoder_only["stages.3.1.pwconv2.weight"])
    # a full finetuned checkpoint gives its encoder part to a bare encoder
    enc2 = load_profound_checkpoint(profound_encoder("atto"), {"model": official_full})
    torch.testing.assert_close(enc2.stages[0][0].dwconv.weight, encoder_only["stages.0.0.dwconv.weight"])


def test_official_unetr_and_classifier_names_load():
    src = ProFoundDense("atto", in_channels=3, out_channels=1, decoder="unetr", feature_size=4)
    ours = src.state_dict()
    official = {}
    for k, v in ours.items():
        if k.startswith(("decoder.norm1.", "decoder.norm2.", "decoder.norm3.")):
            k = k[len("decoder.") :]  # official ConvnextUNETR keeps norm1..3 at the top level
        official[k] = v
    assert "norm1.weight" in official and "decoder.encoder1.layer.conv1.conv.weight" in official
    dst = load_profound_checkpoint(
        ProFoundDense("atto", in_channels=3, out_channels=1, decoder="unetr", feature_size=4), {"model": official}
    )
    torch.testing.assert_close(dst.decoder.norm2.weight, ours["decoder.norm2.weight"])

    cls_src = ProFoundClassifier("atto", hidden=8)
    cls = load_profound_checkpoint(ProFoundClassifier("atto", hidden=8), {"model": cls_src.state_dict()})
    torch.testing.assert_close(cls.head[3].weight, cls_src.head[3].weight)


def test_load_errors_list_keys_and_shapes():
    enc = profound_encoder("atto")
    good = enc.state_dict()
    missing = {k: v for k, v in good.items() if k != "stages.1.0.grn.beta"}
    with pytest.raises(ValueError, match=r"missing keys \(1\).*stages\.1\.0\.grn\.beta"):
        load_profound_checkpoint(profound_encoder("atto"), missing)
    load_profound_checkpoint(profound_encoder("atto"), missing, strict=False)  # tolerated when not strict
    extra = {**good, "stages.0.9.gamma": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*stages\.0\.9\.gamma"):
        load_profound_checkpoint(profound_encoder("atto"), extra)
    with pytest.raises(ValueError, match=r"shape mismatches.*downsample_layers\.0\.0\.weight: checkpoint \(40, 3"):
        load_profound_checkpoint(profound_encoder("atto", in_channels=1), good, strict=False)
    with pytest.raises(ValueError, match=r"encoder\.downsample_layers"):
        load_profound_checkpoint(ProFoundClassifier("femto", hidden=8), good)


def test_detect_rejects_foreign_and_load_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="Not a ProFound checkpoint"):
        detect_profound_format({"conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no checkpoint file"):
        load_profound_checkpoint(profound_encoder("atto"), tmp_path / "nothing.pth")


@pytest.mark.parametrize("in_channels", [1, 2, 5])
def test_adapt_stem_keeps_response_to_repeated_image(in_channels):
    src = profound_encoder("atto", in_channels=3)
    _randomise(src, seed=3)
    adapted = adapt_profound_stem({"model": src.state_dict()}, in_channels)
    assert adapted["downsample_layers.0.0.weight"].shape == (40, in_channels, 4, 4, 4)
    dst = load_profound_checkpoint(profound_encoder("atto", in_channels=in_channels), adapted)
    img = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        expected = F.conv3d(img.repeat(1, 3, 1, 1, 1), src.downsample_layers[0][0].weight, stride=4)
        got = F.conv3d(img.repeat(1, in_channels, 1, 1, 1), dst.downsample_layers[0][0].weight, stride=4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_adapt_stem_named_channels_equal_the_official_zero_filled_input():
    # official ProFound feeds [T2W, 0, 0] (or [T2W, DWI, 0]) into its 3-channel stem; a network of the present
    # channels whose stem kernels are the pretrained channels' kernels answers exactly the same
    src = profound_encoder("atto", in_channels=3)
    _randomise(src, seed=4)
    t2w, dwi = torch.randn(1, 1, *SIZE), torch.randn(1, 1, *SIZE)
    zero = torch.zeros_like(t2w)
    for channels, present, official in (
        ([0], [t2w], [t2w, zero, zero]),
        ([0, 1], [t2w, dwi], [t2w, dwi, zero]),
        ([2, 0], [dwi, t2w], [t2w, zero, dwi]),
    ):
        adapted = adapt_profound_stem(src.state_dict(), len(channels), channels)
        dst = load_profound_checkpoint(profound_encoder("atto", in_channels=len(channels)), adapted)
        with torch.no_grad():
            expected = src(torch.cat(official, dim=1))
            got = dst(torch.cat(present, dim=1))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    w = src.downsample_layers[0][0].weight
    mixed = adapt_profound_stem(src.state_dict(), 2, [0, None])["downsample_layers.0.0.weight"]
    torch.testing.assert_close(mixed[:, :1], w[:, :1])
    torch.testing.assert_close(mixed[:, 1:], w.sum(dim=1, keepdim=True) / 2)
    with pytest.raises(ValueError, match="name 1 channels"):
        adapt_profound_stem(src.state_dict(), 2, [0])
    with pytest.raises(ValueError, match=r"channels \[3\] do not exist"):
        adapt_profound_stem(src.state_dict(), 1, [3])
