"""Post-copy's source half: the switch-over that resumes the VM on the destination before all
its pages are there, and the phase that sends the rest (docs/protocol.md, "Post-copy").

The SourceSession (source.py) runs pre-copy rounds as always; when the operator's
``postcopy-after`` says so (``wanted``), the switch-over is this module's:

* the urgent connection is opened first (a second connection, PostcopyAttach), while the VM
  still runs: page requests and their answers travel on it and never queue behind the
  background push on the main connection;
* PostcopyStart; the last round's dirty set (pages whose copies on the destination are
  stale) as PostcopyDiscard messages while the VM still runs, and a Sync: the destination
  has punched them out when SyncAck comes; then pause, last harvest, the pages dirtied since
  as more discards, and DeviceState. No final copy and no
  digest: that is what makes the downtime short whatever the guest dirties;
* READY, then the session's usual COMMIT and RESUMED: exactly-once holds as in pre-copy, and
  after RESUMED the source never resumes the VM;
* the phase (``run``): the stale pages are pushed on the main connection in the background,
  jumping to the region of the latest request; a thread answers requests on the urgent
  connection first; guest RAM here (the paused VM process's memfd) is kept until the
  destination says every page is present (PostcopyDone). Only then does the session let the
  VM go here (source_end.complete).
"""

from __future__ import annotations

import select
import threading
import time
from typing import TYPE_CHECKING

from agent.migration import compression, page_maps, pages
from agent.migration.common import RUN_STATE_KEY, MigrationError, describe
from agent.migration.info import PAGE_SIZE, Status
from agent.migration.policy import Action, Decision
from agent.migration.transport import Connection
from proto.errors import ErrorCode
from proto.limits import MAX_RANGES
from proto.messages import DeviceState, Ready, Sync, SyncAck
from proto.postcopy_messages import PageRequest, PostcopyAttach, PostcopyDiscard, PostcopyDone, PostcopyStart
from proto.state import SourceMachine
from vmruntime.dirty.ranges import Ranges

if TYPE_CHECKING:
    from agent.migration.source import SourceSession

Range = tuple[int, int]

#: The first protocol version with post-copy.
POSTCOPY_SINCE = PostcopyStart.SINCE
# Pages per background batch: small, so a jump to a requested region takes effect soon; gathered
# from a window ahead of the cursor, so a scattered dirty set still goes in full batches.
PUSH_PAGES = 256
PUSH_WINDOW = 16 * PUSH_PAGES
POLL_S = 0.05
# After the push: how long the destination may take to say every page is present.
DONE_WAIT_S = 60.0


def wanted(postcopy_after: str | None, rounds: int, d: Decision) -> bool:
    """Whether the switch-over after round ``rounds`` (1-based) goes post-copy: after round N
    whatever the policy says, or with ``auto`` when the policy sees pre-copy will not converge."""
    if postcopy_after in (None, "never"):
        return False
    if postcopy_after == "auto":
        return d.action is Action.POSTCOPY
    return rounds >= int(postcopy_after)


def check_peer(s: SourceSession, version: int) -> None:
    """Refuse post-copy towards a peer older than version 4, before anything moves."""
    if s.params.postcopy_after not in (None, "never") and version < POSTCOPY_SINCE:
        raise MigrationError(ErrorCode.INCOMPATIBLE,
                             f"the destination speaks protocol version {version}: post-copy needs "
                             f"{POSTCOPY_SINCE} (migrate without --postcopy / --postcopy-after)")
    if s.params.postcopy_after not in (None, "never") and s.params.copy_storage:
        raise MigrationError(ErrorCode.BAD_REQUEST, "post-copy does not copy storage (--copy-storage)")


