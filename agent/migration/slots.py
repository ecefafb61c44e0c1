"""The outgoing migrations' turns: at most N run at once, the others wait in order.

A burst of migrations (an operator emptying a host, a script that starts fifty) would otherwise
start every session at once: the destination starts a VM process for each and answers each
MigrateAccept only after it, and on a small host fifty process starts take longer than the stall
timeout, so healthy migrations would be failed as stalled (docs/RELIABILITY.md, "Stalls").
vCenter and KubeVirt queue past a per-host limit for the same reason. A waiting migration is
status `setup` with `queued` (how many wait before it) in its report; the VM runs on untouched,
and a cancel takes it out of the queue at once.

The waits happen in the session threads (a Condition), never on the event loop.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

# vCenter runs 4 vMotions at once per host on a 1 GbE link (8 on 10 GbE); KubeVirt 2 outbound
# per node. Four keeps a small host's setups well inside the stall timeout.
MAX_OUTGOING = 4
WAKE_S = 0.1  # how often a waiting thread looks at its cancel flag


class Slots:
    """At most ``limit`` holders at once, served first come first served."""

    def __init__(self, limit: int = MAX_OUTGOING) -> None:
        if limit < 1:
            raise ValueError(f"the limit of migrations at once must be at least 1, got {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._free = limit
        self._queue: collections.deque[object] = collections.deque()

    def take(self, cancelled: Callable[[], bool], waiting: Callable[[int], None]) -> bool:
        """Wait for a turn; True once held (give it back with :meth:`give`), False if
        ``cancelled()`` came first. ``waiting(n)`` is told how many wait ahead, each time that
        changes, and only when this caller has to wait at all."""
        ticket = object()
        told = -1
        with self._cond:
            self._queue.append(ticket)
            try:
                while True:
                    ahead = self._queue.index(ticket)
                    if ahead == 0 and self._free > 0:
                        self._free -= 1
                        return True
                    if cancelled():
                        return False
                    if ahead != told:
                        waiting(ahead)
                        told = ahead
                    self._cond.wait(WAKE_S)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may go, or moved up

    def give(self) -> None:
        with self._cond:
            self._free = min(self.limit, self._free + 1)
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)
