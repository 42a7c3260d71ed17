"""Run profiles: one name that scales a bundle or the study without editing it (DESIGN.md section 6).

``smoke`` runs on two CPU cores in minutes and is what the tests use; ``gpu`` is one GPU, well under an hour for
the whole grid; ``paper`` has the paper's sizes (200 x 200 x 96, H x W x D) and epochs. Spatial sizes are
``(H, W, D)``, the MONAI array order of our pipelines, D being the through-plane (slice) axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    """Sizes and counts that a profile fixes.

    Args:
        name: the profile's name.
        spatial_size: ``(H, W, D)`` every volume is resampled to before padding.
        divisible_by: ``(H, W, D)`` divisors the padded size must satisfy (the networks' total strides).
        cohort_cases: number of synthetic cases made when no datalist is given.
        cohort_size: ``(D, H, W)`` voxel grid of the synthetic cohort's volumes (the phantom CLI order).
        epochs: downstream training epochs (paper: 100, cosine-annealed).
        pretrain_epochs: epochs of the pretraining bundles.
        batch_size: volumes per training batch (per GPU).
        profound_size: ProFound encoder size (``PROFOUND_SIZES``; the paper's is ``tiny``).
        provicnet_size: ProViCNet backbone size (``DINOV2_SIZES``; the paper's is ``small``).
        slice_size: side ProViCNet resizes each slice to (a multiple of its 14-pixel patch).
        num_workers: data-loading worker processes.
        train_steps_per_epoch: iterations per downstream training epoch, or None for one pass over the training split;
            the smoke profile caps it so that a bundle runs in about a minute on two CPU cores.
        decoder_channels: width of ProFound's UperNet decoder (official: 512; the smoke profile's is narrow so that a
            bundle runs in about a minute on two CPU cores).
        lesion_patch_fraction: share of lesion pixels that makes a ProViCNet patch a "lesion" patch in the
            lesion-guided contrast (official: 62/64 at 448-pixel slices, where a 14-pixel patch is ~6 mm; at smaller
            slices a patch spans more tissue and a lesion covers less of it).

    The training fields default to the smoke profile's values, so a custom ``Profile`` for a pipeline needs only the
    data fields.
    """

    name: str
    spatial_size: tuple[int, int, int]
    divisible_by: tuple[int, int, int]
    cohort_cases: int
    cohort_size: tuple[int, int, int]
    epochs: int = 2
    pretrain_epochs: int = 3
    batch_size: int = 2
    profound_size: str = "atto"
    provicnet_size: str = "tiny"
    slice_size: int = 56
    num_workers: int = 0
    lesion_patch_fraction: float = 0.02
    decoder_channels: int = 32
    train_steps_per_epoch: int | None = 4

    @property
    def padded_size(self) -> tuple[int, int, int]:
        """``(H, W, D)`` after explicit zero padding of ``spatial_size`` up to ``divisible_by``."""
        return tuple(-(-s // k) * k for s, k in zip(self.spatial_size, self.divisible_by, strict=True))

    def to_dict(self) -> dict:
        return asdict(self)


# Padding to multiples of 32 in-plane and 16 through-plane fits ProFound's total strides; in the paper profile
# 200 -> 224 in-plane, which is also a multiple of ProViCNet's 14-pixel patch, and 96 slices stay 96.
PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", spatial_size=(64, 64, 32), divisible_by=(32, 32, 16), cohort_cases=40, cohort_size=(24, 96, 96),
        epochs=2, pretrain_epochs=3, batch_size=2, profound_size="atto", provicnet_size="tiny", slice_size=56,
        num_workers=0, lesion_patch_fraction=0.02,
    ),
    "gpu": Profile(
        "gpu", spatial_size=(128, 128, 64), divisible_by=(32, 32, 16), cohort_cases=160, cohort_size=(32, 160, 160),
        epochs=20, pretrain_epochs=50, batch_size=2, profound_size="tiny", provicnet_size="small", slice_size=224,
        num_workers=4, lesion_patch_fraction=0.25, decoder_channels=512, train_steps_per_epoch=None,
    ),
    "paper": Profile(
        "paper", spatial_size=(200, 200, 96), divisible_by=(32, 32, 16), cohort_cases=740, cohort_size=(32, 256, 256),
        epochs=100, pretrain_epochs=300, batch_size=2, profound_size="tiny", provicnet_size="small", slice_size=448,
        num_workers=8, lesion_patch_fraction=62 / 64, decoder_channels=512, train_steps_per_epoch=None,
    ),
}  # fmt: skip


def get_profile(name: str) -> Profile:
    """Return the profile called ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
