from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from common.metrics import SSIM3DMetric, compute_ssim_3d


def _pair(shape: tuple[int, ...], seed: int, noise: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth structure plus noise, so that local means and variances differ across the volume
    grid = np.meshgrid(*[np.linspace(0, 3, n) for n in shape], indexing="ij")
    a = 0.5 + 0.3 * np.sin(grid[0] + 2 * grid[1]) * np.cos(grid[2]) + 0.1 * rng.standard_normal(shape)
    b = a + noise * rng.standard_normal(shape)
    return a, b


def _skimage(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
    return structural_similarity(a, b, gaussian_weights=True, use_sample_covariance=False, **kwargs)


@pytest.mark.parametrize(
    ("shape", "win_size", "sigma", "data_range"),
    [
        ((16, 16, 16), 7, 1.5, 1.0),
        ((20, 18, 9), 7, 1.5, 2.0),
        ((16, 16, 16), 11, 1.5, 1.0),  # win 11 = 2 r + 1: Wang et al.'s valid region
        ((12, 14, 5), 5, 1.0, 1.0),
        ((10, 12, 3), 3, 1.5, 1.0),  # Gaussian radius 5 > 3 slices: several mirror reflections
    ],
)
@pytest.mark.parametrize("compute_dtype", [torch.float64, "float32"])
def test_against_skimage(
    shape: tuple[int, int, int], win_size: int, sigma: float, data_range: float, compute_dtype: str | torch.dtype
) -> None:
    a, b = _pair(shape, seed=sum(shape))
    expected = _skimage(a, b, sigma=sigma, data_range=data_range, win_size=win_size)
    got = compute_ssim_3d(
        torch.from_numpy(a)[None, None],
        torch.from_numpy(b)[None, None],
        data_range=data_range,
        win_size=win_size,
        sigma=sigma,
        compute_dtype=compute_dtype,
    )
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_batch_and_channels_against_skimage() -> None:
    pairs = [_pair((12, 12, 8), seed=s, noise=0.05 * (s + 1)) for s in range(4)]
    a = torch.from_numpy(np.stack([p[0] for p in pairs])).reshape(2, 2, 12, 12, 8)
    b = torch.from_numpy(np.stack([p[1] for p in pairs])).reshape(2, 2, 12, 12, 8)
    got = compute_ssim_3d(a, b, win_size=5)
    expected = [
        _skimage(a[i].numpy(), b[i].numpy(), sigma=1.5, data_range=1.0, win_size=5, channel_axis=0) for i in range(2)
    ]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert got[0] > got[1]  # the second case has more noise


def test_per_axis_window_against_skimage_map() -> None:
    a, b = _pair((14, 12, 4), seed=3)
    _, ssim_map = _skimage(a, b, sigma=1.5, data_range=1.0, win_size=3, full=True)
    expected = ssim_map[3:-3, 2:-2, 1:-1].mean()
    got = compute_ssim_3d(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], win_size=(7, 5, 3))
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("shape", [(8, 8, 8), (9, 7, 3)])
def test_identity_is_one(shape: tuple[int, int, int]) -> None:
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(compute_ssim_3d(x, x, win_size=3).numpy(), [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(("a", "b", "data_range"), [(0.2, 0.6, 1.0), (0.5, 0.5, 1.0), (10.0, 30.0, 100.0)])
def test_constant_volumes(a: float, b: float, data_range: float) -> None:
    # zero variances: the contrast-structure term is C2 / C2 = 1, SSIM = (2 a b + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # 0.2, 0.6: 0.2401 / 0.4001
    x = torch.full((1, 1, 9, 9, 5), a)
    y = torch.full((1, 1, 9, 9, 5), b)
    assert compute_ssim_3d(x, y, data_range=data_range, win_size=5).item() == pytest.approx(expected, rel=1e-6)


def test_bf16_input() -> None:
    a, b = _pair((12, 12, 6), seed=1)
    a16, b16 = torch.from_numpy(a).bfloat16()[None, None], torch.from_numpy(b).bfloat16()[None, None]
    expected = _skimage(a16.double()[0, 0].numpy(), b16.double()[0, 0].numpy(), sigma=1.5, data_range=1.0, win_size=5)
    assert compute_ssim_3d(a16, b16, win_size=5).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({"win_size": 7}, (8, 8, 4), "exceeds"),
        ({"win_size": 4}, (8, 8, 8), "odd"),
        ({"win_size": (3, 3)}, (8, 8, 8), "sequence of 3"),
        ({"data_range": 0.0}, (8, 8, 8), "> 0"),
        ({"compute_dtype": "float16"}, (8, 8, 8), "compute_dtype"),
    ],
)
def test_invalid(kwargs: dict, shape: tuple[int, int, int], match: str) -> None:
    x = torch.zeros(1, 1, *shape)
    with pytest.raises(ValueError, match=match):
        compute_ssim_3d(x, x, **kwargs)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        compute_ssim_3d(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 7))


def test_cumulative_metric() -> None:
    a, b = _pair((10, 10, 6), seed=0)
    x = torch.from_numpy(np.stack([a, b, a]))[:, None]
    y = torch.from_numpy(np.stack([b, b, a + 0.5]))[:, None]
    metric = SSIM3DMetric(win_size=5, compute_dtype="float32")
    metric(x[:1], y[:1])
    metric(x[1:], y[1:])
    expected = np.mean(
        [_skimage(x[i, 0].numpy(), y[i, 0].numpy(), sigma=1.5, data_range=1.0, win_size=5) for i in range(3)]
    )
    assert metric.aggregate().item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_full_size(dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(1, 1, 224, 224, 96, device="cuda", generator=gen)
    y = (x + 0.1 * torch.randn(x.shape, device="cuda", generator=gen)).clamp(0, 1)
    x, y = x.to(dtype), y.to(dtype)
    got = compute_ssim_3d(x, y, compute_dtype="float32")
    assert got.device.type == "cuda"
    reference = compute_ssim_3d(x.cpu(), y.cpu())
    assert got.cpu().item() == pytest.approx(reference.item(), abs=1e-5)
