"""Several data streams of one outgoing migration: guest RAM spread over N connections.

One Python thread sending on one connection copies (or encrypts, with TLS) at the rate of one
core. With ``--streams N`` (docs/protocol.md, "Several streams") the source opens N - 1 extra
connections after MigrateAccept, each tied to the migration by StreamAttach (its id and the
stream key the main connection's MigrateStart carried), each sent by its own thread; the socket
calls (``sendmsg``, an SSLSocket's ``sendall``: the encryption included) release the GIL, so N
cores copy or encrypt at once.

* The session thread plans the batches (pages.plan_batches); each batch goes to an idle
  stream's thread, or, when every one is busy, out on the main connection by the session thread
  itself: work goes where there is room, no stream waits on another. The thread that sent a
  batch also hashes it for the RAM digest (SourceDigest.hash_hot: the hashing without a lock,
  the bookkeeping under the digest's), so the hashing is spread over the streams too.
* The ordering rule, a page's later copy always wins, is kept by a barrier per round: the round
  ends (``end_round``) only when every stream's thread has sent its batches; then each extra
  stream carries a Sync marking the end of its share. The destination answers the main
  connection's Sync, and reads the final round's DeviceState, only once every stream passed its
  mark (agent/migration/stream_recv.py), so no page of round k + 1 leaves before every page of
  round k is written there.
* Handshake, MigrateStart, the Syncs' answers, the final round's end, the device state, the
  digest and COMMIT stay on the main connection, exactly once. A stream that fails fails the
  round: the session rolls back before COMMIT, the VM running here.
* Each stream has its own compression Packer (a zstd context is one thread's) sharing the
  migration's figures and its bandwidth cap.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.migration import pages
from agent.migration.common import MigrationError
from agent.migration.info import MigrationParams, RoundStat
from agent.migration.rounds import RoundBook
from agent.migration.transport import Connection
from proto.errors import ErrorCode
from proto.limits import STREAMS_VERSION
from proto.messages import Abort, MigrateAccept, MigrateRefuse, Sync
from proto.state import SourceMachine
from proto.stream_messages import StreamAttach

if TYPE_CHECKING:
    from agent.migration.source import SourceSession

#: MigrateStart's param holding the stream key (hex), beside the MigrationParams.
KEY_PARAM = "stream-key"
KEY_BYTES = 32
#: What a stream's thread calls with a batch it sent (SourceDigest.hash_hot).
AfterSend = Callable[[pages.Batch], None]
_Item = tuple[memoryview, pages.Batch, RoundStat, AfterSend | None]
# A stream broke: how long to look on the main connection for the destination's Abort, which it
# sends there before it drops the streams (its reason is the one to report).
ABORT_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class Plan:
    """The streams a migration proposes, and the key its extra streams prove they belong with."""

    count: int
    key: bytes

    def params(self) -> dict[str, Any]:
        """What MigrateStart's params say of the streams (nothing for one: an older peer's way)."""
        return {"streams": self.count, KEY_PARAM: self.key.hex()} if self.count > 1 else {}


def plan(params: MigrationParams, version: int) -> Plan:
    """The streams to propose to a peer of protocol ``version``: one towards an older peer, and
    with post-copy (its phase pushes pages on the main connection and answers requests on its
    own); else the params' count."""
    count = params.streams or 1
    if version < STREAMS_VERSION or params.postcopy_after not in (None, "never"):
        count = 1
    return Plan(count, secrets.token_bytes(KEY_BYTES))


def open_streams(s: SourceSession, p: Plan) -> SendStreams | None:
    """Connect, authenticate and attach the extra streams of ``p`` (None for one stream); a
    refusal or a failure is the migration's, raised before any page moves."""
    if p.count <= 1:
        return None
    assert s.conn is not None and s.conn.packer is not None
    conns: list[Connection] = []
    try:
        for index in range(1, p.count):
            conn = s._connect(guest_size=s.vm.mem)
            conns.append(conn)
            s._handshake(conn)
            conn.start(SourceMachine())
            conn.send(StreamAttach(s.migration_id, index, p.key))
            reply = conn.recv()
            if isinstance(reply, MigrateRefuse):
                raise MigrationError(reply.code, f"the destination refused stream {index}: {reply.reason}")
            if not isinstance(reply, MigrateAccept):
                raise MigrationError(ErrorCode.PROTOCOL_ERROR, f"stream {index}: unexpected {type(reply).__name__}")
            conn.packer = s.conn.packer.sibling(conn.sock)
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return SendStreams(conns, s._book, s.conn)


