"""common.bundle.data: the datalist a run uses, validated once per cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.bundle import data
from common.data.datalist import DatalistError
from common.data.phantom import make_cohort


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return Path(make_cohort(tmp_path / "cohort", cases=4, seed=0, size=(8, 32, 32)))


def test_validation_is_remembered_until_a_file_changes(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ("id", "t2w", "dwi")
    first = data.load_splits(cohort, keys)
    stamps = list((cohort.parent / data.VALIDATED_DIR).glob("*.ok"))
    assert len(stamps) == 1

    opened: list[bool] = []
    real = data.load_datalist

    def spy(*args, **kwargs):
        opened.append(kwargs.get("check_files", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "load_datalist", spy)
    data._validated.cache_clear()
    assert data.load_splits(cohort, keys) == first
    assert opened == [False]  # the stamp matched: no file was opened

    # a damaged volume (another size) no longer matches the stamp: the files are checked and the damage named
    t2w = Path(first["test"][0]["t2w"])
    t2w.write_bytes(t2w.read_bytes()[:100])
    data._validated.cache_clear()
    with pytest.raises(DatalistError, match=first["test"][0]["id"]):
        data.load_splits(cohort, keys)
    assert opened == [False, True]


def test_other_keys_are_validated_on_their_own(cohort: Path) -> None:
    data.load_splits(cohort, ("id", "t2w"))
    data.load_splits(cohort, ("id", "t2w", "lesion"))
    assert len(list((cohort.parent / data.VALIDATED_DIR).glob("*.ok"))) == 2
