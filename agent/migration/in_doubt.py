"""Asking the destination whether it resumed a VM, when COMMIT went out and no answer came back.

After COMMIT the source may no longer resume the VM on its own: the
destination may be running it. Only the destination's word settles it,
asked on a new connection (InDoubtQuery, InDoubtAnswer; docs/protocol.md):
repeatedly for a bounded time when the COMMIT's own answer is lost, and once
more when the operator resolves a migration that stayed in doubt. A "not
resumed" answer fences the migration on the destination for good, so the
answer is final either way. This module owns that exchange, apart from the
session it belongs to; connecting and authenticating are the session's,
passed in.

In cluster mode etcd, not the destination, has the last word
(agent/migration/ownership.py). The in-doubt record then also names the
ownership terms (``owner_ref``), so that an agent restarted in doubt settles
by etcd first: a record still naming this host is fenced and the VM runs
here again without waiting for the destination, which may be gone for good;
only a record naming the destination needs its word.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.migration.common import describe
from agent.migration.info import MigrationInfo
from agent.migration.ownership import PARAMS_KEY
from agent.migration.seams import LogLike
from agent.migration.transport import Connection
from proto.errors import ProtocolError
from proto.messages import Abort, InDoubtAnswer, InDoubtQuery, Message, Resumed
from proto.state import SourceMachine

# How long the source, in doubt after COMMIT, keeps asking the destination.
IN_DOUBT_TIMEOUT_S = 60.0
IN_DOUBT_RETRY_S = 0.5
# A migration a restarted agent found in doubt is asked about until it is settled: each query
# bounded, the waits between failed ones doubling up to this.
ADOPTED_ASK_S = 10.0
ADOPTED_RETRY_MAX_S = 10.0


class InDoubtAsker:
    """The in-doubt queries of one migration (``migration_id``, of VM ``vm_name``).

    ``connect`` opens a new connection to the destination's migration
    listener, ``handshake`` authenticates it (both raise OSError or
    ProtocolError, as the exchange itself does).
    """

    def __init__(self, *, connect: Callable[[], Connection], handshake: Callable[[Connection], object],
                 vm_name: str, migration_id: str, log: LogLike) -> None:
        self._connect = connect
        self._handshake = handshake
        self.vm_name = vm_name
        self.migration_id = migration_id
        self.log = log

    def ask(self, deadline_s: float | None = None) -> bool:
        """One query: whether the destination resumed the VM. Raises OSError or ProtocolError
        when it cannot say; past ``deadline_s`` (the whole exchange) the connection is shut and
        the wait ends with an OSError."""
        conn = self._connect()  # a TLS failure stays an OSError here: the in-doubt loop retries it
        timer = None
        if deadline_s is not None:
            timer = threading.Timer(deadline_s, conn.shutdown)
            timer.daemon = True
            timer.start()
        try:
            self._handshake(conn)
            conn.start(SourceMachine())
            conn.send(InDoubtQuery(self.vm_name, self.migration_id))
            answer = conn.recv()
            assert isinstance(answer, InDoubtAnswer)  # the state machine admits nothing else
            return answer.resumed
        finally:
            if timer is not None:
                timer.cancel()
            conn.close()

    def ask_once(self, deadline_s: float | None = None) -> bool | None:
        """One query (the operator's migrate-resolve): the destination's answer, or None when it
        cannot be reached (within ``deadline_s``)."""
        try:
            return self.ask(deadline_s)
        except (OSError, ProtocolError) as exc:
            self.log.info("in-doubt query failed", vm=self.vm_name, error=describe(exc))
            return None

    def resolve(self, timeout: float) -> bool | None:
        """Ask until the destination answers or ``timeout`` seconds passed (then None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.ask()
            except (OSError, ProtocolError) as exc:
                self.log.info("in-doubt query failed, retrying", vm=self.vm_name, error=describe(exc))
                time.sleep(IN_DOUBT_RETRY_S)
        return None


def owner_ref(terms: Mapping[str, Any]) -> dict[str, str]:
    """The in-doubt record's entries for cluster mode's ownership terms (the source's MigrateStart
    params entry): the destination host's name and the generation this host owned; {} in
    two-agent mode."""
    owner = terms.get(PARAMS_KEY)
    if not isinstance(owner, Mapping):
        return {}
    return {"owner-to": str(owner.get("to", "")), "generation": str(owner.get("generation", ""))}


def owner_terms(ref: Mapping[str, str]) -> dict[str, Any] | None:
    """The ownership terms an in-doubt record names (``owner_ref``), None when it names none."""
    to, generation = ref.get("owner-to"), ref.get("generation")
    if not to or not generation or not generation.isdigit():
        return None
    return {PARAMS_KEY: {"to": to, "generation": int(generation)}}


# Settles with the owner store's word given the destination's (None: not asked / no answer):
# True the destination runs the VM, False this host does, None nobody can say yet.
Settle = Callable[[bool | None], bool | None]


class AdoptedInDoubt:
    """A migration a previous run of this agent left in doubt (its VM re-adopted, paused, with
    COMMIT recorded as sent): this run asks the destination, in its own thread, until it gives a
    definite answer, and hands that to ``on_answer`` (resumed there: True). The operator's
    `migrate-resolve` may settle it first (``ask_once``, then ``stop``).

    With ``settle`` (cluster mode: etcd's word, ownership.settle) the store is asked first, and
    the destination only when the store names it; its answer then goes through ``settle`` too."""

    def __init__(self, asker: InDoubtAsker, info: MigrationInfo, on_answer: Callable[[bool], None],
                 settle: Settle | None = None, terms: Mapping[str, Any] | None = None) -> None:
        self.asker = asker
        self.owner_terms = terms or {}  # the ownership terms (cluster mode), for migrate-resolve
        self.info = info
        self._on_answer = on_answer
        self._settle = settle
        self._stop = threading.Event()

    def ask_once(self, deadline_s: float | None = None) -> bool | None:
        return self.asker.ask_once(deadline_s)

    def stop(self) -> None:
        """No more queries (settled by the operator, a new migration, or the agent stopping)."""
        self._stop.set()

    def run(self) -> None:
        """The thread's body: ask until answered or stopped, waiting longer after each failure."""
        if self._settle is not None:
            # The store alone settles a record that still names this host: fenced, the VM is ours.
            first = self._settle(None)
            if first is not None:
                self._answer(first)
                return
        wait = IN_DOUBT_RETRY_S
        while not self._stop.is_set():
            try:
                resumed = self.asker.ask(ADOPTED_ASK_S)
            except (OSError, ProtocolError) as exc:
                self.asker.log.info("in-doubt query failed, retrying", vm=self.asker.vm_name, error=describe(exc),
                                    retry_s=wait)
                self._stop.wait(wait)
                wait = min(wait * 2, ADOPTED_RETRY_MAX_S)
                continue
            settled = resumed if self._settle is None else self._settle(resumed)
            if settled is None:  # the store and the destination disagree: the operator decides
                self.asker.log.error("in doubt: etcd and the destination disagree; the VM stays paused",
                                     vm=self.asker.vm_name, destination_says=resumed)
                return
            self._answer(settled)
            return

    def _answer(self, resumed: bool) -> None:
        if not self._stop.is_set():
            self._on_answer(resumed)


def settle(reply: Message, info: MigrationInfo) -> bool:
    """What the destination's answer to COMMIT (Resumed, InDoubtAnswer or Abort) means: True
    resumed there, False not (and never will); why not goes into ``info``."""
    if isinstance(reply, Resumed):
        return True
    if isinstance(reply, InDoubtAnswer):
        info.error = "the destination could not start the VM"
        return reply.resumed
    assert isinstance(reply, Abort)
    info.error = f"the destination aborted: {reply.reason}"
    info.error_code = info.error_code or reply.code
    return False
