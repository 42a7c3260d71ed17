"""The base of the study's output wrappers (:class:`~common.networks.ResidualRestoration`,
:class:`~common.networks.RefinedDense`, :class:`~common.networks.PriorOffset`)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WrappedNetwork"]


class WrappedNetwork(nn.Module):
    """A network that adds to another's output and keeps it as :attr:`network`.

    The bundles' network initialisation (``common.bundle.init_network``) descends ``network`` attributes to load the
    pretrained encoder and apply the freezing protocol, so the wrapper's own layers always train; the recorded
    representations are the wrapped network's (:meth:`forward_representations`, :meth:`representation_kinds`).

    Raises:
        ValueError: when ``network`` is no ``nn.Module`` (naming the subclass).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"{type(self).__name__}: network must be an nn.Module, got {type(network).__name__}.")
        self.network = network

    def forward_representations(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        """The wrapped network's ``forward_representations``."""
        return self.network.forward_representations(*args, **kwargs)

    def representation_kinds(self) -> dict[str, str]:
        """The wrapped network's ``representation_kinds()``."""
        return self.network.representation_kinds()
