"""Networks of the study (DESIGN.md sections 1 and 3).

- ProFound (:mod:`.profound`): the 3D ConvNeXt V2 encoder of the official ProFound code, its UperNet and UNETR-style
  dense decoders, classification and super-resolution heads, FCMAE checkpoint conversion, finetune freezing.
- ProViCNet (:mod:`.provicnet`, :mod:`.dinov2`): the DINOv2 ViT with registers and LayerScale, the 2.5D ProViCNet
  model with slice-position tokens and its heads, DINOv2 hub / official checkpoint conversion, finetune freezing.
- Specialised task models (:mod:`.specialised`, :mod:`.transunet`): MONAI's 3D ResNet-50, UNet, ViTAutoEnc and
  DiffusionModelUNet with the representation contract, and a 3D TransUNet for super-resolution.
- :class:`ResidualRestoration` (:mod:`.restoration`): super-resolution and distortion correction as a correction of
  the trivial baseline through a zero-initialised full-resolution refinement (a deviation from the paper, DESIGN.md
  section 2).
- :class:`RefinedDense` (:mod:`.refined`): the segmentation networks' logits plus a zero-initialised full-resolution
  refinement that reads the input (their heads predict at stride 4 or at the patch grid; a deviation from the paper).
- :class:`PriorOffset` (:mod:`.prior`): a fixed image (the mean training DWI) added to the modality-translation
  denoisers' clean-image prediction.
- :func:`load_checkpoint`: one loader for every format (:mod:`.checkpoint`).

Every study model has ``forward_representations(x) -> {"head_input": (B, d), "encoder": (B, e)}``, the pooled
representations the alignment analysis compares (paper section 3.2), and ``representation_kinds() -> {"head_input":
kind, "encoder": kind}`` naming what sort of layer each is (``common.contract.LAYER_KINDS``).
"""

from __future__ import annotations

from .blocks import GRN, ConvNeXtV2Block, FullResolutionRefinement, LayerNormChannelsFirst
from .checkpoint import CHECKPOINT_FORMATS, detect_checkpoint_format, load_checkpoint, read_checkpoint
from .conditioning import FINAL_LAYERS, TimestepConditioned, final_layer_name
from .decoders import UnetrDecoder3d, UperNetDecoder3d
from .dinov2 import (
    DINOV2_SIZES,
    DinoVisionTransformer,
    dinov2_vitb14_reg,
    dinov2_vitg14_reg,
    dinov2_vitl14_reg,
    dinov2_vits14_reg,
    interpolate_pos_embed,
    provicnet_backbone,
)
from .heads import MLPHead, SubpixelUpsample3dHead, pixel_shuffle_3d
from .prior import PriorOffset
from .profound import (
    PROFOUND_SIZES,
    ProFoundClassifier,
    ProFoundDense,
    ProFoundEncoder,
    ProFoundSuperRes,
    adapt_profound_stem,
    convert_profound_dense,
    convert_profound_fcmae,
    enable_feature_cache,
    freeze_profound_finetune,
    load_profound_checkpoint,
    profound_encoder,
)
from .provicnet import (
    PROVICNET_NORMS,
    SLICE_POOLINGS,
    ConvUpsampleHead,
    ProViCNet,
    ProViCNetClassifier,
    ProViCNetDense,
    ProViCNetEncoder,
    ProViCNetSuperRes,
    SliceAttentionPool,
    convert_dinov2_hub,
    convert_provicnet_official,
    freeze_provicnet_finetune,
    load_provicnet_checkpoint,
    neighbour_slice_indices,
)
from .refined import RefinedDense
from .restoration import ResidualRestoration
from .specialised import (
    SPECIALISED_MODELS,
    ConditionalDiffusionUNet,
    ResNet50Classifier,
    UNetSegmenter,
    ViTImageToImage,
    specialised_network,
)
from .transunet import TransUNet3d
from .wrapper import WrappedNetwork

__all__ = [
    "CHECKPOINT_FORMATS",
    "DINOV2_SIZES",
    "FINAL_LAYERS",
    "GRN",
    "PROFOUND_SIZES",
    "SPECIALISED_MODELS",
    "ConditionalDiffusionUNet",
    "ResNet50Classifier",
    "TransUNet3d",
    "UNetSegmenter",
    "ViTImageToImage",
    "specialised_network",
    "ConvNeXtV2Block",
    "ConvUpsampleHead",
    "DinoVisionTransformer",
    "FullResolutionRefinement",
    "LayerNormChannelsFirst",
    "MLPHead",
    "ProFoundClassifier",
    "ProFoundDense",
    "ProFoundEncoder",
    "ProFoundSuperRes",
    "ProViCNet",
    "ProViCNetClassifier",
    "ProViCNetEncoder",
    "ProViCNetDense",
    "ProViCNetSuperRes",
    "PriorOffset",
    "SliceAttentionPool",
    "RefinedDense",
    "ResidualRestoration",
    "WrappedNetwork",
    "SubpixelUpsample3dHead",
    "TimestepConditioned",
    "UnetrDecoder3d",
    "UperNetDecoder3d",
    "adapt_profound_stem",
    "convert_dinov2_hub",
    "convert_profound_dense",
    "convert_profound_fcmae",
    "convert_provicnet_official",
    "detect_checkpoint_format",
    "dinov2_vitb14_reg",
    "dinov2_vitg14_reg",
    "dinov2_vitl14_reg",
    "dinov2_vits14_reg",
    "final_layer_name",
    "enable_feature_cache",
    "freeze_profound_finetune",
    "freeze_provicnet_finetune",
    "PROVICNET_NORMS",
    "SLICE_POOLINGS",
    "interpolate_pos_embed",
    "load_checkpoint",
    "load_profound_checkpoint",
    "load_provicnet_checkpoint",
    "neighbour_slice_indices",
    "pixel_shuffle_3d",
    "profound_encoder",
    "provicnet_backbone",
    "read_checkpoint",
]
