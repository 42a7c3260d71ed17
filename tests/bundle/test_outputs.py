"""What the evaluate / inference configs call (common.bundle.outputs): trained weights loaded strictly with a clear
error, and predictions written per task as a CSV or NIfTI volumes on the grid (and affine) the network saw."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from common.bundle.outputs import load_trained, write_predictions


class Logits(nn.Module):
    """Classification "network": four class logits from the image mean, ``(B, 1, H, W, D)`` -> ``(B, 4)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3, 4))[:, None] * torch.tensor([[0.0, 1.0, 2.0, 3.0]])


class Threshold(nn.Module):
    """Segmentation "network": foreground logit where the first channel exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], dim=1)


class Scale(nn.Module):
    """Image-to-image "network": twice the input minus 0.25, so that the output leaves [0, 1] on both sides."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x - 0.25


def _affine(shift: float) -> torch.Tensor:
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = shift
    return affine


def _batch(images: torch.Tensor, ids: list[str], **extra: torch.Tensor) -> dict[str, object]:
    affines = torch.stack([_affine(float(k)) for k in range(images.shape[0])])
    image = MetaTensor(images, affine=affines)
    return {"image": image, "id": ids, **extra}


def test_load_trained_reads_a_state_dict_or_a_training_checkpoint(tmp_path: Path) -> None:
    trained = nn.Linear(3, 2)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    torch.save({"network": trained.state_dict(), "optimizer": {}}, tmp_path / "checkpoint_epoch=2.pt")
    for name in ("model.pt", "checkpoint_epoch=2.pt"):
        model = load_trained(nn.Linear(3, 2), tmp_path / name)
        assert torch.equal(model.weight, trained.weight) and torch.equal(model.bias, trained.bias)


def test_load_trained_names_the_missing_file_and_the_mismatched_keys(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        load_trained(nn.Linear(3, 2), tmp_path / "no_such.pt")
    torch.save(nn.Linear(3, 5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt.*does not fit network_def(.|\n)*weight"):
        load_trained(nn.Linear(3, 2), tmp_path / "wide.pt")


def test_classification_predictions_are_a_csv_of_probabilities_and_the_argmax(tmp_path: Path) -> None:
    images = torch.stack([torch.full((1, 4, 4, 2), v) for v in (-1.0, 0.0, 1.0)])
    loader = [_batch(images[:2], ["a", "b"]), _batch(images[2:], ["c"])]
    out = write_predictions(Logits(), loader, "classification", tmp_path / "pred")
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert list(rows[0]) == ["id", "p0", "p1", "p2", "p3", "class"]
    for row, image_mean in zip(rows, (-1.0, 0.0, 1.0), strict=True):
        probs = np.array([float(row[f"p{k}"]) for k in range(4)])
        expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]) * image_mean, dim=0).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        assert int(row["class"]) == int(np.argmax(expected))
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]


def test_segmentation_masks_are_uint8_argmax_on_the_label_grid(tmp_path: Path) -> None:
    images = torch.zeros(2, 2, 4, 4, 2)
    images[0, 0, 1, 2, 0] = 1.0  # one foreground voxel in case "a", none in "b"
    label = MetaTensor(torch.zeros(2, 1, 4, 4, 2), affine=torch.stack([_affine(10.0), _affine(20.0)]))
    write_predictions(Threshold(), [_batch(images, ["a", "b"], label=label)], "segmentation", tmp_path)
    a, b = nib.load(tmp_path / "a_lesion.nii.gz"), nib.load(tmp_path / "b_lesion.nii.gz")
    assert a.get_data_dtype() == np.uint8 and a.shape == (4, 4, 2)
    assert np.argwhere(np.asarray(a.dataobj)).tolist() == [[1, 2, 0]]
    assert not np.asarray(b.dataobj).any()
    np.testing.assert_array_equal(a.affine, _affine(10.0).numpy())  # the label's grid, not the image's
    np.testing.assert_array_equal(b.affine, _affine(20.0).numpy())


def test_image_predictions_are_clamped_to_the_unit_range_with_the_image_affine(tmp_path: Path) -> None:
    images = torch.linspace(0.0, 1.0, 32).reshape(1, 1, 4, 4, 2)
    write_predictions(Scale(), [_batch(images, ["x"])], "distortion_correction", tmp_path)
    saved = nib.load(tmp_path / "x_pred.nii.gz")
    np.testing.assert_allclose(np.asarray(saved.dataobj), (2.0 * images[0, 0] - 0.25).clamp(0, 1).numpy())
    np.testing.assert_array_equal(saved.affine, _affine(0.0).numpy())


def test_an_empty_loader_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        write_predictions(Scale(), [], "super_resolution", tmp_path)
