"""The DDPM pieces of the modality-translation task (T2W -> DWI, DESIGN.md section 2), for MONAI's own engines.

Training (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020): a ``SupervisedTrainer`` with

- ``prepare_batch``: :class:`NoisePrepareBatch` draws noise and a timestep per volume for the DWI (``"label"``) and
  passes the T2W (``"image"``) as the condition;
- ``inferer``: ``monai.inferers.DiffusionInferer(scheduler)``, which noises the DWI
  (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``) and calls ``network(x=cat([x_t, T2W]), timesteps=t,
  context=None)`` (``mode="concat"``);
- ``loss_function``: :class:`DiffusionLoss`, L1 on the network's target (the velocity by default, see below) plus an
  SSIM regulariser on the implied clean image;
- ``network``: :class:`~common.networks.TimestepConditioned` around an FM's dense network, or the specialised
  :class:`~common.networks.ConditionalDiffusionUNet`.

Validation and test: :class:`DiffusionSampler` is the ``inferer(image, network)`` of the evaluator and of
:class:`~common.bundle.TestPredictions`; it generates the DWI from the T2W with a few DDIM steps (Song et al.,
"Denoising Diffusion Implicit Models", ICLR 2021) and the metric is the SSIM of that sample.

What the network predicts is the schedulers' ``prediction_type``: the noise (``"epsilon"``, Ho et al., the default
here), the clean image (``"sample"``) or the velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``
(``"v_prediction"``, Salimans and Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022).
The modality-translation bundles predict the clean DWI around the mean training DWI
(:class:`~common.networks.PriorOffset`). With noise prediction the clean-image estimate of the first sampling step,
``(x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``, multiplies the network's error by ``1 / sqrt(abar_999)``, about
160 for the linear schedule: with the few DDIM steps and training steps of a CPU profile the samples were clipped
noise (demo profile, test SSIM 0.016 against 0.220 for the mean training DWI); velocity prediction gave 0.06 in one
step, the clean image 0.144, the clean image around the mean DWI 0.230.

One noise schedule for all three: build one ``monai.networks.schedulers.DDPMScheduler(num_train_timesteps,
schedule)`` for the inferer and the loss, and the sampler with the same two arguments (or take the scheduler from
:meth:`DiffusionSampler.train_scheduler`).

Feature snapshots: the DDPM networks' ``forward_representations`` take ``cat([DWI, T2W])`` (the clean target at the
representation timestep, the convention of ``ConditionalDiffusionUNet``). MONAI's
``ConcatItemsd(keys=["label", "image"], name="snapshot_input", dim=0)`` makes that input in the test pipeline
(it keeps MetaTensors); no transform of ours is needed (:func:`common.bundle.test_transforms` adds it).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.losses import SSIMLoss
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from torch import nn

from .engine import plain_tensor as _plain

__all__ = ["PREDICTION_TYPES", "DiffusionLoss", "DiffusionSampler", "NoisePrepareBatch"]

#: what a denoiser may predict (MONAI's ``DDPMPredictionType`` values): the noise, the clean image, the velocity
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class NoisePrepareBatch(DiffusionPrepareBatch):
    """``prepare_batch`` of a ``SupervisedTrainer`` for conditional DDPM training (Ho et al. 2020, Algorithm 1):
    MONAI's ``DiffusionPrepareBatch`` with the generated image taken from ``image_key``, the condition from
    ``condition_key``, concatenation conditioning, and a target dict for :class:`DiffusionLoss`.

    The task pipeline names the DWI to generate ``"label"`` and the T2W condition ``"image"``. Noise is
    ``torch.randn_like`` (the global RNG, seeded by the run) and timesteps are uniform in ``[0, T)``, one per volume.

    Args:
        num_train_timesteps: T of the noise schedule. Default 1000.
        image_key: batch entry of the image to generate, ``(B, 1, H, W, D)``. Default ``"label"``.
        condition_key: batch entry of the condition, ``(B, C_c, H, W, D)``. Default ``"image"``.

    Returns (``__call__``): ``(x0, targets, (), kwargs)`` with ``x0`` the plain ``(B, 1, H, W, D)`` image on
    ``device``, ``targets = {"noise": (B, 1, H, W, D), "x0": x0, "timesteps": (B,) long}`` and ``kwargs =
    {"noise", "timesteps", "condition": (B, C_c, H, W, D), "mode": "concat"}`` for ``DiffusionInferer.__call__``.
    """

    def __init__(self, num_train_timesteps: int = 1000, image_key: str = "label", condition_key: str = "image") -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"NoisePrepareBatch: num_train_timesteps must be >= 1, got {num_train_timesteps}.")
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_key)
        self.image_key = image_key
        self.condition_key = condition_key

    def __call__(  # type: ignore[override]
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, object]]:
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"NoisePrepareBatch: expected a dict batch, got {type(batchdata).__name__}.")
        missing = [k for k in (self.image_key, self.condition_key) if k not in batchdata]
        if missing:
            raise ValueError(f"NoisePrepareBatch: the batch needs entries {missing} (the DWI and the T2W).")
        x0 = _plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        condition = _plain(batchdata[self.condition_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if x0.ndim < 3 or condition.shape[0] != x0.shape[0] or condition.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"NoisePrepareBatch: {self.image_key!r} {tuple(x0.shape)} and {self.condition_key!r} "
                f"{tuple(condition.shape)} must be (B, C, *spatial) with the same B and spatial size."
            )
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        targets = {"noise": noise, "x0": x0, "timesteps": timesteps}
        return x0, targets, (), {"noise": noise, "timesteps": timesteps, "condition": condition, "mode": "concat"}


class DiffusionLoss(nn.Module):
    """L1 loss on the network's target plus an SSIM regulariser on the implied clean image (the modality-translation
    loss of paper section 3.1, "L1 + SSIM regulariser").

    ``loss = |pred - target|_1 + ssim_weight * (1 - SSIM(clamp(x0_hat, 0, 1), x0))`` with
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (``scheduler.add_noise``), ``abar`` =
    ``scheduler.alphas_cumprod``, and target and clean-image estimate set by ``scheduler.prediction_type``:

    - ``"epsilon"``: target ``eps``, ``x0_hat = (x_t - sqrt(1 - abar_t) pred) / sqrt(abar_t)`` (Ho et al. 2020,
      Eq. 15);
    - ``"v_prediction"``: target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``, ``x0_hat = sqrt(abar_t) x_t -
      sqrt(1 - abar_t) pred`` (Salimans and Ho 2022);
    - ``"sample"``: target ``x0``, ``x0_hat = pred``.

    The L1 term is the mean over voxels (the "simple" DDPM objective with L1); SSIM is
    MONAI's differentiable ``SSIMLoss`` (3D Gaussian window, valid region, mean over the batch), which differs in its
    border convention from the test metric :func:`~common.metrics.compute_ssim_3d`. Everything is computed in
    float32 outside autocast, whatever the network's output dtype. At large t, ``1 / sqrt(abar_t)`` amplifies the
    noise error in ``x0_hat`` under ``"epsilon"`` (about 160x at t = 999 of the linear schedule); the clamp bounds
    it.

    After each call :attr:`last_terms` holds ``{"l1": float, "ssim": float}`` (the SSIM term is ``1 - SSIM``, before
    weighting), for logging the components of the training loss.

    Args:
        scheduler: the training noise scheduler (a ``monai.networks.schedulers.Scheduler``, normally the
            ``DDPMScheduler`` given to ``DiffusionInferer``), for ``alphas_cumprod``, ``add_noise`` and
            ``prediction_type`` (``"epsilon"`` when it has none).
        ssim_weight: weight of the SSIM term, >= 0. Default 0.1.
        data_range: intensity range of the images for the SSIM constants. Default 1.0.
        win_size: SSIM window, odd, an int or one per axis; must not exceed any axis. Default 7.
        kernel_sigma: SSIM Gaussian standard deviation. Default 1.5.

    Shapes: ``forward(pred (B, C, H, W, D), {"noise": (B, C, H, W, D), "x0": (B, C, H, W, D), "timesteps": (B,)})
    -> ()``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        ssim_weight: float = 0.1,
        data_range: float = 1.0,
        win_size: int | Sequence[int] = 7,
        kernel_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        if not hasattr(scheduler, "alphas_cumprod") or not callable(getattr(scheduler, "add_noise", None)):
            raise ValueError(
                f"DiffusionLoss: scheduler must be a MONAI noise scheduler, got {type(scheduler).__name__}."
            )
        if ssim_weight < 0 or data_range <= 0:
            raise ValueError(
                f"DiffusionLoss: need ssim_weight >= 0 and data_range > 0, got {ssim_weight}, {data_range}."
            )
        self.prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"DiffusionLoss: the scheduler's prediction_type {self.prediction_type!r} is not one of "
                f"{PREDICTION_TYPES}."
            )
        self.scheduler = scheduler
        self.ssim_weight = float(ssim_weight)
        self.win_size = tuple(win_size) if isinstance(win_size, Sequence) else (int(win_size),) * 3
        if len(self.win_size) != 3 or any(w < 1 or w % 2 == 0 for w in self.win_size):
            raise ValueError(f"DiffusionLoss: win_size must be odd, one int or three, got {win_size!r}.")
        self.ssim = SSIMLoss(spatial_dims=3, data_range=data_range, win_size=self.win_size, kernel_sigma=kernel_sigma)
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's prediction ``(B, C, H, W, D)`` and the :class:`NoisePrepareBatch` targets -> scalar loss."""
        missing = [k for k in ("noise", "x0", "timesteps") if k not in targets]
        if missing:
            raise ValueError(f"DiffusionLoss: targets lack {missing}; use NoisePrepareBatch as prepare_batch.")
        pred = _plain(pred)
        noise, x0 = _plain(targets["noise"]).to(pred.device), _plain(targets["x0"]).to(pred.device)
        timesteps = targets["timesteps"].to(device=pred.device, dtype=torch.long)
        if pred.shape != noise.shape or x0.shape != noise.shape or pred.ndim != 5:
            raise ValueError(
                f"DiffusionLoss: pred {tuple(pred.shape)}, noise {tuple(noise.shape)} and x0 {tuple(x0.shape)} must be "
                "equal (B, C, H, W, D) shapes."
            )
        if any(w > s for w, s in zip(self.win_size, pred.shape[2:], strict=True)):
            raise ValueError(
                f"DiffusionLoss: SSIM win_size {self.win_size} exceeds the volume {tuple(pred.shape[2:])}."
            )
        autocast_off = (
            torch.autocast(pred.device.type, enabled=False)
            if torch.is_autocast_enabled(pred.device.type)
            else contextlib.nullcontext()
        )
        with autocast_off:
            pred, noise, x0 = pred.float(), noise.float(), x0.float()
            x_t = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
            abar = self.scheduler.alphas_cumprod.to(device=pred.device, dtype=torch.float32)[timesteps]
            abar = abar.reshape(-1, *(1,) * (pred.ndim - 1))
            if self.prediction_type == "v_prediction":
                target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
                x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * pred
            elif self.prediction_type == "sample":
                target, x0_hat = x0, pred
            else:
                target = noise
                x0_hat = (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
            l1 = (pred - target).abs().mean()
            ssim_term = self.ssim(x0_hat.clamp(0.0, 1.0), x0)
            loss = l1 + self.ssim_weight * ssim_term
        self.last_terms = {"l1": float(l1.detach()), "ssim": float(ssim_term.detach())}
        return loss


class DiffusionSampler:
    """Validation / test inferer of modality translation: ``sampler(t2w, network) -> DWI sample`` by DDIM (Song et
    al. 2021, Eq. 12 with eta = 0, deterministic given the initial noise) with MONAI's ``DDIMScheduler`` and
    ``DiffusionInferer.sample(..., mode="concat")``.

    Initial noise: ``(1, out_channels, H, W, D)`` per image from a CPU ``torch.Generator`` seeded with the CRC32 of
    ``seed``, the image's shape and its float32 bytes, so the same test image gets the same noise in every run, epoch
    and batch composition, and the test metric compares networks, not noise draws.

    Timesteps. MONAI's ``DDIMScheduler.step`` goes from t to ``t - T // n`` while ``set_timesteps(n)`` spaces the
    steps by ``(T - 1) / (n - 1)`` (999, 888, ..., 0 for T = 1000, n = 10), so each step would start from another
    noise level than the previous one reached. Here ``steps_offset = T // n - 1`` makes them agree ("trailing"
    spacing, 999, 899, ..., 99, then the clean image; Lin et al., "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", WACV 2024); this needs ``n`` to divide ``T``.

    Args:
        num_train_timesteps: T, as in training. Default 1000.
        num_inference_steps: n, DDIM steps; must divide T. Default 10.
        schedule: MONAI noise schedule name, as in training. Default ``"linear_beta"``.
        seed: seed of the initial noise, in ``[0, 2**32)``. Default 0.
        clip: ``(low, high)`` range of the images: the predicted clean image is clipped to it at every step (the
            scheduler's ``clip_sample``, as Ho et al. 2020) and the sample at the end; None clips nothing.
            Default ``(0.0, 1.0)``.
        out_channels: channels of the generated image. Default 1.
        schedule_args: extra arguments of the schedule (e.g. ``beta_start``, ``beta_end``), as in training.
            Default None.
        prediction_type: what the network predicts, one of :data:`PREDICTION_TYPES`, as in training (the module
            docstring says why the bundles use ``"v_prediction"``). Default ``"epsilon"``.

    Shapes: ``(B, C_c, H, W, D)`` condition -> ``(B, out_channels, H, W, D)`` float32 sample.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        num_inference_steps: int = 10,
        schedule: str = "linear_beta",
        seed: int = 0,
        clip: Sequence[float] | None = (0.0, 1.0),
        out_channels: int = 1,
        schedule_args: Mapping[str, float] | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"DiffusionSampler: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}."
            )
        if num_train_timesteps < 1 or not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                "DiffusionSampler: need 1 <= num_inference_steps <= num_train_timesteps, got "
                f"{num_inference_steps}, {num_train_timesteps}."
            )
        if num_train_timesteps % num_inference_steps:
            raise ValueError(
                f"DiffusionSampler: num_inference_steps ({num_inference_steps}) must divide num_train_timesteps "
                f"({num_train_timesteps}): MONAI's DDIM step goes back T // n training steps."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"DiffusionSampler: seed must be an int in [0, 2**32), got {seed!r}.")
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"DiffusionSampler: clip must be None or (low, high) with low < high, got {clip!r}.")
        if out_channels < 1:
            raise ValueError(f"DiffusionSampler: out_channels must be >= 1, got {out_channels}.")
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.schedule = schedule
        self.schedule_args = dict(schedule_args or {})
        self.seed = seed
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.out_channels = out_channels
        self.prediction_type = prediction_type
        low, high = self.clip if self.clip is not None else (-1.0, 1.0)
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            clip_sample=self.clip is not None,
            set_alpha_to_one=True,
            steps_offset=num_train_timesteps // num_inference_steps - 1,
            clip_sample_min=low,
            clip_sample_max=high,
            prediction_type=prediction_type,
            **self.schedule_args,
        )
        self.scheduler.set_timesteps(num_inference_steps)
        self.inferer = DiffusionInferer(self.scheduler)

    def train_scheduler(self) -> DDPMScheduler:
        """A new ``DDPMScheduler`` with this sampler's schedule (same betas), for ``DiffusionInferer`` and
        :class:`DiffusionLoss` in training."""
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            **self.schedule_args,
        )

    def initial_noise(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C_c, H, W, D)`` condition -> ``(B, out_channels, H, W, D)`` float32 noise on ``image``'s device, one
        generator per image (see the class docstring)."""
        image = _plain(image)
        parts = []
        for one in image.detach():
            data = np.ascontiguousarray(one.to(device="cpu", dtype=torch.float32).numpy())
            # torch's CPU generator keeps only the low 32 bits of a seed, so the seed goes into the checksum
            header = np.asarray([self.seed, *data.shape], dtype=np.int64).tobytes()
            generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(data.tobytes(), zlib.crc32(header)))
            parts.append(torch.randn((1, self.out_channels, *one.shape[1:]), generator=generator))
        return torch.cat(parts).to(image.device)

    def __call__(self, image: torch.Tensor, network: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Sample the DWI for the T2W ``image`` ``(B, C_c, H, W, D)`` -> ``(B, out_channels, H, W, D)``."""
        image = _plain(image)
        if image.ndim != 5:
            raise ValueError(f"DiffusionSampler: the condition must be (B, C, H, W, D), got {tuple(image.shape)}.")

        def predict(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            # float32 output: the scheduler's update stays in float32 under bf16 autocast
            return _plain(network(x, timesteps=timesteps, context=context)).float()

        sample = self.inferer.sample(
            input_noise=self.initial_noise(image),
            diffusion_model=predict,
            scheduler=self.scheduler,
            conditioning=image.float(),
            mode="concat",
            verbose=False,
        )
        return sample.clamp(*self.clip) if self.clip is not None else sample
