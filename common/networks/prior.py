"""A fixed image added to a network's output: the modality-translation denoisers start from the mean training DWI.

A deviation from the paper (Huang et al., ISBI 2026, section 3.1), which does not say how its DDPMs are parameterised
(DESIGN.md section 2). The modality-translation bundles predict the clean DWI (``prediction_type`` ``"sample"``) as
``prior + network(x_t, t)``, ``prior`` being the voxel-wise mean DWI of the training split, the task's trivial
baseline. Measured on the demo profile (ProFound finetune, 240 steps): noise prediction sampled clipped noise (test
SSIM 0.016), velocity prediction 0.06 in one step, clean-image prediction without the prior 0.144, where the mean
training DWI scores 0.220: a head that starts at zero needs more steps than a CPU profile has to reach the
intensities of the target, as the restoration heads did before their residual formulation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .wrapper import WrappedNetwork

__all__ = ["PriorOffset"]


class PriorOffset(WrappedNetwork):
    """``y = network(x, *args, **kwargs) + prior``, ``prior`` a fixed ``(1, C, H, W, D)`` buffer.

    The buffer is part of the state dict (``prior``), so a trained model carries it: evaluation, inference and export
    need no training data. It starts at zero (``y = network(...)``) and is set once from the training split with
    :meth:`fit_mean` (the bundles call it through ``common.bundle.fit_prior``); it is not trained. The
    wrapped network is kept as :attr:`network` (checkpoint loading and the finetune freezing reach it through
    there), and :meth:`forward_representations` / :meth:`representation_kinds` are its own.

    Args:
        network: any network whose output is ``(B, C, H, W, D)``, e.g. a
            :class:`~common.networks.TimestepConditioned` denoiser.
        shape: ``(C, H, W, D)`` of one output.

    Shapes: whatever ``network`` takes -> ``(B, C, H, W, D)``.
    """

    def __init__(self, network: nn.Module, shape: Sequence[int]) -> None:
        super().__init__(network)
        dims = tuple(int(s) for s in shape)
        if len(dims) != 4 or min(dims) < 1:
            raise ValueError(f"PriorOffset: shape must be (C, H, W, D) with positive sizes, got {tuple(shape)}.")
        self.register_buffer("prior", torch.zeros((1, *dims)))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """``network(x, *args, **kwargs) + prior``."""
        out = self.network(x, *args, **kwargs)
        if out.shape[1:] != self.prior.shape[1:]:
            raise ValueError(
                f"PriorOffset: the network's output {list(out.shape)} does not match the prior "
                f"{list(self.prior.shape)}."
            )
        return out + self.prior.to(out.dtype)

    @torch.no_grad()
    def fit_mean(self, items: Iterable[Mapping[str, object]], key: str = "label") -> PriorOffset:
        """Set the prior to the voxel-wise mean of ``item[key]`` ``(C, H, W, D)`` over ``items``; returns ``self``.

        Raises:
            ValueError: when ``items`` is empty or an item is not of the prior's shape.
        """
        total = torch.zeros(self.prior.shape[1:], dtype=torch.float64)
        n = 0
        for item in items:
            value = torch.as_tensor(item[key]).detach().to(device="cpu", dtype=torch.float64)
            if value.shape != total.shape:
                raise ValueError(
                    f"PriorOffset.fit_mean: item {n} has {key!r} of shape {list(value.shape)}, expected "
                    f"{list(total.shape)}."
                )
            total += value
            n += 1
        if n == 0:
            raise ValueError("PriorOffset.fit_mean: no items to average.")
        self.prior.copy_((total / n)[None].to(self.prior.dtype))
        return self
