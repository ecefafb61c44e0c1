"""Several data streams of one incoming migration: the extra connections' receivers, and the
per-round barrier (docs/protocol.md, "Several streams"; the sending half is streams.py).

* An extra connection's first message is StreamAttach: it joins the migration under way here
  with the same peer whose id it names, if it proves the stream key that migration's
  MigrateStart carried, as a stream index not taken yet and below the agreed count. Anything
  else (an unknown or finished migration, another peer, a wrong key, a second set of streams)
  is refused with MigrateRefuse and the reason, and the migration itself is untouched.
* Each stream is received by the thread that accepted its connection: its page batches go
  into guest RAM at their checked offsets (``pwrite`` into the memfd, or straight into the
  mapping), each piece hashed by the stream's thread while it is in the cache, the digest's
  bookkeeping under the session's lock (the RAM digest is one structure). A round's pages are all
  distinct, so the streams' writes within a round never overlap.
* The barrier: a stream's Sync marks the end of its share of a round. The main connection's
  Sync is answered, and the final round's DeviceState read, only once every stream has passed
  as many marks (``barrier``): every page of the round is written before the source hears the
  round is over, so a later round's copy of a page can never be overtaken by an older one.
* A stream that fails (closed, stalled, a bad frame) fails the migration at the next barrier,
  before COMMIT; the copy here is discarded and the source resumes the VM.
"""

from __future__ import annotations

import hmac
import select
import threading
import time
from typing import TYPE_CHECKING

from agent.migration import pages
from agent.migration.transport import Connection
from proto.errors import ErrorCode, RemoteProtocolError
from proto.messages import Abort, MigrateAccept, MigrateRefuse, MigrateStart, PageBatch, Sync
from proto.stream_messages import StreamAttach

if TYPE_CHECKING:
    from agent.migration.destination import DestinationSession

KEY_PARAM = "stream-key"  # (streams.KEY_PARAM: the source's name for it)
POLL_S = 0.5  # how often an idle stream looks whether its migration is over
CLOSE_WAIT_S = 10.0  # how long closing waits for the stream threads to leave guest RAM


class SharedSink(pages.DigestingSink):
    """A DigestingSink for one of several streams feeding one digest: each stream's thread hashes
    its pieces itself, and takes the session's lock only to store the result."""

    def __init__(self, fd: int, digest: pages.RamDigest, lock: threading.Lock) -> None:
        super().__init__(fd, digest)
        self._lock = lock

    def received(self, offset: int, data: memoryview) -> None:
        done, digests = pages.chunk_digests(offset, data)  # (reads only the piece: no lock)
        with self._lock:
            self._hashed.update(self._digest.put_chunks(done, digests))


