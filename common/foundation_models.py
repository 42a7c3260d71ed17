"""The foundation-model registry: each FM of the study described once (DESIGN.md sections 1, 3 and 4).

Torch-free; the networks are named by dotted path and built by the bundles (``_target_``). The study runner and the
analysis derive the grid and the layer semantics from here and from :mod:`common.tasks`.

Adding an FM (README, "Bring your own foundation model"; ``docs/byo_foundation_model.md``): one
:class:`FoundationModel` entry and its bundles (``<fm>_pretrain`` unless official weights are always given,
``<fm>_<task>_finetune`` and ``<fm>_<task>_scratch``). The entry goes either into :data:`FOUNDATION_MODELS` below or,
without editing this repository, into a module of your own that calls :func:`register_fm` and is named in the
environment variable ``VFM_FOUNDATION_MODELS`` (comma-separated module names, imported when this module is); its
``bundles`` field then says where its bundles are.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass

__all__ = ["FOUNDATION_MODELS", "PLUGINS_ENV", "FoundationModel", "fm_ids", "get_fm", "register_fm"]

#: environment variable naming the modules (comma-separated) that register further FMs with :func:`register_fm`
PLUGINS_ENV = "VFM_FOUNDATION_MODELS"


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
        bundles: the folder that holds its bundles (``<bundles>/<fm>_<task>_<regime>``), absolute or relative to
            the repository; None for the repository's ``bundles/``.
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
    bundles: str | None = None


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


def register_fm(fm: FoundationModel) -> FoundationModel:
    """Add ``fm`` to :data:`FOUNDATION_MODELS` (the runner's grid and the analysis read it) and return it.

    Registering the same entry again is a no-op, so a plugin module may be imported more than once.

    Raises:
        ValueError: when ``fm`` is no :class:`FoundationModel`, its id is not a lower-case identifier (it prefixes
            bundle names, ``<fm>_<task>_<regime>``), or another entry has that id.
    """
    if not isinstance(fm, FoundationModel):
        raise ValueError(f"register_fm: expected a FoundationModel, got {type(fm).__name__}.")
    if not re.fullmatch(r"[a-z][a-z0-9]*", fm.id):
        raise ValueError(
            f"register_fm: FM id {fm.id!r} must be lower-case letters and digits (it prefixes bundle names "
            "<fm>_<task>_<regime>, whose parts are split at '_')."
        )
    known = FOUNDATION_MODELS.get(fm.id)
    if known is not None and known != fm:
        raise ValueError(f"register_fm: another foundation model is registered as {fm.id!r}: {known.title}.")
    FOUNDATION_MODELS[fm.id] = fm
    return fm


def _load_plugins() -> None:
    """Import the modules named in :data:`PLUGINS_ENV`; each registers its FMs with :func:`register_fm`."""
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"{PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r}: cannot import {name!r} ({err}); put its folder on "
                "PYTHONPATH or install it."
            ) from err


_load_plugins()
