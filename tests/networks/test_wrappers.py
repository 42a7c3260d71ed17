"""The output wrappers of the study networks: PriorOffset (modality translation) and RefinedDense (segmentation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.bundle.downstream import _inner, init_network
from common.networks import PriorOffset, ProFoundDense, RefinedDense, TimestepConditioned, freeze_profound_finetune


def _dense(in_channels: int = 2, out_channels: int = 2) -> ProFoundDense:
    torch.manual_seed(0)
    return ProFoundDense(
        "atto", in_channels=in_channels, out_channels=out_channels, hidden_size=8, auxiliary_channels=4
    )


def _x(c: int = 2) -> torch.Tensor:
    return torch.rand((2, c, 32, 32, 16), generator=torch.Generator().manual_seed(1))


def test_refined_dense_starts_as_the_plain_network_and_then_reads_the_input() -> None:
    model = RefinedDense(_dense(), in_channels=2, out_channels=2)
    plain = model.network
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # the zero-initialised last layer adds exactly 0
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), (x[:, 1] > 0.5).long()).backward()
        optimiser.step()
    with torch.no_grad():
        assert not torch.equal(model(x), plain(x))
    assert model.representation_kinds() == plain.representation_kinds()
    assert set(model.forward_representations(x)) == set(plain.forward_representations(x))
    assert RefinedDense(_dense(), refine_channels=0).refine is None


def test_refined_dense_foreground_prior_starts_every_voxel_at_the_prior() -> None:
    model = RefinedDense(_dense(), foreground_prior=0.01)
    x = _x()
    with torch.no_grad():
        logits, plain = model(x), model.network(x)
    offset = torch.tensor([0.0, math.log(0.01 / 0.99)]).view(1, 2, 1, 1, 1)
    torch.testing.assert_close(logits, plain + offset)  # the plain logits plus the constant prior logit
    # a network whose own logits are equal for both classes gives exactly the prior
    flat = torch.softmax(torch.zeros(1, 2, 1, 1, 1) + offset, dim=1)[0, 1].item()
    assert flat == pytest.approx(0.01)
    for bad in ({"foreground_prior": 0.0}, {"foreground_prior": 1.0}, {"foreground_prior": 0.1, "refine_channels": 0}):
        with pytest.raises(ValueError, match="foreground_prior"):
            RefinedDense(_dense(), **bad)


def test_refined_dense_errors() -> None:
    with pytest.raises(ValueError, match="expected \\(B, 2"):
        RefinedDense(_dense())(torch.zeros(1, 3, 32, 32, 16))
    with pytest.raises(ValueError, match="is not \\[1, 3"):
        RefinedDense(_dense(), out_channels=3)(torch.zeros(1, 2, 32, 32, 16))
    with pytest.raises(ValueError, match="refine_channels >= 0"):
        RefinedDense(_dense(), refine_channels=-1)


def test_prior_offset_adds_the_mean_of_the_items_and_keeps_it_in_the_state_dict(tmp_path) -> None:
    net = TimestepConditioned(_dense(out_channels=1), embed_dim=16)
    model = PriorOffset(net, (1, 32, 32, 16))
    x, t = _x(), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, timesteps=t), net(x, timesteps=t))  # the prior starts at zero
    items = [{"label": torch.rand(1, 32, 32, 16, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    model.fit_mean(items)
    expected = torch.stack([i["label"] for i in items]).double().mean(0).float()
    torch.testing.assert_close(model.prior[0], expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timesteps=t), net(x, timesteps=t) + expected)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = PriorOffset(TimestepConditioned(_dense(out_channels=1), embed_dim=16), (1, 32, 32, 16))
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    torch.testing.assert_close(other.prior, model.prior, rtol=0, atol=0)
    assert not any(p is model.prior for p in model.parameters())  # a buffer: never trained


def test_prior_offset_errors() -> None:
    model = PriorOffset(_dense(out_channels=1), (1, 32, 32, 16))
    with pytest.raises(ValueError, match="no items"):
        model.fit_mean([])
    with pytest.raises(ValueError, match="item 0 has 'label' of shape \\[1, 8, 8, 8\\]"):
        model.fit_mean([{"label": torch.zeros(1, 8, 8, 8)}])
    with pytest.raises(ValueError, match="does not match the prior"):
        PriorOffset(_dense(out_channels=1), (1, 16, 16, 16))(_x())
    with pytest.raises(ValueError, match="shape must be"):
        PriorOffset(_dense(), (32, 32, 16))


def test_init_network_reaches_the_fm_inside_nested_wrappers() -> None:
    """PriorOffset(TimestepConditioned(ProFoundDense)): the freezing protocol applies to the innermost network, the
    wrappers' own layers train."""
    inner = _dense(out_channels=1)
    model = PriorOffset(TimestepConditioned(inner, embed_dim=16, refine_channels=4), (1, 32, 32, 16))
    assert _inner(model) is inner
    init_network(model, "random", freeze=freeze_profound_finetune)
    assert not any(p.requires_grad for p in inner.encoder.parameters())
    assert all(p.requires_grad for p in model.network.time_mlp.parameters())
    assert all(p.requires_grad for p in model.network.refine.parameters())
