"""Timestep conditioning of a dense study network, so that it can act as a DDPM noise predictor (modality
translation, DESIGN.md section 2).

The foundation models' dense networks (:class:`~common.networks.ProFoundDense`,
:class:`~common.networks.ProViCNetDense`) map an image to an image and know nothing of a diffusion timestep. A DDPM
(Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020) needs ``eps_theta(x_t, t, c)``.
:class:`TimestepConditioned` adds ``t`` by FiLM (Perez et al., "FiLM: Visual Reasoning with a General Conditioning
Layer", AAAI 2018) on the input of the network's final prediction layer; the condition ``c`` (the T2W) enters by
channel concatenation with ``x_t`` (Saharia et al., "Palette", SIGGRAPH 2022), as for the specialised
:class:`~common.networks.ConditionalDiffusionUNet`.
"""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from .blocks.refinement import FullResolutionRefinement
from .profound import ProFoundDense
from .provicnet import ProViCNetDense

__all__ = ["FINAL_LAYERS", "TimestepConditioned", "final_layer_name"]

#: (network class name, decoder name or None) -> dotted name of the final prediction layer (``get_submodule``)
FINAL_LAYERS: dict[tuple[str, str | None], str] = {
    ("ProFoundDense", "upernet"): "decoder.decode_head.classifier",  # 1x1x1 Conv3d at stride 4, then resized
    ("ProFoundDense", "unetr"): "decoder.out.conv.conv",  # the Conv3d inside MONAI's UnetOutBlock
    ("ProViCNetDense", None): "head.segmentation_conv.9",  # last Conv2d of the upsampling head, slice-wise
}

_MODULATED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def final_layer_name(network: nn.Module) -> str:
    """The dotted name of ``network``'s final prediction layer (:data:`FINAL_LAYERS`): the layer whose input is the
    ``head_input`` representation of ``forward_representations``.

    Raises:
        ValueError: for a network this module does not know; pass ``final_layer`` explicitly then.
    """
    if isinstance(network, ProFoundDense):
        key: tuple[str, str | None] = ("ProFoundDense", network.decoder_name)
    elif isinstance(network, ProViCNetDense):
        key = ("ProViCNetDense", None)
    else:
        raise ValueError(
            f"final_layer_name: no known final layer for {type(network).__name__}; supported: ProFoundDense "
            "(upernet, unetr) and ProViCNetDense. Give final_layer as a dotted submodule name."
        )
    return FINAL_LAYERS[key]


