from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, ViTAutoEnc, resnet50
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

pytest.importorskip("einops", reason="MONAI's ViT and diffusion attention blocks need einops")

from common.networks.specialised import (  # noqa: E402
    SPECIALISED_MODELS,
    ConditionalDiffusionUNet,
    ResNet50Classifier,
    UNetSegmenter,
    ViTImageToImage,
    specialised_network,
)
from common.networks.transunet import TransUNet3d  # noqa: E402

RESNET = {"widen_factor": 0.125}  # 2048 * 0.125 = 256 pooled features
UNET = {"channels": (4, 8, 16), "strides": (2, 2)}
VIT = {"img_size": (32, 32, 16), "patch_size": (16, 16, 16), "hidden_size": 16, "mlp_dim": 32, "num_layers": 2}
VIT = {**VIT, "num_heads": 4, "deconv_chns": 6}
DDPM = {"channels": (8, 16, 16), "norm_num_groups": 8, "num_head_channels": 8}


def _randomise(module: torch.nn.Module, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _build(name: str) -> tuple[torch.nn.Module, torch.nn.Module, tuple[torch.Tensor, ...]]:
    """(our network, the plain MONAI network with the same arguments, inputs)."""
    torch.manual_seed(0)
    if name == "resnet50":
        ours = ResNet50Classifier(**RESNET)
        ref = resnet50(spatial_dims=3, n_input_channels=1, num_classes=4, **RESNET)
        args: tuple[torch.Tensor, ...] = (torch.randn(2, 1, 16, 16, 8),)
    elif name == "unet":
        ours = UNetSegmenter(**UNET)
        ref = UNet(spatial_dims=3, in_channels=2, out_channels=2, num_res_units=2, **UNET)
        args = (torch.randn(2, 2, 16, 16, 8),)
    elif name == "vit":
        ours = ViTImageToImage(**VIT)
        ref = ViTAutoEnc(in_channels=1, out_channels=1, spatial_dims=3, **VIT)
        args = (torch.randn(2, 1, 32, 32, 16),)
    else:
        ours = ConditionalDiffusionUNet(**DDPM)
        ref = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=2,
            out_channels=1,
            num_res_blocks=1,
            attention_levels=(False, False, True),
            **DDPM,
        )
        args = (torch.randn(2, 2, 16, 16, 8), torch.tensor([3, 700]))
    _randomise(ours)  # also un-zeroes the DDPM output conv, so output checks are not trivially 0 == 0
    return ours.eval(), ref.eval(), args


# (name, final-layer getter, encoder-output module getter, head_input width, encoder width, output shape)
CASES = [
    ("resnet50", lambda m: m.fc, lambda m: m.layer4, 256, 256, (2, 4)),
    ("unet", lambda m: m.final_layer(), lambda m: m.model[1].submodule[1].submodule, 2, 16, (2, 2, 16, 16, 8)),
    ("vit", lambda m: m.conv3d_transpose_1, lambda m: m.norm, 6, 16, (2, 1, 32, 32, 16)),
    ("ddpm", lambda m: m.out[2], lambda m: m.middle_block, 8, 16, (2, 1, 16, 16, 8)),
]


@pytest.mark.parametrize(("name", "final", "enc", "d", "e", "out_shape"), CASES)
def test_shapes_and_representations_match_the_forward_pass(name, final, enc, d, e, out_shape) -> None:
    """Independent reference: forward hooks on MONAI's own forward capture the final layer's input and the encoder
    output; the representations must be their global averages, and the final layer must map head_input to y."""
    net, _, args = _build(name)
    seen: dict[str, torch.Tensor] = {}
    final(net).register_forward_hook(lambda m, i, o: seen.update(head=i[0]))
    enc(net).register_forward_hook(lambda m, i, o: seen.update(enc=o))
    with torch.no_grad():
        y = net(*args)
        reps = net.forward_representations(*args)
    assert y.shape == out_shape
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    assert reps["head_input"].shape == (2, d) and reps["encoder"].shape == (2, e)
    head = seen["head"] if seen["head"].ndim == 2 else seen["head"].mean(dim=(2, 3, 4))  # fc sees pooled features
    torch.testing.assert_close(reps["head_input"], head)
    enc_dims = (1,) if seen["enc"].ndim == 3 else (2, 3, 4)  # ViT tokens (B, N, hidden)
    torch.testing.assert_close(reps["encoder"], seen["enc"].mean(dim=enc_dims))
    with torch.no_grad():
        maps = net.forward_feature_maps(*args)
        head_map = maps["head_input"].mean(dim=(2, 3, 4)) if name == "resnet50" else maps["head_input"]
        torch.testing.assert_close(final(net)(head_map), y)


def test_resnet_fc_of_head_input_is_logits() -> None:
    net, _, (x,) = _build("resnet50")
    with torch.no_grad():
        torch.testing.assert_close(net.fc(net.forward_representations(x)["head_input"]), net(x))


