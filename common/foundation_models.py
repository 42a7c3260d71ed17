"""The foundation-model registry: each FM of the study described once (DESIGN.md sections 1, 3 and 4).

Torch-free; the networks are named by dotted path and built by the bundles (``_target_``). The study runner and the
analysis derive the grid and the layer semantics from here and from :mod:`common.tasks`.

Adding an FM: one :class:`FoundationModel` entry in :data:`FOUNDATION_MODELS` and its bundles
(``bundles/<fm>_pretrain`` unless official weights are always given, ``bundles/<fm>_<task>_<regime>``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FOUNDATION_MODELS", "FoundationModel", "fm_ids", "get_fm"]


@dataclass(frozen=True)
class FoundationModel:
    """One foundation model.

    Args:
        id: the ``model`` tag and the bundle-name prefix.
        title: a human-readable name.
        pretraining: its pretraining objective, as the report names it.
        pretrain_bundle: the bundle that pretrains it when no official weights are given, or None.
        freeze: dotted path of its finetune freezing protocol (``common.networks.freeze_*``).
        checkpoint_formats: the weight formats ``common.networks.load_checkpoint`` reads for it.
        common_layer: the recorded layer that is the same kind of layer for every task of this FM and moves under
            its finetune protocol, or None when no such layer exists (the analysis then warns).
        frozen_layers: recorded layers that the finetune protocol does not train (their D2P is 0 by construction).
        note: what the report says about its layers.
    """

    id: str
    title: str
    pretraining: str
    pretrain_bundle: str | None
    freeze: str
    checkpoint_formats: tuple[str, ...]
    common_layer: str | None
    frozen_layers: tuple[str, ...] = ()
    note: str = ""


FOUNDATION_MODELS: dict[str, FoundationModel] = {
    fm.id: fm
    for fm in (
        FoundationModel(
            id="profound", title="ProFound (3D ConvNeXt V2)", pretraining="masked autoencoding (FCMAE)",
            pretrain_bundle="profound_pretrain", freeze="common.networks.freeze_profound_finetune",
            checkpoint_formats=("profound_fcmae", "profound_dense"),
            common_layer=None, frozen_layers=("encoder",),
            note="the encoder is frozen under finetune, so its pooled output does not move (D2P = 0); the head "
            "input moves but is an MLP hidden layer for classification and a decoder feature map for the dense "
            "tasks, so no layer of one kind across all five tasks moves",
        ),
        FoundationModel(
            id="provicnet", title="ProViCNet (DINOv2 ViT)", pretraining="contrastive (lesion-guided DINO)",
            pretrain_bundle="provicnet_pretrain", freeze="common.networks.freeze_provicnet_finetune",
            checkpoint_formats=("dinov2_hub", "provicnet_official"), common_layer="encoder",
            note="the pooled backbone output (mean cls token after the trainable last blocks) is the same kind of "
            "layer for all five tasks and moves under finetune",
        ),
    )
}  # fmt: skip


def fm_ids() -> tuple[str, ...]:
    """The registered FM ids."""
    return tuple(FOUNDATION_MODELS)


def get_fm(fm: str) -> FoundationModel:
    """The registered :class:`FoundationModel` of ``fm``; a ``ValueError`` lists the known ids otherwise."""
    try:
        return FOUNDATION_MODELS[fm]
    except (KeyError, TypeError):
        raise ValueError(f"unknown foundation model {fm!r}; choose one of {list(FOUNDATION_MODELS)}") from None
