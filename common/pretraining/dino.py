"""ProViCNet pretraining objective: DINOv2 self-distillation of the cls token plus lesion-guided patch contrast.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024 (arXiv 2304.07193);
Lee et al., "Prostate-Specific Foundation Models with Patch-Level Contrast for Cancer Detection", arXiv 2502.00366;
Huang et al., "Understanding the Transfer Limits of Vision Foundation Models", ISBI 2026, section 2.1.

Facts taken from facebookresearch/dinov2:

- ``DINOHead`` (``dinov2/layers/dino_head.py``): MLP of 3 Linear layers (hidden 2048, GELU, bottleneck 256, Linear
  weights truncated-normal std 0.02, zero biases), L2 normalisation, then a weight-normalised bias-free Linear to K
  prototypes with ``weight_g`` filled with 1 (default K = 65536 in ``ssl_default_config.yaml``).
- ``DINOLoss`` (``dinov2/loss/dino_clstoken_loss.py``): teacher probabilities ``softmax((t - c) / tau_t)``, student
  ``log_softmax(s / tau_s)`` with ``tau_s = 0.1``; cross-entropy summed over prototypes, averaged over the batch;
  with two global crops the student's crop A is matched with the teacher's crop B and vice versa and the loss is
  the mean of the two terms (``ssl_meta_arch.py``). The centre ``c`` (1, K) is used first, then updated by
  ``c <- m c + (1 - m) mean(t)`` with ``m = 0.9`` (``center_momentum``).
- Teacher: exponential moving average of the student, ``theta_t <- m theta_t + (1 - m) theta_s``, with ``m``
  following a cosine schedule from its base value to 1 (``CosineScheduler``; dinov2 0.992, DINO v1 0.996).
  Teacher temperature 0.04 (dinov2 warms it up to 0.07; set :attr:`ProViCNetPretrainer.teacher_temp` for that).

Facts taken from pimed/ProViCNet (``ProViCNet/ModelArchitectures/ProViCNet/ProViCNet.py``,
``util_functions/train_functions.py``):

- ``CL_Head`` (``ContrastiveLearning_Head``) is a DINO head (3 layers, hidden 2048, bottleneck 256) to 65536 outputs
  with the weight-norm gain frozen at 1 (``norm_last_layer=True``), applied to single patch tokens.
- The patch-level contrast is supervised by the lesion mask: a label patch (8 x 8 label pixels = one 14 x 14 input
  patch) is cancer if >= 62 of its 64 pixels are cancer and non-cancer if <= 2 are; for every cancer patch, its
  cancer neighbours in the 3 x 3 window are positive pairs and its non-cancer neighbours negative pairs; an equal
  number ``min(#pos, #neg, 30)`` of each is drawn at random; the pair loss on the CL_Head outputs is
  ``1 - cos`` (positive) and ``relu(cos - 0.5)`` (negative), averaged over the drawn pairs. No temperature.
- Officially the contrast is added to the supervised segmentation loss, ``0.85 seg + 0.15 contrast``; here, as the
  study's pretraining bundle needs a self-supervised objective, it is added to the DINO loss with ``patch_weight``.

Choices of this implementation:

- ``patch_loss="provicnet"`` (default) is the official pairwise term above; ``"supcon"`` is a supervised-contrastive
  alternative (Khosla et al. 2020) over up to ``max_patches`` patches per slice, balanced lesion / background,
  positives = patches of the same class, temperature ``patch_temp``. Either way only slices with at least one lesion
  patch contribute, and a batch without lesion patches gives a patch loss of exactly 0 (no NaN).
- Neighbours outside the patch grid are skipped (the official slicing silently drops a border anchor's window).
- Two global views per slice stack, made in torch on the batch (random resized crop with scale (0.32, 1) as dinov2's
  global crops, horizontal flip, intensity scale/shift, gamma, Gaussian noise); local crops, iBOT masked-patch loss
  are omitted. The patch contrast uses the student tokens of both views (lesion masks warped with them).
- KoLeo (dinov2 ``KoLeoLoss``, Sablayrolles et al. 2019), ``koleo_weight`` 0.1 as dinov2's ``koleo_loss_weight``:
  ``-mean_n log ||z_n - z_nn(n)||`` over the L2-normalised student cls tokens of each global view, ``nn(n)`` the
  nearest other token of the same view, summed over the views. It keeps the tokens of a batch apart. Without it the
  demo profile's pretraining collapsed: a random tiny ViT maps every slice stack to nearly the same cls token, the
  centred teacher is uniform after ~20 iterations (entropy ln K) and the DINO loss gives no signal, so the backbone
  drifted to features on which the downstream classifier scored below a random-weight one.
- The teacher is an EMA copy of the student's backbone, slice-position tokens and DINO head; it never gets
  gradients and stays in eval mode.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.checks import check_float, check_int
from common.networks.checkpoint import atomic_save
from common.networks.dinov2 import DinoVisionTransformer
from common.networks.provicnet import ProViCNetBase, make_provicnet_backbone

__all__ = [
    "PATCH_LOSSES",
    "DINOHead",
    "ProViCNetPretrainer",
    "cosine_momentum",
    "dino_cls_loss",
    "koleo_loss",
    "patch_lesion_labels",
    "provicnet_pair_loss",
    "random_global_view",
    "sample_neighbour_pairs",
    "sample_supcon_patches",
    "save_student_checkpoint",
    "supcon_loss",
    "teacher_probabilities",
    "updated_center",
]

PATCH_LOSSES = ("provicnet", "supcon")
# Encoder modules of a ProViCNet model: what the downstream networks load (common.networks.load_checkpoint).
_ENCODER_PREFIXES = ("backbone.", "axis_pos.", "axis_max.")
# Official ProViCNet thresholds: cancer if >= 62 of 64 label pixels of a patch, non-cancer if <= 2 of 64.
_OFFICIAL_LESION_FRACTION = 62 / 64
_OFFICIAL_BACKGROUND_FRACTION = 2 / 64


def _check_range(value: object, name: str, low: float, high: float | None = None) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}.")
    a, b = (check_float(v, name, low, high) for v in value)
    if a > b:
        raise ValueError(f"{name} must satisfy min <= max, got {value!r}.")
    return a, b


# --------------------------------------------------------------------------------------------------------------------
# Heads


class _WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation ``W = g * v / ||v||`` per output row, parameters ``weight_g``
    ``(K, 1)`` and ``weight_v`` ``(K, d)`` (the names of ``torch.nn.utils.weight_norm`` in the official heads)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        layer = nn.Linear(in_features, out_features, bias=False)  # default (Kaiming-uniform) init, as the official
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(layer.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (..., K)``."""
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """DINO projection head (dinov2 ``DINOHead``; ProViCNet's ``CL_Head``): ``(..., E) -> (..., K)``.

    MLP ``E -> hidden -> hidden -> bottleneck`` with GELU (``nlayers`` Linear layers), L2 normalisation, then a
    weight-normalised bias-free Linear to K prototypes.

    Args:
        in_dim: input width E.
        out_dim: prototypes K. Default 65536 (dinov2 and ProViCNet).
        hidden_dim: MLP hidden width. Default 2048.
        bottleneck_dim: bottleneck width. Default 256.
        nlayers: Linear layers in the MLP (>= 1). Default 3.
        norm_last_layer: freeze the weight-norm gain at 1 (ProViCNet's ``CL_Head``; DINO v1). Default False (dinov2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        for value, name in ((in_dim, "in_dim"), (out_dim, "out_dim"), (hidden_dim, "hidden_dim")):
            check_int(value, name)
        check_int(bottleneck_dim, "bottleneck_dim")
        check_int(nlayers, "nlayers")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E) -> (..., K)`` prototype scores."""
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class _DinoBranch(ProViCNetBase):
    """ProViCNet encoder (``backbone``, ``axis_pos``, ``axis_max``) with a DINO head on the cls token."""

    def __init__(self, backbone: DinoVisionTransformer, head: DINOHead) -> None:
        super().__init__(backbone)
        self.dino_head = head


