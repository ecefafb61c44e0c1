"""Post-copy recovery: the link of a migration's post-copy phase lost, both sides keep their
halves and reconnect (docs/protocol.md, "Post-copy recovery"; docs/RELIABILITY.md, "Post-copy").

From RESUMED on the destination owns the VM: it runs there on partial RAM, and the pages it
lacks exist only in the source's paused VM process. A lost link (main or urgent connection: a
cut, a reset, a send or a wait past the stall timeout) is therefore no failure, on either side:

* **destination** (:func:`pause_incoming`): status ``postcopy-paused``; the VM keeps running,
  its faults are still served (a present or zero page at once; a missing one is marked
  requested and its vCPU blocks until the page comes); the phase waits, for as long as it takes,
  for the source to come back (:class:`Phase`: a new connection whose first message is
  PostcopyRecover naming this migration, from the same peer, authenticated as any migration
  connection). Then, ``postcopy-recover``: it sends the pages it still lacks (missing, and the
  requested ones whose answers the lost link carried: :class:`PostcopyLacking`), takes the new
  urgent connection (PostcopyAttach, as at the switch-over), asks again for every requested page,
  and the phase goes on;
* **source** (:func:`run_source`): status ``postcopy-paused``; it keeps its paused VM process and
  guest RAM, and reconnects with backoff (``FIRST_DELAY_S`` doubling to ``MAX_DELAY_S``;
  ``ferry migrate-recover NAME`` wakes it at once: :func:`recover_op`), status
  ``postcopy-recover`` while a handshake is under way. The push then sends exactly what the
  destination lacks. Never does it resume its own copy: the destination's may have run.

A recovery the destination refuses for good (it does not know the migration id: its VM was
stopped, or its agent forgot it; the peer is not this migration's; the VM name differs) ends the
migration as a failed post-copy does: the VM stays paused here, in doubt, for the operator.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.migration.common import MigrationError, describe
from agent.migration.info import MigrationInfo, Status
from agent.migration.transport import Connection
from proto.errors import ErrorCode, ProtocolError
from proto.limits import MAX_RANGES
from proto.messages import MigrateRefuse
from proto.postcopy_messages import (
    PostcopyAttach,
    PostcopyDone,
    PostcopyLacking,
    PostcopyRecover,
    PostcopyRecovered,
)
from proto.state import SourceMachine
from vmruntime.dirty import merge_ranges

if TYPE_CHECKING:
    from agent.migration.destination import DestinationSession
    from agent.migration.postcopy_dest import PostcopyIncoming
    from agent.migration.source import SourceSession

Range = tuple[int, int]

PAGE_SIZE = 4096
# The source's reconnect backoff: the first attempt soon after the loss (a blip), then doubling.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
# The destination, once it sent what it lacks: how long the source may take to open the urgent connection.
URGENT_WAIT_S = 10.0
RECOVERING = (Status.POSTCOPY_PAUSED, Status.POSTCOPY_RECOVER)
# A finished phase's PostcopyDone, repeated to a recovery: how long the source may take to read it.
DONE_LINGER_S = 5.0
KEEP_FINISHED = 64  # finished phases remembered for that
# Refusals the source retries (the destination is still letting go of the previous attempt).
_RETRIED = frozenset({ErrorCode.BUSY.value})


class Refused(Exception):
    """The destination refused a recovery (its MigrateRefuse): ``code`` and ``reason``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- the destination ---------------------------------------------------------------------------------


