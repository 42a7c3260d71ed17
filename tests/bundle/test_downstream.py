"""common.bundle.downstream: the pieces the downstream bundles' shared workflow is made of."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from common.bundle.downstream import (
    INITS,
    _inner,
    class_weights,
    fit_prior,
    init_network,
    load_task_split,
    regime_of,
    save_state_dict,
    snapshot_key,
    test_postprocess,
    trainable_summary,
    validation_metric,
)
from common.data.phantom import make_cohort
from common.metrics.handlers import BinaryDiceHandler, SpecificityAtSensitivityHandler, SSIM3DHandler
from common.networks import PriorOffset
from common.tasks import TASKS


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return Path(make_cohort(tmp_path_factory.mktemp("cohort"), cases=12, seed=0, size=(8, 32, 32)))


def test_regimes() -> None:
    assert [regime_of(i) for i in INITS] == ["finetune", "random", "scratch"]
    with pytest.raises(ValueError, match="init"):
        regime_of("imagenet")


def test_the_few_shot_split_pools_and_redivides_the_cohort(datalist: Path) -> None:
    keys = ("id", "t2w")
    own = {s: [e["id"] for e in load_task_split(datalist, s, keys)] for s in ("training", "validation", "test")}
    resplit = {s: [e["id"] for e in load_task_split(datalist, s, keys, (330, 82, 177))] for s in own}
    everything = sorted(i for ids in own.values() for i in ids)
    assert sorted(i for ids in resplit.values() for i in ids) == everything  # the same cases, divided again
    assert len(resplit["test"]) > len(own["test"])  # 177 / 589 of the cohort against PROMIS's 148 / 740
    again = [e["id"] for e in load_task_split(datalist, "test", keys, (330, 82, 177))]
    assert again == resplit["test"]  # the same split in every run
    with pytest.raises(ValueError, match="split must be one of"):
        load_task_split(datalist, "holdout", keys)


def test_class_weights_are_inverse_frequencies_with_mean_one_over_present_classes() -> None:
    data = [{"pirads": p} for p in (1, 2, 2, 3, 3, 3, 4)]  # classes: PI-RADS 1-2 -> 0, 3 -> 1, 4 -> 2, 5 -> 3
    w = class_weights(data)
    expected = torch.tensor([1 / 3, 1 / 3, 1.0, 0.0])
    expected[:3] *= 3 / expected[:3].sum()
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="no training entries"):
        class_weights([])


class _Wrapper(nn.Module):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.extra = nn.Linear(2, 2)


def test_init_network_freezes_the_innermost_network_and_reports_what_trains(tmp_path: Path) -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = _Wrapper(_Wrapper(inner))
    assert _inner(model) is inner
    frozen = []
    init_network(model, "random", freeze=lambda m: frozen.append(m) or m[0].requires_grad_(False))
    assert frozen == [inner] and not inner[0].weight.requires_grad and model.extra.weight.requires_grad
    assert trainable_summary(model) == "22 / 42 parameters trainable (52.4 %)"
    with pytest.raises(FileNotFoundError, match="needs the pretrained weights"):
        init_network(_Wrapper(nn.Linear(2, 2)), "pretrained", tmp_path / "missing.pt")
    scratch = nn.Linear(2, 2)
    init_network(scratch, "scratch", freeze=lambda m: m.requires_grad_(False))  # scratch trains everything
    assert scratch.weight.requires_grad


def test_task_lookups_come_from_the_registry() -> None:
    handlers = {"classification": SpecificityAtSensitivityHandler, "segmentation": BinaryDiceHandler}
    for task in TASKS:
        assert isinstance(validation_metric(task), handlers.get(task, SSIM3DHandler))
        assert snapshot_key(task) == TASKS[task].snapshot_key
    mask = test_postprocess("segmentation")(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]]).reshape(1, 2, 2))
    torch.testing.assert_close(mask, torch.tensor([[[0.0, 1.0]]]))
    assert test_postprocess("super_resolution") is None


def test_fit_prior_sets_the_mean_training_dwi_and_passes_other_networks(datalist: Path) -> None:
    from common.transforms import required_keys, task_transforms

    data = load_task_split(datalist, "training", required_keys("modality_translation"))
    first = task_transforms("modality_translation", "smoke", seed=0, train=False)(data[0])["label"]
    model = PriorOffset(nn.Identity(), tuple(first.shape))
    assert fit_prior(model, "modality_translation", data, "smoke", 0) is model
    items = [task_transforms("modality_translation", "smoke", seed=0, train=False)(d)["label"] for d in data]
    torch.testing.assert_close(model.prior[0], torch.stack([torch.as_tensor(i) for i in items]).mean(0))
    other = nn.Identity()
    assert fit_prior(other, "modality_translation", data, "smoke", 0) is other  # nothing to fit, nothing read


def test_save_state_dict_is_atomic_and_loadable(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    save_state_dict(model, path)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"weight", "bias"} and not list(path.parent.glob("*.tmp"))


def _init_from_file(bundle: str, path: Path, monkeypatch: pytest.MonkeyPatch, **network: object) -> nn.Module:
    """``bundle``'s network at the smoke profile (``network`` overrides ``network_def`` keys), initialised from the
    file ``path`` by the bundle's own init path and freezing protocol, as ``--pretrained_ckpt FILE`` does."""
    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the configs' macros are relative to the repository
    parser = ConfigParser()
    parser.read_config(str(repo / "bundles" / bundle / "configs" / "train.json"))
    parser["profile"] = "smoke"
    for key, value in network.items():
        parser["network_def"][key] = value
    return init_network(
        parser.get_parsed_content("network_def"), "pretrained", path, parser.get_parsed_content("freeze")
    )