# --------------------------------------------------------------------------------------------------------------------
# DINO cls-token self-distillation


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution (dinov2 ``softmax_center_teacher``): ``(N, K), (1, K) -> (N, K)``,
    ``softmax((t - c) / teacher_temp)``, without gradient."""
    with torch.no_grad():
        return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean output (dinov2 ``apply_center_update``): ``(1, K), (N, K) -> (1, K)``,
    ``m c + (1 - m) mean_n(t_n)``."""
    with torch.no_grad():
        return center * momentum + teacher_logits.float().mean(dim=0, keepdim=True) * (1.0 - momentum)


def dino_cls_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temp: float = 0.1
) -> torch.Tensor:
    """DINO cross-view loss (dinov2 ``DINOLoss`` over two global crops): views ``(N, K)`` each ``-> ()``.

    ``mean over pairs (i, j), i != j, of mean_n [-sum_k P_t^j[n, k] log_softmax(s^i[n] / student_temp)_k]``: the
    student's view i is matched with every other teacher view j.
    """
    if len(student_logits) != len(teacher_probs) or len(student_logits) < 2:
        raise ValueError("need the same number (>= 2) of student and teacher views.")
    total, terms = 0.0, 0
    for i, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for j, t in enumerate(teacher_probs):
            if i != j:
                total = total - (t * log_p).sum(dim=-1).mean()
                terms += 1
    return total / terms


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (dinov2 ``KoLeoLoss``): ``(N, E) -> ()``, ``-mean_n log(||z_n - z_m(n)|| + eps)`` with
    ``z = features / ||features||`` and ``m(n)`` the index of the largest ``z_n . z_m``, ``m != n`` (the nearest
    neighbour on the sphere); distances as ``torch.nn.PairwiseDistance(2, eps)``. Computed in float32. N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, E) with N >= 2, got {tuple(features.shape)}.")
    z = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = z @ z.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(z, z[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum at ``step`` (dinov2 ``CosineScheduler``, no warm-up):
    ``final + (base - final) (1 + cos(pi step / total_steps)) / 2``; ``final`` from ``total_steps`` on."""
    check_int(step, "step", minimum=0)
    check_int(total_steps, "total_steps")
    check_float(base, "base", 0.0, 1.0)
    check_float(final, "final", 0.0, 1.0)
    if step >= total_steps:
        return float(final)
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * step / total_steps)))


# --------------------------------------------------------------------------------------------------------------------
# Lesion-guided patch contrast


def patch_lesion_labels(
    lesion: torch.Tensor,
    patch_size: int,
    lesion_fraction: float = _OFFICIAL_LESION_FRACTION,
    background_fraction: float = _OFFICIAL_BACKGROUND_FRACTION,
) -> torch.Tensor:
    """Patch classes from a lesion mask: ``(N, 1, h, w) -> (N, h/p, w/p)`` long, 1 = lesion (lesion fraction of the
    patch's pixels >= ``lesion_fraction``), 0 = background (<= ``background_fraction``), -1 = ignored (in between).

    Defaults: the official 62/64 and 2/64. Soft masks (warped) are fractions already; values are clamped to [0, 1].
    """
    if lesion.ndim != 4 or lesion.shape[1] != 1:
        raise ValueError(f"lesion must have shape (N, 1, h, w), got {tuple(lesion.shape)}.")
    if lesion.shape[-2] % patch_size or lesion.shape[-1] % patch_size:
        raise ValueError(f"lesion size {tuple(lesion.shape[-2:])} is not a multiple of the patch size {patch_size}.")
    if background_fraction >= lesion_fraction:
        raise ValueError("background_fraction must be smaller than lesion_fraction.")
    frac = F.avg_pool2d(lesion.float().clamp(0.0, 1.0), patch_size)[:, 0]  # (N, h/p, w/p)
    labels = torch.full(frac.shape, -1, dtype=torch.long, device=lesion.device)
    labels[frac <= background_fraction] = 0
    labels[frac >= lesion_fraction] = 1
    return labels


def _choose(n: int, k: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``k`` distinct random indices out of ``n`` (CPU generator, moved to ``device``)."""
    return torch.randperm(n, generator=generator)[:k].to(device)


def sample_supcon_patches(
    labels: torch.Tensor, max_patches: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Patches for the SupCon term: ``(N, gh, gw) -> (P,)`` long flat indices into ``N * gh * gw``.

    Only slices with at least one lesion patch are used; from each, up to ``max_patches`` patches, half lesion and
    half background where possible (the shorter class is topped up by the other). Empty when no slice qualifies.
    """
    check_int(max_patches, "max_patches", minimum=2)
    flat = labels.reshape(labels.shape[0], -1)
    chosen = []
    for i in range(flat.shape[0]):
        les = torch.nonzero(flat[i] == 1).flatten()
        bg = torch.nonzero(flat[i] == 0).flatten()
        if les.numel() == 0:
            continue
        k_les = min(les.numel(), max_patches // 2)
        k_bg = min(bg.numel(), max_patches - k_les)
        k_les = min(les.numel(), max_patches - k_bg)
        picks = (
            les[_choose(les.numel(), k_les, generator, les.device)],
            bg[_choose(bg.numel(), k_bg, generator, bg.device)],
        )
        chosen.append(torch.cat(picks) + i * flat.shape[1])
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat(chosen)


def sample_neighbour_pairs(
    labels: torch.Tensor, max_pairs: int = 30, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official ProViCNet pairs: ``(N, gh, gw) -> anchor (Q,), other (Q,), positive (Q,) bool``, flat indices into
    ``N * gh * gw``.

    Anchors are lesion patches; each of its 8 neighbours inside the grid gives a positive pair if it is a lesion
    patch, a negative pair if it is background. ``min(#positive, #negative, max_pairs)`` pairs of each kind are
    drawn at random (none when either kind is absent), positives first.
    """
    check_int(max_pairs, "max_pairs")
    n, gh, gw = labels.shape
    anchors, others, kinds = [], [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            # anchor (y, x) and neighbour (y + dy, x + dx), both inside the grid
            a = labels[:, max(0, -dy) : gh - max(0, dy), max(0, -dx) : gw - max(0, dx)]
            b = labels[:, max(0, dy) : gh - max(0, -dy), max(0, dx) : gw - max(0, -dx)]
            s, y, x = torch.nonzero((a == 1) & (b >= 0), as_tuple=True)
            ya, xa = y + max(0, -dy), x + max(0, -dx)
            anchors.append((s * gh + ya) * gw + xa)
            others.append((s * gh + ya + dy) * gw + xa + dx)
            kinds.append(b[s, y, x] == 1)
    anchor, other, positive = torch.cat(anchors), torch.cat(others), torch.cat(kinds)
    pos_idx, neg_idx = torch.nonzero(positive).flatten(), torch.nonzero(~positive).flatten()
    k = min(pos_idx.numel(), neg_idx.numel(), max_pairs)
    keep = torch.cat(
        (
            pos_idx[_choose(pos_idx.numel(), k, generator, labels.device)],
            neg_idx[_choose(neg_idx.numel(), k, generator, labels.device)],
        )
    )
    return anchor[keep], other[keep], positive[keep]


def provicnet_pair_loss(
    anchor: torch.Tensor, other: torch.Tensor, positive: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Official ProViCNet patch pair loss: ``(Q, K), (Q, K), (Q,) bool -> ()``, the mean over pairs of
    ``1 - cos`` (positive) or ``relu(cos - margin)`` (negative); 0 for ``Q = 0``."""
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    cos = F.cosine_similarity(anchor, other, dim=-1)
    return torch.where(positive, 1.0 - cos, F.relu(cos - margin)).mean()


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out"): ``(P, d), (P,) -> ()``.

    With ``z`` the L2-normalised features, ``P(i)`` the other samples of i's class and ``A(i)`` all others:
    ``mean over anchors with |P(i)| > 0 of -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / T) / sum_{a in A(i)}
    exp(z_i.z_a / T))``; 0 when no anchor has a positive.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features (P, d) and labels (P,) expected, got {tuple(features.shape)}, {tuple(labels.shape)}."
        )
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(dim=1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(dim=1)[valid] / n_pos[valid]
    return per_anchor.mean()


# --------------------------------------------------------------------------------------------------------------------
# Views


def random_global_view(
    x: torch.Tensor,
    lesion: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    crop_scale: Sequence[float] = (0.32, 1.0),
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    gamma_range: Sequence[float] = (0.7, 1.5),
    noise_std: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One augmented view per slice stack: ``(N, C, h, w)`` [and ``(N, 1, h, w)``] ``-> (N, C, h, w)`` [and the
    bilinearly warped lesion mask ``(N, 1, h, w)``, soft values in [0, 1]; None without a mask].

    Per slice: random resized crop (area fraction in ``crop_scale``, aspect ratio in [3/4, 4/3], resampled to
    ``(h, w)``), horizontal flip with ``flip_prob``; then intensity scale ``1 + U(-j, j)`` and shift ``U(-j, j)``
    times the slice's standard deviation, gamma ``U(gamma_range)`` on the slice's min-max range, and Gaussian noise
    of ``noise_std`` times the standard deviation. Random numbers come from ``generator`` (CPU).
    """
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, h, w), got {tuple(x.shape)}.")
    if lesion is not None and (lesion.ndim != 4 or lesion.shape[1] != 1 or lesion.shape[0] != x.shape[0]):
        raise ValueError(f"lesion must have shape ({x.shape[0]}, 1, h, w), got {tuple(lesion.shape)}.")
    lo, hi = _check_range(crop_scale, "crop_scale", 0.0, 1.0)
    g_lo, g_hi = _check_range(gamma_range, "gamma_range", 0.0)
    if g_lo <= 0.0:
        raise ValueError(f"gamma_range must be positive, got {gamma_range!r}.")
    n, _, h, w = x.shape

    def uniform(a: float, b: float) -> torch.Tensor:
        return (a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)).to(x.device, torch.float32)

    area = uniform(max(lo, 1e-3), hi)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop width / image width
    sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (1.0 - sx) * (2.0 * uniform(0.0, 1.0) - 1.0)  # crop centre in normalised coordinates
    cy = (1.0 - sy) * (2.0 * uniform(0.0, 1.0) - 1.0)
    flip = torch.where(uniform(0.0, 1.0) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)  # (N, h, w, 2)
    view = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped = None
    if lesion is not None:
        warped = F.grid_sample(lesion.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    std = view.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
    scale = uniform(1.0 - intensity_jitter, 1.0 + intensity_jitter)[:, None, None, None]
    shift = uniform(-intensity_jitter, intensity_jitter)[:, None, None, None] * std
    vmin = view.flatten(1).min(dim=1).values[:, None, None, None]
    vmax = view.flatten(1).max(dim=1).values[:, None, None, None]
    span = (vmax - vmin).clamp_min(1e-6)
    gamma = uniform(g_lo, g_hi)[:, None, None, None]
    view = vmin + span * ((view - vmin) / span).clamp(0.0, 1.0) ** gamma
    view = view * scale + shift
    noise = torch.randn(view.shape, generator=generator).to(view.device)
    view = view + noise_std * std * noise
    return view.to(x.dtype), warped


# --------------------------------------------------------------------------------------------------------------------
# The pretrainer


class ProViCNetPretrainer(nn.Module):
    """DINO self-distillation of ProViCNet's cls token with lesion-guided patch contrast (module docstring).

    ``forward(x (N, C, h, w), pos (N, 2), lesion (N, 1, h, w) | None) -> {"loss", "dino_loss", "patch_loss"}``
    (scalars), with ``loss = dino_loss + patch_weight * patch_loss``; h and w multiples of the patch size. In training
    mode each call also updates the DINO centre; call :meth:`update_teacher` after each optimiser step.

    Args:
        backbone_size: DINOv2 size when ``backbone`` is None. Default ``"small"``.
        in_chans: input channels C (slices x modalities). Default 3.
        patch_size, num_register_tokens, backbone_img_size, drop_path_rate: backbone settings as
            :class:`~common.networks.provicnet.ProViCNet` (defaults 14, 4, 518, 0.0).
        backbone: a prebuilt :class:`DinoVisionTransformer` with ``in_chans`` inputs (overrides the size arguments).
        out_dim: DINO prototypes K. Default 4096.
        head_hidden_dim: hidden width of both heads. Default 2048.
        head_bottleneck_dim: bottleneck width of both heads. Default 256.
        student_temp: student temperature. Default 0.1.
        teacher_temp: teacher temperature. Default 0.04.
        center_momentum: DINO centre momentum. Default 0.9.
        teacher_momentum: base EMA momentum of the teacher (see :func:`cosine_momentum`). Default 0.996.
        patch_loss: ``"provicnet"`` (official pairwise cosine term) or ``"supcon"``. Default ``"provicnet"``.
        patch_weight: weight of the patch term. Default 1.0.
        patch_out_dim: output width of the patch head ``CL_Head``. Default 65536 (official).
        patch_temp: SupCon temperature. Default 0.1.
        koleo_weight: weight of the KoLeo term on the student cls tokens (:func:`koleo_loss`). Default 0.1 (dinov2).
        patch_margin: margin of the official negative-pair term. Default 0.5.
        max_pairs: pairs of each kind per view for ``"provicnet"``. Default 30 (official).
        max_patches: patches per slice for ``"supcon"``. Default 64.
        lesion_fraction: lesion share of a patch's pixels from which it is a lesion patch. Default 62/64 (official).
        background_fraction: lesion share up to which it is a background patch. Default 2/64 (official).
        crop_scale, flip_prob, intensity_jitter, gamma_range, noise_std: view augmentation, see
            :func:`random_global_view`.
    """

    def __init__(
        self,
        backbone_size: str = "small",
        in_chans: int = 3,
        patch_size: int = 14,
        num_register_tokens: int = 4,
        backbone_img_size: int = 518,
        drop_path_rate: float = 0.0,
        backbone: DinoVisionTransformer | None = None,
        out_dim: int = 4096,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.996,
        patch_loss: str = "provicnet",
        patch_weight: float = 1.0,
        patch_out_dim: int = 65536,
        patch_temp: float = 0.1,
        koleo_weight: float = 0.1,
        patch_margin: float = 0.5,
        max_pairs: int = 30,
        max_patches: int = 64,
        lesion_fraction: float = _OFFICIAL_LESION_FRACTION,
        background_fraction: float = _OFFICIAL_BACKGROUND_FRACTION,
        crop_scale: Sequence[float] = (0.32, 1.0),
        flip_prob: float = 0.5,
        intensity_jitter: float = 0.1,
        gamma_range: Sequence[float] = (0.7, 1.5),
        noise_std: float = 0.05,
    ) -> None:
        super().__init__()
        check_int(in_chans, "in_chans")
        check_int(patch_size, "patch_size")
        if patch_loss not in PATCH_LOSSES:
            raise ValueError(f"patch_loss must be one of {PATCH_LOSSES}, got {patch_loss!r}.")
        self.student_temp = check_float(student_temp, "student_temp", 0.0, open_low=True)
        self.teacher_temp = check_float(teacher_temp, "teacher_temp", 0.0, open_low=True)
        self.center_momentum = check_float(center_momentum, "center_momentum", 0.0, 1.0)
        self.teacher_momentum = check_float(teacher_momentum, "teacher_momentum", 0.0, 1.0)
        self.patch_weight = check_float(patch_weight, "patch_weight", 0.0)
        self.patch_temp = check_float(patch_temp, "patch_temp", 0.0, open_low=True)
        self.koleo_weight = check_float(koleo_weight, "koleo_weight", 0.0)
        self.patch_margin = check_float(patch_margin, "patch_margin", -1.0, 1.0)
        self.lesion_fraction = check_float(lesion_fraction, "lesion_fraction", 0.0, 1.0, open_low=True)
        self.background_fraction = check_float(background_fraction, "background_fraction", 0.0, 1.0)
        if self.background_fraction >= self.lesion_fraction:
            raise ValueError(
                f"background_fraction ({background_fraction}) must be smaller than lesion_fraction ({lesion_fraction})."
            )
        self.patch_loss = patch_loss
        self.max_pairs = check_int(max_pairs, "max_pairs")
        self.max_patches = check_int(max_patches, "max_patches", minimum=2)
        self.view_kwargs = {
            "crop_scale": _check_range(crop_scale, "crop_scale", 0.0, 1.0),
            "flip_prob": check_float(flip_prob, "flip_prob", 0.0, 1.0),
            "intensity_jitter": check_float(intensity_jitter, "intensity_jitter", 0.0, 1.0),
            "gamma_range": _check_range(gamma_range, "gamma_range", 0.0),
            "noise_std": check_float(noise_std, "noise_std", 0.0),
        }
        if self.view_kwargs["gamma_range"][0] <= 0.0:
            raise ValueError(f"gamma_range must be positive, got {gamma_range!r}.")
        backbone = make_provicnet_backbone(
            backbone, backbone_size, in_chans, patch_size, num_register_tokens, backbone_img_size, drop_path_rate
        )
        embed_dim = backbone.embed_dim
        self.student = _DinoBranch(backbone, DINOHead(embed_dim, out_dim, head_hidden_dim, head_bottleneck_dim))
        self.CL_Head = DINOHead(embed_dim, patch_out_dim, head_hidden_dim, head_bottleneck_dim, norm_last_layer=True)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.register_buffer("center", torch.zeros(1, out_dim))

    def train(self, mode: bool = True) -> ProViCNetPretrainer:
        """Set training mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None) -> None:
        """EMA step ``theta_t <- m theta_t + (1 - m) theta_s`` over every teacher parameter (``momentum`` default:
        ``teacher_momentum``; use :func:`cosine_momentum` for dinov2's schedule). ``momentum=0`` copies the student,
        e.g. after loading pretrained weights into ``student``."""
        m = self.teacher_momentum if momentum is None else check_float(momentum, "momentum", 0.0, 1.0)
        student = dict(self.student.named_parameters())
        for name, p_t in self.teacher.named_parameters():
            p_t.mul_(m).add_(student[name].detach(), alpha=1.0 - m)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's encoder weights under ProViCNet names (``backbone.*``, ``axis_pos.*``, ``axis_max.*``),
        detached copies: what downstream ProViCNet models load."""
        return {k: v.detach().clone() for k, v in self.student.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}

    def _patch_term(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor | None:
        """Patch loss of one view, tokens ``(N, n, E)`` and labels ``(N, gh, gw)`` -> ``()``; None when nothing
        was sampled (no lesion patch, or no pair of each kind)."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        if self.patch_loss == "provicnet":
            anchor, other, positive = sample_neighbour_pairs(labels, self.max_pairs, generator)
            if anchor.numel() == 0:
                return None
            proj = self.CL_Head(flat[torch.cat((anchor, other))])
            return provicnet_pair_loss(proj[: anchor.numel()], proj[anchor.numel() :], positive, self.patch_margin)
        idx = sample_supcon_patches(labels, self.max_patches, generator)
        if idx.numel() == 0:
            return None
        return supcon_loss(self.CL_Head(flat[idx]), labels.flatten()[idx], self.patch_temp)

    def _zero_patch_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        # An exact zero that still touches CL_Head, so DDP sees a (zero) gradient for every parameter.
        return sum((p.sum() for p in self.CL_Head.parameters()), tokens.sum()) * 0.0

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        lesion: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``(N, C, h, w), (N, 2)`` [and lesion ``(N, 1, h, w)``] ``-> {"loss", "dino_loss", "patch_loss",
        "koleo_loss", "teacher_entropy", "dino_kl"}`` scalars, ``loss = dino_loss + patch_weight * patch_loss +
        koleo_weight * koleo_loss``; the last two (no gradient) split the DINO cross-entropy into the
        teacher's entropy, which rises early while the centre adapts, and KL(teacher || student), which training
        lowers.

        Two global views are drawn with ``generator``; teacher and student see both; the DINO loss matches each
        student view with the other teacher view. ``patch_loss`` is 0 without a mask or without lesion patches.
        """
        if x.ndim != 4:
            raise ValueError(f"x must have shape (N, C, h, w), got {tuple(x.shape)}.")
        p = self.student.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"slice size {tuple(x.shape[-2:])} must be a multiple of the patch size {p}.")
        views = [random_global_view(x, lesion, generator, **self.view_kwargs) for _ in range(2)]
        images = torch.cat([v for v, _ in views])
        pos2 = torch.cat((pos, pos))

        with torch.no_grad():
            t_logits = self.teacher.dino_head(self.teacher.forward_features_pos(images, pos2)["x_norm_clstoken"])
            t_probs = teacher_probabilities(t_logits, self.center, self.teacher_temp).chunk(2)
            if self.training:
                batch_mean = t_logits.float().mean(dim=0, keepdim=True)
                if dist.is_available() and dist.is_initialized():  # dinov2 averages the centre over all ranks
                    dist.all_reduce(batch_mean)
                    batch_mean = batch_mean / dist.get_world_size()
                self.center.copy_(updated_center(self.center, batch_mean, self.center_momentum))

        feats = self.student.forward_features_pos(images, pos2)
        s_logits = self.student.dino_head(feats["x_norm_clstoken"]).chunk(2)
        dino_loss = dino_cls_loss(s_logits, t_probs, self.student_temp)
        # dinov2 sums the term over the global views; a view of one image has no neighbour, so its term is 0
        cls_views = feats["x_norm_clstoken"].chunk(2)
        koleo = sum(koleo_loss(c) for c in cls_views) if x.shape[0] > 1 else dino_loss.new_zeros(())

        terms = []
        if lesion is not None:
            for tok, (_, mask) in zip(feats["x_norm_patchtokens"].chunk(2), views, strict=True):
                labels = patch_lesion_labels(mask, p, self.lesion_fraction, self.background_fraction)
                terms.append(self._patch_term(tok, labels, generator))
        terms = [t for t in terms if t is not None]
        # mean over the views that had lesion patches; an exact (graph-connected) zero when none had
        patch_loss = sum(terms) / len(terms) if terms else self._zero_patch_loss(feats["x_norm_patchtokens"])
        with torch.no_grad():  # CE = H(teacher) + KL(teacher || student): the KL is the student's progress measure
            entropy = torch.stack([-(t * t.clamp_min(1e-12).log()).sum(dim=-1).mean() for t in t_probs]).mean()
        return {
            "loss": dino_loss + self.patch_weight * patch_loss + self.koleo_weight * koleo,
            "dino_loss": dino_loss,
            "patch_loss": patch_loss,
            "koleo_loss": koleo.detach(),
            "teacher_entropy": entropy,
            "dino_kl": dino_loss.detach() - entropy,
        }


def save_student_checkpoint(model: ProViCNetPretrainer, path: str | os.PathLike) -> None:
    """Write ``model.student_state_dict()`` to ``path`` with ``torch.save`` (atomically: a temporary file renamed into
    place): a ``provicnet_official``-format file without ``head.*``, which ProViCNet models load with
    ``load_provicnet_checkpoint(..., encoder_only=True)``."""
    if not isinstance(model, ProViCNetPretrainer):
        raise ValueError(f"model must be a ProViCNetPretrainer, got {type(model).__name__}.")
    atomic_save(model.student_state_dict(), path)
