"""common.tasks: the task registry's derived properties, checked on every registered task."""

from __future__ import annotations

import pytest

from common.tasks import TASKS, get_task


@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
def test_target_kind_and_in_place_restoration_follow_the_fields(task) -> None:
    assert task.target_kind in ("class", "mask", "image")
    assert (task.target_kind == "class") == (task.label_key is not None) == task.classification
    assert (task.target_kind == "mask") == ("empty_mask" in task.baselines)
    assert task.restores_in_place == (task.image_to_image and task.upsample == (1, 1, 1))
    assert task.required_keys[0] == "id" and set(task.volumes) <= set(task.required_keys)


def test_the_study_tasks() -> None:
    assert [t for t in TASKS if get_task(t).restores_in_place] == ["distortion_correction"]
    assert {t: get_task(t).target_kind for t in TASKS} == {
        "classification": "class", "segmentation": "mask", "super_resolution": "image",
        "distortion_correction": "image", "modality_translation": "image",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown task"):
        get_task("denoising")