class SendStreams:
    """The extra streams of one outgoing migration and their sender threads (see the module)."""

    def __init__(self, conns: list[Connection], book: RoundBook, main: Connection) -> None:
        self.conns = conns
        self._main = main
        self._book = book
        self.lock = threading.Lock()  # the round's figures, counted by every sender
        self._done = threading.Condition(self.lock)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=len(conns))
        self._busy = 0  # batches handed to the threads and not yet sent
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, args=(conn, i + 1), name=f"ferry-stream-{i + 1}",
                                          daemon=True) for i, conn in enumerate(conns)]
        for t in self._threads:
            t.start()

    @property
    def count(self) -> int:
        """Streams in all, the main connection included."""
        return len(self.conns) + 1

    def offer(self, ram: memoryview, batch: pages.Batch, stat: RoundStat, after: AfterSend | None = None) -> bool:
        """Hand ``batch`` to an idle stream, whose thread calls ``after`` with it once it is sent
        (the digest's hashing); False when none is idle (the caller sends it on the main
        connection). A stream's failure is raised here."""
        self.check()
        with self.lock:
            self._busy += 1
        try:
            self._queue.put_nowait((ram, batch, stat, after))
        except queue.Full:
            with self.lock:
                self._busy -= 1
            return False
        return True

    def count_batch(self, stat: RoundStat, batch: pages.Batch, wire: int) -> None:
        """A batch the main connection sent, counted with the streams' (under their lock)."""
        with self.lock:
            self._book.count_batch(stat, batch, wire)

    def end_round(self, n: int) -> None:
        """The round's batches are all handed out: wait until the streams sent theirs, then mark
        the end of each stream's share with a Sync (the barrier the destination waits at)."""
        with self._done:
            self._done.wait_for(lambda: self._busy == 0 or self._error is not None)
        self.check()
        for index, conn in enumerate(self.conns, 1):
            try:
                conn.send(Sync(n))
            except BaseException as e:
                self._error = _stream_failed(index, e)
                self.check()

    def check(self) -> None:
        """Raise the failure of a stream, if one failed: the destination's Abort when it gave up
        first (the session thread's call: it alone reads the main connection)."""
        if self._error is None:
            return
        deadline = time.monotonic() + ABORT_WAIT_S
        while time.monotonic() < deadline:
            if self._main.next_frame_is(Abort):
                msg = self._main.recv()
                if isinstance(msg, Abort):
                    raise MigrationError(msg.code, f"the destination aborted: {msg.reason}")
            time.sleep(0.02)
        raise self._error

    def _run(self, conn: Connection, index: int) -> None:
        while (item := self._queue.get()) is not None:
            ram, batch, stat, after = item
            try:
                if self._error is None:  # after a failure the round is lost: drain, send nothing
                    wire = conn.send_pages(ram, batch.ranges.tolist(), batch.zeros.tolist())
                    if after is not None:  # before the round's end (the barrier waits for it)
                        after(batch)
                    with self.lock:
                        self._book.count_batch(stat, batch, wire)
            except BaseException as e:  # the session raises it at its next batch or the round's end
                with self.lock:
                    if self._error is None:
                        self._error = _stream_failed(index, e)
                conn.shutdown()
            finally:
                del item, ram
                with self._done:
                    self._busy -= 1
                    self._done.notify_all()

    def shutdown(self) -> None:
        """Wake every sender blocked on its connection (a cancel); safe from any thread."""
        for conn in self.conns:
            conn.shutdown()

    def close(self) -> None:
        """Stop the threads (each ends after the batch it sends) and close the connections; the
        guest RAM view they were given is free when this returns."""
        self.shutdown()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        for conn in self.conns:
            conn.close()


def _stream_failed(index: int, exc: BaseException) -> BaseException:
    """A stream's failure as the migration's, naming the stream (the type kept: a timeout stays one)."""
    if isinstance(exc, MigrationError | TimeoutError):
        return exc
    text = getattr(exc, "message", None) or exc or type(exc).__name__
    if isinstance(exc, OSError):  # still a connection's failure: a cancel that shut it is a cancel
        return ConnectionError(f"data stream {index} failed: {text}")
    return MigrationError(getattr(exc, "code", ErrorCode.MIGRATION_FAILED),
                          f"data stream {index} failed: {text}")