@pytest.mark.parametrize("task", list(TASKS))
def test_every_profound_finetune_bundle_takes_the_official_fcmae_pretraining_output(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the official pretraining output has a (T2W, DWI, ADC) stem in MinkowskiEngine layout; each bundle's network
    # (1 or 2 input channels) loads it through the bundle's own init path
    from common.networks import profound_encoder
    from tests.networks.test_profound import _to_official_fcmae

    pretrained = profound_encoder("atto", in_channels=3)
    path = tmp_path / "fcmae.pth"
    torch.save(_to_official_fcmae(pretrained.state_dict()), path)
    network = _init_from_file(f"profound_{task}_finetune", path, monkeypatch)
    encoder = next(m for m in network.modules() if hasattr(m, "downsample_layers"))
    blocks = {k: v for k, v in pretrained.state_dict().items() if k.startswith("stages.")}
    assert blocks and all(torch.equal(encoder.state_dict()[k], v) for k, v in blocks.items())
    assert not any(p.requires_grad for p in encoder.parameters())  # the finetune protocol froze what it loaded


@pytest.mark.parametrize("fmt", ["dinov2_hub", "provicnet_official"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_provicnet_finetune_bundle_takes_official_weights(
    task: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the DINOv2 hub ViT (3 input channels, 518-pixel position grid) and an official ProViCNet checkpoint (with its
    # contrastive head) through each bundle's own network and init path; the classifier with attention slice
    # pooling, whose pool is new like the head
    from common.networks import ProViCNetDense, provicnet_backbone

    torch.manual_seed(0)
    if fmt == "dinov2_hub":
        source = provicnet_backbone("tiny", in_chans=3)
        state = source.state_dict()
        prefix = ""
    else:
        source = ProViCNetDense(out_channels=4, n_slices=3, slice_size=56, backbone_size="tiny")
        state = {**source.state_dict(), "CL_Head.mlp.0.weight": torch.randn(16, 192)}
        prefix = "backbone."
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    pooling = {"slice_pooling": "attention"} if task == "classification" else {}
    network = _init_from_file(f"provicnet_{task}_finetune", path, monkeypatch, **pooling)
    loaded = next(
        m.backbone for m in network.modules() if isinstance(getattr(m, "backbone", None), nn.Module)
    ).state_dict()
    blocks = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "blocks.")}
    assert blocks and all(torch.equal(loaded[k], v) for k, v in blocks.items())
