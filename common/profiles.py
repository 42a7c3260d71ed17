"""Run profiles: one name that scales a bundle or the study without editing it (DESIGN.md section 6).

``smoke`` runs on two CPU cores in minutes and is what the tests use (its numbers test the pipeline, not the
science); ``demo`` runs the whole study on two CPU cores within 90 minutes with test splits large enough to measure and
models that beat their trivial baselines; ``gpu`` is one GPU, well under an hour for
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
        cohort_size: ``(D, H, W)`` voxel grid of the synthetic cohort's volumes (the phantom CLI order). Its D is at
            least ``spatial_size``'s, so that the super-resolution target has native slices (DESIGN.md section 6);
            the built-in profiles use ``spatial_size`` itself, so no native detail is lost to resampling.
        epochs: downstream training epochs (paper: 100, cosine-annealed).
        pretrain_epochs: epochs of the pretraining bundles.
        batch_size: volumes per training batch (per GPU).
        profound_size: ProFound encoder size (``PROFOUND_SIZES``; the paper's is ``tiny``).
        provicnet_size: ProViCNet backbone size (``DINOV2_SIZES``; the paper's is ``small``).
        slice_size: side ProViCNet resizes each slice to (a multiple of its 14-pixel patch).
        num_workers: data-loading worker processes.
        learning_rate: initial AdamW learning rate of the downstream bundles (paper: 1e-4, cosine-annealed over the
            epochs); the demo profile trains a few hundred steps and uses a larger one.
        sample_steps: DDIM steps of the modality-translation sampler at test time.
        transformer_size: key of :data:`TRANSFORMER_SIZES`: the specialised transformers', the DDPM UNet's and the
            ProViCNet pretraining heads' sizes (``"tiny"`` on CPU, ``"base"`` the published ones).
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
    sample_steps: int = 4
    transformer_size: str = "tiny"
    learning_rate: float = 1e-4

    @property
    def transformer(self) -> dict[str, int]:
        """Width, depth and heads of the specialised transformers (ViT, TransUNet) and the DDPM UNet's widths and the
        ProViCNet pretraining heads at this profile (:data:`TRANSFORMER_SIZES`)."""
        return dict(TRANSFORMER_SIZES[self.transformer_size])

    @property
    def padded_size(self) -> tuple[int, int, int]:
        """``(H, W, D)`` after explicit zero padding of ``spatial_size`` up to ``divisible_by``."""
        return tuple(-(-s // k) * k for s, k in zip(self.spatial_size, self.divisible_by, strict=True))

    def to_dict(self) -> dict:
        return asdict(self)


#: sizes that scale with the profile: ViT-Tiny / ViT-Base (hidden, MLP, layers, heads) for the specialised ViT and
#: TransUNet, the DDPM UNet's channels, the DINO / patch head outputs of ProViCNet pretraining (official 65536), and the
#: specialised 3D ResNet-50's width (its depth stays 50; at width 1 a training step at the demo size takes 7.0 s on one
#: CPU thread, at 0.25 1.0 s: the published width would make it 28 of the demo study's 90 minutes)
TRANSFORMER_SIZES: dict[str, dict] = {
    "tiny": {"hidden_size": 192, "mlp_dim": 768, "num_layers": 4, "num_heads": 3, "ddpm_channels": [8, 16, 16],
             "ddpm_groups": 8, "ddpm_head_channels": 8, "dino_out_dim": 1024, "dino_patch_out_dim": 4096,
             "resnet_widen_factor": 0.25},
    "base": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "ddpm_channels": [32, 64, 64],
             "ddpm_groups": 32, "ddpm_head_channels": 32, "dino_out_dim": 4096, "dino_patch_out_dim": 65536,
             "resnet_widen_factor": 1.0},
}  # fmt: skip

# Padding to multiples of 32 in-plane and 16 through-plane fits ProFound's total strides; in the paper profile
# 200 -> 224 in-plane, which is also a multiple of ProViCNet's 14-pixel patch, and 96 slices stay 96.
PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", spatial_size=(64, 64, 32), divisible_by=(32, 32, 16), cohort_cases=40, cohort_size=(32, 64, 64),
        epochs=2, pretrain_epochs=3, batch_size=2, profound_size="atto", provicnet_size="tiny", slice_size=56,
        num_workers=0, lesion_patch_fraction=0.02,
    ),
    # demo: the whole study on 2 CPU cores within 90 minutes, with test splits large enough to measure (40 PROMIS-split
    # test images, 12 of them PI-RADS 1-2; 60 in the few-shot split) and training long enough to beat the baselines
    "demo": Profile(
        "demo", spatial_size=(64, 64, 32), divisible_by=(32, 32, 16), cohort_cases=200, cohort_size=(32, 64, 64),
        epochs=6, pretrain_epochs=2, batch_size=2, profound_size="atto", provicnet_size="tiny", slice_size=56,
        num_workers=0, lesion_patch_fraction=0.02, train_steps_per_epoch=40, learning_rate=5e-4,
    ),
    "gpu": Profile(
        "gpu", spatial_size=(128, 128, 64), divisible_by=(32, 32, 16), cohort_cases=160, cohort_size=(64, 128, 128),
        epochs=20, pretrain_epochs=50, batch_size=2, profound_size="tiny", provicnet_size="small", slice_size=224,
        num_workers=4, lesion_patch_fraction=0.25, decoder_channels=512, train_steps_per_epoch=None, sample_steps=10,
        transformer_size="base",
    ),
    "paper": Profile(
        "paper", spatial_size=(200, 200, 96), divisible_by=(32, 32, 16), cohort_cases=740, cohort_size=(96, 200, 200),
        epochs=100, pretrain_epochs=300, batch_size=2, profound_size="tiny", provicnet_size="small", slice_size=448,
        num_workers=8, lesion_patch_fraction=62 / 64, decoder_channels=512, train_steps_per_epoch=None, sample_steps=10,
        transformer_size="base",
    ),
}  # fmt: skip


def get_profile(name: str) -> Profile:
    """Return the profile called ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
