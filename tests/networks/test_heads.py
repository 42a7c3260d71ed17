from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.networks.heads import MLPHead, SubpixelUpsample3dHead, pixel_shuffle_3d


def _shuffle_by_loops(x: torch.Tensor, scale: tuple[int, int, int]) -> torch.Tensor:
    s0, s1, s2 = scale
    b, c, nx, ny, nz = x.shape
    r = s0 * s1 * s2
    out = torch.empty(b, c // r, nx * s0, ny * s1, nz * s2, dtype=x.dtype)
    for ch in range(c // r):
        for i in range(s0):
            for j in range(s1):
                for k in range(s2):
                    out[:, ch, i::s0, j::s1, k::s2] = x[:, ch * r + (i * s1 + j) * s2 + k]
    return out


@pytest.mark.parametrize("scale", [(1, 1, 2), (2, 1, 1), (2, 3, 2), (1, 1, 1)])
def test_pixel_shuffle_3d_matches_loop_reference(scale):
    r = scale[0] * scale[1] * scale[2]
    x = torch.randn(2, 3 * r, 2, 3, 4)
    out = pixel_shuffle_3d(x, scale)
    assert out.shape == (2, 3, 2 * scale[0], 3 * scale[1], 4 * scale[2])
    torch.testing.assert_close(out, _shuffle_by_loops(x, scale), rtol=0, atol=0)


def test_pixel_shuffle_3d_equals_torch_2d_per_slice():
    x = torch.randn(1, 8, 3, 5, 4)
    out = pixel_shuffle_3d(x, (2, 2, 1))
    for z in range(4):
        torch.testing.assert_close(out[..., z], F.pixel_shuffle(x[..., z], 2), rtol=0, atol=0)


def test_pixel_shuffle_3d_slice_axis_hand_example():
    # two sub-pixel channels interleave along D: [a0, a1] and [b0, b1] -> a0 b0 a1 b1
    x = torch.tensor([[0.0, 1.0], [10.0, 11.0]]).reshape(1, 2, 1, 1, 2)
    out = pixel_shuffle_3d(x, (1, 1, 2))
    assert out.flatten().tolist() == [0.0, 10.0, 1.0, 11.0]


@pytest.mark.parametrize("bad", [(1, 2), (0, 1, 2), (1, 1, -2)])
def test_pixel_shuffle_3d_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match="scale"):
        pixel_shuffle_3d(torch.zeros(1, 4, 2, 2, 2), bad)


def test_pixel_shuffle_3d_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle_3d(torch.zeros(1, 3, 2, 2, 2), (1, 1, 2))


@pytest.mark.parametrize("scale", [(1, 1, 2), (2, 2, 1), (1, 2, 3)])
def test_subpixel_head_shape_and_icnr(scale):
    head = SubpixelUpsample3dHead(in_channels=5, out_channels=2, scale=scale, kernel_size=3)
    x = torch.randn(2, 5, 4, 4, 3)
    y = head(x)
    assert y.shape == (2, 2, 4 * scale[0], 4 * scale[1], 3 * scale[2])
    # ICNR: at initialisation every sub-pixel copy of a voxel is equal (nearest-neighbour-like upsampling)
    base = y[:, :, :: scale[0], :: scale[1], :: scale[2]]
    nearest = base.repeat_interleave(scale[0], 2).repeat_interleave(scale[1], 3).repeat_interleave(scale[2], 4)
    torch.testing.assert_close(y, nearest)
    assert y.std() > 0


def test_subpixel_head_rejects_bad_args():
    with pytest.raises(ValueError, match="kernel_size"):
        SubpixelUpsample3dHead(4, 1, kernel_size=2)
    with pytest.raises(ValueError, match="channels"):
        SubpixelUpsample3dHead(0, 1)
    with pytest.raises(ValueError, match="expected"):
        SubpixelUpsample3dHead(4, 1)(torch.zeros(1, 3, 2, 2, 2))


def test_mlp_head_official_layout_names():
    head = MLPHead(in_channels=768, out_channels=4, hidden_channels=256)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["0.weight"] == (256, 768)
    assert shapes["1.running_mean"] == (256,)
    assert shapes["3.weight"] == (4, 256)
    assert shapes["3.bias"] == (4,)
    assert "2.weight" not in shapes  # ReLU has no parameters


def test_mlp_head_hand_computed():
    head = MLPHead(in_channels=2, out_channels=1, hidden_channels=2, norm=None, act="relu")
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.0]]))
        head[0].bias.copy_(torch.tensor([0.0, -1.0]))
        head[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        head[2].bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    # hidden: [2, 5] and relu([-2, 1]) = [0, 1]; outputs 2 + 5 + 0.5 and 0 + 1 + 0.5
    torch.testing.assert_close(head.forward_features(x), torch.tensor([[2.0, 5.0], [0.0, 1.0]]))
    torch.testing.assert_close(head(x), torch.tensor([[7.5], [1.5]]))


@pytest.mark.parametrize(
    ("hidden", "norm", "dropout", "n_layers", "feat"),
    [(256, "batch", 0.0, 4, 256), ((32, 16), "layer", 0.1, 9, 16), ((), None, 0.0, 1, 8)],
)
def test_mlp_head_variants(hidden, norm, dropout, n_layers, feat):
    head = MLPHead(8, 3, hidden_channels=hidden, norm=norm, act="gelu", dropout=dropout)
    assert len(head) == n_layers
    x = torch.randn(4, 8)
    assert head(x).shape == (4, 3)
    assert head.forward_features(x).shape == (4, feat)


@pytest.mark.parametrize(
    "kwargs", [{"norm": "group"}, {"act": "tanh"}, {"dropout": 1.0}, {"hidden_channels": 0}, {"in_channels": 0}]
)
def test_mlp_head_rejects_bad_args(kwargs):
    args = {"in_channels": 8, "out_channels": 2, **kwargs}
    with pytest.raises(ValueError):
        MLPHead(**args)


def test_subpixel_head_exports_to_torchscript_with_the_same_output() -> None:
    head = SubpixelUpsample3dHead(in_channels=4, out_channels=2, scale=(1, 2, 2))
    x = torch.randn(2, 4, 3, 4, 5)
    scripted = torch.jit.script(head)
    assert torch.equal(scripted(x), head(x))
    assert scripted(x).shape == (2, 2, 3, 8, 10)
