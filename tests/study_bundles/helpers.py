"""What the bundle tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kill_after_first_checkpoint(command: Sequence[str], models: Path, env: Mapping[str, str] | None = None) -> None:
    """Start ``command`` in the repository root and SIGKILL its process group as soon as
    ``models/checkpoint_epoch=1.pt`` exists: at once and without warning, as an OOM killer or a scheduler would. The
    saver writes atomically, so whatever it was doing, the newest complete checkpoint is intact."""
    proc = subprocess.Popen(list(command), cwd=REPO, env=None if env is None else dict(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (models / "checkpoint_epoch=1.pt").exists():
        assert proc.poll() is None, "the first run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
