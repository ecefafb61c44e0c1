"""The destination side: one accepted migration connection, run in its own thread.

This module owns the receiving half of a migration (docs/protocol.md, "The
exchange") and the ownership rules that bind it (docs/RELIABILITY.md):

* authenticate the peer; the first message is either MigrateStart (a
  migration) or InDoubtQuery (a source in doubt asking about an earlier one);
* compatibility check before anything is touched (ISA version and features,
  page size, memory against free capacity, the VM name, the VM's NIC: its
  bridge here, its MAC unused): a refusal is a MigrateRefuse with a stable code;
* reserve guest RAM, receive page batches straight into it (zero ranges
  become holes), the CPU and device state, then check the RAM digest and
  answer READY;
* with --copy-storage, write the disk image's copy as it arrives (storage_copy);
* start the VM only on COMMIT (its NIC on a TAP of this host), then answer
  RESUMED, and only then announce the guest's MAC on the network
  (agent/announce.py), as a task of the loop that RESUMED never waits for.

Any failure before COMMIT discards the reserved copy. ``Outcomes``
(outcomes.py) records what became of every migration this host saw, so an
in-doubt query gets a true answer; answering "not resumed" fences the
migration first, so a COMMIT still in flight can never start the VM
afterwards.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.code_cache import CodeCache
from agent.disk_copy import CopyError
from agent.disks import DiskConfig
from agent.migration import (
    code_hint,
    pages,
    postcopy_dest,
    postcopy_recover,
    spec_move,
    storage_copy,
    stream_recv,
)
from agent.migration.common import (
    LOOP_CALL_TIMEOUT_S,
    RUN_STATE_KEY,
    LoopBridge,
    describe,
    error_code,
    server_handshake,
    tell,
)
from agent.migration.incoming_checks import Refused, check_compatible, incoming_disk, incoming_nic, params_of
from agent.migration.info import PAGE_SIZE, DiskProgress, MigrationInfo, RoundStat, Status
from agent.migration.outcomes import Outcomes
from agent.migration.ownership import TWO_AGENTS, Ownership, OwnershipLost
from agent.migration.seams import IncomingHost, IncomingRAM, Lane, LogLike
from agent.migration.transport import Connection, GuestRamFull
from proto.auth import error_response
from proto.errors import ErrorCode, ProtocolError
from proto.messages import (
    Abort,
    CodeHint,
    Commit,
    DeviceState,
    Digest,
    DiskBatch,
    InDoubtAnswer,
    InDoubtQuery,
    Message,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    Sync,
    SyncAck,
)
from proto.postcopy_messages import PostcopyAttach, PostcopyRecover
from proto.state import DestinationMachine
from proto.stream_messages import StreamAttach

# Whole time an unauthenticated peer gets for the handshake and its first message. The kernel
# timeout holds per socket call only, so a peer sending a byte a second would otherwise hold a
# session (and its thread) forever; an honest peer needs a few round trips.
HANDSHAKE_TIMEOUT_S = 10.0
# After an Abort sent while the source sends pages, how long to wait for it to read the Abort
# and close (it checks between batches; through TLS, at its next Sync).
ABORT_LINGER_S = 10.0
# Restoring the CPU state is quick; past this the VM process is stuck: not resumed here.
RESTORE_TIMEOUT_S = 10.0


class Aborted(Exception):
    """The migration ended before COMMIT; the reserved copy is discarded."""


class DestinationSession:
    """One accepted migration connection."""

    def __init__(self, *, conn: Connection, vms: IncomingHost[Any, Any], key: bytes, agent_name: str,
                 bridge: LoopBridge, outcomes: Outcomes[DestinationSession], infos: dict[str, MigrationInfo],
                 log: LogLike, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 code_cache: CodeCache | None = None, ownership: Ownership = TWO_AGENTS) -> None:
        self.conn = conn
        self.ownership = ownership  # who settles the VM's owner at COMMIT (agent/migration/ownership.py)
        self._terms: dict[str, Any] = {}  # the MigrateStart params the ownership claim reads
        self._on_authenticated: Callable[[], None] | None = None  # the listener's unauthenticated list
        self._handshake_timeout = handshake_timeout
        self._too_late = False
        self.vms = vms
        self.key = key
        self.agent_name = agent_name
        self.bridge = bridge
        self.outcomes = outcomes
        self.infos = infos
        self.log = log
        self.code_cache = code_cache  # this host's translated guest blocks (agent/code_cache.py)
        self.machine = DestinationMachine()
        self.info: MigrationInfo | None = None
        self.fenced = False
        self.committing = False
        self.settled = threading.Event()
        self._inc: IncomingRAM | None = None
        self._ram: memoryview | None = None
        self._digest: pages.RamDigest | None = None
        self._sink: pages.DigestingSink | None = None  # the memfd large ranges are written to
        self._after_sync: set[int] = set()  # chunks of a round's last batch: hashed after SyncAck
        self._state: dict[str, Any] | None = None
        self._start_paused = False  # the VM was paused on the source: it stays paused here
        self._ram_digest: str | None = None
        self._round = RoundStat()
        self._mid = ""
        self._peer = "?"
        self._lane: Lane | None = None  # this thread's own socket to the incoming VM's process
        self._listen_at: str | None = None  # where that process will listen once restored
        self._vm: Any = None  # the claimed VM, once COMMIT started it here
        self._warm_until: float | None = None  # a code warm-up runs: hold SyncAck for it until then
        self._disk_copy: tuple[DiskConfig, str] | None = None  # the disk to copy here, and its identity
        self._copy: storage_copy.IncomingCopy | None = None  # that copy, once created (_accept)
        self._postcopy: postcopy_dest.PostcopyIncoming | None = None  # a post-copy switch-over (postcopy_dest)
        self._streams: stream_recv.IncomingStreams | None = None  # the extra data streams (stream_recv)
        self._lock = threading.Lock()  # the digest's bookkeeping, which every stream's thread does

    def on_authenticated(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the peer has authenticated or the session ended."""
        self._on_authenticated = callback

    def fence(self) -> None:
        """Never start this VM: called by an in-doubt answer, or shutdown, before COMMIT."""
        self.fenced = True
        self.conn.shutdown()

    # -- the thread body -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            first = self._greet()
            if isinstance(first, InDoubtQuery):
                self._answer_query(first)
            elif isinstance(first, MigrateStart):
                self._migration(first)
            elif isinstance(first, PostcopyAttach):
                postcopy_dest.attach(self, first)
            elif isinstance(first, PostcopyRecover):
                postcopy_recover.join(self, first)
            elif isinstance(first, StreamAttach):
                stream_recv.serve(self, first)
        except Exception as exc:  # the connection is this session's only client: log, never raise
            self.log.warning("incoming migration connection failed", peer=self._peer, error=describe(exc))
        finally:
            self._authenticated()
            self.conn.close()
            if self._lane is not None:
                self._lane.close()

    def _greet(self) -> Message:
        """Handshake and first message, within one deadline for the whole exchange."""
        timer = threading.Timer(self._handshake_timeout, self._too_slow)
        timer.daemon = True
        timer.start()
        try:
            self._peer = server_handshake(self.conn, self.key, self.agent_name)  # tells the peer itself
            self.conn.start(self.machine)
            first = self._first()
        except Exception as e:
            if self._too_late:  # the deadline shut the socket: say so, not "peer closed"
                raise TimeoutError(f"handshake not done within {self._handshake_timeout:g} s") from e
            raise
        finally:
            timer.cancel()
        if self._too_late:
            raise TimeoutError(f"handshake not done within {self._handshake_timeout:g} s")
        self._authenticated()
        return first

    def _first(self) -> Message:
        """The first message after the handshake; an illegal one is answered with the reason."""
        try:
            return self._recv()
        except ProtocolError as e:
            tell(self.conn, error_response(e))
            raise

    def _too_slow(self) -> None:
        self._too_late = True
        self.conn.shutdown()

    def _authenticated(self) -> None:
        """Once: the peer no longer counts against the listener's unauthenticated connections."""
        done, self._on_authenticated = self._on_authenticated, None
        if done is not None:
            done()

    def _answer_query(self, q: InDoubtQuery) -> None:
        # An agent restarted after that migration's COMMIT knows nothing of it, but it re-adopted
        # the VM if the VM started here: that VM's record names the migration.
        resumed = self.outcomes.answer(
            q.migration_id, lambda: self.bridge.run(self.vms.arrived_by, q.vm_name, q.migration_id))
        if resumed is None:
            raise TimeoutError(f"migration {q.migration_id} is still starting; ask again")
        self._send(InDoubtAnswer(q.migration_id, resumed))
        self.log.info("in-doubt query answered", vm=q.vm_name, migration_id=q.migration_id, resumed=resumed)

    # -- one migration -------------------------------------------------------------------------------
    def _migration(self, start: MigrateStart) -> None:
        self._mid = start.migration_id
        try:
            self._check_and_reserve(start)
        except Refused as r:
            self._send(MigrateRefuse(r.code, r.reason))
            self.log.info("migration refused", vm=start.vm_name, peer=self._peer, code=r.code, reason=r.reason)
            return
        try:
            self._accept(start)
            self._receive_until_ready()
            resumed = self._on_commit(self._recv()) if self._postcopy is None else self._postcopy.commit()
        except BaseException as exc:
            if self._postcopy is not None:
                self._postcopy.close()
            told = self._tell_abort(exc)
            self._discard(exc)
            if told:  # the source may be sending still: let it read the Abort before we close
                self.conn.linger(ABORT_LINGER_S)
            raise
        if self._postcopy is None or self._postcopy.run():  # post-copy: the VM runs here on partial RAM
            self._finish(resumed)

    def _tell_abort(self, exc: BaseException) -> bool:
        """A bad frame, an out-of-order message, a timeout, no room here: tell the source why (best
        effort); True when it went out and the source may still be sending (this host's RAM or
        disk is full)."""
        if self.fenced or isinstance(exc, Aborted) or not self.machine.can_send(Abort):
            return False
        if isinstance(exc, ProtocolError | TimeoutError | GuestRamFull | CopyError):
            try:
                self._send(Abort(error_code(exc), describe(exc)[:500]))
            except (OSError, ProtocolError):
                return False
            return isinstance(exc, GuestRamFull | CopyError)
        return False

    def _check_and_reserve(self, start: MigrateStart) -> None:
        """The compatibility check and the reservation; Refused when either fails, nothing held."""
        check_compatible(start)
        if (why := self.ownership.refusal(start.vm_name, start.params)) is not None:
            raise Refused(ErrorCode.INCOMPATIBLE, why)
        self._terms = dict(start.params)
        nic = incoming_nic(start)  # reads /sys: here, in the session thread
        got = incoming_disk(start, self.bridge.run(self.vms.allowed_disk_dirs))  # reads the image, here too
        disk = None if got is None else got[0]
        if got is not None and got[1] is not None:
            self._disk_copy = (got[0], got[1])
        if not self.outcomes.register(start.migration_id, self):
            raise Refused(ErrorCode.BAD_REQUEST, f"migration {start.migration_id} was already seen here")
        try:
            self._inc = self.bridge.run(self.vms.reserve_incoming, start.vm_name, start.mem_size, nic, disk,
                                        spec_move.incoming(start.params))
        except Exception as exc:
            self.outcomes.settle(start.migration_id, False)
            raise Refused(error_code(exc), describe(exc)) from exc

    def _accept(self, start: MigrateStart) -> None:
        """RAM is reserved: get ready to receive into it and tell the source to go."""
        inc = self._inc
        assert inc is not None
        self.conn.guest_size = start.mem_size
        if (stall := params_of(start).receive_stall(self.conn.stall_s)) != self.conn.stall_s:
            self.conn.set_stall_timeout(stall)  # the operator's for this migration, and its bandwidth cap
        self._ram = memoryview(inc.ram)
        # Before the wait for the VM process, not after: the digest's set-up (it grows with the
        # guest) then runs while that process starts, instead of adding to the setup time.
        self._digest = pages.RamDigest(inc.memfd, self._ram, start.mem_size)
        self._digest.assume_holes_except([])  # fresh RAM; every batch invalidates what it writes
        self._sink = stream_recv.SharedSink(inc.memfd, self._digest, self._lock)
        self._streams = stream_recv.incoming(start, params_of(start).streams or 1)
        self._await_vm_process()
        self.info = MigrationInfo(vm=start.vm_name, direction="in", peer=self._peer, mem=start.mem_size,
                                  dirty_tracker=start.dirty_tracker, status=Status.ACTIVE,
                                  params=params_of(start))
        if self._disk_copy is not None:  # created now: from here on a failure removes it (_discard)
            self.info.disk = DiskProgress()
            self._copy = storage_copy.IncomingCopy(*self._disk_copy, self.info.disk)
        self.info.streams = self._streams.count if self._streams is not None else 1
        self.bridge.run(self.infos.__setitem__, start.vm_name, self.info)  # the manager's dict: the loop's
        self._send(MigrateAccept(start.migration_id))
        self.info.setup_s = time.monotonic() - self.info.started
        self.log.info("incoming migration accepted", vm=start.vm_name, peer=self._peer, mem=start.mem_size)

    def _await_vm_process(self) -> None:
        """Hold the accept until the VM process for the reservation is up, and open a lane to it.

        Starting a Python process takes longer than a small guest takes to
        migrate (docs/PERFORMANCE.md section 11), and whatever is left of the
        start at COMMIT is downtime. Waiting now moves it into the setup time instead. The lane is
        this thread's own socket to that process: the restore at COMMIT goes
        over it, with no round trip through the agent's event loop.
        """
        self._lane = self.bridge.call(self.vms.incoming_lane(self._inc))
        self._listen_at = self.bridge.run(self.vms.incoming_socket_path, self._inc)

    def _receive_until_ready(self) -> None:
        """Pages, round ends, state, digest; answers READY when guest RAM checks out."""
        while True:
            msg = self._recv(self._ram, self._sink)
            if isinstance(msg, PageBatch):
                self._on_pages(msg)
            elif isinstance(msg, DiskBatch):
                assert self._copy is not None  # (the transport refuses disk data without a copy)
                self._copy.on_batch(msg)
            elif isinstance(msg, Sync):  # every page before it is applied (and the disk's synced): say so
                if self._streams is not None:  # on every stream (stream_recv: the round's barrier)
                    self._streams.barrier(self.conn.stall_s)
                if self._copy is not None:
                    self._copy.sync()
                self._send(SyncAck(msg.round, self._hold_for_warm_up()))
                self._digest_after_sync()
            elif isinstance(msg, RoundEnd):
                self._on_round_end(msg)
            elif isinstance(msg, CodeHint):
                assert self._lane is not None and self.info is not None
                code_hint.forward(self._lane, msg, self.info.mem, self.log, self.info.vm, self.code_cache)
                self._warm_until = time.monotonic() + code_hint.HOLD_MAX_S
            elif isinstance(msg, DeviceState):
                if self._streams is not None:  # the final round's pages, on every stream
                    self._streams.barrier(self.conn.stall_s)
                    self._streams.close()
                self._on_state(msg)
            elif isinstance(msg, Digest):
                self._on_digest(msg)
                return
            elif postcopy_dest.take(self, msg):  # the switch-over is a post-copy one
                return

    def _hold_for_warm_up(self) -> float:
        """Seconds SyncAck waited for the VM process's warm-up (agent/migration/code_hint.py)."""
        if self._warm_until is None or self._lane is None:
            return 0.0
        held = code_hint.hold(self._lane, self._warm_until)
        self._warm_until = None  # over, or given up on: later rounds are not held
        return held

    def _on_pages(self, batch: PageBatch, sink: pages.DigestingSink | None = None, conn: Connection | None = None) -> None:
        """A batch arrived (on the main connection, or on ``conn``, a stream with its own ``sink``)."""
        with self._lock:
            self._count_pages(batch, sink or self._sink, conn or self.conn)

    def _count_pages(self, batch: PageBatch, sink: pages.DigestingSink | None, conn: Connection) -> None:
        assert self._ram is not None and self.info is not None and self._digest is not None
        if batch.zeros:
            assert self._inc is not None
            pages.punch_zeros(self._inc.memfd, self._ram, batch.zeros)
        self._digest_batch(batch, sink, conn)
        data = pages.total_bytes(batch.ranges)
        zero = pages.total_bytes(batch.zeros)
        r = self._round
        if r.pages == 0:
            r.start = time.monotonic() - self.info.started
        r.pages += (data + zero) // PAGE_SIZE
        r.zero_pages += zero // PAGE_SIZE
        r.bytes += data
        self.info.normal += data // PAGE_SIZE
        self.info.duplicate += zero // PAGE_SIZE
        self.info.transferred = self.conn.received + (self._streams.received() if self._streams is not None else 0)
        self.info.first_round_rate(r.bytes, r.start)

    def _digest_batch(self, batch: PageBatch, sink: pages.DigestingSink | None, conn: Connection) -> None:
        """Keep the digest current: every chunk the batch touched is hashed now, those it covered
        whole from what it knows (still in the CPU cache), the others through the mapping; but
        those of a pre-copy round's last batch (a Sync is next) only after SyncAck went out.

        Batch by batch, not once per round: in the final round (the source paused) hashing each
        batch while the next one is on its way leaves only the last batch's chunks for after the
        final copy (docs/PERFORMANCE.md section 7), at no extra cost: batches go in address
        order, so only a chunk a batch boundary cuts is hashed twice."""
        assert self._digest is not None and sink is not None
        data, zeros, merged = pages.received(batch.ranges, batch.zeros)
        touched = pages.chunks_of(merged)
        hashed = sink.take()  # chunks hashed from the receive buffer as they arrived
        self._digest.invalidate_chunks(touched - hashed if hashed else touched)
        covered = pages.covered_chunks(merged)
        self._digest.refresh_known(data, zeros, hashed if hashed else None, covered)
        partial = touched - covered
        if conn.next_frame_is(Sync):  # the round's (or the stream's share's) last batch: answer the Sync first
            self._after_sync |= partial
        else:
            self._digest.refresh(partial)

    def _digest_after_sync(self) -> None:
        """Hash the chunks of the round's last batch now that SyncAck is out: beside the source's
        harvest and decision, not inside the round it waits for (docs/PERFORMANCE.md, section 7).
        The final round ends without a Sync: its batches are all hashed as they arrive."""
        assert self._digest is not None
        with self._lock:
            if self._after_sync:
                self._digest.refresh(self._after_sync)
                self._after_sync = set()

    def _on_round_end(self, msg: RoundEnd) -> None:
        assert self.info is not None
        self._round.seconds = msg.seconds
        self._round.dirty_pages = msg.dirty_pages
        self.info.rounds.append(self._round)
        self.info.remaining = msg.dirty_pages * PAGE_SIZE
        self.info.dirty_pages_rate = msg.dirty_rate
        if msg.seconds > 0:
            self.info.bandwidth = msg.bytes_sent / msg.seconds
        self._round = RoundStat()

    def _on_state(self, msg: DeviceState) -> None:
        """The source is paused and every page is here: finish our digest (each batch's chunks
        were hashed as it arrived: little is left) while the source computes its own."""
        assert self.info is not None and self._digest is not None
        self.info.status = Status.DEVICE
        if self.info.rounds:
            self.info.rounds[-1].final = True
        self._state = dict(msg.state)
        self._start_paused = self._state.pop(RUN_STATE_KEY, "running") == "paused"
        t = time.monotonic()
        self._ram_digest = self._digest.hexdigest()
        self.info.breakdown["digest"] = time.monotonic() - t

    def _on_digest(self, msg: Digest) -> None:
        if msg.algorithm != pages.DIGEST_ALGORITHM:
            self._abort(ErrorCode.INCOMPATIBLE, f"unknown digest algorithm {msg.algorithm!r}")
        if msg.value != self._ram_digest:
            self._abort(ErrorCode.DIGEST_MISMATCH,
                        f"guest RAM digest mismatch: source {msg.value}, destination {self._ram_digest}")
        if self._copy is not None:  # READY promises the disk too: durable before it goes
            self._copy.sync()
        self._send(Ready())

    def _abort(self, code: str, why: str) -> None:
        """Give up before COMMIT, telling the source why."""
        try:
            self._send(Abort(code, why))
        except (OSError, ProtocolError):
            pass
        raise Aborted(why)

    # -- commit ----------------------------------------------------------------------------------------
    def _on_commit(self, msg: Message) -> bool:
        """Start the VM from the received state; True when it runs here."""
        assert isinstance(msg, Commit) and self.info is not None and self._state is not None
        if not self.outcomes.begin_commit(self._mid):
            raise Aborted("fenced by an in-doubt answer before COMMIT arrived")
        self._release_ram()
        t = time.monotonic()
        try:
            self.ownership.claim(self.info.vm, self._terms)  # cluster mode: etcd names this host first
        except OwnershipLost as exc:
            self.committing = False  # nothing started: the reserved copy goes, as before COMMIT
            self.outcomes.settle(self._mid, False)
            self._tell_not_resumed()
            raise Aborted(f"not the VM's owner: {exc}") from exc
        try:
            if self._copy is not None:
                self._copy.install()  # under its name, which the restore locks
            self._start_vm()
        except Exception as exc:
            # The claim was dropped (or never made); the source may resume: we never will.
            self.outcomes.settle(self._mid, False)
            self.info.finish(Status.FAILED, f"starting the VM failed: {describe(exc)}")
            self._tell_not_resumed()
            raise Aborted(f"starting the VM failed: {describe(exc)}") from exc
        self.outcomes.settle(self._mid, True)
        self.info.breakdown["start"] = time.monotonic() - t
        try:
            self._send(Resumed())
        except (OSError, ProtocolError) as exc:
            # The VM runs here; the source learns it from an in-doubt query.
            self.log.warning("RESUMED not delivered; the source will ask", vm=self.info.vm, error=describe(exc))
        self._announce()
        return True

    def _announce(self) -> None:
        """Tell the network where the guest is now (a task on the loop; nothing waits for it)."""
        assert self.info is not None
        schedule = self.info.params.announce()
        if self._vm is None or self._inc is None or self._inc.nic is None or not schedule.rounds:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: no announce
            self.bridge.submit(self.vms.announce_incoming, self._vm, schedule)

    def _start_vm(self) -> None:
        """List and record the VM (on the loop), then restore and resume it on this thread's lane.

        Recorded first: a restored VM process outlives this agent, as every VM does, so a VM
        that runs here must already be one a restarted agent re-adopts and names in its in-doubt
        answer. Restoring beside the record (to hide the loop's hop) would leave a window in
        which an agent killed between the two leaves a VM running that no record names;
        restarted, the agent would answer "not resumed" and the source resume its copy too
        (tests/test_faults_kills.py). Killed after the record and before the
        restore, the VM process (not yet restored) exits with the agent and the record names a
        process that is gone: "not resumed" is then the truth.
        """
        assert self._state is not None and self._lane is not None and self._inc is not None
        vm, recorded = self.bridge.run(self.vms.claim_incoming, self._inc, self._state, self._start_paused,
                                       self._listen_at, self._mid)
        recorded.result(LOOP_CALL_TIMEOUT_S)
        try:
            reply = self._lane.request("restore", state=self._state, paused=self._start_paused,
                                       listen=self._listen_at, timeout=RESTORE_TIMEOUT_S,
                                       **self._inc.restore_fields())
        except BaseException:
            with contextlib.suppress(Exception):
                self.bridge.call(self.vms.drop_claimed(vm))
            raise
        self.bridge.submit(self.vms.incoming_restored, vm, reply)
        self._vm = vm
        if self.info is not None and "code-blocks-warm" in reply:
            self.info.code_blocks_warm = int(reply["code-blocks-warm"])
            self.info.code_blocks_cold = int(reply.get("code-blocks-cold", 0))

    def _tell_not_resumed(self) -> None:
        try:
            self._send(InDoubtAnswer(self._mid, False))
        except (OSError, ProtocolError):
            pass

    def _finish(self, resumed: bool) -> None:
        assert self.info is not None
        self.info.remaining = 0
        self.info.finish(Status.COMPLETED)
        self.log.info("incoming migration completed", vm=self.info.vm, peer=self._peer,
                      rounds=len(self.info.rounds), code_blocks_warm=self.info.code_blocks_warm,
                      code_blocks_cold=self.info.code_blocks_cold)

    def _discard(self, exc: BaseException) -> None:
        """Before COMMIT (or when the start failed): drop the reserved copy, and the disk's."""
        self._release_ram()
        if self._copy is not None and self._vm is None:
            self._copy.discard()
        if self._inc is not None and not self.committing:
            self.outcomes.settle(self._mid, False)
            try:
                self.bridge.run(self.vms.discard_incoming, self._inc)
            except Exception as e:
                self.log.error("discarding incoming RAM failed", vm=self._inc.name, error=describe(e))
        if self.info is not None and self.info.finished is None:
            if self.fenced:  # cancelled here (operator, shutdown, or an in-doubt answer)
                self.info.finish(Status.CANCELLED, None, ErrorCode.CANCELLED)
            else:
                self.info.finish(Status.FAILED, describe(exc), error_code(exc))
        self.log.warning("incoming migration discarded", vm=self._inc.name if self._inc else "?",
                         error=describe(exc))

    # -- plumbing ------------------------------------------------------------------------------------
    def _send(self, msg: Message) -> None:
        self.conn.send(msg)

    def _recv(self, ram: memoryview | None = None, sink: pages.DigestingSink | None = None) -> Message:
        msg = self.conn.recv(ram, sink, None if self._copy is None else self._copy.writer)
        if isinstance(msg, Abort):
            raise Aborted(f"the source aborted: {msg.reason}")
        return msg

    def _release_ram(self) -> None:
        if self._streams is not None:  # their threads write into the mapping: gone first
            self._streams.close()
        self._digest = self._sink = None  # they hold slices of the mapping
        if self._ram is not None:
            self._ram.release()
            self._ram = None
