from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from common.data.phantom import make_case, pirads_of_case
from common.networks import DinoVisionTransformer, ProViCNetDense, load_checkpoint, neighbour_slice_indices
from common.networks.provicnet import load_provicnet_checkpoint
from common.pretraining.dino import (
    DINOHead,
    ProViCNetPretrainer,
    cosine_momentum,
    dino_cls_loss,
    koleo_loss,
    patch_lesion_labels,
    provicnet_pair_loss,
    random_global_view,
    sample_neighbour_pairs,
    sample_supcon_patches,
    save_student_checkpoint,
    supcon_loss,
    teacher_probabilities,
    updated_center,
)


def tiny_backbone(in_chans: int = 3) -> DinoVisionTransformer:
    return DinoVisionTransformer(
        img_size=56, patch_size=14, in_chans=in_chans, embed_dim=48, depth=2, num_heads=2, num_register_tokens=4
    )


def tiny_pretrainer(**kwargs: object) -> ProViCNetPretrainer:
    torch.manual_seed(0)
    defaults = {
        "out_dim": 64,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "patch_out_dim": 32,
        "lesion_fraction": 0.02,
        "background_fraction": 0.0,
    }
    defaults.update(kwargs)
    return ProViCNetPretrainer(backbone=tiny_backbone(), **defaults)


