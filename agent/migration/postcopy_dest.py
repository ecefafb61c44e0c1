"""Post-copy's destination half: the switch-over that starts the VM on partial guest RAM, and
the phase that fills it in (docs/protocol.md, "Post-copy").

A DestinationSession (destination.py) receives pre-copy rounds as always; a PostcopyStart
from the source hands the rest of the migration to :class:`PostcopyIncoming`:

* the discards (PostcopyDiscard): pages whose copies here are stale (dirtied on the source since they were
  sent). Where userfaultfd's MINOR mode works (``postcopy.minor_available``) they are only noted:
  their copies stay in the page cache, and the FaultServer serves them by MINOR faults (writing the
  fresh copy, then UFFDIO_CONTINUE); elsewhere they are punched out of the memfd at once, so they
  are holes again (10 us a page and more, much of it in the pause: docs/PERFORMANCE.md, section 20);
* DeviceState, READY (no digest: RAM is not whole yet), COMMIT;
* on COMMIT: the incoming VM process registers guest RAM for userfaultfd MISSING (MISSING|MINOR) faults and
  hands the uffd over its lane (``postcopy-register``); the :class:`FaultServer` serves faults
  in its own thread, starting before the restore (the restore may touch a hole). Requests go
  out, and their answers come back, on the *urgent connection*, a second connection the source
  opened with PostcopyAttach: it never queues behind the background push, which keeps the main
  connection busy (QEMU's postcopy-preempt idea);
* the session's usual commit (claim, restore, RESUMED): the VM runs here; in MINOR mode the
  pages that were up to date are mapped into it in bulk (FaultServer.map_present);
* the post-copy phase: the background push arrives on the main connection and is installed
  with UFFDIO_COPY (never written through the mapping: a page the guest wrote meanwhile
  would be overwritten); once every page is present, guest RAM is unregistered, the VM
  process drops its uffd (``postcopy-end``) and PostcopyDone tells the source to let go.

Pages received on either connection go into a staging mapping (anonymous, the guest's size,
pages freed once installed) at their guest offsets, then are installed from there.

The urgent connection arrives as its own DestinationSession (the listener cannot tell it
apart before the handshake); :func:`attach` parks it in ``_links`` for the migration it names
and keeps that session's thread until the post-copy is over.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from agent.migration import page_maps, postcopy_record, postcopy_recover
from agent.migration.common import RUN_STATE_KEY, describe
from agent.migration.info import PAGE_SIZE, Status
from agent.migration.postcopy_faults import REQUESTED, FaultServer
from agent.migration.transport import Connection
from proto.errors import ErrorCode, RemoteProtocolError
from proto.messages import Commit, DeviceState, Message, PageBatch, Ready, Sync, SyncAck
from proto.postcopy_messages import (
    MAX_REQUEST_PAGES,
    PageRequest,
    PostcopyAttach,
    PostcopyDiscard,
    PostcopyDone,
    PostcopyStart,
)
from vmruntime import postcopy
from vmruntime.dirty import written_extents

if TYPE_CHECKING:
    from agent.migration.destination import DestinationSession

Range = tuple[int, int]

# Neighbouring pages asked for with each faulting page: a guest that touched one page soon
# touches the next.
READAHEAD_PAGES = 7
# How long COMMIT waits for the source's urgent connection before the VM may start here.
URGENT_WAIT_S = 10.0
POLL_S = 0.05
STATS_EVERY_S = 0.25  # how often the phase refreshes the figures migrate-status shows
# After PostcopyDone: how long to read and drop what the source still pushed until it closes.
DONE_LINGER_S = 5.0


class _FdLane(Protocol):
    def request_fds(self, op: str, *, timeout: float | None = None,
                    **fields: Any) -> tuple[dict[str, Any], list[int]]: ...  # fmt: skip


class _Link:
    """An urgent connection parked for its migration until the session takes it."""

    def __init__(self, conn: Connection, peer: str) -> None:
        self.conn = conn
        self.peer = peer
        self.taken = threading.Event()
        self.ended = threading.Event()


_links: dict[str, _Link] = {}
_links_lock = threading.Condition()


def attach(s: DestinationSession, msg: PostcopyAttach) -> None:
    """An urgent connection's session: park it for its migration (a live one of the same peer),
    and keep this thread (whose end closes it) until that migration's post-copy is over."""
    owner = next((o for o in s.outcomes.live() if o._mid == msg.migration_id), None)
    if owner is None and postcopy_recover.attach_urgent(s, msg):  # a recovery's urgent connection
        return
    if owner is None or owner._peer != s._peer:
        raise RemoteProtocolError(f"PostcopyAttach for migration {msg.migration_id}, which is not under way "
                                  f"here with {s._peer}")
    link = _Link(s.conn, s._peer)
    with _links_lock:
        if msg.migration_id in _links:
            raise RemoteProtocolError(f"migration {msg.migration_id} has its urgent connection already")
        _links[msg.migration_id] = link
        _links_lock.notify_all()
    try:
        while not link.ended.wait(0.5):
            if owner.settled.is_set() and not link.taken.is_set():
                return  # the migration ended before it went post-copy
    finally:
        with _links_lock:
            if _links.get(msg.migration_id) is link:
                del _links[msg.migration_id]


