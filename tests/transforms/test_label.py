from __future__ import annotations

import numpy as np
import pytest
import torch

from common.transforms.label import NUM_CLASSES, PiradsToClass, PiradsToClassd


@pytest.mark.parametrize(
    ("pirads", "cls"),
    [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (np.int64(5), 3), (4.0, 2), (torch.tensor([3]), 1), (np.array(2), 0)],
)
def test_pirads_map(pirads, cls: int) -> None:
    assert PiradsToClass()(pirads) == cls
    out = PiradsToClassd(keys="pirads", output_keys="label")({"id": "c", "pirads": pirads})
    assert out["label"].dtype == torch.int64 and out["label"].ndim == 0 and int(out["label"]) == cls
    assert 0 <= cls < NUM_CLASSES


@pytest.mark.parametrize("bad", [0, 6, -1, 3.5, float("nan"), None, True, "4", np.array([3, 4])])
def test_invalid_pirads_names_the_case(bad) -> None:
    with pytest.raises(ValueError, match="case 'case_0042', key 'pirads'.*1..5"):
        PiradsToClassd()({"id": "case_0042", "pirads": bad})
