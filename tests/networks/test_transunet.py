from __future__ import annotations

import pytest
import torch

pytest.importorskip("einops", reason="MONAI's TransformerBlock needs einops")

from common.networks.transunet import TransUNet3d  # noqa: E402

SMALL = {"channels": (4, 8, 8, 16), "hidden_size": 16, "mlp_dim": 32, "num_layers": 2, "num_heads": 4}
FEW_SLICES = ((2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1))  # total stride (16, 16, 4)


def _net(**kwargs: object) -> TransUNet3d:
    torch.manual_seed(0)
    return TransUNet3d(**{"head_channels": 6, **SMALL, **kwargs}).eval()


@pytest.mark.parametrize(
    ("kwargs", "in_size", "out_shape"),
    [
        ({"img_size": (64, 64, 16)}, (64, 64, 16), (1, 1, 64, 64, 32)),
        ({"img_size": (32, 32, 8), "strides": FEW_SLICES}, (32, 32, 8), (1, 1, 32, 32, 16)),
        ({"img_size": (32, 32, 16), "scale": (1, 1, 1), "out_channels": 3}, (32, 32, 16), (1, 3, 32, 32, 16)),
        ({"img_size": (32, 32, 16), "scale": (2, 2, 1), "in_channels": 2}, (32, 32, 16), (1, 1, 64, 64, 16)),
        # another size than img_size: position embeddings interpolated from a 2x2x2 to a 4x2x4 grid
        ({"img_size": (32, 32, 8), "strides": FEW_SLICES}, (64, 32, 16), (1, 1, 64, 32, 32)),
    ],
)
def test_shapes(kwargs: dict, in_size: tuple, out_shape: tuple) -> None:
    net = _net(**kwargs)
    x = torch.randn(1, net.in_channels, *in_size)
    y = net(x)
    assert y.shape == out_shape
    assert torch.isfinite(y).all()
    reps = net.forward_representations(x)
    assert reps["head_input"].shape == (1, 6)
    assert reps["encoder"].shape == (1, SMALL["hidden_size"])


def test_total_stride_and_grid() -> None:
    net = _net(img_size=(32, 32, 8), strides=FEW_SLICES)
    assert net.total_stride == (16, 16, 4)
    assert net.grid_size == (2, 2, 2)
    assert net.position_embedding.shape == (1, 8, SMALL["hidden_size"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"img_size": (30, 32, 16)},  # 30 not divisible by 16
        {"img_size": (32, 32, 8)},  # 8 < total stride 16 along D
        {"strides": (2, 2, 2)},  # one stride per stage needed
        {"channels": (8,), "strides": (2,)},
        {"hidden_size": 18},  # not divisible by 4 heads
        {"scale": (1, 1, 0)},
        {"strides": ((2, 2), 2, 2, 2)},
        {"dropout_rate": 1.0},
        {"head_channels": 0},
    ],
)
def test_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransUNet3d(**{**SMALL, "img_size": (32, 32, 16), **kwargs})


@pytest.mark.parametrize(("shape", "match"), [((1, 1, 32, 32, 24), "divisible"), ((1, 2, 32, 32, 16), "expected")])
def test_bad_input(shape: tuple, match: str) -> None:
    net = _net(img_size=(32, 32, 16))
    with pytest.raises(ValueError, match=match):
        net(torch.randn(*shape))


def test_representations_are_head_input_and_tokens() -> None:
    """Independent reference: hooks on the real forward pass (input of the head, output of the final LayerNorm)."""
    net = _net(img_size=(32, 32, 8), strides=FEW_SLICES)
    seen: dict[str, torch.Tensor] = {}
    net.head.register_forward_hook(lambda m, i, o: seen.update(head_in=i[0], out=o))
    net.norm.register_forward_hook(lambda m, i, o: seen.update(tokens=o))
    x = torch.randn(2, 1, 32, 32, 8)
    y = net(x)
    reps = net.forward_representations(x)
    assert seen["head_in"].shape == (2, 6, 32, 32, 8)
    torch.testing.assert_close(reps["head_input"], seen["head_in"].mean(dim=(2, 3, 4)))
    torch.testing.assert_close(reps["encoder"], seen["tokens"].mean(dim=1))
    torch.testing.assert_close(net.head(seen["head_in"]), y)


def test_super_resolution_head_is_subpixel_on_slice_axis() -> None:
    """With scale (1, 1, 2), output slices 2k and 2k+1 come from sub-pixel channels 0 and 1 of the head conv."""
    net = _net(img_size=(32, 32, 16))
    seen: dict[str, torch.Tensor] = {}
    net.head.conv.register_forward_hook(lambda m, i, o: seen.update(conv=o))
    y = net(torch.randn(1, 1, 32, 32, 16))
    torch.testing.assert_close(y[:, 0, :, :, 0::2], seen["conv"][:, 0])
    torch.testing.assert_close(y[:, 0, :, :, 1::2], seen["conv"][:, 1])


@pytest.mark.parametrize("kwargs", [{"img_size": (32, 32, 16)}, {"img_size": (32, 32, 8), "strides": FEW_SLICES}])
def test_gradient_reaches_every_parameter(kwargs: dict) -> None:
    net = _net(**kwargs).train()
    x = torch.randn(2, 1, *kwargs["img_size"])
    loss = net(x).square().mean() + sum(v.square().mean() for v in net.forward_representations(x).values())
    loss.backward()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.norm_cross_attn.{w}" for i in range(2) for w in ("weight", "bias")}
    for name, p in net.named_parameters():
        if name in frozen:
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scale", [(1, 1, 1), (1, 1, 2)])
def test_torchscript_with_conv_and_subpixel_heads(scale: tuple[int, int, int]) -> None:
    net = _net(img_size=(32, 32, 16), scale=scale)
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 64, 32, 16)  # interpolated position embeddings in the scripted path too
    torch.testing.assert_close(scripted(x), net(x))
