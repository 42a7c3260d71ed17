from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler
from monai.transforms import ConcatItemsd
from numpy.lib.stride_tricks import sliding_window_view

from common.bundle import DiffusionLoss, DiffusionSampler, NoisePrepareBatch
from common.networks import ConditionalDiffusionUNet, ProFoundDense, TimestepConditioned

pytest.importorskip("einops", reason="MONAI's diffusion UNet needs einops")

T = 1000


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded; the CPU is shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _unet() -> ConditionalDiffusionUNet:
    torch.manual_seed(0)
    net = ConditionalDiffusionUNet(
        channels=(8, 8), attention_levels=(False, False), norm_num_groups=8, num_head_channels=8
    )
    with torch.no_grad():  # MONAI zero-initialises the output conv; a zero predictor would hide the noise
        net.out[2].conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return net.eval()


def _profound() -> TimestepConditioned:
    torch.manual_seed(0)
    net = ProFoundDense("atto", in_channels=2, out_channels=1, hidden_size=8, auxiliary_channels=4)
    return TimestepConditioned(net, embed_dim=16)


# ---------------------------------------------------------------------------------------------------------------
# NoisePrepareBatch


def test_prepare_batch_gives_the_diffusion_inferer_its_arguments() -> None:
    dwi, t2w = MetaTensor(_rand(2, 1, 8, 8, 4, seed=1)), MetaTensor(_rand(2, 1, 8, 8, 4, seed=2))
    batch = {"image": t2w, "label": dwi, "id": ["a", "b"]}
    torch.manual_seed(0)
    x0, targets, args, kwargs = NoisePrepareBatch(num_train_timesteps=T)(batch, torch.device("cpu"))
    assert type(x0) is torch.Tensor and torch.equal(x0, dwi.as_tensor())
    assert args == ()
    assert set(targets) == {"noise", "x0", "timesteps"} and set(kwargs) == {"noise", "timesteps", "condition", "mode"}
    assert kwargs["mode"] == "concat"
    assert type(kwargs["condition"]) is torch.Tensor and torch.equal(kwargs["condition"], t2w.as_tensor())
    assert targets["noise"] is kwargs["noise"] and targets["timesteps"] is kwargs["timesteps"]
    assert targets["noise"].shape == dwi.shape and targets["noise"].std() > 0.5
    t = targets["timesteps"]
    assert t.shape == (2,) and t.dtype == torch.long and ((t >= 0) & (t < T)).all()
    # the inferer's training call: network(x=cat([x_t, T2W]), timesteps=t, context=None)
    seen = {}

    def network(x, timesteps, context=None):
        seen.update(x=x, t=timesteps, context=context)
        return x[:, :1]

    scheduler = DDPMScheduler(num_train_timesteps=T)
    DiffusionInferer(scheduler)(x0, network, *args, **kwargs)
    assert seen["x"].shape == (2, 2, 8, 8, 4) and seen["context"] is None and seen["t"] is t
    torch.testing.assert_close(seen["x"][:, 1:], t2w.as_tensor())
    torch.testing.assert_close(seen["x"][:, :1], scheduler.add_noise(x0, targets["noise"], t))


def test_prepare_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"needs entries \['label'\]"):
        NoisePrepareBatch()({"image": torch.zeros(1, 1, 4, 4, 4)})
    with pytest.raises(ValueError, match="same B and spatial size"):
        NoisePrepareBatch()({"image": torch.zeros(1, 1, 4, 4, 4), "label": torch.zeros(1, 1, 4, 4, 2)})


# ---------------------------------------------------------------------------------------------------------------
# DiffusionLoss


def _ssim_numpy(x: np.ndarray, y: np.ndarray, win: int = 7, sigma: float = 1.5, data_range: float = 1.0) -> float:
    """Gaussian-window SSIM (Wang et al. 2004) over the valid region of one 3D volume, from the definition."""
    d = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    g /= g.sum()
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]

    def local_mean(v: np.ndarray) -> np.ndarray:
        return (sliding_window_view(v, (win, win, win)) * w).sum(axis=(-3, -2, -1))

    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def _targets(t: list[int]) -> dict[str, torch.Tensor]:
    b = len(t)
    return {
        "noise": _randn(b, 1, 12, 12, 10, seed=3),
        "x0": _rand(b, 1, 12, 12, 10, seed=4),
        "timesteps": torch.tensor(t),
    }