@functools.cache
def phantom_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slice stacks (8, 3, 56, 56), positions (8, 2) and lesion masks (8, 1, 56, 56) of the first phantom case with a
    PI-RADS 5 lesion. The lesion covers a small part of a 14 x 14 patch here, hence ``lesion_fraction=0.02``."""
    index = next(k for k in range(40) if pirads_of_case(0, k) == 5)
    c = make_case(index, seed=0, size=(8, 56, 56))
    assert c["lesion"].any(), "the fixture needs a lesion"
    t2 = torch.from_numpy(c["t2w"])
    t2 = (t2 - t2.mean()) / t2.std()
    stacks = t2[..., neighbour_slice_indices(8, 3)].permute(2, 3, 0, 1)  # (H, W, D, 3) -> (D, 3, H, W)
    masks = torch.from_numpy(c["lesion"]).float().permute(2, 0, 1)[:, None]
    pos = torch.stack((torch.arange(8.0), torch.full((8,), 8.0)), dim=1)
    return stacks, pos, masks


# ---------------------------------------------------------------------------------------------------------------- DINO


def test_dino_loss_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    s = [rng.normal(size=(3, 5)) for _ in range(2)]
    t = [rng.normal(size=(3, 5)) for _ in range(2)]
    center = rng.normal(size=(1, 5))
    t_temp, s_temp = 0.04, 0.1

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    probs = [softmax((ti - center) / t_temp) for ti in t]
    log_s = [np.log(softmax(si / s_temp)) for si in s]
    expected = 0.5 * (-(probs[1] * log_s[0]).sum(1).mean() - (probs[0] * log_s[1]).sum(1).mean())

    c_t = torch.tensor(center)
    t_probs = [teacher_probabilities(torch.tensor(ti), c_t, t_temp) for ti in t]
    np.testing.assert_allclose(t_probs[0].double().numpy(), probs[0], rtol=1e-5, atol=1e-7)
    got = dino_cls_loss([torch.tensor(si) for si in s], t_probs, s_temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_hand_value() -> None:
    # teacher one-hot on prototype 0; student logits (0, 0) -> log_softmax = log(1/2) for both views: loss = log 2
    t = [torch.tensor([[1.0, 0.0]])] * 2
    s = [torch.zeros(1, 2), torch.zeros(1, 2)]
    assert dino_cls_loss(s, t).item() == pytest.approx(math.log(2.0))


def test_koleo_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 4))
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    # nearest other point by Euclidean distance on the sphere (the same as the largest dot product)
    d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.diag(np.full(7, np.inf))
    expected = -np.log(d.min(axis=1)).mean()
    assert koleo_loss(torch.tensor(x)).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_hand_values_and_gradient() -> None:
    # two orthogonal unit vectors: distance sqrt(2) each, loss -log sqrt(2)
    assert koleo_loss(torch.eye(2)).item() == pytest.approx(-0.5 * math.log(2.0), rel=1e-6)
    # points that nearly coincide give a large loss whose gradient pushes them apart
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]], requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() > 2.0
    loss.backward()
    assert x.grad[1, 1] < 0  # moving point 1 further from point 0 lowers the loss
    with pytest.raises(ValueError):
        koleo_loss(torch.ones(1, 3))


def test_pretrainer_adds_weighted_koleo() -> None:
    x, pos, lesion = phantom_batch()
    outs = {}
    for weight in (0.0, 0.1):
        model = tiny_pretrainer(koleo_weight=weight).train()
        outs[weight] = model(x, pos, lesion, generator=torch.Generator().manual_seed(0))
    for weight, out in outs.items():
        torch.testing.assert_close(out["loss"], out["dino_loss"] + out["patch_loss"] + weight * out["koleo_loss"])
    torch.testing.assert_close(outs[0.0]["koleo_loss"], outs[0.1]["koleo_loss"])
    assert outs[0.1]["koleo_loss"].item() != 0.0


@pytest.mark.parametrize(("momentum", "expected"), [(0.9, [[1.3, 2.0]]), (0.5, [[2.5, 2.0]]), (1.0, [[1.0, 2.0]])])
def test_center_update(momentum: float, expected: list[list[float]]) -> None:
    center = torch.tensor([[1.0, 2.0]])
    logits = torch.tensor([[3.0, 0.0], [5.0, 4.0]])  # mean (4, 2)
    torch.testing.assert_close(updated_center(center, logits, momentum), torch.tensor(expected))


def test_center_updated_in_training_only() -> None:
    model = tiny_pretrainer()
    x, pos, _ = phantom_batch()
    x, pos = x[:4], pos[:4]
    model.eval()
    model(x, pos, generator=torch.Generator().manual_seed(1))
    assert torch.count_nonzero(model.center) == 0
    model.train()
    model(x, pos, generator=torch.Generator().manual_seed(1))
    # independent recomputation of the teacher output on the same two views
    gen = torch.Generator().manual_seed(1)
    views = torch.cat([random_global_view(x, None, gen, **model.view_kwargs)[0] for _ in range(2)])
    with torch.no_grad():
        cls = model.teacher.forward_features_pos(views, torch.cat((pos, pos)))["x_norm_clstoken"]
        t_logits = model.teacher.dino_head(cls)
    torch.testing.assert_close(model.center, 0.1 * t_logits.mean(0, keepdim=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("m", "expected"), [(0.75, 3.0), (0.5, 4.0), (0.0, 6.0)])
def test_teacher_ema_update(m: float, expected: float) -> None:
    model = tiny_pretrainer()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.fill_(2.0)
        for p in model.student.parameters():
            p.fill_(6.0)
    model.update_teacher(m)
    for name, p in model.teacher.named_parameters():
        assert torch.allclose(p, torch.full_like(p, expected)), name


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, base=0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, base=0.996) == pytest.approx(0.998)
    assert cosine_momentum(25, 100, base=0.99) == pytest.approx(1.0 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_momentum(150, 100) == 1.0


@pytest.mark.parametrize("patch_loss", ["provicnet", "supcon"])
def test_gradients_reach_student_not_teacher(patch_loss: str) -> None:
    model = tiny_pretrainer(patch_loss=patch_loss).train()
    x, pos, lesion = phantom_batch()
    out = model(x, pos, lesion, generator=torch.Generator().manual_seed(0))
    assert out["patch_loss"].item() > 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("student.backbone.mask_token"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.CL_Head.mlp[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------- patch contrast


def test_patch_lesion_labels_hand_values() -> None:
    lesion = torch.zeros(1, 1, 4, 4)
    lesion[0, 0, :2, :2] = 1.0  # patch (0, 0): 4/4
    lesion[0, 0, 0, 2] = 1.0  # patch (0, 1): 1/4
    lesion[0, 0, 2:, 2:] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # patch (1, 1): 3/4
    labels = patch_lesion_labels(lesion, 2, lesion_fraction=0.75, background_fraction=0.25)
    torch.testing.assert_close(labels, torch.tensor([[[1, 0], [0, 1]]]))
    labels = patch_lesion_labels(lesion, 2, lesion_fraction=0.9, background_fraction=0.0)
    torch.testing.assert_close(labels, torch.tensor([[[1, -1], [0, -1]]]))


def test_supcon_matches_double_loop() -> None:
    torch.manual_seed(0)
    feats = torch.randn(5, 3)
    labels = torch.tensor([1, 1, 0, 0, 1])
    temp = 0.2
    z = [f / f.norm() for f in feats]
    total, anchors = 0.0, 0
    for i in range(5):
        positives = [p for p in range(5) if p != i and labels[p] == labels[i]]
        denom = sum(math.exp(float(z[i] @ z[a]) / temp) for a in range(5) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / temp) / denom) for p in positives) / len(positives)
        anchors += 1
    assert supcon_loss(feats, labels, temp).item() == pytest.approx(total / anchors, rel=1e-5)


def test_supcon_without_positives_is_zero() -> None:
    feats = torch.randn(3, 4, requires_grad=True)
    loss = supcon_loss(feats, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(feats.grad) == 0


def test_provicnet_pair_loss_hand_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    positive = torch.tensor([True, False, False])
    c = 1 / math.sqrt(2)  # cos(45 deg)
    expected = ((1 - c) + (c - 0.5) + 0.0) / 3
    assert provicnet_pair_loss(a, b, positive, margin=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_neighbour_pairs_hand_grid() -> None:
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 1, 1] = labels[0, 1, 2] = 1  # flat 4 and 5
    labels[0, 2, 0] = -1  # ignored: neither positive nor negative
    anchor, other, positive = sample_neighbour_pairs(labels, max_pairs=30, generator=torch.Generator().manual_seed(0))
    # positives: 4<->5; negatives of anchor 4: 0, 1, 2, 3, 7, 8 (6 ignored); of anchor 5: 1, 2, 7, 8 -> 10; k = 2
    pos_pairs = {(int(a), int(o)) for a, o, p in zip(anchor, other, positive, strict=True) if p}
    neg_pairs = {(int(a), int(o)) for a, o, p in zip(anchor, other, positive, strict=True) if not p}
    assert pos_pairs == {(4, 5), (5, 4)}
    assert len(neg_pairs) == 2
    assert neg_pairs <= {(4, 0), (4, 1), (4, 2), (4, 3), (4, 7), (4, 8), (5, 1), (5, 2), (5, 7), (5, 8)}


def test_neighbour_pairs_need_both_kinds() -> None:
    labels = torch.ones(2, 3, 3, dtype=torch.long)  # lesion everywhere: positives only -> no pairs (official)
    anchor, _, _ = sample_neighbour_pairs(labels)
    assert anchor.numel() == 0


def test_supcon_sampling_balanced_and_lesion_slices_only() -> None:
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[1, 0, :3] = 1  # slice 1: 3 lesion, 13 background; slices 0 and 2 no lesion
    idx = sample_supcon_patches(labels, max_patches=8, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == 8
    assert ((idx >= 16) & (idx < 32)).all()
    assert int(labels.flatten()[idx].sum()) == 3  # all 3 lesion patches + 5 background
    assert sample_supcon_patches(torch.zeros(2, 4, 4, dtype=torch.long), 8).numel() == 0


@pytest.mark.parametrize("patch_loss", ["provicnet", "supcon"])
def test_no_lesion_patches_contribute_zero(patch_loss: str) -> None:
    model = tiny_pretrainer(patch_loss=patch_loss).train()
    x, pos, lesion = phantom_batch()
    out = model(x, pos, torch.zeros_like(lesion), generator=torch.Generator().manual_seed(0))
    assert out["patch_loss"].item() == 0.0
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], out["dino_loss"] + model.koleo_weight * out["koleo_loss"])
    out["loss"].backward()
    assert model.CL_Head.mlp[0].weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------- views


def test_view_warps_mask_with_image_and_is_seeded() -> None:
    mask = torch.zeros(2, 1, 28, 28)
    mask[:, :, 8:16, 10:20] = 1.0
    kwargs = {"flip_prob": 0.5, "intensity_jitter": 0.0, "gamma_range": (1.0, 1.0), "noise_std": 0.0}
    view, warped = random_global_view(mask.clone(), mask, torch.Generator().manual_seed(4), **kwargs)
    torch.testing.assert_close(view, warped, atol=1e-5, rtol=0)
    assert not torch.allclose(warped, mask)
    again, _ = random_global_view(mask.clone(), mask, torch.Generator().manual_seed(4), **kwargs)
    torch.testing.assert_close(view, again)


# ------------------------------------------------------------------------------------------------ training and saving


def test_total_loss_falls() -> None:
    # Fixed views and a slow teacher. With center_momentum=0 the centre is the previous step's teacher mean, so the
    # target is stationary from step 1 on; with 0.9 the DINO loss first rises while the centre catches up from 0
    # (normal DINO dynamics, not a test of learning).
    model = tiny_pretrainer(center_momentum=0.0).train()
    x, pos, lesion = phantom_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, patch = [], []
    for step in range(30):
        out = model(x, pos, lesion, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_teacher(cosine_momentum(step, 30))
        losses.append(out["loss"].item())
        patch.append(out["patch_loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[1:5])
    assert np.mean(patch[-4:]) < 0.5 * patch[0]


def test_saved_student_loads_into_dense_model(tmp_path: object) -> None:
    model = tiny_pretrainer()
    with torch.no_grad():
        model.student.axis_pos.weight.add_(1.0)  # make the slice-position tokens distinguishable from a fresh init
    path = tmp_path / "student.pt"
    save_student_checkpoint(model, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(model.student_state_dict())
    assert {k.split(".")[0] for k in saved} == {"backbone", "axis_pos", "axis_max"}

    torch.manual_seed(1)
    dense = ProViCNetDense(out_channels=2, slice_size=None, backbone=tiny_backbone())
    load_checkpoint(dense.backbone, path, strict=True)
    for k, v in dense.backbone.state_dict().items():
        torch.testing.assert_close(v, model.student.backbone.state_dict()[k], rtol=0, atol=0)

    dense = ProViCNetDense(out_channels=2, slice_size=None, backbone=tiny_backbone())
    report = load_provicnet_checkpoint(dense, path, strict=True, encoder_only=True)
    assert all(k.startswith("head.") for k in report["kept"]) and not report["ignored"]
    for k, v in model.student_state_dict().items():
        torch.testing.assert_close(dense.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch_loss": "infonce"},
        {"student_temp": 0.0},
        {"koleo_weight": -0.1},
        {"center_momentum": 1.5},
        {"lesion_fraction": 0.1, "background_fraction": 0.2},
        {"max_patches": 1},
        {"gamma_range": (0.0, 1.0)},
        {"in_chans": 6},  # the tiny backbone takes 3 channels
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        tiny_pretrainer(**kwargs)


def test_dino_head_shapes_and_frozen_gain() -> None:
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    assert head(torch.randn(2, 3, 8)).shape == (2, 3, 10)
    assert not head.last_layer.weight_g.requires_grad
    with pytest.raises(ValueError):
        DINOHead(8, out_dim=0)
