"""Faults injected into a real bundle run: an Ignite handler given to the bundle on its command line,
``--tracking_handlers "[{'_target_': 'tests.reliability.faults.Fault', 'at': 'epoch2', 'action': 'SIGTERM'}]"``
(the tracker is appended after it, as after MONAI's own handlers)."""

from __future__ import annotations

import signal

#: where a fault strikes: the first iteration of this start (before the first checkpoint of a fresh run), the start
#: of epoch 2 (after the first checkpoint), or the end of training after the test pass logged its metric (before the
#: run is FINISHED)
POINTS = ("iteration", "epoch2", "test")
ACTIONS = ("raise", "SIGINT", "SIGTERM", "SIGKILL")


class InjectedFault(RuntimeError):
    """The crash of the ``raise`` action."""


class Fault:
    """Ignite handler that does ``action`` (raise, or send the process a signal) at ``at`` (one of ``POINTS``)."""

    def __init__(self, at: str, action: str) -> None:
        if at not in POINTS or action not in ACTIONS:
            raise ValueError(f"Fault: at must be one of {POINTS} and action one of {ACTIONS}, got {at!r}, {action!r}")
        self.at, self.action = at, action
        self._fired = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        event = {"iteration": Events.ITERATION_COMPLETED, "epoch2": Events.EPOCH_STARTED(once=2),
                 "test": Events.COMPLETED}[self.at]  # fmt: skip
        engine.add_event_handler(event, self)

    def __call__(self, engine) -> None:
        if self._fired:
            return
        self._fired = True
        if self.action == "raise":
            raise InjectedFault(f"injected fault at {self.at}")
        signal.raise_signal(getattr(signal, self.action))  # to this (the main) thread: Python's handler acts here