class IncomingStreams:
    """The extra streams of one incoming migration, and the barrier its main connection waits at."""

    def __init__(self, count: int, key: bytes) -> None:
        self.count = count
        self._key = key
        self._cond = threading.Condition()
        self._conns: dict[int, Connection] = {}
        self._marks: dict[int, int] = {}
        self._active = 0  # stream threads inside their receive loop
        self._passed = 0  # barriers passed
        self._error: BaseException | None = None
        self.closed = False

    def attach(self, index: int, key: bytes, conn: Connection) -> str | None:
        """Take stream ``index``; the reason it is refused, or None."""
        with self._cond:
            if not hmac.compare_digest(key, self._key):
                return "wrong stream key"
            if index >= self.count:
                return f"stream {index} of a migration with {self.count} streams"
            if index in self._conns or self.closed:
                return f"stream {index} is attached already" if not self.closed else "the migration is over"
            self._conns[index] = conn
            self._marks[index] = 0
            self._active += 1
            return None

    def received(self) -> int:
        """Bytes received on the extra streams."""
        return sum(c.received for c in list(self._conns.values()))

    def mark(self, index: int) -> None:
        with self._cond:
            self._marks[index] += 1
            self._cond.notify_all()

    def fail(self, index: int, exc: BaseException) -> None:
        with self._cond:
            if not self.closed and self._error is None:
                msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self._error = RemoteProtocolError(f"data stream {index} failed: {msg}") \
                    if not isinstance(exc, TimeoutError) else TimeoutError(f"data stream {index}: {exc}")
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def barrier(self, stall_s: float) -> None:
        """Wait until every stream has passed one more mark (the end of its share of the round);
        a stream's failure, or no stream moving for ``stall_s``, raises."""
        with self._cond:
            self._passed += 1
            deadline = time.monotonic() + stall_s
            progress = self._progress()
            while True:
                if self._error is not None:
                    raise self._error
                if len(self._marks) == self.count - 1 and min(self._marks.values()) >= self._passed:
                    return
                if (t := time.monotonic()) >= deadline:
                    missing = sorted(set(range(1, self.count)) - set(self._conns))
                    raise TimeoutError(f"the data streams did not end round {self._passed} within {stall_s:g} s"
                                       + (f" (streams {missing} never attached)" if missing else ""))
                self._cond.wait(min(deadline - t, POLL_S))
                if (moved := self._progress()) != progress:
                    progress, deadline = moved, time.monotonic() + stall_s

    def _progress(self) -> tuple[int, int]:
        return sum(self._marks.values()), self.received()

    def close(self) -> None:
        """Stop every stream (the migration is over here, one way or the other) and wait until
        their threads left guest RAM."""
        with self._cond:
            self.closed = True
            conns = list(self._conns.values())
        for conn in conns:
            conn.shutdown()
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, CLOSE_WAIT_S)


def incoming(start: MigrateStart, count: int) -> IncomingStreams | None:
    """The streams a MigrateStart asks for (``count`` from its params), None for one; a bad key
    is the source's protocol error."""
    if count <= 1:
        return None
    try:
        key = bytes.fromhex(str(start.params.get(KEY_PARAM, "")))
    except ValueError:
        key = b""
    if len(key) < 16:
        raise RemoteProtocolError(f"{count} streams asked for without a stream key")
    return IncomingStreams(count, key)


def serve(s: DestinationSession, msg: StreamAttach) -> None:
    """An extra stream's session (its own thread): attach it to its migration, or refuse it with
    the reason; then receive its batches until the migration ends."""
    owner = next((o for o in s.outcomes.live() if o._mid == msg.migration_id), None)
    streams = owner._streams if owner is not None else None
    if owner is None or owner._peer != s._peer:
        why: str | None = f"no migration {msg.migration_id} under way here with {s._peer}"
    elif streams is None:
        why = f"migration {msg.migration_id} takes no extra streams"
    else:
        why = streams.attach(msg.index, msg.key, s.conn)
    if why is not None or owner is None or streams is None:
        s.conn.send(MigrateRefuse(ErrorCode.BAD_REQUEST, f"stream refused: {why}"))
        raise RemoteProtocolError(f"stream {msg.index} of migration {msg.migration_id} refused: {why}")
    try:
        s.conn.send(MigrateAccept(msg.migration_id))
        _receive(owner, streams, msg.index, s.conn)
    except BaseException as e:
        streams.fail(msg.index, e)
        if not streams.closed:
            raise
    finally:
        streams.leave()


def _receive(owner: DestinationSession, streams: IncomingStreams, index: int, conn: Connection) -> None:
    assert owner._inc is not None and owner._digest is not None and owner._ram is not None
    sink = SharedSink(owner._inc.memfd, owner._digest, owner._lock)
    ram = owner._ram
    poller = select.poll()
    poller.register(conn.sock.fileno(), select.POLLIN)
    pending = getattr(conn.sock, "pending", lambda: 0)  # an SSLSocket's decrypted bytes
    while not streams.closed:
        if not (pending() or poller.poll(POLL_S * 1000)):
            continue
        msg = conn.recv(ram, sink)
        if isinstance(msg, PageBatch):
            owner._on_pages(msg, sink, conn)
        elif isinstance(msg, Sync):
            streams.mark(index)
        elif isinstance(msg, Abort):
            raise RemoteProtocolError(f"the source aborted on stream {index}: {msg.reason}")
