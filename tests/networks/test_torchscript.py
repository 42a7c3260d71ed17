"""TorchScript export of the foundation-model networks (MONAI's ``ckpt_export`` runs ``torch.jit.script``).

Each network is scripted, saved and loaded back through a file, and must give the eager output on the same input
with the same state-dict keys; its validation errors still raise inside the scripted graph, and
``forward_representations`` (not compiled; eager only) keeps working on the same classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from common.networks import (
    ProFoundClassifier,
    ProFoundDense,
    ProFoundSuperRes,
    ProViCNetClassifier,
    ProViCNetDense,
    ProViCNetSuperRes,
)

UPERNET = {"hidden_size": 32, "auxiliary_channels": 16}
PROFOUND_INPUT = (1, 2, 32, 32, 16)  # (B, C, H, W, D); every spatial size divisible by 16
PROVICNET_INPUT = (1, 2, 30, 26, 4)  # (B, M, H, W, D); slices are resized to slice_size, outputs back to (H, W)

# name -> (factory, input shape, output shape)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "profound_classifier": (
        lambda: ProFoundClassifier(encoder_size="atto", in_channels=2, num_classes=3, hidden=16),
        PROFOUND_INPUT,
        (1, 3),
    ),
    "profound_dense_upernet": (
        lambda: ProFoundDense(encoder_size="atto", in_channels=2, out_channels=3, **UPERNET),
        PROFOUND_INPUT,
        (1, 3, 32, 32, 16),
    ),
    "profound_dense_unetr": (
        lambda: ProFoundDense(encoder_size="atto", in_channels=2, out_channels=3, decoder="unetr", feature_size=8),
        PROFOUND_INPUT,
        (1, 3, 32, 32, 16),
    ),
    "profound_superres_upernet": (
        lambda: ProFoundSuperRes(encoder_size="atto", in_channels=2, decoder_channels=8, hidden_size=32),
        PROFOUND_INPUT,
        (1, 1, 32, 32, 32),
    ),
    "profound_superres_unetr": (
        lambda: ProFoundSuperRes(
            encoder_size="atto", in_channels=2, decoder="unetr", decoder_channels=8, feature_size=8, scale=(2, 1, 1)
        ),
        PROFOUND_INPUT,
        (1, 1, 64, 32, 16),
    ),
    "provicnet_classifier": (
        lambda: ProViCNetClassifier(num_classes=3, hidden_dim=16, n_modalities=2, slice_size=28, backbone_size="tiny"),
        PROVICNET_INPUT,
        (1, 3),
    ),
    "provicnet_dense": (
        lambda: ProViCNetDense(out_channels=3, n_modalities=2, slice_size=28, backbone_size="tiny", slice_batch_size=3),
        PROVICNET_INPUT,
        (1, 3, 30, 26, 4),
    ),
    "provicnet_superres": (
        lambda: ProViCNetSuperRes(depth_factor=2, n_modalities=2, slice_size=28, backbone_size="tiny"),
        PROVICNET_INPUT,
        (1, 1, 30, 26, 8),
    ),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, in_shape, _ = NETWORKS[name]
    torch.manual_seed(0)
    net = factory().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights everywhere (GRN, LayerScale, norms), not the zero/identity init
        for p in net.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    return net, torch.randn(in_shape, generator=g)


def _script_roundtrip(net: nn.Module, path: Path) -> torch.jit.ScriptModule:
    torch.jit.save(torch.jit.script(net), str(path))
    return torch.jit.load(str(path))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_scripted_network_matches_eager_after_save_and_load(name: str, tmp_path: Path) -> None:
    net, x = _build(name)
    loaded = _script_roundtrip(net, tmp_path / f"{name}.pt")
    assert list(loaded.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        expected, actual = net(x), loaded(x)
    assert expected.shape == NETWORKS[name][2]
    assert expected.abs().amax() > 0
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "bad_shape", "message"),
    [
        ("profound_dense_upernet", (1, 2, 32, 32, 20), "must be divisible by 16"),
        ("provicnet_classifier", (1, 3, 28, 28, 4), r"expected input \(B, 2, H, W, D\), got \[1, 3, 28, 28, 4\]"),
    ],
)
def test_scripted_network_keeps_its_input_checks(name: str, bad_shape: tuple[int, ...], message: str) -> None:
    net, _ = _build(name)
    scripted = torch.jit.script(net)
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(bad_shape))
    with pytest.raises(torch.jit.Error, match=message):
        scripted(torch.zeros(bad_shape))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_forward_representations_still_work_in_eager_mode(name: str) -> None:
    net, x = _build(name)
    with torch.no_grad():
        reps = net.forward_representations(x)
        out = net(x)
    assert set(reps) == {"head_input", "encoder"}
    for value in reps.values():
        assert value.ndim == 2 and value.shape[0] == x.shape[0] and torch.isfinite(value).all()
    if "classifier" in name:  # the head input is what the last linear layer turns into the logits
        torch.testing.assert_close(net.head[-1](reps["head_input"]), out)
