"""A foundation model of your own, registered without editing the repository (README, "Bring your own foundation
model"; docs/byo_foundation_model.md).

``TinyFM`` is a small 3D encoder built from MONAI's network blocks (``Convolution``, ``ResidualUnit``) with a
segmentation head. It shows the contract every study network keeps:

- the pretrained part is the ``encoder`` attribute (``common.networks.load_checkpoint(..., encoder_only=True)`` loads
  the ``encoder.*`` weights into it, from a checkpoint of the whole model or of the encoder alone);
- ``forward(x)`` returns the task output, here ``(B, 2, H, W, D)`` lesion logits;
- ``forward_representations(x)`` returns the pooled layers the analysis compares, ``{"head_input": (B, F),
  "encoder": (B, E)}`` (paper section 3.2), and ``representation_kinds()`` names what sort of layer each is
  (``common.contract.LAYER_KINDS``);
- a freezing protocol (:func:`freeze_tinyfm_finetune`), applied to the finetune and random-weight runs.

Use it with ``VFM_FOUNDATION_MODELS=examples.byo_fm.tinyfm`` (this module must be importable: run from the
repository root, or put its folder on ``PYTHONPATH``); the bundles are in ``examples/byo_fm/bundles``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from common.foundation_models import FoundationModel, register_fm

__all__ = ["TINYFM", "TinyFMSegmenter", "freeze_tinyfm_finetune"]


class TinyFMSegmenter(nn.Module):
    """Encoder: a stride-2 MONAI ``Convolution`` and a stride-2 ``ResidualUnit`` (total stride 4); head: a 3x3x3
    ``Convolution`` on the encoder's map, then a 1x1x1 convolution to the classes, upsampled trilinearly to the input.

    Args:
        in_channels: input channels (T2W and a diffusion map: 2).
        out_channels: classes (background, lesion: 2).
        features: width of the encoder's first stage; the second has twice as many. Default 8.

    Shapes: ``(B, in_channels, H, W, D) -> (B, out_channels, H, W, D)``, H, W, D divisible by 4.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 2, features: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            Convolution(3, in_channels, features, strides=2),
            ResidualUnit(3, features, 2 * features, strides=2),
        )
        self.head = nn.Sequential(Convolution(3, 2 * features, 2 * features))
        self.final = nn.Conv3d(2 * features, out_channels, kernel_size=1)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.encoder(x)
        return encoded, self.head(encoded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D) -> (B, K, H, W, D)`` logits."""
        _, hidden = self._features(x)
        return F.interpolate(self.final(hidden), size=x.shape[2:], mode="trilinear", align_corners=False)

    def forward_representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"head_input": (B, 2 features), "encoder": (B, 2 features)}``: the final layer's input and the encoder's
        output, each averaged over space."""
        encoded, hidden = self._features(x)
        return {"head_input": hidden.mean(dim=(2, 3, 4)), "encoder": encoded.mean(dim=(2, 3, 4))}

    def representation_kinds(self) -> dict[str, str]:
        return {"head_input": "decoder_features", "encoder": "encoder_pooled"}


def freeze_tinyfm_finetune(model: nn.Module) -> list[str]:
    """The finetune protocol: the encoder frozen, the head trained. Returns the trainable parameters' names."""
    model.encoder.requires_grad_(False)
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


TINYFM = register_fm(
    FoundationModel(
        id="tinyfm", title="TinyFM (MONAI blocks, example)", pretraining="none (weights given with --weights)",
        pretrain_bundle=None, freeze="examples.byo_fm.tinyfm.freeze_tinyfm_finetune",
        checkpoint_formats=("state_dict",), common_layer=None, frozen_layers=("encoder",),
        note="an example FM; its encoder is frozen under finetune, so its pooled output does not move",
        bundles="examples/byo_fm/bundles",
    )
)  # fmt: skip