class _Offer:
    """A connection a recovery brought, held by its session's thread until the phase lets it go."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ended = threading.Event()


class Phase:
    """One incoming post-copy phase that a recovery may join: from RESUMED until it ends."""

    def __init__(self, migration_id: str, peer: str, vm_name: str, preempt: Callable[[], None]) -> None:
        self.migration_id = migration_id
        self.peer = peer
        self.vm_name = vm_name
        self._preempt = preempt  # shuts the phase's connections: a recovery replaces them
        self._cond = threading.Condition()
        self.state = "active"  # "paused": waits for a recovery; "recovering": one is under way
        self._main: _Offer | None = None
        self._urgent: _Offer | None = None
        self._held: list[_Offer] = []  # offers in use: let go when replaced or at the end
        self.closed = False
        self.done: PostcopyDone | None = None  # every page here: a recovery is told so at once

    # (the recovering session's thread)
    def offer_main(self, conn: Connection) -> _Offer:
        """A recovery's main connection; Refused while another recovery is under way."""
        with self._cond:
            if self.closed:
                raise Refused(ErrorCode.NOT_FOUND, f"unknown migration id {self.migration_id}: its post-copy "
                              "is over here")
            if self.state == "recovering" or self._main is not None:
                raise Refused(ErrorCode.BUSY, f"a recovery of migration {self.migration_id} is under way already")
            offer = self._main = _Offer(conn)
            active = self.state == "active"
            self._cond.notify_all()
        if active:  # this side has not seen the loss yet (a half-open link): drop it at once
            self._preempt()
        return offer

    def offer_urgent(self, conn: Connection) -> _Offer:
        with self._cond:
            if self.closed or self.state != "recovering" or self._urgent is not None:
                raise Refused(ErrorCode.BAD_REQUEST, f"an urgent connection for migration {self.migration_id}, "
                              "which is not recovering here")
            offer = self._urgent = _Offer(conn)
            self._cond.notify_all()
        return offer

    def hold(self, offer: _Offer) -> None:
        """Keep the offering thread (whose end closes the connection) until the phase lets go."""
        while not offer.ended.wait(0.5):
            with self._cond:
                if self.closed:
                    return

    # (the phase's own thread)
    def wait_main(self) -> _Offer:
        """Paused: wait for a recovery's main connection, for as long as it takes."""
        with self._cond:
            self.state = "paused"
            self._cond.wait_for(lambda: self._main is not None)
            offer, self._main = self._main, None
            assert offer is not None
            self.state = "recovering"
            self._held.append(offer)
            return offer

    def wait_urgent(self, timeout: float) -> _Offer:
        with self._cond:
            if not self._cond.wait_for(lambda: self._urgent is not None, timeout):
                raise TimeoutError(f"the source's urgent connection did not come within {timeout:g} s")
            offer, self._urgent = self._urgent, None
            assert offer is not None
            self._held.append(offer)
            return offer

    def recovered(self, keep: list[_Offer]) -> None:
        """The phase goes on on ``keep``; every other connection a recovery brought is let go."""
        with self._cond:
            self.state = "active"
            for offer in self._held:
                if offer not in keep:
                    offer.ended.set()
            self._held = list(keep)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            for offer in [*self._held, *(o for o in (self._main, self._urgent) if o is not None)]:
                offer.ended.set()
            self._cond.notify_all()
        with _phases_lock:
            if self.done is not None:  # kept (the latest few): the source may not have heard PostcopyDone
                _finished.append(self.migration_id)
                while len(_finished) > KEEP_FINISHED:
                    _phases.pop(_finished.popleft(), None)
            elif _phases.get(self.migration_id) is self:
                del _phases[self.migration_id]


_phases: dict[str, Phase] = {}
_finished: collections.deque[str] = collections.deque()
_phases_lock = threading.Lock()


def open_phase(s: DestinationSession, preempt: Callable[[], None]) -> Phase:
    """The post-copy phase of ``s`` starts: from here on a recovery may join it."""
    assert s.info is not None
    phase = Phase(s._mid, s._peer, s.info.vm, preempt)
    with _phases_lock:
        _phases[s._mid] = phase
    return phase


def _phase_for(migration_id: str, vm_name: str, peer: str) -> Phase:
    with _phases_lock:
        phase = _phases.get(migration_id)
    if phase is None:
        raise Refused(ErrorCode.NOT_FOUND, f"unknown migration id {migration_id}: no post-copy of it is under "
                      "way here")
    if phase.peer != peer:
        raise Refused(ErrorCode.AUTH_FAILED, f"not this migration's peer: migration {migration_id} runs with "
                      f"{phase.peer}, this connection is from {peer}")
    if phase.vm_name != vm_name:
        raise Refused(ErrorCode.BAD_REQUEST, f"migration {migration_id} moves VM {phase.vm_name!r}, not {vm_name!r}")
    return phase


