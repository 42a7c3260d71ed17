from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.networks import (
    FINAL_LAYERS,
    DinoVisionTransformer,
    ProFoundDense,
    ProViCNetDense,
    TimestepConditioned,
    final_layer_name,
    freeze_profound_finetune,
)

B = 2
SHAPES = {"upernet": (B, 2, 32, 32, 16), "unetr": (B, 2, 32, 32, 16), "provicnet": (B, 2, 16, 16, 4)}


def _network(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "upernet":
        return ProFoundDense("atto", in_channels=2, out_channels=1, hidden_size=8, auxiliary_channels=4)
    if kind == "unetr":
        return ProFoundDense("atto", in_channels=2, out_channels=1, decoder="unetr", feature_size=4)
    backbone = DinoVisionTransformer(img_size=28, in_chans=6, embed_dim=48, depth=2, num_heads=3)
    return ProViCNetDense(out_channels=1, n_modalities=2, slice_size=28, backbone=backbone)


def _wrapped(kind: str, randomise: bool = False) -> TimestepConditioned:
    model = TimestepConditioned(_network(kind), embed_dim=16).eval()
    if randomise:  # leave the zero init, so that the output depends on t
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.time_mlp[-1].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _input(kind: str) -> torch.Tensor:
    return torch.randn(SHAPES[kind], generator=torch.Generator().manual_seed(2))


KINDS = ["upernet", "unetr", "provicnet"]


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("upernet", "decoder.decode_head.classifier"),
        ("unetr", "decoder.out.conv.conv"),
        ("provicnet", "head.segmentation_conv.9"),
    ],
)
def test_final_layer_names(kind, name) -> None:
    net = _network(kind)
    assert final_layer_name(net) == name
    assert name in FINAL_LAYERS.values()
    assert isinstance(net.get_submodule(name), nn.Conv2d | nn.Conv3d)


