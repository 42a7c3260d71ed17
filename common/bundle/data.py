"""Data for a bundle run: which datalist, and its validated splits.

A bundle's config names ``datalist`` (a real cohort's ``datalist.json``) or leaves it ``null``; then the profile's
synthetic cohort under the study folder is used, made by the first run that needs it while parallel runs wait on a
file lock, and reused afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path

from common.data.datalist import load_datalist
from common.data.phantom import ensure_cohort
from common.profiles import get_profile

__all__ = ["COHORT_SEED", "load_split", "load_splits", "resolve_datalist"]

#: The synthetic cohort is data, not a run setting: every seed of every bundle trains on the same cohort.
COHORT_SEED = 0


def resolve_datalist(datalist: str | os.PathLike | None, profile: str, study_dir: str | os.PathLike) -> str:
    """Absolute path of the datalist to use: ``datalist`` if given (it must exist), else the profile's synthetic
    cohort ``<study_dir>/cohort-<profile>/datalist.json``, made once."""
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise ValueError(f"datalist {os.fspath(path)!r} does not exist")
        return str(path.resolve())
    prof = get_profile(profile)
    out = Path(study_dir) / f"cohort-{profile}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".cohort-{profile}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path = ensure_cohort(out, prof.cohort_cases, COHORT_SEED, prof.cohort_size)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(Path(path).resolve())


#: where a datalist's successful validations are remembered, next to it (skipped when that folder is read-only)
VALIDATED_DIR = ".vfm-validated"


def _signature(datalist: str, required_keys: tuple[str, ...]) -> str | None:
    """A digest of the datalist's text, the keys checked and every file's size and modification time, or None when
    a file is missing (then the full validation runs and names it)."""
    path = Path(datalist)
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr(required_keys).encode())
    root = path.parent.resolve()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        for split in ("training", "validation", "test"):
            for entry in entries.get(split, []):
                for key in sorted(k for k, v in entry.items() if isinstance(v, str) and k != "id"):
                    stat = (root / entry[key]).stat()
                    digest.update(f"{key}:{entry[key]}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _validated(datalist: str, required_keys: tuple[str, ...]) -> dict[str, list[dict]]:
    """The validated datalist. Every file of a cohort is opened once per cohort, not once per run: a successful
    validation leaves a stamp keyed by :func:`_signature`, and a later run with the same files skips the file checks
    (the structural checks always run). Any change of the datalist or of a file's size or time validates again."""
    signature = _signature(datalist, required_keys)
    stamp = Path(datalist).parent / VALIDATED_DIR / f"{signature}.ok" if signature else None
    if stamp is not None and stamp.is_file():
        return load_datalist(datalist, required_keys=required_keys, allow_resample=True, check_files=False)
    splits = load_datalist(datalist, required_keys=required_keys, allow_resample=True)
    if stamp is not None:
        with contextlib.suppress(OSError):
            stamp.parent.mkdir(exist_ok=True)
            stamp.touch()
    return splits


def load_splits(datalist: str | os.PathLike, required_keys: tuple[str, ...] | list[str]) -> dict[str, list[dict]]:
    """Every split of the datalist (``{name: entries}``, absolute paths), validated once per process for
    ``required_keys``."""
    splits = _validated(str(datalist), tuple(k for k in required_keys if k != "id"))
    return {name: [dict(entry) for entry in entries] for name, entries in splits.items()}


def load_split(datalist: str | os.PathLike, split: str, required_keys: tuple[str, ...] | list[str]) -> list[dict]:
    """The entries of ``split`` (``training``, ``validation`` or ``test``) with absolute paths, after validating the
    whole datalist once per process for ``required_keys`` (every problem is listed by case, key and file)."""
    splits = _validated(str(datalist), tuple(k for k in required_keys if k != "id"))
    if split not in splits:
        raise ValueError(f"datalist {os.fspath(datalist)!r} has no split {split!r}; it has {sorted(splits)}")
    return [dict(entry) for entry in splits[split]]
