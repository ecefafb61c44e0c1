"""Who owns each incoming migration's VM, as far as this host knows: the in-doubt answers' truth.

A source whose COMMIT went unanswered asks this host, on a new connection,
whether the VM resumed here (in_doubt.py on the source side). The answer must
be true and final: ``Outcomes`` remembers how every migration this run of the
agent saw ended, waits for one whose COMMIT is being carried out, and
answers "not resumed" for one not committed only after fencing it, so a
COMMIT still in flight can never start the VM afterwards. Thread-safe: each
incoming connection is a session in its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

# How long an in-doubt query waits for a COMMIT that is being carried out.
OUTCOME_WAIT_S = 30.0
# Outcomes remembered for in-doubt queries (oldest forgotten first).
MAX_OUTCOMES = 4096


class Fenceable(Protocol):
    """An incoming migration's session, as Outcomes sees it (destination.DestinationSession)."""

    fenced: bool  # an in-doubt answer (or a cancel) said the VM never starts here
    committing: bool  # COMMIT is being carried out: too late to fence
    settled: threading.Event  # set once the outcome is known

    def fence(self) -> None:
        """Never start this VM (and stop receiving it)."""


S = TypeVar("S", bound=Fenceable)


class Outcomes(Generic[S]):
    """Who owns each migration's VM, as far as this host knows; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[str, bool] = {}
        self._live: dict[str, S] = {}

    def register(self, mid: str, session: S) -> bool:
        """Track a new migration; False if that id was already settled (a replay: refuse)."""
        with self._lock:
            if mid in self._done or mid in self._live:
                return False
            self._live[mid] = session
            return True

    def begin_commit(self, mid: str) -> bool:
        """COMMIT arrived: True if the VM may start, False if an in-doubt answer fenced it off."""
        with self._lock:
            session = self._live.get(mid)
            if session is None or session.fenced:
                return False
            session.committing = True
            return True

    def settle(self, mid: str, resumed: bool) -> None:
        with self._lock:
            session = self._live.pop(mid, None)
            self._done[mid] = resumed
            while len(self._done) > MAX_OUTCOMES:
                del self._done[next(iter(self._done))]
        if session is not None:
            session.settled.set()

    def answer(self, mid: str, runs_here: Callable[[], bool] = lambda: False) -> bool | None:
        """Did migration ``mid`` resume here? Fences it when not; None if still undecided after a wait.

        ``runs_here`` is asked about a migration this run of the agent never saw: True when a VM it
        re-adopted from the previous run arrived by that migration (it committed, then the agent died)."""
        with self._lock:
            if mid in self._done:
                return self._done[mid]
            session = self._live.get(mid)
            if session is not None and not session.committing:
                self._done[mid] = False  # not committed: it never will be
                session.fence()
                return False
        if session is None:
            here = runs_here()
            with self._lock:
                return self._done.setdefault(mid, here)  # never seen: it committed before a restart, or never
        session.settled.wait(OUTCOME_WAIT_S)
        with self._lock:
            return self._done.get(mid)

    def fence(self, session: S) -> bool:
        """Stop ``session`` from ever starting its VM, unless COMMIT is already being carried out."""
        with self._lock:
            if session.committing:
                return False
            session.fence()
            return True

    def live(self) -> list[S]:
        with self._lock:
            return list(self._live.values())
