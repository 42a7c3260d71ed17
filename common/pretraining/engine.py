"""Engine glue for the ProViCNet pretraining bundle: MONAI's ``SupervisedTrainer`` runs the pretrainer with a
``prepare_batch`` that turns volumes into 2.5D slice stacks, and a handler that moves the EMA teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.bundle.engine import unwrap_model
from common.networks.provicnet import neighbour_slice_indices

from .dino import ProViCNetPretrainer, cosine_momentum

__all__ = ["SliceStackBatch", "TeacherEMAHandler"]


class SliceStackBatch:
    """``prepare_batch`` for ``SupervisedTrainer``: volumes -> sampled neighbour-slice stacks, as ProViCNet sees them.

    From ``batch[image_key]`` ``(B, M, H, W, D)`` it draws ``slices_per_volume`` distinct slices k of each volume
    and returns the stacks ``(N, M * S, s, s)`` (channels modality-major as
    :meth:`~common.networks.provicnet.ProViCNetDense.slice_stack`, resized bilinearly to ``slice_size``), no target,
    the slice positions ``(N, 2)`` = ``(k, D)`` as the positional argument, and ``lesion=`` the centre slice's lesion
    mask ``(N, 1, s, s)`` (nearest resize) when the batch has ``lesion_key``. ``N = B * slices_per_volume``.

    Args:
        n_slices: neighbouring slices S per stack (odd). Default 3 (official).
        slice_size: side s of the resized slices, or None to keep ``(H, W)``. Default None.
        slices_per_volume: slices drawn per volume and batch (capped at D). Default 8.
        lesion_slice_fraction: share of a volume's draws taken from its slices that contain lesion (when it has
            any), so the lesion-guided contrast sees lesions in every batch. Default 0.5.
        image_key, lesion_key: batch keys. Defaults ``"image"``, ``"lesion"``.
        edge_mode: see :func:`~common.networks.provicnet.neighbour_slice_indices`. Default ``"shift"``.
        seed: seeds the slice draws. Default 0.
    """

    def __init__(
        self,
        n_slices: int = 3,
        slice_size: int | None = None,
        slices_per_volume: int = 8,
        lesion_slice_fraction: float = 0.5,
        image_key: str = "image",
        lesion_key: str = "lesion",
        edge_mode: str = "shift",
        seed: int = 0,
    ) -> None:
        if slices_per_volume < 1:
            raise ValueError(f"slices_per_volume must be >= 1, got {slices_per_volume}")
        if slice_size is not None and slice_size < 1:
            raise ValueError(f"slice_size must be >= 1 or None, got {slice_size}")
        if not 0.0 <= lesion_slice_fraction <= 1.0:
            raise ValueError(f"lesion_slice_fraction must be in [0, 1], got {lesion_slice_fraction}")
        neighbour_slice_indices(1, n_slices, edge_mode)  # validates both
        self.n_slices = n_slices
        self.slice_size = slice_size
        self.slices_per_volume = slices_per_volume
        self.lesion_slice_fraction = lesion_slice_fraction
        self.image_key = image_key
        self.lesion_key = lesion_key
        self.edge_mode = edge_mode
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **_):
        x = torch.as_tensor(batchdata[self.image_key]).float()
        if x.ndim != 5:
            raise ValueError(f"SliceStackBatch: {self.image_key!r} must be (B, M, H, W, D), got {tuple(x.shape)}")
        b, m, h, w, d = x.shape
        per_volume = min(self.slices_per_volume, d)
        window = neighbour_slice_indices(d, self.n_slices, self.edge_mode)  # (D, S)
        masks = torch.as_tensor(batchdata[self.lesion_key]).float() if self.lesion_key in batchdata else None
        ks = torch.stack([self._draw(d, per_volume, None if masks is None else masks[v]) for v in range(b)])  # (B, P)
        vols = torch.arange(b).repeat_interleave(per_volume)
        centre = ks.reshape(-1)
        pairs = list(zip(vols.tolist(), centre.tolist(), strict=True))
        stacks = torch.stack([x[v][..., window[k]] for v, k in pairs])  # (N, M, H, W, S)
        stacks = stacks.permute(0, 1, 4, 2, 3).reshape(-1, m * self.n_slices, h, w)  # modality-major channels
        pos = torch.stack((centre.float(), torch.full((centre.numel(),), float(d))), dim=1)
        lesion = None
        if masks is not None:
            lesion = torch.stack([masks[v][..., k] for v, k in pairs])  # (N, 1, H, W)
        if self.slice_size is not None and (h, w) != (self.slice_size, self.slice_size):
            size = (self.slice_size, self.slice_size)
            stacks = F.interpolate(stacks, size=size, mode="bilinear", align_corners=False)
            lesion = None if lesion is None else F.interpolate(lesion, size=size, mode="nearest")
        kwargs = {} if lesion is None else {"lesion": lesion.to(device, non_blocking=non_blocking)}
        return stacks.to(device, non_blocking=non_blocking), None, (pos.to(device, non_blocking=non_blocking),), kwargs

    def _draw(self, depth: int, count: int, mask: torch.Tensor | None) -> torch.Tensor:
        """``count`` distinct slice indices, ``lesion_slice_fraction`` of them among the slices with lesion."""
        order = torch.randperm(depth, generator=self.generator)
        if mask is None or self.lesion_slice_fraction == 0:
            return order[:count]
        has_lesion = mask.reshape(-1, depth).amax(dim=0) > 0
        lesion_first = order[has_lesion[order]][: round(self.lesion_slice_fraction * count)]
        rest = order[~torch.isin(order, lesion_first)][: count - lesion_first.numel()]
        return torch.cat((lesion_first, rest))


class TeacherEMAHandler:
    """Ignite handler: after every iteration, move the teacher towards the student with dinov2's cosine momentum
    schedule from ``base_momentum`` to 1 over the run's iterations (:func:`~common.pretraining.dino.
    cosine_momentum`)."""

    def __init__(self, model: ProViCNetPretrainer, base_momentum: float = 0.996) -> None:
        self.model = model
        self.base_momentum = base_momentum

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        total = max(1, engine.state.max_epochs * engine.state.epoch_length)
        momentum = cosine_momentum(min(engine.state.iteration, total), total, base=self.base_momentum)
        unwrap_model(self.model).update_teacher(momentum)
