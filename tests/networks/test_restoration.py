"""ResidualRestoration: step 0 is the trivial baseline exactly, training moves it, the wrapped network keeps its
names, freezing protocol, checkpoints and TorchScript export; and the FullResolutionRefinement block."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.bundle.downstream import init_network
from common.networks import (
    DinoVisionTransformer,
    FullResolutionRefinement,
    ProFoundDense,
    ProFoundSuperRes,
    ProViCNetDense,
    ProViCNetSuperRes,
    ResidualRestoration,
    TransUNet3d,
    ViTImageToImage,
    freeze_profound_finetune,
    freeze_provicnet_finetune,
    load_checkpoint,
    profound_encoder,
)

SR, DC = (1, 1, 2), (1, 1, 1)
PROFOUND_IN, PROVICNET_IN = (1, 1, 32, 32, 16), (1, 1, 20, 18, 4)
TRANSFORMER = {"hidden_size": 16, "mlp_dim": 32, "num_layers": 2, "num_heads": 4}
TRANSUNET = {"img_size": (32, 32, 16), "channels": (4, 8), "strides": (2, 2), "head_channels": 4, **TRANSFORMER}


def _provicnet_backbone() -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=28, in_chans=3, embed_dim=48, depth=2, num_heads=3)


# name -> (wrapped-network factory, scale, input shape); every factory maps the input to the input grid times scale
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], tuple[int, ...]]] = {
    "profound_superres_upernet": (
        lambda: ProFoundSuperRes("atto", in_channels=1, decoder_channels=6, hidden_size=8),
        SR,
        PROFOUND_IN,
    ),
    "profound_superres_unetr": (
        lambda: ProFoundSuperRes("atto", in_channels=1, decoder="unetr", decoder_channels=6, feature_size=4),
        SR,
        PROFOUND_IN,
    ),
    "profound_dense": (
        lambda: ProFoundDense("atto", in_channels=1, out_channels=1, hidden_size=8, auxiliary_channels=4),
        DC,
        PROFOUND_IN,
    ),
    "provicnet_superres": (
        lambda: ProViCNetSuperRes(depth_factor=2, slice_size=28, backbone=_provicnet_backbone()),
        SR,
        PROVICNET_IN,
    ),
    "provicnet_dense": (
        lambda: ProViCNetDense(out_channels=1, slice_size=28, backbone=_provicnet_backbone()),
        DC,
        PROVICNET_IN,
    ),
    "transunet": (
        lambda: TransUNet3d(scale=SR, **TRANSUNET),
        SR,
        PROFOUND_IN,
    ),
    "vit": (
        lambda: ViTImageToImage(img_size=(32, 32, 16), patch_size=(16, 16, 16), deconv_chns=4, **TRANSFORMER),
        DC,
        PROFOUND_IN,
    ),
}


def _build(name: str, **kwargs: object) -> tuple[ResidualRestoration, torch.Tensor]:
    factory, scale, in_shape = NETWORKS[name]
    torch.manual_seed(0)
    model = ResidualRestoration(factory(), scale=scale, refine_channels=4, **kwargs)
    return model, torch.rand(in_shape, generator=torch.Generator().manual_seed(1))


def _target_shape(name: str) -> tuple[int, ...]:
    _, scale, (b, c, h, w, d) = NETWORKS[name]
    return (b, c, h * scale[0], w * scale[1], d * scale[2])


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float = 1e-2) -> None:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    optimiser.zero_grad()
    F.l1_loss(model(x), target).backward()
    optimiser.step()


# ---------------------------------------------------------------------------------------------------------------------
# Baseline and step 0


def test_baseline_is_trilinear_upsampling_by_hand() -> None:
    """Along D, align_corners=False upsampling by 2 of [0, 4, 8, 12] reads source positions (k + 0.5) / 2 - 0.5,
    clamped at the edges: -0.25 -> 0, 0.25 -> 1, 0.75 -> 3, ..., 3.25 -> 12."""
    model = ResidualRestoration(nn.Identity(), scale=(1, 1, 2))
    x = torch.tensor([0.0, 4.0, 8.0, 12.0]).expand(1, 1, 2, 3, 4)
    expected = torch.tensor([0.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 12.0]).expand(1, 1, 2, 3, 8)
    torch.testing.assert_close(model.baseline(x), expected, rtol=0, atol=1e-6)
    x = torch.rand(2, 1, 4, 6, 5)
    assert torch.equal(model.baseline(x), F.interpolate(x, size=[4, 6, 10], mode="trilinear", align_corners=False))
    assert ResidualRestoration(nn.Identity()).baseline(x) is x  # distortion correction: the input itself


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("train", [False, True])
def test_step0_output_is_the_baseline_exactly(name: str, train: bool) -> None:
    model, x = _build(name)
    model.train(train)
    y = model(x)
    assert y.shape == _target_shape(name)
    assert torch.equal(y, model.baseline(x))  # bit for bit: base + 0
    assert not torch.equal(model.network(x), model.baseline(x))  # the wrapped network alone is not the baseline


@pytest.mark.parametrize("name", ["profound_superres_upernet", "provicnet_dense"])
def test_one_step_changes_the_output_and_then_gradients_reach_the_network(name: str) -> None:
    model, x = _build(name)
    model.train()
    target = model.baseline(x) + 0.1 * torch.randn(_target_shape(name), generator=torch.Generator().manual_seed(2))
    F.l1_loss(model(x), target).backward()
    # step 0: only the zero-initialised last layer gets a gradient (everything behind it is multiplied by 0)
    assert model.refine.out.weight.grad.abs().sum() > 0 and model.refine.out.bias.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.network.parameters())
    assert not model.refine.hidden[0].weight.grad.any()
    model.zero_grad()
    _step(model, x, target)
    with torch.no_grad():
        assert not torch.equal(model(x), model.baseline(x))
    model.zero_grad()
    F.l1_loss(model(x), target).backward()
    assert model.refine.hidden[0].weight.grad.abs().sum() > 0
    head = model.network.head.conv if name.startswith("profound") else model.network.head.segmentation_conv[-1]
    assert head.weight.grad.abs().sum() > 0  # the wrapped network trains through the refinement


def test_training_reduces_the_error_below_the_baseline() -> None:
    """A target that is the baseline plus a fixed pattern: a few steps make the model better than its baseline."""
    model, x = _build("profound_superres_upernet")
    model.train()
    target = model.baseline(x) + 0.05
    before = F.l1_loss(model.baseline(x), target).item()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        optimiser.zero_grad()
        F.l1_loss(model(x), target).backward()
        optimiser.step()
    with torch.no_grad():
        assert F.l1_loss(model(x), target).item() < 0.5 * before


# ---------------------------------------------------------------------------------------------------------------------
# The plain network (residual=False)


@pytest.mark.parametrize("name", ["profound_superres_upernet", "provicnet_superres"])
def test_residual_false_is_the_plain_network(name: str) -> None:
    model, x = _build(name, residual=False)
    assert model.refine is None
    assert all(k.startswith("network.") for k in model.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.network(x))
        assert model(x).shape == _target_shape(name)


# ---------------------------------------------------------------------------------------------------------------------
# Names, checkpoints, freezing, representations, TorchScript


@pytest.mark.parametrize("name", ["profound_superres_upernet", "provicnet_dense"])
def test_state_dict_names_and_round_trip(name: str, tmp_path: Path) -> None:
    model, x = _build(name)
    inner = NETWORKS[name][0]().state_dict()
    refine = {f"refine.{k}" for k in ("hidden.0.weight", "hidden.0.bias")}
    refine |= {"refine.out.weight", "refine.out.bias"}
    assert set(model.state_dict()) == {f"network.{k}" for k in inner} | refine
    _step(model, x, model.baseline(x) + 0.1)  # non-trivial weights everywhere, the zero layer included
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other, _ = _build(name)
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
        assert not torch.equal(other(x), other.baseline(x))


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_profound_finetune_protocol_freezes_the_encoder_and_trains_the_refinement(init: str, tmp_path: Path) -> None:
    """Through the bundles' own initialisation: the checkpoint and the freezing go to ``network``."""
    model, x = _build("profound_superres_upernet")
    torch.manual_seed(5)
    pretrained = profound_encoder("atto", in_channels=1).state_dict()
    torch.save(pretrained, tmp_path / "encoder.pt")
    init_network(model, init, tmp_path / "encoder.pt", freeze_profound_finetune)
    if init == "pretrained":
        for k, v in pretrained.items():
            assert torch.equal(model.network.encoder.state_dict()[k], v), k
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("network.encoder.") for n in trainable)
    assert {n for n, _ in model.refine.named_parameters(prefix="refine")} <= trainable
    assert any(n.startswith("network.decoder.") for n in trainable)
    encoder = {k: v.clone() for k, v in model.network.encoder.state_dict().items()}
    refine = {k: v.clone() for k, v in model.refine.state_dict().items()}
    model.train()
    assert not model.network.encoder.training  # the frozen encoder stays in eval mode under the wrapper's train()
    for _ in range(2):
        _step(model, x, model.baseline(x) + 0.1)
    assert all(torch.equal(v, encoder[k]) for k, v in model.network.encoder.state_dict().items())
    assert all(not torch.equal(v, refine[k]) for k, v in model.refine.state_dict().items())


