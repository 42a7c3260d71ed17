from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.phantom import make_case
from common.networks import ProFoundDense, load_checkpoint, profound_encoder
from common.pretraining.fcmae import (
    FCMAEPretrainer,
    fcmae_loss,
    patchify,
    random_patch_mask,
    save_encoder_checkpoint,
    unpatchify,
    upsample_patch_mask,
)


def _model(official_axis_order: bool = True, seed: int = 0, **kwargs) -> FCMAEPretrainer:
    """Atto pretrainer with every parameter perturbed, so LayerNorm biases and GRN gamma/beta are non-zero (at
    initialisation they are zero and would hide a leak through them)."""
    torch.manual_seed(seed)
    kwargs = {"encoder_size": "atto", "in_channels": 1, "decoder_embed_dim": 32, **kwargs}
    model = FCMAEPretrainer(official_axis_order=official_axis_order, official_init=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# --- patchify / unpatchify -------------------------------------------------------------------------------------


def test_patchify_hand_checked_order_two_channels():
    x = torch.arange(32.0).reshape(1, 2, 4, 2, 2)  # value = 16 c + 4 h + 2 w + d
    p = patchify(x, 2)
    assert p.shape == (1, 2, 16)
    first = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23]  # (ph, pw, pd, c), channel fastest
    assert p[0, 0].tolist() == first
    assert p[0, 1].tolist() == [v + 8 for v in first]  # second patch: h + 2


def test_patchify_hand_checked_grid_order():
    x = torch.arange(32.0).reshape(1, 1, 4, 4, 2)  # value = 8 h + 2 w + d; grid (2, 2, 1)
    p = patchify(x, 2)
    assert p[0, :, 0].tolist() == [0, 4, 16, 20]  # l = gh * 2 + gw: corners (0,0), (0,2), (2,0), (2,2)
    assert p[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 4, 12), 4), ((1, 1, 32, 16, 16), 16), ((3, 2, 6, 6, 6), 3)])
def test_patchify_round_trip(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    grid = [s // p for s in shape[2:]]
    assert patches.shape == (shape[0], grid[0] * grid[1] * grid[2], p**3 * shape[1])
    torch.testing.assert_close(unpatchify(patches, p, grid), x, rtol=0, atol=0)


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 8, 8, 6), 4)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.zeros(1, 5, 8), 2, (2, 2, 1))


