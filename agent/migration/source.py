"""The source side of one outgoing migration, run in its own thread.

This module owns the sequence of a migration on the sending host
(docs/protocol.md, "The exchange") and the ownership rules that bind it
(docs/RELIABILITY.md):

* setup: connect, authenticate, propose (MigrateStart), accept or refusal;
* pre-copy: arm dirty tracking, round 0 sends the written extents of the
  memfd, later rounds send what the guest dirtied meanwhile; after each round
  the pure policy (``policy.decide``) says continue, throttle, switch over,
  abort or force;
* stop-and-copy: pause, last harvest, final pages, CPU and device state,
  digest of guest RAM, then wait for READY;
* commit: COMMIT, then RESUMED and the local copy is destroyed. With
  ``commit_ahead`` COMMIT goes right behind the digest instead of after READY
  (one round trip less downtime; docs/protocol.md, "commit ahead"), and READY
  (or an Abort: the digest did not check out) comes back before RESUMED.

Before COMMIT every failure (and a cancel) ends with the VM running here
again: tracking stopped, throttle lifted, vCPU resumed. After COMMIT and
before RESUMED the session is in doubt: the VM stays paused while it asks
the destination (on new connections, for a bounded time) whether it resumed;
it resumes locally only when the destination answers that it did not and
never will.

What is not the sequence lives beside it: the RAM digest and its thread
(source_digest), the round figures and the policy's inputs (rounds), the
in-doubt queries (in_doubt), the disk's copy (storage_copy), and what becomes
of the VM here once the exchange has settled its owner (source_end).
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from typing import Any

from agent.code_cache import CodeCache
from agent.migration import (
    code_hint,
    compression,
    disk_move,
    nic_move,
    pages,
    postcopy_source,
    source_end,
    spec_move,
    storage_copy,
    streams,
    tls,
)
from agent.migration.common import (
    LOOP_CALL_TIMEOUT_S,
    RUN_STATE_KEY,
    Cancelled,
    LoopBridge,
    MigrationError,
    Signal,
    client_handshake,
    describe,
    timed_client_handshake,
)
from agent.migration.in_doubt import IN_DOUBT_TIMEOUT_S, InDoubtAsker, owner_ref, settle
from agent.migration.info import PAGE_SIZE, MigrationInfo, MigrationParams, RoundStat, Status
from agent.migration.ownership import TWO_AGENTS, Ownership
from agent.migration.policy import Action, Decision, Limits, decide
from agent.migration.rounds import RoundBook
from agent.migration.seams import Lane, LogLike, MigratingVM, SourceHost
from agent.migration.source_digest import SourceDigest
from agent.migration.transport import STALL_TIMEOUT_S, Connection
from proto.errors import ErrorCode, ProtocolError
from proto.messages import (
    Abort,
    Commit,
    DeviceState,
    Digest,
    Message,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    Ready,
    Sync,
    SyncAck,
)
from proto.state import SourceMachine
from vmruntime import control as vmctl
from vmruntime import isa
from vmruntime.dirty import DirtyTracker, Ranges, merge_ranges, written_extents

Range = tuple[int, int]

# A VM process answers a pause at its next instruction boundary (one huge FILL/COPY/HASH
# instruction can take a second): past this the migration fails, the VM resumes.
PAUSE_TIMEOUT_S = 10.0
# The downtime of an idle guest that is neither copy nor hashing: pause, final harvest, state,
# READY, COMMIT to RESUMED (docs/BENCHMARKS.md, bench_downtime), plus the round trips the
# switch-over waits for on the path (SWITCH_ROUND_TRIPS; see _fixed_s).
FIXED_DOWNTIME_S = 0.010
SWITCH_ROUND_TRIPS = {False: 2, True: 1}  # commit_ahead -> Digest..READY, COMMIT..RESUMED (or both at once)
# Beyond the stall timeout, for the wait for MigrateAccept only: the destination's VM process start.
ACCEPT_ALLOWANCE_S = 10.0


class SourceSession:
    """One outgoing migration of one VM."""

    def __init__(self, *, vm: MigratingVM, vms: SourceHost, dest: tuple[str, int], params: MigrationParams,
                 key: bytes, agent_name: str, bridge: LoopBridge, info: MigrationInfo, log: LogLike,
                 in_doubt_timeout: float = IN_DOUBT_TIMEOUT_S, tls: ssl.SSLContext | None = None,
                 code_cache: CodeCache | None = None, stall_timeout: float = STALL_TIMEOUT_S,
                 ownership: Ownership = TWO_AGENTS) -> None:
        self.vm = vm
        self.vms = vms
        self.dest = dest
        self.params = params
        self.key = key
        self.agent_name = agent_name
        self.bridge = bridge
        self.info = info
        self.log = log
        self.in_doubt_timeout = in_doubt_timeout
        self.stall_s = params.stall_timeout_s or stall_timeout  # each wait's progress deadline (transport.py)
        self.tls = tls  # the client context of mutual TLS, or None for plaintext
        self.code_cache = code_cache  # this host's translated guest blocks (agent/code_cache.py)
        self.ownership = ownership  # who settles the VM's owner at COMMIT (agent/migration/ownership.py)
        self._terms: dict[str, Any] = {}  # this host's ownership as proposed (cluster mode's owner entry)
        self.migration_id = secrets.token_hex(8)
        self.machine = SourceMachine()
        self.conn: Connection | None = None
        self.setup_done = Signal()  # set when setup succeeded or the session ended
        self.in_doubt = False  # ended in doubt: the VM is paused here until an operator resolves it
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # orders cancel() against sending COMMIT
        self._committing = False
        self._failure: Exception | None = None  # why interrupt() stopped the session (progress.py)
        self._tracker: DirtyTracker | None = None
        self._ram: memoryview | None = None
        self._digest: SourceDigest | None = None
        self._book = RoundBook(info)
        self._asker = InDoubtAsker(connect=self._connect, handshake=self._handshake, vm_name=vm.name,
                                   migration_id=self.migration_id, log=log)
        self._was_running = True
        self._paused = False
        self._throttle = 0
        self._pause_t = 0.0
        self._rtt = 0.0  # the path's round trip as the handshake measured it (_setup)
        self._lane: Lane | None = None  # this thread's own socket to the VM process
        self._tap_dropped: int | None = None  # the TAP's tx_dropped at the pause (a VM with a NIC)
        self._copy: storage_copy.SourceCopy | None = None  # the disk's copy (--copy-storage)
        self._postcopy: postcopy_source.PostcopySource | None = None  # a post-copy switch-over
        self._plan: streams.Plan | None = None  # the data streams proposed (agent/migration/streams.py)
        self._streams: streams.SendStreams | None = None  # the extra ones, once attached

    # -- control from other threads ----------------------------------------------------------------
    def cancel(self, failure: Exception | None = None) -> bool:
        """Ask the session to stop; False once COMMIT is (being) sent and cancel can no longer apply."""
        with self._lock:
            if self._committing:
                return False
            self._failure = failure
            if failure is None:
                self._cancel.set()
        conn = self.conn  # read once: the session thread may drop it meanwhile
        if conn is not None:
            conn.shutdown()  # wakes a blocked send/recv at once
        if (extra := self._streams) is not None:
            extra.shutdown()
        return True

    def interrupt(self, failure: Exception) -> bool:
        """Fail the session with ``failure`` (the progress timeout), as cancel() would stop it."""
        return self.cancel(failure)

    def cancel_requested(self) -> bool:
        return self._cancel.is_set() or self._failure is not None

    # -- waiting for a turn (agent/migration/slots.py), before run() --------------------------------
    def queued(self, ahead: int) -> None:
        """Past the agent's limit of migrations at once: waiting, ``ahead`` others first. The
        migrate call returns meanwhile (status setup, ``queued``); the VM runs on untouched."""
        self.info.queued = ahead
        self.setup_done.set()

    def cancelled_in_queue(self) -> None:
        self.info.queued = None
        self.info.finish(Status.CANCELLED, None, ErrorCode.CANCELLED)
        self.log.warning("migration cancelled", vm=self.vm.name, error="cancelled while queued")
        self.setup_done.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the operator")

    # -- the thread body -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        finally:
            if self._streams is not None:  # their threads end, whichever way the session did
                self._streams.close()
            if self._postcopy is not None:
                self._postcopy.close()
            if self._copy is not None:
                self._copy.close()
            if self._lane is not None:
                self._lane.close()
                self._lane = None
            self.setup_done.set()

    def _run(self) -> None:
        self.info.queued = None
        try:
            self._setup()
            self.setup_done.set()
            pending = self._precopy()
            if self._postcopy is not None:  # READY comes without a digest (postcopy_source)
                digest_sent = self._postcopy.switch_over(pending[0])
            else:
                digest_sent = self._stop_and_copy(pending)
                if not self.params.commit_ahead:
                    self._await_ready(digest_sent)
        except BaseException as exc:  # every failure before COMMIT rolls back to a running VM
            source_end.roll_back(self, exc)
            return
        self._commit(digest_sent)

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        vm = self.vm
        self._was_running = vm.state not in ("paused",)
        self.bridge.call(vm.begin_migration())
        with tls.refusals(self.dest):
            self.conn = self._connect(guest_size=vm.mem)
            self._check_cancel()
            # A round trip of the path as the protocol sees it (a relay in between included, which
            # TCP's own estimate of the first hop would miss). On a long path the switch-over's round
            # trips are most of the downtime: the policy must expect them (docs/PERFORMANCE.md section 10).
            self.info.peer, self._rtt = timed_client_handshake(self.conn, self.key, self.agent_name)
        postcopy_source.check_peer(self, self.conn.channel.version)
        self.conn.start(self.machine)
        self.conn.packer = compression.packer(self.params, self.conn.channel.version, self.info, self._cancel,
                                              self.conn.sock)
        self._plan = streams.plan(self.params, self.conn.channel.version)
        self._propose()
        with tls.refusals(self.dest):
            self._streams = streams.open_streams(self, self._plan)
        self.info.streams = self._plan.count
        self.info.setup_s = time.monotonic() - self.info.started
        self.info.status = Status.ACTIVE
        self.log.info("migration accepted", vm=vm.name, peer=self.info.peer, migration_id=self.migration_id)

    def _propose(self) -> None:
        vm = self.vm
        start = MigrateStart(
            migration_id=self.migration_id, vm_name=vm.name, mem_size=vm.mem, page_size=PAGE_SIZE,
            isa_version=isa.ISA_VERSION, isa_features=tuple(sorted(isa.ISA_FEATURES)),
            dirty_tracker=vm.dirty_backend, params=self._proposed_params(),
        )
        self._send(start)
        assert self.conn is not None
        # The destination answers once its VM process is up (destination.py, _await_vm_process): a
        # process start, which on an overloaded host takes seconds by itself. This one wait gets that
        # allowance beyond the stall timeout, so a busy destination is not taken for a frozen one.
        self.conn.set_stall_timeout(self.stall_s + ACCEPT_ALLOWANCE_S)
        try:
            reply = self._recv()
        finally:
            self.conn.set_stall_timeout(self.stall_s)
        if isinstance(reply, MigrateRefuse):
            raise MigrationError(reply.code, f"destination {self.info.peer} refused: {reply.reason}")
        if not isinstance(reply, MigrateAccept):
            raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"unexpected {type(reply).__name__}")

    def _proposed_params(self) -> dict[str, Any]:
        """The params, and the VM's spec, NIC and disk, each under its own key (*_move.PARAMS_KEY)."""
        assert self.conn is not None
        version = self.conn.channel.version
        self._terms = self.ownership.proposal(self.vm.name, self.info.peer)
        params = {**self.params.for_peer(version), **spec_move.proposal(self.vm, version), **self._terms}
        params = {**{k: v for k, v in params.items() if k != "streams"}, **(self._plan.params() if self._plan else {})}
        if self.vm.nic is not None:
            params[nic_move.PARAMS_KEY] = nic_move.proposal(self.vm.nic)
        if self.vm.disk is not None or self.params.copy_storage:
            params[disk_move.PARAMS_KEY] = disk_move.proposal(self.vm.disk, self.params, version)
        return params

    # -- pre-copy ------------------------------------------------------------------------------------
    def _precopy(self) -> tuple[Ranges, list[Range]]:
        """Rounds until the policy switches over; returns the dirty sets (RAM, disk) still to send."""
        vm = self.vm
        self._tracker = self.bridge.call(vm.track_start(hot_blocks=self.params.hot_blocks))
        self._lane = self.bridge.call(vm.open_lane())
        self.info.dirty_tracker = self._tracker.name
        self._ram = memoryview(vm.ram)
        self._digest = SourceDigest(vm.memfd, self._ram, vm.mem)
        self._tracker.start()  # armed before round 0 reads anything: no write escapes
        pending = Ranges.from_pairs(written_extents(vm.memfd, vm.mem))
        self._digest.start(pending)  # its thread started now, ahead of the downtime
        assert self.conn is not None
        hint = code_hint.ask(self._lane, self._ram, self.code_cache)
        if hint is not None and self.params.code_hint and self.conn.channel.version >= hint.SINCE:
            self._send(hint)  # first: the destination translates while the pages arrive
        disk_pending: list[Range] = []
        if self.params.copy_storage and vm.disk is not None:
            self._copy = storage_copy.SourceCopy(vm.disk, self._lane, self.info)
            disk_pending = self._copy.start()
        limits = Limits(self.params.max_downtime_ms / 1000, self.params.max_rounds, self.params.timeout_s,
                        self.params.auto_converge, self.params.force, self.params.postcopy_after == "auto")
        remainders: list[int] = []  # the dirty bytes after each round, for the policy
        while True:
            pending, disk_pending, dirty_bytes, decision = self._one_round(pending, disk_pending, tuple(remainders),
                                                                           limits)
            remainders.append(dirty_bytes)
            if self._act(decision):
                return pending, disk_pending

    def _one_round(self, ranges: Ranges, disk: list[Range], earlier: tuple[int, ...],
                   limits: Limits) -> tuple[Ranges, list[Range], int, Decision]:
        """Send ``ranges`` of RAM and ``disk`` of the image as one round, harvest, ask the policy."""
        t0 = time.monotonic()
        assert self._digest is not None and self._tracker is not None
        self._digest.hash_stable()
        stat = self._send_ranges(ranges, disk)
        self._sync(stat)
        # The harvest is the last step before the decision: the dirty set the policy judges is the
        # one a switch-over sends, not that plus what the guest wrote while we hashed.
        dirty = self._harvest()
        disk_dirty = self._copy.harvest() if self._copy is not None else []
        dirty_chunks = pages.chunks_of(dirty)  # computed once: the digest and the policy both use it
        self._digest.after_round(ranges, dirty, dirty_chunks)
        elapsed = max(time.monotonic() - t0, 1e-6)
        ram_bytes = pages.total_bytes(dirty)
        dirty_bytes = ram_bytes + pages.total_bytes(disk_dirty)  # the policy judges both, the RAM's figures one
        self._send(self._book.end(stat, ram_bytes, elapsed))
        fig = self._book.figures(dirty_bytes=dirty_bytes, earlier=earlier, elapsed=elapsed, throttle=self._throttle,
                                 hash_s=self._digest.hash_time(dirty_chunks), fixed_s=self._fixed_s,
                                 whole_bytes=self._tracker.whole_bytes)
        decision = decide(fig, limits, time.monotonic())
        self.info.expected_downtime_s = decision.expected_downtime_s
        return dirty, disk_dirty, dirty_bytes, decision

    def _act(self, d: Decision) -> bool:
        """Carry out a policy decision; True when pre-copy is over (switch over now)."""
        if postcopy_source.wanted(self.params.postcopy_after, len(self.info.rounds), d):
            self._postcopy = postcopy_source.PostcopySource(self)
            self.info.summary = f"post-copy after round {len(self.info.rounds)}: {d.reason}"
            return True
        if d.action is Action.CONTINUE:
            return False
        if d.action is Action.THROTTLE_UP:
            self.bridge.call(self.vm.throttle(d.throttle))
            self._throttle = self.info.throttle = d.throttle
            assert self._tracker is not None
            hot_off = d.hot_blocks_off and self._tracker.hot_blocks
            if hot_off:  # the next harvest protects them again (reporting them whole once more)
                self._tracker.hot_blocks = False
            self.log.info("auto-converge", vm=self.vm.name, throttle=d.throttle, hot_blocks_off=hot_off)
            return False
        if d.action is Action.ABORT:
            raise MigrationError(ErrorCode.MIGRATION_FAILED, d.reason)
        self.info.summary = d.reason if d.action is Action.SWITCH_OVER else f"forced switch-over: {d.reason}"
        return True

    @property
    def _shares_disk(self) -> bool:
        """The VM's image is on shared storage: its lock changes hands at the switch-over."""
        return self.vm.disk is not None and not self.params.copy_storage

    @property
    def _fixed_s(self) -> float:
        """The policy's fixed downtime: FIXED_DOWNTIME_S and the round trips the switch-over waits for."""
        return FIXED_DOWNTIME_S + SWITCH_ROUND_TRIPS[self.params.commit_ahead] * self._rtt

    def _harvest(self) -> Ranges:
        assert self._tracker is not None
        ranges = self._tracker.harvest()
        self.info.dirty_sync_count += 1
        # Sorted and merged by contract, but a kernel walk may report regions out of order and a
        # batch must be sorted: normalised here, cheap for sorted input (docs/PERFORMANCE.md section 4).
        return ranges.merged()

    def _send_ranges(self, ranges: Ranges, disk: list[Range], final: bool = False) -> RoundStat:
        """Send one round's ranges in page batches (zero grains go without payload), then the
        disk's (--copy-storage)."""
        assert self._ram is not None and self._digest is not None
        t0 = time.monotonic()
        stat = self._book.begin(ranges, t0)
        self._packer().new_round()
        for batch in pages.plan_batches(self._ram, ranges):
            self._before_batch(final)
            self._send_batch(batch, stat, None if final else self._digest.hash_hot)  # (final: the digest thread's)
        if self._streams is not None:  # the round's barrier: every stream's share is out
            self._streams.end_round(len(self.info.rounds))
        if self._copy is not None and disk:
            assert self.conn is not None
            self._copy.send(self.conn, disk, stat, self.info, lambda: self._before_batch(final))
        self._book.sent(stat, time.monotonic() - t0)
        return stat

    def _packer(self) -> compression.Packer:
        assert self.conn is not None and self.conn.packer is not None
        return self.conn.packer

    def _before_batch(self, final: bool) -> None:
        self._check_cancel()
        if not final:
            self._check_deadline()
        assert self.conn is not None
        if self.conn.next_frame_is(Abort):  # the destination gave up mid-round (its RAM or disk full)
            self._recv()

    def _sync(self, stat: RoundStat) -> None:
        """Wait until the destination applied every page of the round (Sync, SyncAck): else what
        sits in the buffers and the path drains after the pause, in the downtime, unseen by the
        policy. It costs a round trip per round, and makes the round's time (so the bandwidth the
        policy predicts with) what the destination took."""
        t = time.monotonic()
        n = len(self.info.rounds)
        self._send(Sync(n))
        with self._packer().draining(self.conn):  # compressed batches may still be inflating there
            reply = self._recv()
        if not isinstance(reply, SyncAck) or reply.round != n:
            raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected SyncAck({n}), got {reply!r}")
        self._book.synced(stat, time.monotonic() - t, self._rtt, reply.held_s)

    def _check_deadline(self) -> None:
        """The time limit also holds inside a long round (a big guest on a capped link). With
        ``force`` the round finishes and the policy then forces the switch-over; else the migration
        ends here, the VM running."""
        limit = self.params.timeout_s
        if limit is not None and not self.params.force and time.monotonic() - self.info.started >= limit:
            raise MigrationError(ErrorCode.TIMEOUT, f"did not converge: time limit reached ({limit:g} s) "
                                 f"in round {len(self.info.rounds)}")

    def _send_batch(self, batch: pages.Batch, stat: RoundStat, after: streams.AfterSend | None) -> None:
        assert self._ram is not None and self.conn is not None
        if self._streams is not None and self._streams.offer(self._ram, batch, stat, after):
            return  # an idle stream's thread sends it, and calls ``after``
        wire = self.conn.send_pages(self._ram, batch.ranges.tolist(), batch.zeros.tolist())
        if after is not None:
            after(batch)
        (self._streams or self._book).count_batch(stat, batch, wire)  # (the streams' count under their lock)

    # -- stop-and-copy -------------------------------------------------------------------------------
    def _stop_and_copy(self, pending: tuple[Ranges, list[Range]]) -> float:
        """Pause, send the rest, the state and the digest; returns when the digest went out."""
        info = self.info
        info.status = Status.DEVICE
        self._check_cancel()
        self._pause_t = t = time.monotonic()
        self._paused = True  # set first: a pause that fails half-way is undone by a resume all the same
        state = self._pause()
        t = self._book.lap("pause", t)
        assert self._tracker is not None
        # No round follows to send blocks whole in: spare the downtime hot blocks' search for dense
        # blocks (a scan of all guest RAM). Blocks still hot are reported whole by this harvest.
        self._tracker.hot_blocks = False
        last = self._harvest()
        disk = merge_ranges(pending[1] + self._copy.harvest(final=True)) if self._copy is not None else []
        assert self._digest is not None
        digest = self._digest.finish_meanwhile(last)  # in its thread, while the final pages go out
        final = Ranges.concat([pending[0], last]).merged()
        stat = self._send_ranges(final, disk, final=True)
        self._send(self._book.end(stat, 0, max(time.monotonic() - t, 1e-6), final=True))
        t = self._book.lap("final-copy", t)
        self._send(DeviceState({**state, RUN_STATE_KEY: "running" if self._was_running else "paused"}))
        t = self._book.lap("state", t)
        self._send(Digest(pages.DIGEST_ALGORITHM, digest.result()))
        return self._book.lap("digest", t)  # only what the final copy did not hide

    def _await_ready(self, digest_sent: float) -> None:
        """The destination's READY: guest RAM checked out there (COMMIT may follow)."""
        with self._packer().draining(self.conn):
            reply = self._recv()
        if not isinstance(reply, Ready):
            raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected Ready, got {type(reply).__name__}")
        self._book.lap("verify", digest_sent)

    def _pause(self) -> dict[str, Any]:
        """Stop the vCPU through this thread's lane (no event-loop round trip inside the downtime);
        the VM manager's bookkeeping follows on the loop, not waited for. A shared disk's image is
        released with the pause: the destination locks it to resume the VM."""
        assert self._lane is not None
        try:
            release = {"release-disk": True} if self._shares_disk else {}
            reply = self._lane.request("pause", timeout=PAUSE_TIMEOUT_S, **release)
        except (vmctl.VMError, vmctl.VMGone) as exc:
            raise MigrationError(ErrorCode.INTERNAL, f"pausing the VM failed: {exc}") from exc
        state: dict[str, Any] = reply.get("state", {})
        self.bridge.submit(self.vm.paused_by_lane, state)
        if self.vm.nic is not None:  # paused, its TAP is not read: frames pile up or drop from here
            self._tap_dropped = nic_move.tap_dropped(self.vm.nic.tap)
        return state

    # -- commit and the in-doubt window ------------------------------------------------------------
    def _commit(self, digest_sent: float) -> None:
        """Send COMMIT (after READY, or right behind the digest with commit_ahead) and settle who
        owns the VM. With commit ahead the destination's READY arrives here, and an Abort in its
        place (digest refused) means it never read COMMIT: the VM resumes here."""
        with self._lock:
            cancelled = self._cancel.is_set()
            self._committing = not cancelled
        if cancelled:
            source_end.roll_back(self, Cancelled("cancelled by the operator"))
            return
        t = time.monotonic()
        resumed: bool | None
        # Recorded before COMMIT leaves: an agent restarted after this point cannot know whether the
        # destination got it, so it keeps the VM paused (in doubt); before it, it may resume the VM.
        ref = {"id": self.migration_id, "to": f"{self.dest[0]}:{self.dest[1]}", **owner_ref(self._terms)}
        if self._postcopy is not None:  # a restarted agent takes the phase up again (postcopy_adopt)
            ref.update(postcopy="1", peer=self.info.peer)
        self.bridge.run(self.vm.mark_commit_sent, ref).result(LOOP_CALL_TIMEOUT_S)
        try:
            self._send(Commit(self.migration_id))
            assert self.conn is not None
            reply = self.conn.recv()
            if isinstance(reply, Ready):  # only ever with commit ahead (the state machine checks)
                t = self._book.lap("verify", digest_sent)
                reply = self.conn.recv()
            resumed = settle(reply, self.info)
        except (OSError, ProtocolError) as exc:
            self.log.warning("migration in doubt", vm=self.vm.name, error=describe(exc))
            resumed = self._resolve_in_doubt()
            if resumed and self._postcopy is not None:  # it runs there: recover the post-copy's link
                postcopy_source.finish(self)
                return
        resumed = self.ownership.settle(self.vm.name, self._terms, resumed)  # cluster mode: etcd's word
        if resumed is None:
            source_end.stay_in_doubt(self)
            return
        self._book.lap("commit", t)
        if resumed and self._postcopy is not None:  # the VM runs there on partial RAM: send the rest
            postcopy_source.finish(self)
            return
        self._close()
        if resumed:
            source_end.complete(self)
        else:
            source_end.resume_after_commit(self)

    def _resolve_in_doubt(self) -> bool | None:
        """Ask the destination on new connections whether it resumed; None if it never answers."""
        self._close()
        return self._asker.resolve(self.in_doubt_timeout)

    @property
    def owner_terms(self) -> dict[str, Any]:
        """This host's ownership terms as proposed (cluster mode's MigrateStart entry; {} otherwise)."""
        return self._terms

    def ask_once(self, deadline_s: float | None = None) -> bool | None:
        """One more in-doubt query (for the operator's migrate-resolve): the destination's answer,
        or None when it cannot be reached (within ``deadline_s``). A "no" fences the migration
        there for good."""
        return self._asker.ask_once(deadline_s)

    # -- plumbing ------------------------------------------------------------------------------------
    def _connect(self, guest_size: int | None = None) -> Connection:
        return tls.dial(self.dest, self.tls, guest_size, self.stall_s)

    def _handshake(self, conn: Connection) -> str:
        return client_handshake(conn, self.key, self.agent_name)

    def _send(self, msg: Message) -> None:
        assert self.conn is not None
        self.conn.send(msg)

    def _recv(self) -> Message:
        assert self.conn is not None
        msg = self.conn.recv()
        if isinstance(msg, Abort):
            raise MigrationError(msg.code, f"the destination aborted: {msg.reason}")
        return msg

    def _release_ram(self) -> None:
        if self._digest is not None:
            self._digest.release()  # its thread reads guest RAM through our view: it finishes first
        if self._ram is not None:
            self._ram.release()
        self._digest = self._ram = None

    def _close(self) -> None:
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None