@pytest.mark.parametrize("ssim_weight", [0.1, 2.0])
def test_loss_matches_a_numpy_recomputation(ssim_weight) -> None:
    targets = _targets([3, 150])
    pred = targets["noise"] + 0.3 * _randn(2, 1, 12, 12, 10, seed=5)
    loss_fn = DiffusionLoss(DDPMScheduler(num_train_timesteps=T), ssim_weight=ssim_weight)
    loss = loss_fn(pred, targets)

    abar = np.cumprod(1.0 - np.linspace(1e-4, 2e-2, T))[[3, 150]].reshape(2, 1, 1, 1, 1)  # linear beta schedule
    x0, noise, p = (v.double().numpy() for v in (targets["x0"], targets["noise"], pred))
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    x0_hat = np.clip((x_t - np.sqrt(1 - abar) * p) / np.sqrt(abar), 0, 1)
    l1 = np.abs(p - noise).mean()
    ssim_term = 1 - np.mean([_ssim_numpy(x0_hat[i, 0], x0[i, 0]) for i in range(2)])
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(l1 + ssim_weight * ssim_term, rel=1e-4)
    assert loss_fn.last_terms == pytest.approx({"l1": l1, "ssim": ssim_term}, rel=1e-4)
    assert 0.05 < ssim_term < 1.5  # non-trivial: the noisier volume's x0_hat is far from x0


def test_a_perfect_noise_prediction_costs_nothing() -> None:
    targets = _targets([0, 500, 999])
    loss_fn = DiffusionLoss(DDPMScheduler(num_train_timesteps=T), ssim_weight=1.0)
    loss = loss_fn(targets["noise"].clone(), targets)
    assert loss_fn.last_terms["l1"] == 0.0
    assert loss_fn.last_terms["ssim"] < 1e-4
    assert loss.item() < 1e-4


def test_loss_is_float32_under_bf16_autocast_and_differentiable() -> None:
    targets = _targets([20, 300])
    pred = (targets["noise"] + 0.2 * _randn(2, 1, 12, 12, 10, seed=6)).bfloat16().requires_grad_(True)
    loss_fn = DiffusionLoss(DDPMScheduler(num_train_timesteps=T), ssim_weight=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(pred, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(pred.detach().float(), targets))
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad.float()).all() and pred.grad.float().abs().sum() > 0


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_loss_targets_of_the_other_prediction_types_match_a_numpy_recomputation(prediction_type) -> None:
    """Velocity (Salimans and Ho 2022): target sqrt(abar) eps - sqrt(1 - abar) x0, x0_hat = sqrt(abar) x_t -
    sqrt(1 - abar) v; sample: target x0, x0_hat = the prediction."""
    targets = _targets([3, 600])
    pred = _randn(2, 1, 12, 12, 10, seed=5) * 0.5
    loss_fn = DiffusionLoss(DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type), ssim_weight=0.5)
    loss = loss_fn(pred, targets)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 2e-2, T))[[3, 600]].reshape(2, 1, 1, 1, 1)
    x0, noise, p = (v.double().numpy() for v in (targets["x0"], targets["noise"], pred))
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    if prediction_type == "v_prediction":
        target, x0_hat = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0, np.sqrt(abar) * x_t - np.sqrt(1 - abar) * p
    else:
        target, x0_hat = x0, p
    l1 = np.abs(p - target).mean()
    ssim_term = 1 - np.mean([_ssim_numpy(np.clip(x0_hat[i, 0], 0, 1), x0[i, 0]) for i in range(2)])
    assert loss.item() == pytest.approx(l1 + 0.5 * ssim_term, rel=1e-4)
    perfect = loss_fn(torch.as_tensor(target, dtype=torch.float32), targets)
    assert loss_fn.last_terms["l1"] < 1e-6 and perfect.item() < 1e-4