# --- masks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,ratio,expected", [(8, 0.6, 5), (12, 0.75, 9), (100, 0.6, 60), (10, 0.25, 3)])
def test_random_mask_exact_count_and_seeded(n, ratio, expected):
    mask = random_patch_mask(4, n, ratio, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (4, n)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum(1).tolist() == [expected] * 4
    again = random_patch_mask(4, n, ratio, generator=torch.Generator().manual_seed(3))
    other = random_patch_mask(4, n, ratio, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, other)
    assert not all(torch.equal(mask[0], m) for m in mask[1:])  # samples get their own masks


def test_random_mask_global_rng_reproducible():
    torch.manual_seed(11)
    a = random_patch_mask(2, 27, 0.6)
    torch.manual_seed(11)
    assert torch.equal(a, random_patch_mask(2, 27, 0.6))


@pytest.mark.parametrize("n,ratio", [(8, 0.0), (8, 1.0), (2, 0.1), (2, 0.9)])
def test_random_mask_rejects_degenerate(n, ratio):
    with pytest.raises(ValueError):
        random_patch_mask(1, n, ratio)


def test_upsample_patch_mask():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # grid (2, 1, 2)
    up = upsample_patch_mask(mask, (2, 1, 2), 2)
    assert up.shape == (1, 1, 4, 2, 4)
    assert up[0, 0, 0, 1, 1] == 1 and up[0, 0, 1, 0, 2] == 0 and up[0, 0, 2, 1, 1] == 0 and up[0, 0, 3, 0, 3] == 1


# --- no leak of masked content -----------------------------------------------------------------------------------


@pytest.mark.parametrize("official_axis_order", [True, False])
@pytest.mark.parametrize("visible", [[4], [4, 5]])  # one patch; two neighbours along D
def test_visible_features_equal_encoder_on_visible_crop(official_axis_order, visible):
    """Sparse semantics: with only a box of patches visible, the masked encoder on the whole volume equals the
    plain dense encoder on the cropped box (zero padding = absent neighbours, GRN over the box only)."""
    model = _model(official_axis_order)
    x = torch.randn(1, 1, 48, 32, 32)  # grid (3, 2, 2); patch 4 = (gh 1, gw 0, gd 0), patch 5 = (1, 0, 1)
    mask = torch.ones(1, 12)
    mask[0, visible] = 0.0
    with torch.no_grad():
        feats = model.forward_encoder(x, mask)
        gd = len(visible)
        crop = x[:, :, 16:32, 0:16, 0 : 16 * gd]
        reference = model.encoder.forward_features(crop)[-1]
        torch.testing.assert_close(feats[:, :, 1:2, 0:1, 0:gd], reference, rtol=1e-4, atol=1e-4)
        assert feats[:, :, 0].abs().max() == 0 and feats[:, :, 2].abs().max() == 0  # masked patches stay empty
        # Zeroing the masked input alone is not enough: LayerNorm biases and GRN statistics still leak.
        keep = 1.0 - upsample_patch_mask(mask, (3, 2, 2), 16)
        naive = model.encoder.forward_features(x * keep)[-1][:, :, 1:2, 0:1, 0:gd]
        assert (naive - reference).abs().max() > 1e-2


@pytest.mark.parametrize("official_axis_order", [True, False])
def test_pred_independent_of_masked_content(official_axis_order):
    model = _model(official_axis_order)
    x = torch.randn(2, 1, 32, 32, 32)
    mask = random_patch_mask(2, 8, 0.6, generator=torch.Generator().manual_seed(0))
    masked_voxels = upsample_patch_mask(mask, (2, 2, 2), 16)
    x2 = x + 5.0 * torch.randn_like(x) * masked_voxels
    x3 = x + 0.5 * torch.randn_like(x) * (1.0 - masked_voxels)
    with torch.no_grad():
        out, out2, out3 = model(x, mask=mask), model(x2, mask=mask), model(x3, mask=mask)
    torch.testing.assert_close(out2["pred"], out["pred"], rtol=1e-5, atol=1e-5)
    assert (out3["pred"] - out["pred"]).abs().max() > 1e-3  # visible content does reach every prediction
    assert not torch.allclose(out2["loss"], out["loss"])  # the target (masked content) differs


def test_unmasked_encoder_equals_dense_encoder():
    model = _model(True)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_encoder(x, torch.zeros(2, 4)), model.encoder.forward_features(x)[-1], rtol=1e-5, atol=1e-5
        )


# --- loss --------------------------------------------------------------------------------------------------------


def _numpy_loss(x: np.ndarray, pred: np.ndarray, mask: np.ndarray, grid: tuple[int, int, int], norm_pix: bool):
    p, errors = 16, []
    for b in range(x.shape[0]):
        for gh in range(grid[0]):
            for gw in range(grid[1]):
                for gd in range(grid[2]):
                    idx = (gh * grid[1] + gw) * grid[2] + gd
                    if not mask[b, idx]:
                        continue
                    cube = x[b, :, gh * p : (gh + 1) * p, gw * p : (gw + 1) * p, gd * p : (gd + 1) * p]
                    target = cube.transpose(1, 2, 3, 0).reshape(-1).astype(np.float64)
                    if norm_pix:
                        target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
                    errors.append(np.mean((pred[b, idx].astype(np.float64) - target) ** 2))
    return float(np.mean(errors))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_matches_numpy(norm_pix_loss):
    model = _model(True, in_channels=2, norm_pix_loss=norm_pix_loss)
    x = torch.randn(2, 2, 32, 16, 32) * 3.0 + torch.linspace(0, 4, 32)  # grid (2, 1, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = model(x, mask=mask)
    assert out["pred"].shape == (2, 4, 16**3 * 2)
    expected = _numpy_loss(x.numpy(), out["pred"].numpy(), mask.numpy(), (2, 1, 2), norm_pix_loss)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


# --- training and checkpoints -------------------------------------------------------------------------------------


def _phantoms() -> torch.Tensor:
    vols = []
    for k in range(2):
        t2w = make_case(k, seed=0, size=(16, 32, 32))["t2w"]  # (H, W, D) = (32, 32, 16)
        vols.append((t2w - t2w.mean()) / t2w.std())
    return torch.from_numpy(np.stack(vols)[:, None]).float()