def test_provicnet_finetune_protocol_trains_the_refinement(tmp_path: Path) -> None:
    model, x = _build("provicnet_dense")
    torch.save(model.network.state_dict(), tmp_path / "provicnet.pt")  # official ProViCNet layout
    init_network(model, "pretrained", tmp_path / "provicnet.pt", freeze_provicnet_finetune)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in model.refine.named_parameters(prefix="refine")} <= trainable
    assert "network.backbone.blocks.1.mlp.fc1.weight" in trainable  # the last two blocks
    assert "network.backbone.patch_embed.proj.weight" not in trainable
    # the same protocol applied to the bare network names the same parameters, under the prefix
    bare = freeze_provicnet_finetune(NETWORKS["provicnet_dense"][0]())
    assert {n for n in trainable if n.startswith("network.")} == {f"network.{n}" for n in bare}


def test_load_checkpoint_into_the_wrapped_network() -> None:
    model, _ = _build("profound_dense")
    source = ProFoundDense("atto", in_channels=1, out_channels=1, hidden_size=8, auxiliary_channels=4)
    load_checkpoint(model.network, source.state_dict(), strict=True, encoder_only=True)
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(model.network.encoder.state_dict()[k], v)


@pytest.mark.parametrize("name", ["profound_superres_upernet", "provicnet_dense", "vit"])
def test_representations_are_the_wrapped_networks(name: str) -> None:
    model, x = _build(name)
    model.eval()
    with torch.no_grad():
        ours, theirs = model.forward_representations(x), model.network.forward_representations(x)
    assert set(ours) == set(theirs) == {"head_input", "encoder"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.representation_kinds() == model.network.representation_kinds()


@pytest.mark.parametrize("name", ["profound_superres_upernet", "provicnet_superres", "transunet"])
@pytest.mark.parametrize("residual", [True, False])
def test_torchscript_export_matches_eager(name: str, residual: bool, tmp_path: Path) -> None:
    model, x = _build(name, residual=residual)
    if residual:
        with torch.no_grad():  # leave the zero init, so the refinement contributes
            model.refine.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    model.eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    assert list(loaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
        assert residual == (not torch.equal(model(x), model.network(x)))


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="scale must be three positive integers"):
        ResidualRestoration(nn.Identity(), scale=(1, 2))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        ResidualRestoration(nn.Identity(), channels=0)
    with pytest.raises(ValueError, match="residual must be True or False, got 'false'"):
        ResidualRestoration(nn.Identity(), residual="false")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="network must be an nn.Module"):
        ResidualRestoration("ProFoundDense")  # type: ignore[arg-type]
    model = ResidualRestoration(nn.Identity(), scale=(1, 1, 2))
    with pytest.raises(ValueError, match=r"not on the target grid \[1, 1, 4, 4, 8\]"):
        model(torch.zeros(1, 1, 4, 4, 4))  # the identity does not upsample
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W, D\)"):
        model(torch.zeros(1, 2, 4, 4, 4))


