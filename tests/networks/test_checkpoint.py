"""common.networks.load_checkpoint: every format written to a file here, detected and loaded through one entry."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet

from common.networks import (
    DinoVisionTransformer,
    ProFoundDense,
    ProViCNetDense,
    detect_checkpoint_format,
    load_checkpoint,
    profound_encoder,
)
from tests.networks.test_profound import _to_official_fcmae


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str] | None = None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


def _tiny_vit(in_chans: int = 3) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=56, in_chans=in_chans, embed_dim=48, depth=2, num_heads=3)


def _provicnet(out_channels: int = 1) -> ProViCNetDense:
    return ProViCNetDense(out_channels=out_channels, slice_size=28, backbone=_tiny_vit())


def test_profound_dense_in_a_monai_checkpoint_round_trips(tmp_path: Path) -> None:
    source = ProFoundDense(encoder_size="atto", in_channels=1, out_channels=2, decoder="unetr")
    path = _save({"network": source.state_dict(), "optimizer": {"state": {}}}, tmp_path / "ckpt.pt")
    target = ProFoundDense(encoder_size="atto", in_channels=1, out_channels=2, decoder="unetr")
    assert detect_checkpoint_format(torch.load(path, weights_only=True)) == "profound_dense"
    load_checkpoint(target, path)
    assert _same(source.state_dict(), target.state_dict())


def test_profound_encoder_only_leaves_the_new_head_alone(tmp_path: Path) -> None:
    source = ProFoundDense(encoder_size="atto", in_channels=1, out_channels=2)
    path = _save(source.state_dict(), tmp_path / "segmentation.pt")
    target = ProFoundDense(encoder_size="atto", in_channels=1, out_channels=1)  # another task: head differs
    head_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("decoder.")}
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(target, path)
    load_checkpoint(target, path, encoder_only=True)
    encoder_keys = [k for k in source.state_dict() if k.startswith("encoder.")]
    assert _same(source.state_dict(), target.state_dict(), encoder_keys)
    assert _same(head_before, target.state_dict(), list(head_before))


def test_official_fcmae_file_loads_into_an_encoder(tmp_path: Path) -> None:
    dense = profound_encoder("atto", in_channels=3)
    path = _save(_to_official_fcmae(dense.state_dict()), tmp_path / "fcmae.pth")
    assert detect_checkpoint_format(torch.load(path, weights_only=False)) == "profound_fcmae"
    target = profound_encoder("atto", in_channels=3)
    load_checkpoint(target, path)
    assert _same(dense.state_dict(), target.state_dict(), [k for k in dense.state_dict() if not k.startswith("norm")])


def test_official_fcmae_file_loads_into_the_one_and_two_channel_task_networks(tmp_path: Path) -> None:
    # the official pretraining output has a (T2W, DWI, ADC) stem; the T2W-only and the segmentation bundles have one
    # and two input channels, so its stem is adapted after the FCMAE conversion as a dense checkpoint's is
    dense = profound_encoder("atto", in_channels=3)
    path = _save(_to_official_fcmae(dense.state_dict()), tmp_path / "fcmae.pth")
    stem = dense.state_dict()["downsample_layers.0.0.weight"]
    for channels, expected in (
        (1, stem.sum(dim=1, keepdim=True)),
        (2, (stem.sum(dim=1, keepdim=True) / 2).repeat(1, 2, 1, 1, 1)),
    ):
        target = load_checkpoint(ProFoundDense(encoder_size="atto", in_channels=channels, out_channels=1), path)
        torch.testing.assert_close(target.encoder.downsample_layers[0][0].weight, expected)
        blocks = [k for k in dense.state_dict() if k.startswith("stages.")]
        assert _same(dense.state_dict(), {k: target.encoder.state_dict()[k] for k in blocks}, blocks)
    named = load_checkpoint(ProFoundDense(encoder_size="atto", in_channels=1, out_channels=1), path, stem_channels=[0])
    assert torch.equal(named.encoder.downsample_layers[0][0].weight, stem[:, :1])


def test_dinov2_hub_file_is_not_mistaken_for_fcmae_and_fills_the_backbone(tmp_path: Path) -> None:
    hub = _tiny_vit()
    assert "mask_token" in hub.state_dict()  # what made the ProFound rule read it as FCMAE
    path = _save(hub.state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert detect_checkpoint_format(torch.load(path, weights_only=True)) == "dinov2_hub"
    target = _provicnet()
    load_checkpoint(target, path)
    assert _same({f"backbone.{k}": v for k, v in hub.state_dict().items()}, target.state_dict())


def test_official_provicnet_checkpoint_with_contrastive_head_and_a_new_task_head(tmp_path: Path) -> None:
    source = _provicnet(out_channels=4)
    state = collections.OrderedDict(source.state_dict())
    state["CL_Head.mlp.0.weight"] = torch.zeros(8, 48)  # the official contrastive head, dropped on load
    path = _save({"model": state}, tmp_path / "provicnet.pth")
    assert detect_checkpoint_format(torch.load(path, weights_only=True)) == "provicnet_official"
    target = _provicnet(out_channels=1)
    with pytest.raises(ValueError, match=r"(?s)provicnet\.pth.*head"):
        load_checkpoint(target, path)
    load_checkpoint(target, path, encoder_only=True)
    kept = [k for k in source.state_dict() if not k.startswith("head.")]
    assert _same(source.state_dict(), target.state_dict(), kept)


def test_other_networks_load_by_name_and_report_missing_keys_with_the_file(tmp_path: Path) -> None:
    def unet() -> UNet:
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))

    source = unet()
    path = _save({"network": source.state_dict()}, tmp_path / "unet.pt")
    target = load_checkpoint(unet(), path)
    assert detect_checkpoint_format(source.state_dict()) == "state_dict"
    assert _same(source.state_dict(), target.state_dict())
    broken = {k: v for k, v in source.state_dict().items() if "model.0" not in k}
    with pytest.raises(ValueError, match=r"(?s)unet_broken\.pt.*missing keys") as info:
        load_checkpoint(unet(), _save(broken, tmp_path / "unet_broken.pt"))
    assert "model.0" in str(info.value)


def test_one_fm_checkpoint_is_refused_by_the_other_fm(tmp_path: Path) -> None:
    path = _save(profound_encoder("atto", 3).state_dict(), tmp_path / "profound.pt")
    with pytest.raises(ValueError, match="profound_dense checkpoint cannot be loaded into ProViCNetDense"):
        load_checkpoint(_provicnet(), path)


class _Payload:  # any class outside the allowed globals: weights_only must refuse it
    pass


def test_unsafe_pickles_and_missing_files_are_refused(tmp_path: Path) -> None:
    path = _save({"network": {}, "payload": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=r"unsafe\.pt.*weights_only=True"):
        load_checkpoint(_provicnet(), path)
    with pytest.raises(ValueError, match="no checkpoint file at .*nowhere.pt"):
        load_checkpoint(_provicnet(), tmp_path / "nowhere.pt")


def test_profound_stem_pretrained_on_three_channels_adapts_to_the_task_channels(tmp_path: Path) -> None:
    encoder = profound_encoder("atto", in_channels=3)
    path = _save({"network": encoder.state_dict()}, tmp_path / "pretrained.pt")
    target = load_checkpoint(ProFoundDense(encoder_size="atto", in_channels=2, out_channels=1), path)
    stem = encoder.state_dict()["downsample_layers.0.0.weight"]
    expected = (stem.sum(dim=1, keepdim=True) / 2).repeat(1, 2, 1, 1, 1)
    assert torch.allclose(target.encoder.downsample_layers[0][0].weight, expected)
    # the point of the rule: an image repeated on both channels meets the pretrained stem's response to it
    x = torch.randn(1, 1, 16, 16, 16)
    adapted = torch.nn.functional.conv3d(x.repeat(1, 2, 1, 1, 1), expected, stride=4)
    original = torch.nn.functional.conv3d(x.repeat(1, 3, 1, 1, 1), stem, stride=4)
    assert torch.allclose(adapted, original, atol=1e-5)


def test_stem_channels_take_the_named_pretrained_kernels_and_are_refused_for_provicnet(tmp_path: Path) -> None:
    encoder = profound_encoder("atto", in_channels=3)
    path = _save({"network": encoder.state_dict()}, tmp_path / "pretrained.pt")
    stem = encoder.state_dict()["downsample_layers.0.0.weight"]
    target = load_checkpoint(
        ProFoundDense(encoder_size="atto", in_channels=2, out_channels=1), path, stem_channels=[0, 2]
    )
    assert torch.equal(target.encoder.downsample_layers[0][0].weight, stem[:, [0, 2]])
    vit = _save({"model": _provicnet().state_dict()}, tmp_path / "provicnet.pt")
    with pytest.raises(ValueError, match=r"provicnet\.pt: stem_channels applies to ProFound checkpoints only"):
        load_checkpoint(_provicnet(), vit, stem_channels=[0])


def test_one_unwrapper_for_every_loader() -> None:
    """MONAI CheckpointSaver nesting, official FCMAE files with a Namespace beside the weights, DDP prefixes."""
    import argparse

    from common.networks._state import unwrap_state_dict

    w = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    assert unwrap_state_dict(w) == w
    assert unwrap_state_dict({"network": w, "optimizer": {"state": {}}, "trainer": {"epoch": 3}}) == w
    assert unwrap_state_dict({"model": {f"module.{k}": v for k, v in w.items()}, "args": argparse.Namespace()}) == w
    assert unwrap_state_dict({"checkpoint": {"state_dict": w}}.get("checkpoint")) == w
    with pytest.raises(ValueError, match=r"no state dict in the checkpoint; its top-level keys are \['epoch'\]"):
        unwrap_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="must be a mapping"):
        unwrap_state_dict([1, 2])
