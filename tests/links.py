"""Two migration Connections joined by a real loopback TCP socket, for transport-level tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from agent.migration.transport import Connection, prepare_socket


@contextlib.contextmanager
def socket_link(version: int | None = None) -> Iterator[tuple[Connection, Connection]]:
    """(client end, server end); ``version``: what a handshake would have chosen (None: none yet,
    each end sends the oldest version it accepts)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    a, b = Connection(prepare_socket(client)), Connection(prepare_socket(server))
    if version is not None:
        a.channel.speak(version)
        b.channel.speak(version)
    try:
        yield a, b
    finally:
        a.close()
        b.close()
