"""Forward passes that pause at each layer group until every pass has reached it.

One thread runs each calibration batch through a model. A hook at the first layer of each
group calls :meth:`Rendezvous.arrive`; when no thread is running any more (each waits at
the group or has finished), the group's ``action`` runs once with everything the waiting
threads brought, and they resume. So the model runs over the calibration data once, layer
group by layer group, with nothing recomputed, and a group's action can change the layers
the threads are about to run.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Rendezvous", "Aborted"]


class Aborted(Exception):
    """Raised in a waiting thread when another thread failed."""


class Rendezvous:
    """Meeting points for ``threads`` threads at ``groups`` groups, visited in order."""

    def __init__(self, threads: int, groups: int,
                 action: Callable[[int, list[tuple[int, Any]]], None]) -> None:
        self.cond = threading.Condition()
        self.groups, self.action = groups, action
        self.at: list[float | None] = [None] * threads  # group waited at; inf: finished
        self.items: list[Any] = [None] * threads
        self.current = 0
        self.error: BaseException | None = None

    def _advance(self) -> None:
        """Run every group that is complete (lock held)."""
        while self.error is None and self.current < self.groups \
                and all(a is not None for a in self.at):
            k = self.current
            waiting = [t for t, a in enumerate(self.at) if a == k]
            try:
                self.action(k, [(t, self.items[t]) for t in waiting])
            except BaseException as exc:  # handed to the caller
                self.error = exc
                break
            self.current += 1
            for t in waiting:
                self.at[t], self.items[t] = None, None
            if waiting:
                break
        self.cond.notify_all()

    def arrive(self, thread: int, group: int, item: Any) -> None:
        """Wait at ``group`` with ``item`` until the group's action has run."""
        with self.cond:
            if self.error is not None:
                raise Aborted
            if group < self.current:
                raise RuntimeError(f"layer group {group} was reached after group "
                                   f"{self.current - 1}: the batches call the layers in "
                                   "different orders")
            self.at[thread], self.items[thread] = group, item
            self._advance()
            while self.at[thread] is not None and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise Aborted

    def leave(self, thread: int) -> None:
        """The thread finished its forward pass."""
        with self.cond:
            self.at[thread] = math.inf
            self._advance()

    def fail(self, thread: int, exc: BaseException) -> None:
        """The thread failed: every other thread stops too."""
        with self.cond:
            self.at[thread] = math.inf
            if self.error is None:
                self.error = exc
            self.cond.notify_all()