@pytest.mark.parametrize("kind", KINDS)
def test_final_layer_input_is_what_head_input_pools(kind) -> None:
    """Independent check of final_layer_name: the input of that layer in the plain forward pass, averaged per volume
    (over space and, for ProViCNet's slice rows b * D + k, over slices), is the network's head_input."""
    net = _network(kind).eval()
    x = _input(kind)
    seen: dict[str, torch.Tensor] = {}
    net.get_submodule(final_layer_name(net)).register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    with torch.no_grad():
        net(x)
        head_input = net.forward_representations(x)["head_input"]
    h = seen["h"]
    pooled = h.reshape(B, h.shape[0] // B, h.shape[1], -1).mean(dim=(1, 3))
    torch.testing.assert_close(pooled, head_input, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_at_init_the_wrapper_is_the_network(kind) -> None:
    model = _wrapped(kind)
    x = _input(kind)
    with torch.no_grad():
        out = model(x, torch.tensor([5, 900]))
        ref = model.network(x)
    assert out.shape == (B, 1, *x.shape[2:])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    reps, ref_reps = model.forward_representations(x), model.network.forward_representations(x)
    assert set(reps) == {"head_input", "encoder"}
    for k in reps:
        torch.testing.assert_close(reps[k], ref_reps[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_output_depends_on_each_volumes_own_timestep(kind) -> None:
    """After randomising the zero-initialised layer, t changes the output; in a batch with timesteps (t0, t1) each
    volume's output equals that volume run alone with its own t (the per-volume broadcast, slices included)."""
    model = _wrapped(kind, randomise=True)
    x = _input(kind)
    with torch.no_grad():
        batch = model(x, torch.tensor([10, 700]))
        alone = [model(x[i : i + 1], torch.tensor([t])) for i, t in enumerate((10, 700))]
        other = model(x, torch.tensor([700, 10]))
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert (batch - other).abs().amax() > 1e-3
    assert (batch - model.network(x)).abs().amax() > 1e-3


def test_film_is_applied_to_the_final_layers_input() -> None:
    """Hand-computed FiLM: the final layer receives h * (1 + scale) + shift with (scale, shift) = MLP(emb(t))."""
    net = _network("upernet").eval()
    layer = net.get_submodule(final_layer_name(net))
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))  # registered first: sees h unmodulated
    model = _wrapped_from(net)
    layer.register_forward_pre_hook(lambda m, a: seen.update(film=a[0]))  # registered after: sees the modulated h
    t = torch.tensor([3, 640])
    with torch.no_grad():
        model(_input("upernet"), t)
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        scale, shift = model.time_mlp(get_timestep_embedding(t.float(), 16)).chunk(2, dim=1)
    expected = seen["h"] * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]
    torch.testing.assert_close(seen["film"], expected, rtol=1e-5, atol=1e-6)


def _wrapped_from(net: nn.Module) -> TimestepConditioned:
    model = TimestepConditioned(net, embed_dim=16).eval()
    with torch.no_grad():
        model.time_mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        model.time_mlp[-1].bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    return model


@pytest.mark.parametrize("kind", ["upernet", "provicnet"])
def test_timestep_forms_agree(kind) -> None:
    """DiffusionInferer.sample passes a float (1,) tensor, training a long (B,) tensor; a scalar works too."""
    model = _wrapped(kind, randomise=True)
    x = _input(kind)
    with torch.no_grad():
        full = model(x, torch.tensor([250, 250]))
        one = model(x, torch.Tensor((250,)))
        scalar = model(x, 250)
    torch.testing.assert_close(one, full, rtol=0, atol=0)
    torch.testing.assert_close(scalar, full, rtol=0, atol=0)


def test_gradients_reach_the_mlp_and_the_frozen_encoder_stays_frozen() -> None:
    model = _wrapped("upernet")
    freeze_profound_finetune(model.network)
    model.train()
    model(_input("upernet"), torch.tensor([1, 999])).square().mean().backward()
    last, first = model.time_mlp[-1], model.time_mlp[0]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0  # the zero layer learns first
    assert all(p.grad is None for p in model.network.encoder.parameters())
    assert model.network.decoder.decode_head.classifier.weight.grad is not None
    model.zero_grad()
    with torch.no_grad():
        last.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    model(_input("upernet"), torch.tensor([1, 999])).square().mean().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_deepcopy_keeps_its_own_modulation() -> None:
    model = _wrapped("upernet", randomise=True)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.time_mlp[-1].weight.zero_()
        clone.time_mlp[-1].bias.zero_()
        x, t = _input("upernet"), torch.tensor([100, 200])
        torch.testing.assert_close(clone(x, t), clone.network(x), rtol=0, atol=0)
        assert (model(x, t) - model.network(x)).abs().amax() > 1e-3


def test_errors_are_clear() -> None:
    net = _network("upernet")
    with pytest.raises(ValueError, match="no submodule 'decoder.nope'"):
        TimestepConditioned(net, final_layer="decoder.nope")
    with pytest.raises(ValueError, match="is a UperNetConvModule; it must be a Conv"):
        TimestepConditioned(net, final_layer="decoder.decode_head.fpn_bottleneck")
    with pytest.raises(ValueError, match="no known final layer for Sequential"):
        TimestepConditioned(nn.Sequential(nn.Conv3d(2, 1, 1)))
    with pytest.raises(ValueError, match="representation_timestep"):
        TimestepConditioned(net, representation_timestep=1000)
    model = TimestepConditioned(net)
    x = _input("upernet")
    with pytest.raises(ValueError, match=r"timesteps must be a scalar, \(1,\) or \(B,\)"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="context must be None"):
        model(x, torch.tensor([1, 2]), context=x)


def test_an_explicit_linear_final_layer_is_modulated_channels_last() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = TimestepConditioned(net, final_layer="2", embed_dim=8)
    with torch.no_grad():
        model.time_mlp[-1].bias.copy_(torch.cat([torch.full((6,), 1.0), torch.zeros(6)]))  # scale 1: h * 2
    x = torch.randn(2, 5, 4)
    expected = net[2](2 * net[1](net[0](x)))
    torch.testing.assert_close(model(x, torch.tensor([0, 1])), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Full-resolution refinement


@pytest.mark.parametrize("kind", ["upernet", "provicnet"])
def test_refinement_starts_at_zero_so_the_output_is_the_network(kind) -> None:
    model = TimestepConditioned(_network(kind), embed_dim=16, refine_channels=4).eval()
    x, t = _input(kind), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), model.network(x))  # time_mlp and refine.out both start at zero
        model.refine.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
        y900, y10 = model(x, t), model(x, torch.tensor([10, 10]))
    assert not torch.equal(y900, model.network(x))
    assert torch.equal(y900[0], y10[0]) and not torch.equal(y900[1], y10[1])  # the timestep reaches the refinement
    assert model.refine.in_channels == 3  # noisy DWI, T2W and the network's prediction


def test_refinement_trains_under_the_finetune_freeze() -> None:
    model = TimestepConditioned(_network("upernet"), embed_dim=16, refine_channels=4)
    freeze_profound_finetune(model.network)
    assert all(p.requires_grad for p in model.refine.parameters())
    model.train()
    model(_input("upernet"), torch.tensor([1, 999])).square().mean().backward()
    assert model.refine.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.network.encoder.parameters())


def test_refinement_errors_and_kinds() -> None:
    with pytest.raises(ValueError, match="refine_channels >= 0"):
        TimestepConditioned(_network("upernet"), refine_channels=-1)
    model = TimestepConditioned(_network("upernet"), embed_dim=16, refine_channels=4, in_channels=3)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W, D\)"):
        model(_input("upernet"), 5)
    assert model.representation_kinds() == {"head_input": "decoder_features", "encoder": "encoder_pooled"}
    assert not any(k.startswith("refine.") for k in TimestepConditioned(_network("upernet")).state_dict())