@pytest.mark.parametrize("name", ["resnet50", "unet", "vit", "ddpm"])
def test_monai_state_dict_loads_by_name(name: str) -> None:
    """Same keys and shapes as the plain MONAI network (empty prefix); a MONAI checkpoint gives the same output."""
    ours, ref, args = _build(name)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    _randomise(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        expected = ref(*args)
        expected = expected[0] if isinstance(expected, tuple) else expected  # ViTAutoEnc: (image, hidden states)
        torch.testing.assert_close(ours(*args), expected)


def test_unet_last_up_head_layer() -> None:
    net = UNetSegmenter(**UNET, head_layer="last_up").eval()
    seen: dict[str, torch.Tensor] = {}
    net.model[2].register_forward_hook(lambda m, i, o: seen.update(head=i[0]))
    x = torch.randn(2, 2, 16, 16, 8)
    with torch.no_grad():
        net(x)
        reps = net.forward_representations(x)
    assert reps["head_input"].shape == (2, 8)  # 2 * channels[0] at half resolution
    torch.testing.assert_close(reps["head_input"], seen["head"].mean(dim=(2, 3, 4)))


def test_unet_without_residual_units() -> None:
    net = UNetSegmenter(**UNET, num_res_units=0).eval()
    x = torch.randn(1, 2, 16, 16, 8)
    with torch.no_grad():
        maps = net.forward_feature_maps(x)
        assert maps["head_input"].shape == (1, 8, 8, 8, 4)
        torch.testing.assert_close(net.final_layer()(maps["head_input"]), net(x))


def test_ddpm_default_timestep_and_dependence_on_t() -> None:
    net, _, (x, _) = _build("ddpm")
    with torch.no_grad():
        default = net.forward_representations(x)
        t0 = net.forward_representations(x, torch.zeros(2, dtype=torch.long))
        t900 = net.forward_representations(x, torch.full((2,), 900))
    torch.testing.assert_close(default["head_input"], t0["head_input"])
    assert not torch.allclose(t0["encoder"], t900["encoder"])


@pytest.mark.parametrize("name", ["resnet50", "unet", "vit", "ddpm"])
def test_gradient_reaches_every_trainable_parameter(name: str) -> None:
    net, _, args = _build(name)
    net.train()
    net(*args).square().mean().backward()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert all("norm_cross_attn" in n for n in frozen)
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["resnet50", "unet", "vit"])
def test_torchscript(name: str) -> None:
    net, _, args = _build(name)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(*args), net(*args))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (ResNet50Classifier, {"num_classes": 0}),
        (ResNet50Classifier, {"shortcut_type": "C"}),
        (ResNet50Classifier, {"widen_factor": 0.0}),
        (UNetSegmenter, {"channels": (4, 8, 16), "strides": (2,)}),
        (UNetSegmenter, {"head_layer": "bottleneck"}),
        (ViTImageToImage, {**VIT, "patch_size": (16, 16, 8)}),  # 8 is not a perfect square
        (ViTImageToImage, {**VIT, "img_size": (32, 32, 24)}),  # 24 not divisible by 16
        (ViTImageToImage, {**VIT, "num_heads": 5}),
        (ConditionalDiffusionUNet, {**DDPM, "representation_timestep": -1}),
        (ConditionalDiffusionUNet, {**DDPM, "channels": (8, 12, 16)}),  # not multiples of 8 groups (MONAI's check)
    ],
)
def test_bad_args(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("name", "shape"), [("unet", (1, 2, 16, 16, 10)), ("vit", (1, 1, 32, 32, 32)), ("resnet50", (1, 2, 16, 16, 8))]
)
def test_bad_input(name: str, shape: tuple) -> None:
    net, _, _ = _build(name)
    with pytest.raises(ValueError):
        net.forward_representations(torch.randn(*shape))


def test_factory() -> None:
    expected = {
        "classification": ResNet50Classifier,
        "segmentation": UNetSegmenter,
        "super_resolution": TransUNet3d,
        "distortion_correction": ViTImageToImage,
        "modality_translation": ConditionalDiffusionUNet,
    }
    assert set(SPECIALISED_MODELS) == set(expected)
    small = {"classification": RESNET, "segmentation": UNET, "distortion_correction": VIT, "modality_translation": DDPM}
    small["super_resolution"] = {
        "img_size": (32, 32, 16),
        "hidden_size": 8,
        "mlp_dim": 8,
        "num_layers": 1,
        "num_heads": 2,
    }
    for task, cls in expected.items():
        assert type(specialised_network(task, **small[task])) is cls
    assert specialised_network("segmentation", out_channels=3, **UNET).out_channels == 3
    with pytest.raises(ValueError, match="unknown task"):
        specialised_network("detection")
