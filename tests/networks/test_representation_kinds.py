"""Every study network names the kind (``common.contract.LAYER_KINDS``) of every layer ``forward_representations``
records, so the analysis can tell when a correlation across tasks mixes layers of different kinds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from common.contract import LAYER_KINDS, LAYERS
from common.networks import (
    ConditionalDiffusionUNet,
    DinoVisionTransformer,
    ProFoundClassifier,
    ProFoundDense,
    ProFoundSuperRes,
    ProViCNetClassifier,
    ProViCNetDense,
    ProViCNetSuperRes,
    ResidualRestoration,
    ResNet50Classifier,
    TimestepConditioned,
    TransUNet3d,
    UNetSegmenter,
    ViTImageToImage,
    profound_encoder,
)

pytest.importorskip("einops", reason="MONAI's ViT, TransUNet and diffusion attention blocks need einops")


def _vit(in_chans: int = 3) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=28, in_chans=in_chans, embed_dim=48, depth=2, num_heads=3)


TRANSFORMER = {"hidden_size": 16, "mlp_dim": 32, "num_layers": 2, "num_heads": 4}
P, V = (2, 1, 32, 32, 16), (2, 1, 20, 18, 4)  # ProFound-style and ProViCNet-style inputs (B, C, H, W, D)
DECODER, MLP, CONV_HEAD, TOKENS = "decoder_features", "mlp_hidden", "conv_head_input", "backbone_tokens"
ENCODER, BACKBONE, BOTTLENECK = "encoder_pooled", "backbone_pooled", "diffusion_bottleneck"

# name -> (factory, input shape, expected {layer: kind}); the kinds are DESIGN.md section 4's, written out by hand
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, str]]] = {
    "profound_encoder": (lambda: profound_encoder("atto", in_channels=1), P, {"head_input": ENCODER}),
    "profound_classifier": (lambda: ProFoundClassifier("atto", in_channels=1, hidden=8), P, {"head_input": MLP}),
    "profound_dense": (
        lambda: ProFoundDense("atto", in_channels=1, hidden_size=8, auxiliary_channels=4),
        P,
        {"head_input": DECODER},
    ),
    "profound_dense_unetr": (
        lambda: ProFoundDense("atto", in_channels=1, decoder="unetr", feature_size=4),
        P,
        {"head_input": DECODER},
    ),
    "profound_superres": (
        lambda: ProFoundSuperRes("atto", in_channels=1, hidden_size=8, decoder_channels=4),
        P,
        {"head_input": DECODER},
    ),
    "provicnet_classifier": (
        lambda: ProViCNetClassifier(hidden_dim=8, slice_size=28, backbone=_vit()),
        V,
        {"head_input": MLP, "encoder": BACKBONE},
    ),
    "provicnet_dense": (
        lambda: ProViCNetDense(slice_size=28, backbone=_vit()),
        V,
        {"head_input": CONV_HEAD, "encoder": BACKBONE},
    ),
    "provicnet_superres": (
        lambda: ProViCNetSuperRes(slice_size=28, backbone=_vit()),
        V,
        {"head_input": TOKENS, "encoder": BACKBONE},
    ),
    "resnet50": (lambda: ResNet50Classifier(widen_factor=0.125), (2, 1, 16, 16, 8), {"head_input": ENCODER}),
    "unet": (
        lambda: UNetSegmenter(in_channels=1, channels=(4, 8, 16), strides=(2, 2)),
        (2, 1, 16, 16, 8),
        {"head_input": DECODER},
    ),
    "vit": (
        lambda: ViTImageToImage(img_size=(32, 32, 16), patch_size=(16, 16, 16), deconv_chns=4, **TRANSFORMER),
        P,
        {"head_input": DECODER},
    ),
    "transunet": (
        lambda: TransUNet3d(img_size=(32, 32, 16), channels=(4, 8), strides=(2, 2), head_channels=4, **TRANSFORMER),
        P,
        {"head_input": DECODER},
    ),
    "ddpm": (
        lambda: ConditionalDiffusionUNet(channels=(8, 16, 16), norm_num_groups=8, num_head_channels=8),
        (2, 2, 16, 16, 8),
        {"head_input": DECODER, "encoder": BOTTLENECK},
    ),
    "timestep_profound": (
        lambda: TimestepConditioned(
            ProFoundDense("atto", in_channels=2, hidden_size=8, auxiliary_channels=4), embed_dim=16, refine_channels=4
        ),
        (2, 2, 32, 32, 16),
        {"head_input": DECODER},
    ),
    "timestep_provicnet": (
        lambda: TimestepConditioned(ProViCNetDense(n_modalities=2, slice_size=28, backbone=_vit(6)), embed_dim=16),
        (2, 2, 20, 18, 4),
        {"head_input": CONV_HEAD, "encoder": BACKBONE},
    ),
    "restoration_profound": (
        lambda: ResidualRestoration(
            ProFoundSuperRes("atto", in_channels=1, hidden_size=8, decoder_channels=4), scale=(1, 1, 2)
        ),
        P,
        {"head_input": DECODER},
    ),
    "restoration_provicnet": (
        lambda: ResidualRestoration(ProViCNetSuperRes(slice_size=28, backbone=_vit()), scale=(1, 1, 2)),
        V,
        {"head_input": TOKENS, "encoder": BACKBONE},
    ),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_recorded_layer_has_a_known_kind(name: str) -> None:
    factory, shape, expected = NETWORKS[name]
    torch.manual_seed(0)
    net = factory().eval()
    with torch.no_grad():
        reps = net.forward_representations(torch.rand(shape))
    kinds = net.representation_kinds()
    assert set(kinds) == set(reps) == set(LAYERS)
    assert set(kinds.values()) <= set(LAYER_KINDS)
    assert kinds == {"encoder": ENCODER, **expected}  # ENCODER unless the case says otherwise