def join(s: DestinationSession, msg: PostcopyRecover) -> None:
    """A PostcopyRecover connection's session: hand it to the paused phase it names (or refuse
    with the reason), and keep this thread until the phase lets the connection go."""
    try:
        phase = _phase_for(msg.migration_id, msg.vm_name, s._peer)
        if phase.done is not None:  # complete here; the link dropped the last word: say it again
            s.conn.send(PostcopyRecovered(0))
            s.conn.send(phase.done)
            s.conn.linger(DONE_LINGER_S)
            return
        offer = phase.offer_main(s.conn)
    except Refused as r:
        s.conn.send(MigrateRefuse(r.code, r.reason))
        s.log.warning("post-copy recovery refused", peer=s._peer, migration_id=msg.migration_id, reason=r.reason)
        return
    s.log.info("post-copy recovery connection", vm=msg.vm_name, peer=s._peer, migration_id=msg.migration_id)
    phase.hold(offer)


def attach_urgent(s: DestinationSession, msg: PostcopyAttach) -> bool:
    """An urgent connection for a phase under recovery: hand it over and hold it (True); False
    when no phase of that migration is here (the switch-over's attach then decides)."""
    with _phases_lock:
        known = msg.migration_id in _phases
    if not known:
        return False
    try:
        phase = _phase_for(msg.migration_id, msg.vm_name, s._peer)
        offer = phase.offer_urgent(s.conn)
    except Refused as r:
        raise ProtocolError(r.reason, r.code) from None
    phase.hold(offer)
    return True


def pause_incoming(pc: PostcopyIncoming, phase: Phase, exc: BaseException) -> None:
    """The destination's phase lost its link: paused until a recovery succeeds (returns then)."""
    s = pc.s
    assert s.info is not None and pc.server is not None
    s.info.status = Status.POSTCOPY_PAUSED
    s.log.warning("post-copy paused: the link to the source is lost; the VM runs on, waiting for the source",
                  vm=s.info.vm, peer=s._peer, error=describe(exc))
    pc.detach()
    while True:
        offer = phase.wait_main()
        s.info.status = Status.POSTCOPY_RECOVER
        try:
            urgent = _handshake_incoming(pc, phase, offer.conn)
        except (OSError, ProtocolError) as e:
            s.info.status = Status.POSTCOPY_PAUSED
            offer.ended.set()
            s.log.warning("post-copy recovery failed; waiting for the source again", vm=s.info.vm, error=describe(e))
            continue
        phase.recovered([offer, urgent])
        pc.reattach(offer.conn, urgent.conn)
        s.info.status = Status.POSTCOPY_ACTIVE
        s.log.info("post-copy recovered", vm=s.info.vm, peer=s._peer)
        return


