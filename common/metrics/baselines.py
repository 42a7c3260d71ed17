"""Trivial baselines of the five tasks (DESIGN.md section 2, "trivial baseline" column).

A number is only as good as its baseline: every downstream run scores its task's trivial baselines on the same
test images with the same metric code as the model (:class:`~common.bundle.TestPredictions`), and logs the best
as ``baseline_metric``. A model that does not beat it has not learned the task.

=====================  ===================================================================================
baseline               prediction for a test batch ``image`` ``(B, C, H, W, D)`` (target ``label``)
=====================  ===================================================================================
``constant_score``     the uniform class distribution ``(B, K)``: one score for every image (AUC 0.5)
``empty_mask``         a ``(B, 1, H, W, D)`` mask of zeros
``trilinear``          ``image`` trilinearly upsampled to the target grid (``align_corners=False``: the
                       slice centres of a slice-averaged volume sit between the target's)
``distorted_input``    ``image`` itself
``mean_dwi``           the voxel-wise mean target (DWI) of the training split
``linear_map``         ``a * image + b`` with ``(a, b)`` the least-squares fit of target on image over every
                       voxel of the training split
=====================  ===================================================================================

``mean_dwi`` and ``linear_map`` are fitted on the training split (:meth:`TrivialBaselines.fit`) as the test-mode
pipeline gives it (no flips, deterministic), in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from common.tasks import BASELINES, Task, get_task

__all__ = ["FITTED_BASELINES", "TrivialBaselines"]

#: baselines that need the training split
FITTED_BASELINES: frozenset[str] = frozenset({"mean_dwi", "linear_map"})


def _plain(x: object) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class TrivialBaselines:
    """The trivial baselines of one task: fitted once on the training split, then a prediction per test batch.

    Args:
        task: a registered task id or :class:`~common.tasks.Task`.
        num_classes: ``K`` of the classification scores. Default 4 (the PI-RADS groups).

    Raises:
        ValueError: on an unknown task, or a baseline of the registry that this class cannot compute.
    """

    def __init__(self, task: str | Task, num_classes: int | None = None) -> None:
        self.task = get_task(task)
        unknown = [b for b in self.task.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"task {self.task.id!r} names unknown baselines {unknown}; known: {sorted(BASELINES)}")
        self.num_classes = 4 if num_classes is None else int(num_classes)
        self.mean_target: torch.Tensor | None = None
        self.coefficients: tuple[float, float] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.task.baselines

    @property
    def needs_fit(self) -> bool:
        return any(b in FITTED_BASELINES for b in self.names)

    def fit(self, items: Iterable[Mapping[str, object]], image_key: str = "image", label_key: str = "label"):
        """Fit ``mean_dwi`` and ``linear_map`` on training items ``{image: (C, H, W, D), label: (1, H, W, D)}`` (or
        batches of them); returns ``self``. A no-op for tasks without fitted baselines.

        Raises:
            ValueError: when ``items`` is empty or the volumes' grids differ.
        """
        if not self.needs_fit:
            return self
        total: torch.Tensor | None = None
        n = 0
        sx = sy = sxx = sxy = count = 0.0
        for item in items:
            image = _plain(item[image_key]).double()
            label = _plain(item[label_key]).double()
            if image.ndim == 4:  # one item, not a batch
                image, label = image[None], label[None]
            if total is not None and label.shape[1:] != total.shape:
                raise ValueError(f"TrivialBaselines.fit: the training volumes differ in grid: {tuple(label.shape)}")
            batch_sum = label.sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            n += label.shape[0]
            x, y = image[:, :1].reshape(-1), label.reshape(-1)
            sx, sy = sx + float(x.sum()), sy + float(y.sum())
            sxx, sxy = sxx + float((x * x).sum()), sxy + float((x * y).sum())
            count += x.numel()
        if total is None:
            raise ValueError(f"TrivialBaselines.fit: no training items for the {self.task.id} baselines")
        self.mean_target = (total / n).float()
        variance = sxx - sx * sx / count
        slope = (sxy - sx * sy / count) / variance if variance > 0 else 0.0
        self.coefficients = (float(slope), float((sy - slope * sx) / count))
        return self

    def predict(self, name: str, image: torch.Tensor, target_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The prediction of baseline ``name`` for a test batch ``image`` ``(B, C, H, W, D)``.

        Args:
            name: one of :attr:`names`.
            image: the batch's input.
            target_shape: ``(H', W', D')`` of the target grid (super-resolution); default the input's.

        Returns:
            ``(B, K)`` scores (``constant_score``), a ``(B, 1, H, W, D)`` mask (``empty_mask``) or ``(B, 1, H', W',
            D')`` intensities: ready for the metric, with no post-processing.
        """
        if name not in self.names:
            raise ValueError(f"{name!r} is not a baseline of task {self.task.id!r}; its baselines are {self.names}")
        image = _plain(image).float()
        b = image.shape[0]
        if name == "constant_score":
            return torch.full((b, self.num_classes), 1.0 / self.num_classes, device=image.device)
        if name == "empty_mask":
            return torch.zeros((b, 1, *image.shape[2:]), device=image.device)
        if name == "trilinear":
            size = list(target_shape) if target_shape is not None else list(image.shape[2:])
            return F.interpolate(image[:, :1], size=size, mode="trilinear", align_corners=False)
        if name == "distorted_input":
            return image[:, :1]
        if self.mean_target is None or self.coefficients is None:
            raise RuntimeError(f"TrivialBaselines: call fit() on the training split before predicting {name!r}")
        if name == "mean_dwi":
            return self.mean_target.to(image.device)[None].expand(b, *self.mean_target.shape).clone()
        slope, intercept = self.coefficients
        return slope * image[:, :1] + intercept