def test_sampler_returns_a_constant_clean_image_prediction_exactly() -> None:
    """With clean-image prediction, a network that always predicts the same image m makes DDIM return m: the
    modality-translation bundles' PriorOffset at step 0 (network output 0) samples the mean training DWI."""
    sampler = DiffusionSampler(num_train_timesteps=T, num_inference_steps=4, prediction_type="sample")
    m = _rand(1, 1, 8, 8, 4, seed=9) * 0.8 + 0.1
    out = sampler(_rand(2, 1, 8, 8, 4, seed=8), lambda x, timesteps, context=None: m.expand(x.shape[0], -1, -1, -1, -1))
    torch.testing.assert_close(out, m.expand(2, -1, -1, -1, -1), rtol=0, atol=1e-5)
    assert sampler.train_scheduler().prediction_type == "sample"
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSampler(prediction_type="noise")


def test_loss_errors() -> None:
    loss_fn = DiffusionLoss(DDPMScheduler(num_train_timesteps=T))
    with pytest.raises(ValueError, match="targets lack"):
        loss_fn(torch.zeros(1, 1, 8, 8, 8), {"noise": torch.zeros(1, 1, 8, 8, 8)})
    with pytest.raises(ValueError, match="win_size"):
        zeros = torch.zeros(1, 1, 8, 8, 4)  # 4 slices < the 7-voxel window
        loss_fn(zeros, {"noise": zeros, "x0": zeros, "timesteps": torch.tensor([1])})
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionLoss(torch.nn.Identity())
    scheduler = DDPMScheduler(num_train_timesteps=T)
    scheduler.prediction_type = "score"
    with pytest.raises(ValueError, match="prediction_type 'score'"):
        DiffusionLoss(scheduler)


# ---------------------------------------------------------------------------------------------------------------
# DiffusionSampler