class TimestepConditioned(nn.Module):
    """A dense study network as a DDPM noise predictor: ``eps_theta(x_t, t) = network(x_t)`` with the input of its
    final prediction layer modulated by the timestep, FiLM-style (Perez et al. 2018).

    With ``h`` the (unchanged) features entering the final layer ``W``, the layer reads
    ``h * (1 + scale(t)) + shift(t)`` per channel, where ``(scale, shift) = MLP(sinusoidal(t))`` (the embedding of
    Ho et al. 2020, MONAI's ``get_timestep_embedding``; MLP = Linear-SiLU-Linear). The final layer then outputs a
    t-dependent linear combination of the features, ``W diag(1 + scale(t)) h + W shift(t)``, which is what the
    noise needs: ``eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)`` mixes the input (the network sees x_t by
    concatenation) and a clean-image estimate with weights that depend on t only. The last Linear is
    zero-initialised, so at initialisation the wrapper computes exactly the wrapped network. The modulation acts
    after the encoder, so the frozen-encoder finetune protocols (applied to :attr:`network`) keep their meaning; the
    MLP is always trainable, as part of the task head.

    The modulation is a forward pre-hook on the final layer, active only during :meth:`forward`. For a slice-wise 2D
    network (ProViCNetDense, whose final layer sees ``(B * D, C, h, w)`` with row ``b * D + k`` = slice k of volume
    b) each volume's scale and shift are repeated over its D slices; for 3D maps they broadcast over space; for a
    Linear final layer over all but the last (channel) axis.

    Full-resolution path (``refine_channels > 0``; off by default, on in the modality-translation bundles): the FM
    dense heads predict at stride 4 (UperNet) or at the patch grid (ProViCNet) and resize, so a
    :class:`~common.networks.blocks.FullResolutionRefinement` at the input resolution reads ``cat[x_t, T2W,
    network output]`` and the timestep embedding (added to its first hidden layer) and adds its output:
    ``eps_theta = network(x) + refine(cat[x, network(x)], sinusoidal(t))``. It is not a residual over the input (the
    output is noise); its last layer is zero-initialised, so at initialisation the output is still exactly the wrapped
    network's. It sits outside :attr:`network`, so it trains under the freezing protocols. A deviation from the paper,
    which does not describe its FM denoisers (DESIGN.md section 2).

    Args:
        network: the dense network, ``(B, C_in, H, W, D) -> (B, C_out, H, W, D)`` with ``C_in`` = noisy DWI + T2W
            channels (2). Kept as :attr:`network`: checkpoints load into and freezing applies to it.
        final_layer: dotted name (``network.get_submodule``) of the final prediction layer, a Conv1d/2d/3d or
            Linear; None picks it with :func:`final_layer_name`. Default None.
        num_train_timesteps: number of training timesteps T; ``t`` must be in ``[0, T)``. Default 1000.
        embed_dim: width of the sinusoidal embedding and of the MLP's hidden layer. Default 128.
        representation_timestep: kept for config parity with :class:`~common.networks.ConditionalDiffusionUNet`;
            the representations here do not depend on t (see :meth:`forward_representations`). Default 0.
        in_channels: ``C_in``, read by the refinement (unused without it). Default 2 (noisy DWI, T2W).
        refine_channels: width of the full-resolution refinement's hidden layers; 0 builds none. Default 0.
        refine_layers: hidden 3x3x3 convolutions of the refinement before its zero-initialised one. Default 1.

    Shapes: ``forward``: ``(B, C_in, H, W, D)``, timesteps ``(B,)``, ``(1,)`` or scalar (broadcast) ->
    ``(B, C_out, H, W, D)``; ``forward_representations``: as the wrapped network's.

    Raises:
        ValueError: when ``final_layer`` is missing or not Conv/Linear, or arguments are out of range.
    """

    def __init__(
        self,
        network: nn.Module,
        final_layer: str | None = None,
        num_train_timesteps: int = 1000,
        embed_dim: int = 128,
        representation_timestep: int = 0,
        in_channels: int = 2,
        refine_channels: int = 0,
        refine_layers: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"TimestepConditioned: network must be an nn.Module, got {type(network).__name__}.")
        if num_train_timesteps < 1 or embed_dim < 2:
            raise ValueError(
                "TimestepConditioned: num_train_timesteps must be >= 1 and embed_dim >= 2, got "
                f"{num_train_timesteps}, {embed_dim}."
            )
        if not 0 <= representation_timestep < num_train_timesteps:
            raise ValueError(
                f"TimestepConditioned: representation_timestep must be in [0, {num_train_timesteps}), got "
                f"{representation_timestep}."
            )
        if in_channels < 1 or refine_channels < 0 or refine_layers < 1:
            raise ValueError(
                "TimestepConditioned: in_channels and refine_layers must be >= 1 and refine_channels >= 0, got "
                f"{in_channels}, {refine_layers}, {refine_channels}."
            )
        name = final_layer_name(network) if final_layer is None else final_layer
        try:
            layer = network.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"TimestepConditioned: {type(network).__name__} has no submodule {name!r} (final_layer)."
            ) from err
        if not isinstance(layer, _MODULATED):
            raise ValueError(
                f"TimestepConditioned: final_layer {name!r} is a {type(layer).__name__}; it must be a Conv1d/2d/3d "
                "or Linear (the layer that maps the last features to the prediction)."
            )
        self.network = network
        self.final_layer = name
        self.num_train_timesteps = num_train_timesteps
        self.embed_dim = embed_dim
        self.representation_timestep = representation_timestep
        self.channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        self.channels_last = isinstance(layer, nn.Linear)
        self.time_mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, 2 * self.channels)
        )
        nn.init.zeros_(self.time_mlp[-1].weight)
        nn.init.zeros_(self.time_mlp[-1].bias)
        self.in_channels = in_channels
        out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        self.refine: FullResolutionRefinement | None = None
        if refine_channels > 0:
            self.refine = FullResolutionRefinement(
                in_channels + out_channels, out_channels, refine_channels, refine_layers, cond_channels=embed_dim
            )
        self._film: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, shift), each (B, C), during forward
        layer.register_forward_pre_hook(self._modulate)

    def _timesteps(self, timesteps: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
        """A scalar, ``(1,)`` or ``(B,)`` -> ``(B,)`` float32 on ``device``."""
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t.reshape(1)
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(
                f"TimestepConditioned: timesteps must be a scalar, (1,) or (B,) = ({batch},), got {tuple(t.shape)}."
            )
        return t.to(torch.float32).expand(batch)

    def _modulate(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._film is None:
            return None
        h = args[0]
        scale, shift = self._film  # (B, C)
        n, b = h.shape[0], scale.shape[0]
        if n % b:
            raise ValueError(
                f"TimestepConditioned: the final layer sees {n} rows for a batch of {b} volumes; expected a multiple "
                "(slice-wise networks lay volume b's slices out as rows b * D .. b * D + D - 1)."
            )
        if n != b:
            scale, shift = scale.repeat_interleave(n // b, dim=0), shift.repeat_interleave(n // b, dim=0)
        if self.channels_last:
            shape = (n,) + (1,) * (h.ndim - 2) + (self.channels,)  # (N, ..., C)
        else:
            shape = (n, self.channels) + (1,) * (h.ndim - 2)  # (N, C, *spatial)
        scale, shift = scale.reshape(shape).to(h.dtype), shift.reshape(shape).to(h.dtype)
        return (h * (1 + scale) + shift, *args[1:])

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | int | float, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, C_in, H, W, D)``, timesteps ``(B,)`` / ``(1,)`` / scalar -> predicted noise ``(B, C_out, H, W, D)``.

        ``context`` exists for MONAI's ``DiffusionInferer`` (which passes ``context=None`` in ``"concat"`` mode);
        cross-attention conditioning is not supported.
        """
        if context is not None:
            raise ValueError("TimestepConditioned: context must be None; condition by concatenation (mode='concat').")
        t = self._timesteps(timesteps, x.shape[0], x.device)
        embedding = get_timestep_embedding(t, self.embed_dim)  # (B, embed_dim)
        scale, shift = self.time_mlp(embedding).chunk(2, dim=1)  # (B, C) each
        if self.refine is not None and (x.ndim != 5 or x.shape[1] != self.in_channels):
            raise ValueError(f"TimestepConditioned: expected (B, {self.in_channels}, H, W, D), got {list(x.shape)}.")
        self._film = (scale, shift)
        try:
            out = self.network(x)
        finally:
            self._film = None
        if self.refine is None:
            return out
        return out + self.refine(torch.cat([x, out.to(x.dtype)], dim=1), embedding)

    def forward_representations(
        self, x: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The wrapped network's ``forward_representations(x)``: ``{"head_input": (B, F), "encoder": (B, E)}``.

        ``x`` is ``cat([DWI, T2W])`` (the clean target, as :class:`~common.networks.ConditionalDiffusionUNet` at its
        representation timestep). ``head_input`` is pooled from the final layer's input *before* the timestep
        modulation, so it does not depend on t and ``timesteps`` is ignored; at initialisation it equals the
        modulated input at every t.
        """
        return self.network.forward_representations(x)

    def representation_kinds(self) -> dict[str, str]:
        """The wrapped network's ``representation_kinds()`` (the recorded layers are its own)."""
        return self.network.representation_kinds()
