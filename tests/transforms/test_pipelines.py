from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import LoadImaged, Randomizable

from common.profiles import Profile
from common.transforms.degradation import RectalDistortiond
from common.transforms.pipelines import TASKS, required_keys, task_transforms
from common.transforms.spatial import PadToDivisibled

# 30 x 30 x 16 padded to multiples of (16, 16, 8): one voxel before and after in-plane, none through-plane
TINY = Profile("tiny", spatial_size=(30, 30, 16), divisible_by=(16, 16, 8), cohort_cases=2, cohort_size=(16, 32, 32))
PADDED = (32, 32, 16)

EXPECTED_SHAPES = {
    "classification": ((1, *PADDED), ()),
    "segmentation": ((2, *PADDED), (1, *PADDED)),
    "super_resolution": ((1, 32, 32, 8), (1, *PADDED)),
    "distortion_correction": ((1, *PADDED), (1, *PADDED)),
    "modality_translation": ((1, *PADDED), (1, *PADDED)),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("task", TASKS)
def test_task_pipeline_shapes_and_dtypes(task: str, train: bool, case_entries: list[dict]) -> None:
    out = task_transforms(task, TINY, seed=0, train=train)(case_entries[1])
    image_shape, label_shape = EXPECTED_SHAPES[task]
    assert tuple(out["image"].shape) == image_shape and out["image"].dtype == torch.float32
    assert tuple(out["label"].shape) == label_shape
    assert out["label"].dtype == (torch.int64 if task == "classification" else torch.float32)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert out["id"] == "case_0002"
    assert out["padding"].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert set(out) == {"image", "label", "id", "padding"} | ({"diffusion"} if task == "segmentation" else set())


def test_task_labels(case_entries: list[dict]) -> None:
    classes = [int(task_transforms("classification", TINY, train=False)(e)["label"]) for e in case_entries]
    assert classes == [0, 3]  # PI-RADS 2 and 5
    seg = task_transforms("segmentation", TINY, train=False)(case_entries[0])
    assert set(np.unique(seg["label"].numpy())) == {0.0, 1.0}
    # padded border is zero in every channel
    assert float(seg["image"][:, 0].abs().max()) == 0.0 and float(seg["image"][:, -1].abs().max()) == 0.0


def test_super_resolution_input_averages_label_slice_pairs(case_entries: list[dict]) -> None:
    out = task_transforms("super_resolution", TINY, train=False)(case_entries[0])
    label = out["label"].numpy()
    np.testing.assert_allclose(out["image"].numpy(), (label[..., 0::2] + label[..., 1::2]) / 2, atol=1e-6)


def test_distortion_is_deterministic_in_evaluation_and_local(case_entries: list[dict]) -> None:
    first = [task_transforms("distortion_correction", TINY, seed=7, train=False)(e) for e in case_entries]
    pipeline = task_transforms("distortion_correction", TINY, seed=7, train=False)
    second = [pipeline(e) for e in reversed(case_entries)][::-1]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
    diff = (first[0]["image"] - first[0]["label"]).abs()[0].numpy()
    assert diff.max() > 0.05  # clearly distorted near the rectum
    assert not np.allclose(
        first[0]["image"].numpy() - first[0]["label"].numpy(),
        first[1]["image"].numpy() - first[1]["label"].numpy(),
        atol=1e-3,
    )


def test_segmentation_choice_is_deterministic_in_evaluation(case_entries: list[dict]) -> None:
    a = [task_transforms("segmentation", TINY, seed=3, train=False)(e)["diffusion"] for e in case_entries]
    b = [task_transforms("segmentation", TINY, seed=3, train=False)(e)["diffusion"] for e in case_entries]
    assert a == b and set(a) <= {"adc", "dwi"}


def test_extra_keys_are_carried(case_entries: list[dict]) -> None:
    out = task_transforms("classification", TINY, train=False, keys=("t2w", "prostate"))(case_entries[0])
    assert tuple(out["prostate"].shape) == (1, *PADDED)
    assert set(np.unique(out["prostate"].numpy())) == {0.0, 1.0, 2.0}


def test_default_smoke_profile(case_entries: list[dict]) -> None:
    out = task_transforms("classification")(case_entries[0])
    assert tuple(out["image"].shape) == (1, 64, 64, 32)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_steps_come_before_random_ones(task: str, case_entries: list[dict]) -> None:
    pipeline = task_transforms(task, TINY, train=True)
    first_random = pipeline.get_index_of_first(lambda t: isinstance(t, Randomizable))
    index = {type(t): i for i, t in enumerate(pipeline.transforms)}
    assert index[LoadImaged] < index[PadToDivisibled] < first_random
    if task == "distortion_correction":
        assert index[RectalDistortiond] >= first_random


def test_cache_dataset_caches_the_deterministic_part(case_entries: list[dict]) -> None:
    pipeline = task_transforms("distortion_correction", TINY, seed=1, train=True)
    dataset = CacheDataset(case_entries, pipeline, cache_rate=1.0, num_workers=0, progress=False)
    cached = dataset._cache[0]
    assert tuple(cached["image"].shape) == (1, *PADDED) and "label" not in cached  # cached before the distortion
    first, second = dataset[0], dataset[0]
    assert tuple(first["label"].shape) == (1, *PADDED)
    assert not torch.equal(first["image"], second["image"])  # a fresh field each time it is read


@pytest.mark.parametrize("task", TASKS)
def test_cache_dataset_caches_an_evaluation_pipeline_whole(task: str, case_entries: list[dict]) -> None:
    """Evaluation draws its degradations per case, so the validation and test passes after the first read only the
    cache: nothing random is left after it, and the cached items equal the pipeline's own output."""
    pipeline = task_transforms(task, TINY, seed=4, train=False)
    assert pipeline.get_index_of_first(lambda t: isinstance(t, Randomizable)) is None
    dataset = CacheDataset(case_entries, pipeline, cache_rate=1.0, num_workers=0, progress=False)
    for i, entry in enumerate(case_entries):
        direct = task_transforms(task, TINY, seed=4, train=False)(entry)
        cached = dataset[i]
        assert cached.keys() == direct.keys()
        for key, value in direct.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(torch.as_tensor(cached[key]), torch.as_tensor(value)), (task, key)
            else:
                assert cached[key] == value, (task, key)


def test_required_keys() -> None:
    assert required_keys("classification") == ("id", "t2w", "pirads")
    assert required_keys("segmentation") == ("id", "t2w", "adc", "dwi", "lesion")
    assert required_keys("distortion_correction") == ("id", "t2w", "rectum")


def test_errors(case_entries: list[dict]) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        task_transforms("registration")
    with pytest.raises(ValueError, match="lacks \\['rectum'\\]"):
        task_transforms("distortion_correction", keys=("t2w",))
    with pytest.raises(ValueError, match="unknown volume keys"):
        task_transforms("classification", keys=("t2w", "flair"))
    with pytest.raises(ValueError, match="unknown profile"):
        task_transforms("classification", profile="huge")
    entry = dict(case_entries[0])
    del entry["rectum"]
    # MONAI's Compose re-raises a transform's error as a RuntimeError from it
    with pytest.raises(RuntimeError) as err:
        task_transforms("distortion_correction", TINY)(entry)
    assert isinstance(err.value.__cause__, ValueError)
    assert "case 'case_0001' lacks ['rectum'], which task 'distortion_correction' needs" in str(err.value.__cause__)