def _take_link(mid: str, timeout: float) -> _Link:
    with _links_lock:
        if not _links_lock.wait_for(lambda: mid in _links, timeout):
            raise TimeoutError(f"the source's urgent connection did not arrive within {timeout:g} s")
        link = _links[mid]
    link.taken.set()
    return link


class _Requester:
    """The FaultServer's PageSource: a request goes out on the urgent connection. Without one
    (the link is lost: postcopy_recover) the pages stay requested in the received map, and the
    recovery asks for every requested page again."""

    def __init__(self, conn: Connection | None) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def request(self, offset: int, npages: int) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.send(PageRequest(offset, npages))


class PostcopyIncoming:
    """The post-copy part of one incoming migration (see the module's docstring)."""

    def __init__(self, s: DestinationSession) -> None:
        assert s._inc is not None and s.info is not None
        self._setup(s, s.info.mem, postcopy.minor_available(), postcopy_record.dir_for(s.vms))

    def _setup(self, s: DestinationSession, size: int, minor: bool, record_dir: Path | None) -> None:
        """The phase's state before anything is received (a restarted agent's take-over sets it up
        too: postcopy_readopt.Readopted)."""
        self.s = s
        self.size = size
        self.stale: list[Range] = []  # as the discards named them
        self.stale_map = bytearray(self.size // PAGE_SIZE)  # 1: the copy here is stale
        self.present: list[Range] = []
        self.server: FaultServer | None = None
        self.link: _Link | None = None
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()  # set: the serving thread is to stop
        self._requester = _Requester(None)
        self.recoveries = 0
        self.phase: postcopy_recover.Phase | None = None  # from RESUMED on: what a recovery joins
        self._errors: list[BaseException] = []
        # One staging mapping per connection: both may carry the same page at once.
        self._staging = {name: mmap.mmap(-1, self.size) for name in ("main", "urgent")}
        self._closed = False
        self._t0 = time.monotonic()
        self.start: PostcopyStart | None = None
        self.minor = minor
        self._mapped = False  # the present pages mapped (MINOR mode), done once
        self._reg: postcopy.Registered | None = None
        self._record_dir = record_dir  # None: an agent without a state dir

    # -- before COMMIT (failures discard the copy, as in pre-copy) --

    def on_discard(self, msg: PostcopyDiscard) -> None:
        """Stale pages: noted (MINOR mode), or holes again at once (the VM does not run here yet)."""
        assert self.s._inc is not None
        if not self.minor:
            for start, end in msg.ranges:
                postcopy.punch(self.s._inc.memfd, start, end - start)
        page_maps.mark(self.stale_map, msg.ranges)
        self.stale.extend(msg.ranges)

    def commit(self) -> bool:
        """DeviceState, READY, COMMIT; the VM starts here on partial RAM, its faults served.
        True when it runs here (the session's commit said so)."""
        s = self.s
        start = self.start
        assert start is not None
        assert s.info is not None and s._lane is not None and s._inc is not None
        # Every pre-copy page is written at this point (PostcopyStart follows the last round), and the VM
        # still runs on the source: the scan of the memfd is not downtime.
        self.present = written_extents(s._inc.memfd, self.size)
        while not isinstance(state := s._recv(), DeviceState):
            if isinstance(state, PostcopyDiscard):
                self.on_discard(state)
            elif isinstance(state, Sync):  # the discards before the pause: all applied
                early = self.stale_map.count(1)
                if early != start.pages:
                    raise RemoteProtocolError(f"PostcopyStart says {start.pages} stale pages, the discards "
                                              f"named {early}")
                s._send(SyncAck(state.round))
        s.info.status = Status.DEVICE
        if s.info.rounds:
            s.info.rounds[-1].final = True
        s._state = dict(state.state)
        s._start_paused = s._state.pop(RUN_STATE_KEY, "running") == "paused"
        s._send(Ready())
        commit = s._recv()
        assert isinstance(commit, Commit)
        self.link = _take_link(s._mid, URGENT_WAIT_S)
        t = time.monotonic()
        self._serve(s._inc.memfd)
        s.info.breakdown["postcopy-register"] = time.monotonic() - t
        self._save_record()
        try:
            resumed = s._on_commit(commit)
        except BaseException:
            self._forget_record()
            raise
        s.info.status = Status.POSTCOPY_ACTIVE
        return resumed

    def _serve(self, memfd: int) -> None:
        """Register guest RAM MISSING (MISSING|MINOR) in the VM process, and serve its faults from here on."""
        assert self.s._lane is not None and self.link is not None
        lane = cast(_FdLane, self.s._lane)  # vmruntime.control.Lane: the real lane passes fds
        reply, fds = lane.request_fds("postcopy-register", minor=True) if self.minor else \
            lane.request_fds("postcopy-register")
        reg = self._reg = postcopy.Registered.from_reply(reply, fds)
        if reg.minor != self.minor:
            os.close(reg.uffd)
            raise postcopy.PostcopyError("the VM process did not register guest RAM in MINOR mode, and the "
                                         "stale pages were not punched")
        # present: what the pre-copy rounds wrote (the stale copies too, punched since or not)
        self.server = FaultServer(reg, memfd, self._requester, present=self.present,
                                  zero=_holes(self.size, self.present), stale_map=self.stale_map,
                                  readahead=READAHEAD_PAGES)
        self._start_serving(self.link.conn)

    def _save_record(self) -> None:
        """The post-copy record a restarted agent takes the phase up from (postcopy_record), on disk
        before COMMIT's claim: a VM that runs here on partial RAM is always one it names."""
        s, reg = self.s, self._reg
        if self._record_dir is None or reg is None or s.info is None:
            return
        t = time.monotonic()
        rec = postcopy_record.PostcopyRecord(vm=s.info.vm, migration_id=s._mid, peer=s._peer, mem=self.size,
                                             minor=reg.minor, addr=reg.addr, vm_fd=reg.vm_fd,
                                             stale=bytes(self.stale_map), features=reg.features)
        postcopy_record.write(self._record_dir, rec)
        s.info.breakdown["postcopy-record"] = time.monotonic() - t

    def _forget_record(self) -> None:
        """The VM left post-copy (postcopy-end) or was stopped: nothing to take up after a restart."""
        if self._record_dir is not None and self.s.info is not None:
            try:
                postcopy_record.remove(self._record_dir, self.s.info.vm)
            except OSError as e:
                self.s.log.warning("removing the post-copy record", vm=self.s.info.vm, error=describe(e))

    def _start_serving(self, urgent: Connection | None) -> None:
        """Serve faults in a thread; answers read from ``urgent`` in the same wait."""
        self._requester.conn = urgent
        self._serving = stop = threading.Event()
        readers = {} if urgent is None else {urgent.sock.fileno(): lambda: self._urgent(urgent)}
        self._thread = threading.Thread(target=self._serve_faults, args=(stop, readers),
                                        name="ferry-postcopy-faults", daemon=True)
        self._thread.start()

    def _stop_serving(self) -> None:
        self._serving.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _serve_faults(self, stop: threading.Event, readers: dict[int, Callable[[], None]]) -> None:
        assert self.server is not None
        try:
            self.server.serve(stop, POLL_S, readers=readers)
        except BaseException as e:  # the phase reports it
            self._errors.append(e)
            stop.set()

    def detach(self) -> None:
        """The link is lost: both connections go; faults are served on, missing pages marked
        requested (postcopy_recover)."""
        self._stop_serving()
        self.s.conn.shutdown()
        if self.link is not None:
            self.link.conn.shutdown()
            self.link.ended.set()
            self.link = None
        self._errors.clear()
        self._start_serving(None)

    def reattach(self, main: Connection, urgent: Connection) -> None:
        """A recovered link: the phase goes on on ``main`` and ``urgent``; every page requested
        and not yet here (its answer lost with the link) is asked for again."""
        assert self.server is not None
        self._stop_serving()
        old, self.s.conn = self.s.conn, main
        old.close()  # (shut at the loss; a recovery's own is closed by its thread too: closing twice is safe)
        self._errors.clear()
        self.recoveries += 1
        for a, b in self.server.ranges(REQUESTED):
            for at in range(a, b, MAX_REQUEST_PAGES * PAGE_SIZE):
                urgent.send(PageRequest(at, min(MAX_REQUEST_PAGES, (b - at) // PAGE_SIZE)))
        self._start_serving(urgent)

    def preempt(self) -> None:
        """A recovery came while this side still saw its link up: drop it (the source did)."""
        self.s.conn.shutdown()
        if self.link is not None:
            self.link.conn.shutdown()

    def _urgent(self, conn: Connection) -> None:
        """An answer waits on the urgent connection: install it (and any other already here)."""
        self._receive(conn, "urgent")
        pending = getattr(conn.sock, "pending", None)  # TLS: records already decrypted
        while pending is not None and pending():
            self._receive(conn, "urgent")

    def _receive(self, conn: Connection, which: str) -> Message:
        assert self.server is not None
        staging = self._staging[which]
        view = memoryview(staging)
        try:
            msg = conn.recv(view)
            if isinstance(msg, PageBatch):
                for a, b in msg.ranges:
                    self.server.place(a, view[a:b])
                    staging.madvise(mmap.MADV_DONTNEED, a, b - a)
                if msg.zeros:
                    self.server.mark_zero(msg.zeros)
        finally:
            view.release()
        return msg

    # -- after COMMIT: the VM runs here --

    def run(self) -> bool:
        """The post-copy phase; True when it completed. A failure stops the VM here: it must
        never run on holes, and the source still holds guest RAM (docs/RELIABILITY.md)."""
        self.phase = phase = postcopy_recover.open_phase(self.s, self.preempt)
        self._t0 = time.monotonic()
        try:
            while True:
                try:
                    self._fill()
                    return True
                except OSError as exc:  # the link: paused until the source reconnects
                    if phase.done is not None:  # only PostcopyDone was lost: a recovery hears it again
                        return True
                    postcopy_recover.pause_incoming(self, phase, exc)
        except Exception as exc:
            self._stop_vm(exc)
            return False
        finally:
            phase.close()
            self.close()

    def _fill(self) -> None:
        """The background push until every page is here; then let the source go."""
        s = self.s
        assert self.server is not None and s.info is not None
        if not self._mapped:  # MINOR mode: the clean pages, while the guest runs (once: a recovery re-enters)
            self._mapped = True
            self.server.map_present()
        poller = select.poll()
        poller.register(s.conn.sock.fileno(), select.POLLIN)
        shown = 0.0
        while not self.server.complete:
            if self._errors:
                raise self._errors[0]
            if poller.poll(POLL_S * 1000) or getattr(s.conn.sock, "pending", lambda: 0)():
                msg = self._receive(s.conn, "main")
                if not isinstance(msg, PageBatch):
                    raise RemoteProtocolError(f"expected PageBatch, got {type(msg).__name__}")
                s.info.transferred = s.conn.received
            if (now := time.monotonic()) - shown >= STATS_EVERY_S:  # the stats sort the latencies
                s.info.postcopy, shown = self.stats(), now
        stats = self.server.done()
        assert s._lane is not None and self.phase is not None
        s._lane.request("postcopy-end")
        self._forget_record()
        s.info.postcopy = {**self.stats(stats), "postcopy-time": round((time.monotonic() - self._t0) * 1000)}
        self.phase.done = PostcopyDone(stats["pages-placed"], stats["postcopy-requests"])
        s._send(self.phase.done)
        self.close()
        s.conn.linger(DONE_LINGER_S)  # the source closes once it read PostcopyDone
        s.log.info("post-copy completed", vm=s.info.vm, **{k.replace("-", "_"): v for k, v in s.info.postcopy.items()
                                                           if not isinstance(v, list)})

    def stats(self, raw: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.server is not None
        st = self.server.stats() if raw is None else raw
        return {**{k: st[k] for k in ("postcopy-requests", "postcopy-blocktime", "postcopy-vcpu-blocktime",
                                      "postcopy-latency-p50", "postcopy-latency-p99", "pages-placed",
                                      "pages-unsettled", "postcopy-mode", "pages-continued")},
                "postcopy-recoveries": self.recoveries}

    def close(self) -> None:
        """Stop serving faults, release the urgent connection and the staging (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_serving()
        if self.server is not None:
            self.server.close()
        if self.link is not None:
            self.link.ended.set()
        for staging in self._staging.values():
            # A view of it may outlive the phase for a moment (a traceback's frame): then the
            # mapping goes with its last reference instead.
            with contextlib.suppress(BufferError):
                staging.close()

    def _stop_vm(self, exc: BaseException) -> None:
        """The post-copy phase failed: the VM here is stopped, its process killed (a vCPU blocked
        on a hole never wakes on wrong memory), and the migration reported failed."""
        s = self.s
        why = f"post-copy failed, the VM was stopped on this host: {describe(exc)}"
        try:
            if s._vm is not None:
                s.bridge.call(s.vms.drop_claimed(s._vm))
        except Exception as e:
            s.log.error("stopping the VM after a failed post-copy", error=describe(e))
        # Henceforth an in-doubt query hears "not resumed": the VM does not run here, and never
        # will; the source's paused copy is the guest.
        s.outcomes.settle(s._mid, False)
        self._forget_record()
        if s.info is not None:
            s.info.postcopy = self.stats()
            s.info.finish(Status.FAILED, why, ErrorCode.MIGRATION_FAILED)
        s.log.error("post-copy failed; the VM is stopped here", vm=s.info.vm if s.info else "?", error=why)


def take(s: DestinationSession, msg: Message) -> bool:
    """True for PostcopyStart, which ends the pre-copy part: ``s._postcopy`` takes over."""
    if not isinstance(msg, PostcopyStart):
        return False
    s._postcopy = PostcopyIncoming(s)
    s._postcopy.start = msg
    return True


def _holes(size: int, data: list[Range]) -> list[Range]:
    out: list[Range] = []
    pos = 0
    for a, b in data:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return out


__all__ = ["PostcopyIncoming", "attach", "take"]