class PostcopySource:
    """The post-copy part of one outgoing migration (see the module's docstring)."""

    def __init__(self, s: SourceSession) -> None:
        self.s = s
        self.urgent: Connection | None = None
        self._todo = bytearray()  # one byte per guest page: 1 while it is to be sent
        self._left = 0
        self._cursor = 0  # the page the push goes on from
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._answerer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.requests = 0
        self.answered = 0
        self.pushed = 0
        self.recoveries = 0  # links lost and recovered (postcopy_recover)
        self.kick = threading.Event()  # the operator's migrate-recover: reconnect at once
        self._started: float | None = None
        self._sent_before = 0  # bytes the connections lost since carried

    # -- the switch-over (before COMMIT: a failure rolls back, the VM resumes here) --

    def switch_over(self, dirty: Ranges) -> float:
        """Urgent connection, pause, discards, PostcopyStart, state; READY. Returns when READY came."""
        s = self.s
        pending = dirty.tolist()
        self._open_urgent()
        # The last round's dirty set is dropped there while the VM still runs here: punching a
        # page costs tens of microseconds, which in the pause would be downtime.
        s._send(PostcopyStart(sum(b - a for a, b in pending) // PAGE_SIZE))
        self._discard(pending)
        # The pages to push, marked while the VM still runs here (the pause adds the last dirty set).
        self._todo = bytearray(s.vm.mem // PAGE_SIZE)
        page_maps.mark(self._todo, dirty)
        n = len(s.info.rounds)
        s._send(Sync(n))
        ack = s._recv()
        if not isinstance(ack, SyncAck) or ack.round != n:
            raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected SyncAck({n}), got {ack!r}")
        s.info.status = Status.DEVICE
        s._check_cancel()
        s._pause_t = t = time.monotonic()
        s._paused = True
        state = s._pause()
        t = s._book.lap("pause", t)
        assert s._tracker is not None
        s._tracker.hot_blocks = False
        last = s._harvest()
        self._discard(last.tolist())
        s._send(DeviceState({**state, RUN_STATE_KEY: "running" if s._was_running else "paused"}))
        t = s._book.lap("state", t)
        page_maps.mark(self._todo, last)
        npages = self._todo.count(1)
        self._left = npages
        s.info.remaining = npages * PAGE_SIZE
        self._start_answerer()  # the restore there may fault already
        reply = s._recv()
        if not isinstance(reply, Ready):
            raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected Ready, got {type(reply).__name__}")
        return s._book.lap("verify", t)

    def _start_answerer(self) -> None:
        self._answerer = threading.Thread(target=self._answer, name="ferry-postcopy-answers", daemon=True)
        self._answerer.start()

    def resume(self, conn: Connection, lacking: list[Range]) -> None:
        """A recovered link (postcopy_recover): ``conn`` becomes the main connection, the push
        sends exactly what the destination lacks, and answers go on a new urgent connection."""
        todo = bytearray(len(self._todo))
        for a, b in lacking:
            todo[a // PAGE_SIZE:b // PAGE_SIZE] = b"\x01" * ((b - a) // PAGE_SIZE)
        if lacking:  # (none: the destination has every page; PostcopyDone is all that is left)
            self._open_urgent()
        s = self.s
        kept = s.info.compression  # the figures so far go on (packer() starts new ones)
        conn.packer = compression.packer(s.params, conn.channel.version, s.info, s._cancel, conn.sock)
        if kept is not None:
            conn.packer.stats = s.info.compression = kept
        with self._lock:
            self._todo, self._left, self._cursor = todo, todo.count(1), 0
        s.conn = conn
        self._stop = threading.Event()
        self._error = None
        self.recoveries += 1
        if self.urgent is not None:
            self._start_answerer()

    def _discard(self, ranges: list[Range]) -> None:
        s = self.s
        for i in range(0, len(ranges), MAX_RANGES):
            s._send(PostcopyDiscard(tuple(ranges[i:i + MAX_RANGES])))

    def _open_urgent(self) -> None:
        s = self.s
        conn = s._connect(guest_size=s.vm.mem)
        try:
            s._handshake(conn)
            conn.start(SourceMachine())
            conn.send(PostcopyAttach(s.migration_id, s.vm.name))
        except BaseException:
            conn.close()
            raise
        self.urgent = conn

    # -- answers to requests (their own thread, from the switch-over on) --

    def _answer(self) -> None:
        conn = self.urgent
        assert conn is not None
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLIN)
        try:
            while not self._stop.is_set():
                if not (poller.poll(POLL_S * 1000) or getattr(conn.sock, "pending", lambda: 0)()):
                    continue
                msg = conn.recv()
                if not isinstance(msg, PageRequest):
                    raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected PageRequest, got {type(msg).__name__}")
                self._serve(conn, msg)
        except BaseException as e:
            if not self._stop.is_set():
                self._error = e
                self.s.log.warning("post-copy answers stopped", vm=self.s.vm.name, error=describe(e))

    def _serve(self, conn: Connection, req: PageRequest) -> None:
        """Send the pages asked for at once, and point the push at their region."""
        s = self.s
        assert s._ram is not None
        first = req.offset // PAGE_SIZE
        with self._lock:
            self.requests += 1
            self._left -= self._todo[first:first + req.npages].count(1)
            self._todo[first:first + req.npages] = bytes(req.npages)
            self._cursor = first + req.npages
        for batch in pages.plan_batches(s._ram, [(req.offset, req.offset + req.npages * PAGE_SIZE)]):
            conn.send_pages(s._ram, batch.ranges.tolist(), batch.zeros.tolist())
        self.answered += req.npages

    # -- the background push (the session thread, after RESUMED) --

    def run(self) -> None:
        """Push the stale pages, requests first, until the destination has them all."""
        s = self.s
        assert s.conn is not None and s._ram is not None
        s.info.status = Status.POSTCOPY_ACTIVE
        if self._started is None:
            self._started = time.monotonic()
        t = self._started
        try:
            while (ranges := self._next()) is not None:
                if self._error is not None:
                    raise self._error
                for batch in pages.plan_batches(s._ram, ranges):  # (the connection's packer keeps the cap)
                    s.conn.send_pages(s._ram, batch.ranges.tolist(), batch.zeros.tolist())
                    self.pushed += batch.pages
                s.info.remaining = self._left * PAGE_SIZE
                s.info.transferred = self._sent_before + s.conn.sent + (self.urgent.sent if self.urgent else 0)
                s.info.postcopy = self.stats()
                if s.conn.next_frame_is(PostcopyDone):
                    break
            s.conn.set_stall_timeout(max(s.conn.stall_s, DONE_WAIT_S))
            done = s.conn.recv()
            if not isinstance(done, PostcopyDone):
                raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"expected PostcopyDone, got {type(done).__name__}")
        finally:
            self._sent_before += s.conn.sent + (self.urgent.sent if self.urgent else 0)
            self.close()
        s.info.remaining = 0
        s.info.postcopy = {**self.stats(), "postcopy-time": round((time.monotonic() - t) * 1000)}

    def _next(self) -> list[Range] | None:
        """The next pages to push (up to PUSH_PAGES within PUSH_WINDOW): from the cursor (the
        latest request's region), wrapping."""
        with self._lock:
            todo = self._todo
            at = todo.find(1, self._cursor)
            if at == -1:
                at = todo.find(1)
                if at == -1:
                    return None
            limit = min(len(todo), at + PUSH_WINDOW)
            out: list[Range] = []
            taken = 0
            while at != -1 and taken < PUSH_PAGES:
                end = todo.find(0, at, min(limit, at + PUSH_PAGES - taken))
                end = min(limit, at + PUSH_PAGES - taken) if end == -1 else end
                todo[at:end] = bytes(end - at)
                out.append((at * PAGE_SIZE, end * PAGE_SIZE))
                taken += end - at
                self._cursor = end
                at = todo.find(1, end, limit)
            self._left -= taken
        return out

    def stats(self) -> dict[str, int]:
        return {"postcopy-requests": self.requests, "postcopy-pages-answered": self.answered,
                "postcopy-pages-pushed": self.pushed, "postcopy-recoveries": self.recoveries}

    def close(self) -> None:
        """Stop answering and close the urgent connection (idempotent)."""
        self._stop.set()
        if self.urgent is not None:
            self.urgent.shutdown()
        if self._answerer is not None:
            self._answerer.join(10)
            self._answerer = None
        if self.urgent is not None:
            self.urgent.close()
            self.urgent = None




def finish(s: SourceSession) -> None:
    """After RESUMED: the post-copy phase, then the VM here goes (source_end.complete). A lost
    link pauses it until a reconnect (postcopy_recover); a failed phase keeps the VM paused here
    with its RAM (the destination stops its VM: it must not run on holes), for the operator
    (migrate-resolve)."""
    from agent.migration import postcopy_recover, source_end

    assert s._postcopy is not None
    downtime = time.monotonic() - s._pause_t
    try:
        postcopy_recover.run_source(s)
    except Exception as exc:
        s._close()
        why = describe(exc)
        s.in_doubt = True
        s.info.postcopy = s._postcopy.stats()
        s._release_ram()
        s.bridge.call(s.vm.end_migration("paused"))
        s.info.finish(Status.FAILED, f"post-copy failed: {why}; the VM stays paused here with its RAM "
                      "(ferry migrate-resolve NAME --resume-here once the destination's copy is gone)",
                      ErrorCode.MIGRATION_FAILED)
        s.log.error("post-copy failed; VM kept paused", vm=s.vm.name, error=why)
        return
    s._close()
    source_end.complete(s, downtime_s=downtime)


__all__ = ["POSTCOPY_SINCE", "PostcopySource", "check_peer", "finish", "wanted"]
