"""The progress timeout of an outgoing migration: a watchdog thread beside the source session.

Each blocking call on the connection has its own deadline (transport.py, the stall timeout);
this one is the migration's: no new byte on its connection, either way, for the progress
timeout (``MigrationParams.progress_timeout_s``) fails the migration before COMMIT, the VM
running on the source (docs/RELIABILITY.md, "Stalls"). The decision is the policy's
(``policy.progress_stalled``); this module only samples the byte counters and, when the
policy says so, interrupts the session, which refuses once COMMIT is (being) sent.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from agent.migration.common import MigrationError
from agent.migration.policy import progress_stalled
from agent.migration.transport import Connection
from proto.errors import ErrorCode

# How often the counters are sampled: a fraction of the shortest sensible timeout.
POLL_S = 0.1


class Interruptible(Protocol):
    """What the watchdog needs of a source session."""

    conn: Connection | None

    def interrupt(self, failure: Exception) -> bool:
        """Fail the session with ``failure``; False once COMMIT is (being) sent."""


class ProgressWatch:
    """Samples ``session.conn``'s byte counters; interrupts the session once they stood still
    for ``limit_s``. ``stop()`` ends it (the session ended, or COMMIT went out)."""

    def __init__(self, session: Interruptible, limit_s: float) -> None:
        self._session = session
        self._limit = limit_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-migration-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        moved, since = -1, time.monotonic()
        while not self._stop.wait(POLL_S):
            conn = self._session.conn  # read once: the session may drop it meanwhile
            now_moved = -1 if conn is None else conn.sent + conn.received
            now = time.monotonic()
            if now_moved != moved:
                moved, since = now_moved, now
                continue
            why = progress_stalled(now - since, self._limit)
            if why is not None:
                self._session.interrupt(MigrationError(ErrorCode.TIMEOUT, why))
                return
