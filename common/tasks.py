"""The task registry: the five downstream tasks of the study, each described once (paper section 3.1, DESIGN.md
section 2).

Bundles, the study runner, the analysis and the tests look a task up here instead of listing task names. Torch-free:
the code that acts on a task (pipelines, metric handlers, baselines) lives beside its kind in ``common.transforms``,
``common.metrics`` and ``common.bundle`` and dispatches on the fields below, never on a task id.

Adding a task: one :class:`Task` entry in :data:`TASKS`, its pipeline steps in ``common.transforms.pipelines`` and
its bundles (``bundles/<fm>_<task>_<regime>``, ``bundles/<specialised>_<task>``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINES", "ENCODER_CACHE_MODES", "TASKS", "Task", "get_task", "task_ids"]

#: when a frozen encoder's outputs are kept (``common.networks.FeatureCache``): always, in evaluation only, never
ENCODER_CACHE_MODES = ("all", "eval", "off")

#: trivial baseline -> what it predicts (``common.metrics.baselines`` computes them)
BASELINES: dict[str, str] = {
    "constant_score": "the same score for every image (AUC 0.5; specificity 0 at any sensitivity > 0)",
    "empty_mask": "no lesion anywhere",
    "trilinear": "trilinear upsampling of the low-resolution input to the target's slices",
    "distorted_input": "the distorted input itself, uncorrected",
    "mean_dwi": "the voxel-wise mean DWI of the training split",
    "linear_map": "a linear map a * T2W + b fitted to DWI on the training split by least squares",
}


@dataclass(frozen=True)
class Task:
    """One downstream task.

    Args:
        id: the task id used in tags, bundle names and configs.
        short: a short label for figures.
        title: a human-readable name.
        volumes: the datalist volumes its pipeline loads, T2W first.
        label_key: the datalist key of a non-volume target (``"pirads"``), or None.
        metric: the per-image metric (``"specificity_at_sensitivity"``, ``"dice"``, ``"ssim"``).
        metric_label: how the report names P.
        higher_is_better: the metric's direction.
        baselines: its trivial baselines (keys of :data:`BASELINES`); ``baseline_metric`` is the best of them.
        specialised_model: the ``model`` tag of the specialised task model.
        specialised_bundle: the bundle of the specialised task model.
        split_proportions: ``(training, validation, test)`` the cohort is re-split in, or None for its own split
            (distortion correction: the few-shot 330/82/177 split of the paper's second cohort).
        snapshot_key: the batch entry the feature snapshots encode.
        image_to_image: a restoration task whose networks predict a residual over the degraded input.
        upsample: per-axis factor ``(H, W, D)`` from the input to the target grid of an image-to-image task.
        pipeline: dotted path of the function ``(seed, deterministic) -> TaskSteps`` that adds the task's own
            transforms to the shared preprocessing (``common.transforms.pipelines``).
        network_inputs: the volumes the network reads, as plain images at inference (``common.bundle.plain``);
            ``"adc"`` stands for the case's diffusion volume, ADC or else high-b DWI.
        encoder_cache: which frozen-encoder outputs repeat and are worth keeping (:data:`ENCODER_CACHE_MODES`):
            ``"all"`` (training inputs repeat: only a flip or a choice among few inputs varies), ``"eval"`` (only the
            validation and test inputs repeat: the training degradation is drawn anew every epoch) or ``"off"`` (the
            network's input never repeats, e.g. a diffusion denoiser's noisy input).
    """

    id: str
    short: str
    title: str
    volumes: tuple[str, ...]
    metric: str
    metric_label: str
    baselines: tuple[str, ...]
    specialised_model: str
    specialised_bundle: str
    label_key: str | None = None
    higher_is_better: bool = True
    split_proportions: tuple[int, int, int] | None = None
    snapshot_key: str = "image"
    image_to_image: bool = False
    upsample: tuple[int, int, int] = (1, 1, 1)
    pipeline: str = ""
    network_inputs: tuple[str, ...] = ("t2w",)
    encoder_cache: str = "all"

    def __post_init__(self) -> None:
        if self.encoder_cache not in ENCODER_CACHE_MODES:
            raise ValueError(f"task {self.id!r}: encoder_cache must be one of {ENCODER_CACHE_MODES}")
        if not self.pipeline:  # the convention: common.transforms.pipelines.<id>_steps
            object.__setattr__(self, "pipeline", f"common.transforms.pipelines.{self.id}_steps")

    @property
    def required_keys(self) -> tuple[str, ...]:
        """The datalist keys the task reads: ``id``, its volumes and its label key."""
        return ("id", *self.volumes, *((self.label_key,) if self.label_key else ()))

    @property
    def classification(self) -> bool:
        return self.metric == "specificity_at_sensitivity"

    @property
    def target_kind(self) -> str:
        """What the target is: ``"class"`` (a label read from the datalist), ``"mask"`` (a segmentation, scored by
        Dice) or ``"image"`` (an intensity volume)."""
        if self.label_key is not None:
            return "class"
        return "mask" if self.metric == "dice" else "image"

    @property
    def restores_in_place(self) -> bool:
        """An image-to-image task whose input and target share one grid, so ``input - target`` is the degradation
        (distortion correction; super-resolution's input has fewer slices)."""
        return self.image_to_image and self.upsample == (1, 1, 1)


TASKS: dict[str, Task] = {
    t.id: t
    for t in (
        Task(
            id="classification", short="cls", title="PI-RADS classification", volumes=("t2w",),
            label_key="pirads", metric="specificity_at_sensitivity",
            metric_label="specificity at sensitivity 0.9 (PI-RADS >= 3)", baselines=("constant_score",),
            specialised_model="resnet50", specialised_bundle="resnet50_classification",
        ),
        Task(
            id="segmentation", short="seg", title="lesion segmentation", volumes=("t2w", "adc", "dwi", "lesion"),
            metric="dice", metric_label="Dice on lesion cases", baselines=("empty_mask",),
            network_inputs=("t2w", "adc"), specialised_model="unet", specialised_bundle="unet_segmentation",
        ),
        Task(
            id="super_resolution", short="SR", title="through-plane super-resolution", volumes=("t2w",),
            metric="ssim", metric_label="SSIM", baselines=("trilinear",), specialised_model="transunet",
            specialised_bundle="transunet_super_resolution", image_to_image=True, upsample=(1, 1, 2),
        ),
        Task(
            id="distortion_correction", short="DC", title="rectal-air distortion correction",
            volumes=("t2w", "rectum"), metric="ssim", metric_label="SSIM", baselines=("distorted_input",),
            specialised_model="vit", specialised_bundle="vit_distortion_correction",
            split_proportions=(330, 82, 177), image_to_image=True, encoder_cache="eval",
        ),
        Task(
            id="modality_translation", short="MT", title="T2W to DWI translation", volumes=("t2w", "dwi"),
            metric="ssim", metric_label="SSIM of the sampled DWI", baselines=("mean_dwi", "linear_map"),
            specialised_model="ddpm", specialised_bundle="ddpm_modality_translation",
            snapshot_key="snapshot_input", encoder_cache="off",
        ),
    )
}  # fmt: skip


def task_ids() -> tuple[str, ...]:
    """The registered task ids, in the paper's order."""
    return tuple(TASKS)


def get_task(task: str | Task) -> Task:
    """The registered :class:`Task` of ``task``; a ``ValueError`` lists the known ids otherwise."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}") from None