@pytest.mark.parametrize(("n", "expected"), [(2, [999, 499]), (10, list(range(999, 0, -100))), (1, [999])])
def test_sampler_timesteps_step_exactly_to_the_next_one(n, expected) -> None:
    """MONAI's DDIM step goes from t to t - T // n; the sampler's timesteps must follow that chain down to -1 (the
    clean image, alpha 1)."""
    sampler = DiffusionSampler(num_train_timesteps=T, num_inference_steps=n)
    ts = sampler.scheduler.timesteps.tolist()
    assert ts == expected
    assert [t - T // n for t in ts] == ts[1:] + [-1]


def test_sampler_recovers_the_image_with_an_oracle_noise_predictor() -> None:
    """A network that returns the true noise of x_t for a known x0 makes DDIM (eta 0) return x0."""
    sampler = DiffusionSampler(num_train_timesteps=T, num_inference_steps=4)
    x0 = _rand(2, 1, 8, 8, 4, seed=7) * 0.8 + 0.1
    abar = sampler.scheduler.alphas_cumprod

    def oracle(x, timesteps, context=None):
        a = abar[timesteps.long()].reshape(-1, 1, 1, 1, 1)
        return (x[:, :1] - a.sqrt() * x0) / (1 - a).sqrt()

    torch.testing.assert_close(sampler(_rand(2, 1, 8, 8, 4, seed=8), oracle), x0, rtol=0, atol=1e-4)


def test_sampler_is_deterministic_per_image_whatever_the_batch() -> None:
    net = _unet()
    a, b = _rand(1, 1, 16, 16, 8, seed=10), _rand(1, 1, 16, 16, 8, seed=11)
    sampler = DiffusionSampler(num_train_timesteps=T, num_inference_steps=2, seed=0)
    alone = sampler(MetaTensor(a), net)
    ab, ba = sampler(torch.cat([a, b]), net), sampler(torch.cat([b, a]), net)
    assert alone.shape == (1, 1, 16, 16, 8) and type(alone) is torch.Tensor
    assert alone.min() >= 0.0 and alone.max() <= 1.0 and alone.std() > 0.01
    noise_a = sampler.initial_noise(a)
    torch.testing.assert_close(sampler.initial_noise(torch.cat([b, a]))[1:], noise_a, rtol=0, atol=0)
    # same noise; the network's float arithmetic may differ slightly with the batch size
    torch.testing.assert_close(ab[:1], alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(ba[1:], alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(sampler(a, net), alone, rtol=0, atol=0)  # a second call, as in a later epoch
    assert not torch.allclose(ab[0], ab[1], atol=1e-3)
    other_seed = DiffusionSampler(num_train_timesteps=T, num_inference_steps=2, seed=1)
    assert not torch.allclose(other_seed(a, net), alone, atol=1e-3)
    noise = sampler.initial_noise(torch.cat([a, b]))
    assert noise.shape == (2, 1, 16, 16, 8) and abs(noise.std().item() - 1) < 0.1
    assert not torch.allclose(noise, other_seed.initial_noise(torch.cat([a, b])))


def test_sampler_shares_the_training_schedule_and_checks_arguments() -> None:
    args = {"num_train_timesteps": 100, "num_inference_steps": 5, "schedule": "scaled_linear_beta"}
    sampler = DiffusionSampler(**args, schedule_args={"beta_end": 0.012})
    ddpm = sampler.train_scheduler()
    assert isinstance(ddpm, DDPMScheduler) and ddpm.num_train_timesteps == 100
    torch.testing.assert_close(ddpm.betas, sampler.scheduler.betas, rtol=0, atol=0)
    assert ddpm.betas[-1].item() == pytest.approx(0.012)
    with pytest.raises(ValueError, match="must divide"):
        DiffusionSampler(num_train_timesteps=1000, num_inference_steps=3)
    with pytest.raises(ValueError, match="seed"):
        DiffusionSampler(seed=-1)
    with pytest.raises(ValueError, match="clip"):
        DiffusionSampler(clip=(1.0, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# End to end and the snapshot input


def test_supervised_trainer_trains_an_fm_noise_predictor_and_the_sampler_runs_it() -> None:
    data = [{"image": _rand(1, 32, 32, 16, seed=20 + i), "label": _rand(1, 32, 32, 16, seed=30 + i)} for i in range(2)]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    network = _profound()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    loss_fn = DiffusionLoss(scheduler, ssim_weight=0.1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=loss_fn,
        inferer=DiffusionInferer(scheduler),
        prepare_batch=NoisePrepareBatch(num_train_timesteps=T),
    )
    torch.manual_seed(0)
    trainer.run()
    assert trainer.state.iteration == 2
    assert np.isfinite(float(trainer.state.output[0]["loss"]))  # decollated: one dict per volume
    assert set(loss_fn.last_terms) == {"l1", "ssim"} and all(np.isfinite(v) for v in loss_fn.last_terms.values())
    assert network.time_mlp[-1].weight.abs().sum() > 0  # the zero-initialised layer has learned
    sample = DiffusionSampler(num_train_timesteps=T, num_inference_steps=2)(data[0]["image"][None], network.eval())
    assert sample.shape == (1, 1, 32, 32, 16) and sample.min() >= 0 and sample.max() <= 1


def test_snapshot_input_is_concat_items_of_dwi_and_t2w() -> None:
    """The feature snapshots feed cat([DWI, T2W]) (channel 0 the DWI), made by MONAI's ConcatItemsd on MetaTensors,
    to forward_representations of both DDPM networks."""
    dwi, t2w = MetaTensor(_rand(1, 32, 32, 16, seed=40)), MetaTensor(_rand(1, 32, 32, 16, seed=41))
    item = ConcatItemsd(keys=["label", "image"], name="snapshot_input", dim=0)({"label": dwi, "image": t2w})
    x = item["snapshot_input"]
    assert isinstance(x, MetaTensor) and x.shape == (2, 32, 32, 16)
    assert torch.equal(x[0].as_tensor(), dwi[0].as_tensor()) and torch.equal(x[1].as_tensor(), t2w[0].as_tensor())
    with torch.no_grad():
        fm = _profound().eval().forward_representations(x[None].as_tensor())
        unet = _unet().forward_representations(x[None, :, :16, :16, :8].as_tensor())
    assert fm["head_input"].shape == (1, 8) and fm["encoder"].shape == (1, 320)
    assert unet["head_input"].shape == (1, 8) and unet["encoder"].shape == (1, 8)