# ---------------------------------------------------------------------------------------------------------------------
# FullResolutionRefinement


def test_refinement_is_zero_until_trained_and_keeps_the_resolution() -> None:
    block = FullResolutionRefinement(3, 2, channels=5, hidden_layers=2)
    x = torch.randn(2, 3, 6, 5, 4)
    y = block(x)
    assert y.shape == (2, 2, 6, 5, 4) and torch.equal(y, torch.zeros_like(y))
    assert [m.stride for m in block.modules() if isinstance(m, nn.Conv3d)] == [(1, 1, 1)] * 3
    with torch.no_grad():
        block.out.weight.fill_(1.0)
        block.out.bias.fill_(0.5)
    assert block(x).abs().amax() > 0


def test_refinement_single_layer_by_hand() -> None:
    """hidden_layers=0: one 3x3x3 conv; with weight 1 at the kernel centre only, it copies its input (+ bias)."""
    block = FullResolutionRefinement(1, 1, hidden_layers=0)
    with torch.no_grad():
        block.out.weight[0, 0, 1, 1, 1] = 1.0
        block.out.bias.fill_(2.0)
    x = torch.arange(24.0).reshape(1, 1, 2, 3, 4)
    torch.testing.assert_close(block(x), x + 2.0)


def test_refinement_condition_enters_the_first_hidden_layer() -> None:
    block = FullResolutionRefinement(1, 1, channels=4, hidden_layers=1, cond_channels=3)
    with torch.no_grad():
        block.out.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    x, c = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 3)
    assert not torch.equal(block(x, c), block(x, torch.zeros(2, 3)))
    with torch.no_grad():  # the condition adds proj(c) to the first hidden layer, before GELU
        expected = block.out(F.gelu(block.hidden[0](x) + block.cond(c)[:, :, None, None, None]))
    torch.testing.assert_close(block(x, c), expected)
    with pytest.raises(ValueError, match="needs a condition"):
        block(x)
    with pytest.raises(ValueError, match="built with cond_channels=0"):
        FullResolutionRefinement(1, 1)(x, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0, "out_channels": 1}, "must be >= 1"),
        ({"in_channels": 1, "out_channels": 1, "hidden_layers": -1}, "must be >= 0"),
        ({"in_channels": 1, "out_channels": 1, "hidden_layers": 0, "cond_channels": 4}, "at least one hidden layer"),
    ],
)
def test_refinement_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FullResolutionRefinement(**kwargs)