def _handshake_incoming(pc: PostcopyIncoming, phase: Phase, conn: Connection) -> _Offer:
    """Tell the source what this side lacks, then take its new urgent connection."""
    from agent.migration.postcopy_faults import MISSING, REQUESTED

    assert pc.server is not None
    lacking = merge_ranges(pc.server.ranges(MISSING) + pc.server.ranges(REQUESTED))
    for i in range(0, len(lacking), MAX_RANGES):
        conn.send(PostcopyLacking(tuple(lacking[i:i + MAX_RANGES])))
    conn.send(PostcopyRecovered(sum(b - a for a, b in lacking) // PAGE_SIZE))
    return phase.wait_urgent(URGENT_WAIT_S)


# -- the source --------------------------------------------------------------------------------------


def run_source(s: SourceSession) -> None:
    """The source's post-copy phase, through as many lost links as it takes. MigrationError when
    the destination refuses a recovery for good; any other failure of the phase as it comes."""
    pc = s._postcopy
    assert pc is not None
    while True:
        if s.conn is None:  # the link went before RESUMED came (the in-doubt query said it resumed)
            pc.close()
            s.log.warning("post-copy paused: no link to the destination; the VM stays paused here with its "
                          "RAM, reconnecting", vm=s.vm.name)
        else:
            try:
                pc.run()
                return
            except OSError as exc:  # the link (a cut, a reset, a stall past the stall timeout)
                s.log.warning("post-copy paused: the link to the destination is lost; the VM stays paused here "
                              "with its RAM, reconnecting", vm=s.vm.name, error=describe(exc))
                s.conn.close()
                s.conn = None
        _reconnect(s)


def _reconnect(s: SourceSession) -> None:
    """Reconnect with backoff until the destination takes the recovery (or refuses it for good)."""
    pc = s._postcopy
    assert pc is not None
    delay = FIRST_DELAY_S
    attempts = 0
    while True:
        s.info.status = Status.POSTCOPY_PAUSED
        if pc.kick.wait(delay):
            s.log.info("post-copy recovery forced by the operator", vm=s.vm.name)
        pc.kick.clear()
        s.info.status = Status.POSTCOPY_RECOVER
        attempts += 1
        try:
            conn, lacking = _handshake_outgoing(s)
        except Refused as r:
            if r.code not in _RETRIED:
                raise MigrationError(r.code, f"the destination refused the recovery: {r.reason}") from None
            why = r.reason
        except (OSError, ProtocolError) as e:
            why = describe(e)
        else:
            try:
                pc.resume(conn, lacking)
            except (OSError, ProtocolError) as e:
                conn.close()
                why = describe(e)
            else:
                s.log.info("post-copy recovered", vm=s.vm.name, attempts=attempts,
                           lacking=sum(b - a for a, b in lacking) // PAGE_SIZE)
                return
        delay = min(delay * 2, MAX_DELAY_S)
        s.log.warning("post-copy recovery attempt failed", vm=s.vm.name, attempt=attempts, error=why,
                      next_in_s=delay)


def _handshake_outgoing(s: SourceSession) -> tuple[Connection, list[Range]]:
    """A new main connection: PostcopyRecover, and the ranges the destination lacks."""
    conn = s._connect(guest_size=s.vm.mem)
    try:
        peer = s._handshake(conn)
        if peer != s.info.peer:
            raise ConnectionError(f"the agent at {s.dest[0]}:{s.dest[1]} is {peer}, not {s.info.peer}")
        conn.start(SourceMachine())
        conn.send(PostcopyRecover(s.migration_id, s.vm.name))
        lacking: list[Range] = []
        while True:
            msg = conn.recv()
            if isinstance(msg, MigrateRefuse):
                raise Refused(msg.code, msg.reason)
            if isinstance(msg, PostcopyLacking):
                lacking.extend(msg.ranges)
                continue
            assert isinstance(msg, PostcopyRecovered)  # (the state machine allows nothing else)
            named = sum(b - a for a, b in lacking) // PAGE_SIZE
            if named != msg.pages:
                raise ProtocolError(f"PostcopyRecovered says {msg.pages} pages, the PostcopyLacking named {named}")
            return conn, lacking
    except BaseException:
        conn.close()
        raise


def recover_op(s: SourceSession | None, info: MigrationInfo | None, vm_name: str, agent: str) -> str:
    """The operator's ``migrate-recover NAME``: on the source, the next attempt at once; on the
    destination, refused with where to run it (the source is the side that connects)."""
    if s is not None and s._postcopy is not None and s.info.status in RECOVERING:
        s._postcopy.kick.set()
        return f"reconnecting to {s.info.peer} at once"
    if info is not None and info.direction == "in" and info.status in RECOVERING:
        raise MigrationError(ErrorCode.BAD_REQUEST, f"{agent} is the destination of VM {vm_name!r}'s post-copy: "
                             f"run `ferry migrate-recover {vm_name}` on the source's agent ({info.peer}), "
                             "which reconnects")
    status = "none" if info is None else info.status.value
    raise MigrationError(ErrorCode.NOT_FOUND if info is None else ErrorCode.BAD_REQUEST,
                         f"no post-copy of VM {vm_name!r} is paused on {agent} (migration status: {status}): "
                         "nothing to recover")


def refuse_resolve(out: object, vm_name: str) -> None:
    """migrate-resolve on a source whose post-copy is under way (paused included): refused, for
    the destination has owned the VM since COMMIT and runs it; resuming the copy here would run
    it twice and lose what it did there."""
    session = getattr(out, "session", None)
    if session is None or session._postcopy is None or session.info.status not in (Status.POSTCOPY_ACTIVE,
                                                                                    *RECOVERING):
        return
    raise MigrationError(ErrorCode.BUSY, f"VM {vm_name!r} is in post-copy ({session.info.status.value}): the "
                         "destination owns it since COMMIT and runs it, its missing pages are only here; it is "
                         f"not in doubt and is never resumed here (`ferry migrate-recover {vm_name}` reconnects at once)")


__all__ = ["Phase", "Refused", "attach_urgent", "join", "open_phase", "pause_incoming", "recover_op", "refuse_resolve",
           "run_source"]