@pytest.mark.parametrize("official_init", [True, False])
def test_loss_falls_with_adamw(official_init):
    torch.manual_seed(0)
    model = FCMAEPretrainer(encoder_size="atto", in_channels=1, decoder_embed_dim=64, official_init=official_init)
    x = _phantoms()
    eval_mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        before = model(x, mask=eval_mask)["loss"].item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss = model(x, generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(x, mask=eval_mask)["loss"].item()
    assert np.isfinite(after) and after < 0.7 * before
    if not official_init:  # beyond the trivial all-zero prediction (loss ~1 on standardised patches)
        trivial = fcmae_loss(torch.zeros(2, 4, 16**3), patchify(x, 16), eval_mask, norm_pix_loss=True).item()
        assert trivial == pytest.approx(1.0, abs=0.01) and after < 0.8 * trivial


@pytest.mark.parametrize("fmt", ["encoder", "full_model"])
def test_saved_encoder_loads_strictly(tmp_path, fmt):
    model = _model(True)
    path = tmp_path / "fcmae.pt"
    if fmt == "encoder":
        save_encoder_checkpoint(model, path)
        assert all(not k.startswith("encoder.") for k in torch.load(path, weights_only=True)["network"])
    else:  # a CheckpointSaver of the whole pretrainer: detected as FCMAE, decoder / proj / pred / mask_token dropped
        torch.save({"network": model.state_dict()}, path)
    expected = model.encoder.state_dict()
    dense = load_checkpoint(
        ProFoundDense(encoder_size="atto", in_channels=1, hidden_size=32, auxiliary_channels=16), path
    )
    bare = load_checkpoint(profound_encoder("atto", 1), path)
    for net in (dense.encoder, bare):
        got = net.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_forward_representations_and_state_dict_names():
    model = _model(True)
    x = torch.randn(2, 1, 32, 32, 32)
    rep = model.forward_representations(x)
    assert set(rep) == {"encoder"} and rep["encoder"].shape == (2, 320)
    keys = set(model.state_dict())
    assert {"mask_token", "proj.weight", "pred.weight", "decoder.0.dwconv.weight"} <= keys
    assert "encoder.downsample_layers.0.0.weight" in keys and "encoder.stages.3.1.grn.gamma" in keys
    assert set(model.encoder_state_dict()) == {k[len("encoder.") :] for k in keys if k.startswith("encoder.")}
    with pytest.raises(ValueError, match="FCMAEPretrainer"):
        save_encoder_checkpoint(profound_encoder("atto", 1), "unused.pt")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"encoder_size": "mini"}, "encoder_size"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"patch_size": 32}, "patch_size"),
        ({"decoder_depth": 0}, "decoder"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_constructor_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FCMAEPretrainer(**{"encoder_size": "atto", **kwargs})


def test_forward_rejects_bad_input():
    model = _model(True)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 32, 32, 24))
    with pytest.raises(ValueError, match="mask"):
        model(torch.zeros(1, 1, 32, 32, 32), mask=torch.zeros(1, 4))


def test_official_init_scales():
    """Official FCMAE init: std-1 normal truncated at +-2 (std 0.880) on stem, depthwise and pointwise layers, std
    0.02 on the downsampling convolutions, PyTorch's default (uniform, bound 1/sqrt(fan_in)) on decoder linears."""
    torch.manual_seed(0)
    model = FCMAEPretrainer(encoder_size="atto", in_channels=1, decoder_embed_dim=32)
    enc = model.encoder
    for w in (enc.downsample_layers[0][0].weight, enc.stages[2][0].dwconv.weight, enc.stages[2][0].pwconv1.weight):
        assert w.std().item() == pytest.approx(0.880, abs=0.05)
        assert w.abs().max().item() <= 2.0
    assert enc.downsample_layers[2][1].weight.std().item() == pytest.approx(0.02, abs=0.002)
    assert model.pred.weight.std().item() == pytest.approx(0.880, abs=0.05)
    lin = model.decoder[0].pwconv1.weight
    assert lin.abs().max().item() <= 32**-0.5 and lin.std().item() == pytest.approx(32**-0.5 / 3**0.5, rel=0.05)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.2)
