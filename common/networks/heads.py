"""Prediction heads shared by the foundation-model networks.

- :class:`MLPHead`: an MLP on pooled feature vectors (classification, paper section 2.2). With one hidden layer,
  ``norm="batch"`` and ``act="relu"`` it has the layout and parameter names of ProFound's official classifier head
  (github pipiwang/ProFound, ``models/classifier.py``: Linear, BatchNorm1d, ReLU, Linear).
- :class:`SubpixelUpsample3dHead`: a convolution followed by a 3D pixel shuffle with a per-axis scale (super-resolution,
  paper section 2.2). Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
  Convolutional Neural Network", CVPR 2016; ICNR initialisation from Aitken et al., arXiv 1707.02937. MONAI's
  ``SubpixelUpsample`` only takes one isotropic scale; through-plane super-resolution needs ``(1, 1, 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLPHead", "SubpixelUpsample3dHead", "pixel_shuffle_3d"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLPHead(nn.Sequential):
    """Multi-layer perceptron on feature vectors.

    Layers, in order: for each hidden width ``h``: ``Linear``, optional norm (``BatchNorm1d`` or ``LayerNorm``),
    activation, optional ``Dropout``; then the final ``Linear`` (the prediction layer). Being an ``nn.Sequential``,
    parameter names are indices; with ``hidden_channels=256, norm="batch", act="relu", dropout=0.0`` they are
    ``0.*`` (Linear), ``1.*`` (BatchNorm1d), ``3.*`` (Linear): the official ProFound classifier head.

    Args:
        in_channels: input width ``d``.
        out_channels: output width ``K`` (number of classes).
        hidden_channels: width of each hidden layer; an int for one hidden layer, a sequence for several, an empty
            sequence for a single linear layer. Default 256 (official ``bottleneck_dim``).
        norm: ``"batch"``, ``"layer"`` or ``None``. Default ``"batch"`` (official). ``BatchNorm1d`` needs
            batches of at least 2 images in training mode.
        act: ``"relu"`` or ``"gelu"``. Default ``"relu"``.
        dropout: dropout probability after each activation (0 adds no layer). Default 0.0.

    Shapes: ``forward``: ``(B, d) -> (B, K)``; ``forward_features``: ``(B, d) -> (B, h_last)``, the input of the
    final prediction layer (``h_last = d`` without hidden layers).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int | Sequence[int] = 256,
        norm: str | None = "batch",
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"MLPHead: in/out channels must be >= 1, got {in_channels}, {out_channels}.")
        hidden = [hidden_channels] if isinstance(hidden_channels, int) else list(hidden_channels)
        if any(int(h) < 1 for h in hidden):
            raise ValueError(f"MLPHead: hidden_channels must be positive, got {hidden_channels}.")
        if norm not in ("batch", "layer", None):
            raise ValueError(f"MLPHead: norm must be 'batch', 'layer' or None, got {norm!r}.")
        if act not in _ACTS:
            raise ValueError(f"MLPHead: act must be one of {sorted(_ACTS)}, got {act!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLPHead: dropout must be in [0, 1), got {dropout}.")
        layers: list[nn.Module] = []
        width = in_channels
        for h in hidden:
            layers.append(nn.Linear(width, int(h)))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(int(h)))
            elif norm == "layer":
                layers.append(nn.LayerNorm(int(h)))
            layers.append(_ACTS[act]())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, out_channels))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = width
        self.num_feature_layers = len(layers) - 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the final prediction layer: ``(B, d) -> (B, h_last)``."""
        for i, layer in enumerate(self):  # not self[:-1]: TorchScript cannot call a slice of a Sequential
            if i < self.num_feature_layers:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, K)``."""
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLPHead: expected input (B, {self.in_channels}), got {list(x.shape)}.")
        return self[-1](self.forward_features(x))


def _check_scale(scale: Sequence[int], name: str) -> tuple[int, int, int]:
    values = tuple(int(s) for s in scale)
    if len(values) != 3 or any(s < 1 for s in values):
        raise ValueError(f"{name}: scale must be three positive integers, got {tuple(scale)}.")
    return values  # type: ignore[return-value]


def pixel_shuffle_3d(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """3D pixel shuffle with a per-axis scale ``(s0, s1, s2)``.

    ``(B, C * s0 * s1 * s2, X, Y, Z) -> (B, C, X * s0, Y * s1, Z * s2)`` with
    ``out[b, c, x * s0 + i, y * s1 + j, z * s2 + k] = in[b, c * s0 * s1 * s2 + (i * s1 + j) * s2 + k, x, y, z]``,
    the channel order of ``torch.nn.functional.pixel_shuffle`` extended to three axes.
    """
    s0, s1, s2 = _check_scale(scale, "pixel_shuffle_3d")
    if x.ndim != 5:
        raise ValueError(f"pixel_shuffle_3d: expected (B, C, X, Y, Z), got shape {list(x.shape)}.")
    if x.shape[1] % (s0 * s1 * s2) != 0:
        raise ValueError(f"pixel_shuffle_3d: channels {x.shape[1]} are not divisible by prod(scale) = {s0 * s1 * s2}.")
    return _shuffle(x, s0, s1, s2)


def _shuffle(x: torch.Tensor, s0: int, s1: int, s2: int) -> torch.Tensor:
    """The reshape of :func:`pixel_shuffle_3d` alone, in TorchScript-compatible form (the head calls it)."""
    b, c, nx, ny, nz = x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    r = s0 * s1 * s2
    x = x.reshape(b, c // r, s0, s1, s2, nx, ny, nz)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, X, s0, Y, s1, Z, s2)
    return x.reshape(b, c // r, nx * s0, ny * s1, nz * s2)


class SubpixelUpsample3dHead(nn.Module):
    """Sub-pixel convolution head: convolution to ``C_out * prod(scale)`` channels, then :func:`pixel_shuffle_3d`.

    The convolution is ICNR-initialised (every sub-pixel of one output channel starts with the same kernel), so a
    fresh head upsamples without checkerboard artefacts.

    Args:
        in_channels: ``C_in`` of the feature map.
        out_channels: ``C_out`` of the upsampled output.
        scale: integer upsampling factor per spatial axis. Default ``(1, 1, 2)``: doubles the slice axis ``D`` of a
            ``(B, C, H, W, D)`` map.
        kernel_size: odd kernel size of the convolution (``padding = kernel_size // 2``). Default 3.
        bias: whether the convolution has a bias. Default True.

    Shapes: ``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: Sequence[int] = (1, 1, 2),
        kernel_size: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"SubpixelUpsample3dHead: in/out channels must be >= 1, got {in_channels}, {out_channels}."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SubpixelUpsample3dHead: kernel_size must be a positive odd integer, got {kernel_size}.")
        self.scale = _check_scale(scale, "SubpixelUpsample3dHead")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv = nn.Conv3d(
            in_channels, out_channels * math.prod(self.scale), kernel_size, padding=kernel_size // 2, bias=bias
        )
        self._icnr_init()

    @torch.no_grad()
    def _icnr_init(self) -> None:
        r = math.prod(self.scale)
        base = torch.empty((self.out_channels,) + tuple(self.conv.weight.shape[1:]), device=self.conv.weight.device)
        nn.init.kaiming_normal_(base)
        self.conv.weight.copy_(base.repeat_interleave(r, dim=0))
        if self.conv.bias is not None:
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W, D) -> (B, C_out, H * s0, W * s1, D * s2)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SubpixelUpsample3dHead: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}.")
        return _shuffle(self.conv(x), self.scale[0], self.scale[1], self.scale[2])
