"""The migration engine's edge between session threads and the event loop: Signal, and the bounded
in-doubt query the operator's migrate-resolve runs in a worker thread."""

from __future__ import annotations

import socket
import threading
import time

from agent.migration.common import Signal
from agent.migration.in_doubt import InDoubtAsker
from agent.migration.transport import Connection, connect


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, **fields: object) -> None:
        self.lines.append(msg)

    warning = error = info


async def test_a_signal_set_by_a_thread_wakes_the_loop() -> None:
    signal = Signal()
    threading.Timer(0.05, signal.set).start()
    assert await signal.until_set(10)
    assert signal.is_set() and signal.wait(0)


async def test_a_signal_wait_that_times_out_leaves_it_settable() -> None:
    signal = Signal()
    assert not await signal.until_set(0.01)
    signal.set()  # the timeout cancelled the wait, not the signal
    signal.set()  # idempotent
    assert await signal.until_set(1)


def test_a_signal_waited_for_by_a_thread() -> None:
    signal = Signal()
    assert not signal.wait(0.01)
    threading.Timer(0.05, signal.set).start()
    assert signal.wait(10)


def test_an_in_doubt_query_to_a_silent_peer_ends_at_its_deadline() -> None:
    """The peer accepts and never answers the handshake: the query gives up at its deadline (its
    kernel timeouts would hold the worker thread far longer)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(lsock.accept()[0]), daemon=True).start()
    log = Log()

    def handshake(conn: Connection) -> None:
        conn.recv()  # waits for a Hello that never comes

    asker = InDoubtAsker(connect=lambda: Connection(connect(lsock.getsockname()[:2])), handshake=handshake,
                         vm_name="v", migration_id="m1", log=log)
    t = time.monotonic()
    assert asker.ask_once(deadline_s=0.2) is None
    assert time.monotonic() - t >= 0.2
    assert log.lines == ["in-doubt query failed"]
    lsock.close()
    for s in held:
        s.close()
