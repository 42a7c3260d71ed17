"""The contract between the bundles that write a run and the analysis that reads it (DESIGN.md sections 4-5).

Torch-free, so the analysis and the study runner import it without the networks. Every artifact path, MLflow tag
and metric name that crosses from a bundle to the tools bundle is defined here once; the writer
(``common.bundle.snapshots``) and the reader (``common.analysis.runs``) both import it.

Feature snapshots (``features/<snapshot><suffix>.npz``) hold ``features`` ``(N, d)`` float32, ``ids`` ``(N,)``
str, ``layer`` (a name of :data:`LAYERS`) and ``kind`` (a name of :data:`LAYER_KINDS`: what sort of layer it is in
this network, so the analysis can tell when a correlation across tasks mixes layers of different kinds).

Test predictions (``test/predictions.npz``): ``ids``; dense tasks ``per_image`` ``(N,)`` (NaN where the metric does
not count the image, e.g. a lesion-free case under the lesion-case Dice convention) and ``baseline_per_image``
``(N,)`` (the strongest trivial baseline on the same images with the same metric code); classification ``scores``
``(N, K)``, ``labels`` ``(N,)`` and ``baseline_scores`` ``(N, K)``. P is the mean of ``per_image`` over the counted
images (``nanmean``), or the task's classification metric of ``scores``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = [
    "FEATURES_DIR",
    "LAYERS",
    "LAYER_KINDS",
    "METADATA_SCHEMA",
    "METRIC_BASELINE",
    "METRIC_TEST",
    "METRIC_TEST_AUC",
    "DIFFUSION_KEY",
    "METRIC_TEST_DICE_ALL",
    "METRIC_TEST_DICE_ON",
    "METRIC_TEST_FP_VOLUME",
    "PREDICTIONS_ARTIFACT",
    "RUN_FILE",
    "TAG_BASELINE",
    "TAG_LAYER_KINDS",
    "CHECKPOINT_RE",
    "baseline_metric_name",
    "checkpoint_files",
    "feature_artifact",
    "feature_file_name",
    "parse_feature_artifact",
    "resume_checkpoint",
]

#: MONAI's bundle metadata schema 20240725, carried in the repository (``common/configs/schema/README.md``)
METADATA_SCHEMA = Path(__file__).resolve().parent / "configs" / "schema" / "meta_schema_20240725.json"

FEATURES_DIR = "features"
PREDICTIONS_ARTIFACT = "test/predictions.npz"
#: the file a bundle writes in its output folder with its MLflow run id and status (``StudyTracker``)
RUN_FILE = "mlflow_run.json"
#: the per-epoch checkpoints a bundle writes in ``<output_dir>/models`` (``SaveCheckpoints``)
CHECKPOINT_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def checkpoint_files(folder: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``checkpoint_epoch=<k>.pt`` files in ``folder``, oldest first."""
    matches = ((CHECKPOINT_RE.search(p.name), p) for p in Path(folder).glob("checkpoint_epoch=*.pt"))
    return sorted((int(m.group(1)), p) for m, p in matches if m)


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint a restarted run continues from: the newest ``models/checkpoint_epoch=<k>.pt`` of
    ``output_dir``, or None when there is none or when the run there already finished (its :data:`RUN_FILE` says
    FINISHED): running a finished bundle again trains anew. Shared by the bundles and the study runner."""
    state = Path(output_dir) / RUN_FILE
    try:
        if state.is_file() and json.loads(state.read_text()).get("status") == "FINISHED":
            return None
    except (OSError, ValueError):
        pass
    found = checkpoint_files(Path(output_dir) / "models")
    return str(found[-1][1]) if found else None


#: recorded layer -> file-name suffix of its snapshots (``features/final.npz``, ``features/final_encoder.npz``)
LAYERS: dict[str, str] = {"head_input": "", "encoder": "_encoder"}

#: what a recorded layer is, per network (``forward_representations`` names the layer, ``representation_kinds``
#: says which of these it is). Distances are comparable across tasks only on layers of one kind.
LAYER_KINDS: dict[str, str] = {
    "mlp_hidden": "the last hidden layer of an MLP head on pooled encoder features",
    "decoder_features": "the feature map a dense decoder feeds its final convolution, pooled",
    "conv_head_input": "the backbone tokens a randomly initialised convolutional head reads, pooled",
    "backbone_tokens": "the backbone's own patch tokens, read by a single-convolution head, pooled",
    "encoder_pooled": "the encoder's pooled output (frozen under ProFound's finetune protocol)",
    "backbone_pooled": "the pooled backbone output after its trainable blocks (ProViCNet: mean cls token)",
    "diffusion_bottleneck": "the pooled bottleneck of a diffusion UNet",
}

_SNAPSHOT_RE = re.compile(r"^(step0|final|epoch_[1-9][0-9]*)$")

METRIC_TEST = "test_metric"
#: the task's strongest trivial baseline on the same test images with the same metric code
METRIC_BASELINE = "baseline_metric"
#: classification: area under the ROC curve of the PI-RADS >= 3 cut (the constant-score baseline has 0.5)
METRIC_TEST_AUC = "test_auc"
#: segmentation: Dice with the all-empty convention (a lesion-free case predicted empty scores 1)
METRIC_TEST_DICE_ALL = "test_dice_all"
#: segmentation: the batch key and ``predictions.npz`` array naming the diffusion map each case was given
DIFFUSION_KEY = "diffusion"
#: segmentation: P over the test cases given each diffusion map (the input draws ADC or DWI per case), so that a
#: model that reads only one of the two maps shows as such
METRIC_TEST_DICE_ON: dict[str, str] = {"adc": "test_dice_adc", "dwi": "test_dice_dwi"}
#: segmentation: mean predicted lesion volume (ml) on the lesion-free test cases (false positives)
METRIC_TEST_FP_VOLUME = "test_fp_volume_ml"
#: tag: the name of the baseline ``baseline_metric`` comes from
TAG_BASELINE = "baseline_name"
#: tag: JSON ``{layer: kind}`` of the run's network
TAG_LAYER_KINDS = "layer_kinds"


def baseline_metric_name(baseline: str) -> str:
    """The MLflow metric of one trivial baseline, e.g. ``baseline_metric_trilinear``."""
    return f"{METRIC_BASELINE}_{baseline}"


def feature_file_name(snapshot: str, layer: str = "head_input") -> str:
    """``<snapshot><suffix>.npz`` of ``layer`` (:data:`LAYERS`), e.g. ``final_encoder.npz``.

    Raises:
        ValueError: if ``snapshot`` is not ``step0``, ``final`` or ``epoch_<k>`` (k >= 1), or ``layer`` unknown.
    """
    if not isinstance(snapshot, str) or not _SNAPSHOT_RE.match(snapshot):
        raise ValueError(f"snapshot must be 'step0', 'final' or 'epoch_<k>' (k >= 1), got {snapshot!r}.")
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {sorted(LAYERS)}, got {layer!r}.")
    return f"{snapshot}{LAYERS[layer]}.npz"


def feature_artifact(snapshot: str, layer: str = "head_input") -> str:
    """Artifact path of a feature snapshot, ``features/<snapshot><suffix>.npz`` (see :func:`feature_file_name`)."""
    return f"{FEATURES_DIR}/{feature_file_name(snapshot, layer)}"


def parse_feature_artifact(path: str) -> tuple[str, str] | None:
    """``features/final_encoder.npz`` -> ``("final", "encoder")``; None for any other path."""
    prefix = FEATURES_DIR + "/"
    if not path.startswith(prefix) or not path.endswith(".npz"):
        return None
    stem = path[len(prefix) : -len(".npz")]
    # longest suffix first, so "_encoder" wins over the empty suffix of head_input
    for layer, suffix in sorted(LAYERS.items(), key=lambda item: -len(item[1])):
        if suffix and stem.endswith(suffix):
            name = stem[: -len(suffix)]
        elif not suffix:
            name = stem
        else:
            continue
        if _SNAPSHOT_RE.match(name):
            return name, layer
    return None
