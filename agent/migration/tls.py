"""The migration data path over TLS: a Connection for `ssl.SSLSocket`s, and the TLS wrap of both ends.

transport.Connection moves page data with ``sendmsg`` and ``recvmsg_into`` (one syscall for many
guest ranges, no copy in Python); ``ssl.SSLSocket`` has neither, and its ``recv_into`` takes no
flags. ``TLSConnection`` overrides only the three low-level I/O steps of Connection, so framing,
checks and byte counts stay those of the plaintext path, which is untouched (and as fast):

* sending: small pieces (scattered single pages) are gathered into one buffer of up to
  ``COALESCE`` bytes before each ``sendall`` (a copy, cheap next to the encryption, and it saves a
  TLS record and a syscall per page); large ranges go from the memoryview of guest RAM directly;
* receiving: ``recv_into`` straight into guest RAM at each checked offset, in a loop (OpenSSL hands
  out at most one 16 KiB record per call);
* timeouts: Python socket timeouts, not the kernel's SO_RCVTIMEO. A blocking SSLSocket retries
  SSL_read after EAGAIN, so a kernel timeout would never surface; with a timeout set, every wait is
  a poll bounded by the connection's stall timeout;
* ``shutdown`` acts on the TCP socket underneath (SSLSocket.shutdown would also drop the TLS
  state that a thread blocked in a read is using).

The destination does the TLS handshake implicitly on its first read, inside the session thread and
under the listener's handshake deadline, so a slow or plaintext peer never blocks the accept loop.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

from agent import tls
from agent.migration.common import MigrationError
from agent.migration.transport import IO_TIMEOUT_S, Connection, ConnectionClosed, connect, keep_alive
from proto.errors import ErrorCode
from proto.messages import Message

# Pieces shorter than this are gathered before sending; a gathered buffer goes out at this size.
COALESCE = 256 * 1024


class TLSConnection(Connection):
    """A Connection over an ``ssl.SSLSocket``: the same frames, TLS-friendly I/O calls."""

    def __init__(self, sock: ssl.SSLSocket, guest_size: int | None = None,
                 io_timeout: float = IO_TIMEOUT_S) -> None:
        sock.settimeout(io_timeout)
        super().__init__(sock, guest_size)

    def set_stall_timeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)  # a Python-level timeout: the SSLSocket polls
        keep_alive(self.sock, seconds)
        self.stall_s = seconds

    def next_frame_is(self, cls: type[Message]) -> bool:
        """Never known ahead: a TLS record cannot be peeked at decrypted."""
        return False

    def _sendmsg_all(self, bufs: list[memoryview | bytes]) -> int:
        total = 0
        gathered: list[memoryview | bytes] = []
        size = 0
        for buf in bufs:
            n = len(buf)
            if n >= COALESCE:
                self._send_gathered(gathered)
                gathered, size = [], 0
                self._io(self.sock.sendall, buf)
            else:
                gathered.append(buf)
                size += n
                if size >= COALESCE:
                    self._send_gathered(gathered)
                    gathered, size = [], 0
            total += n
        self._send_gathered(gathered)
        return total

    def _send_gathered(self, pieces: list[memoryview | bytes]) -> None:
        if len(pieces) == 1:
            self._io(self.sock.sendall, pieces[0])
        elif pieces:
            self._io(self.sock.sendall, b"".join(pieces))

    def _recv_scatter(self, ram: memoryview, targets: list[tuple[int, int]]) -> None:
        for off, length in targets:
            with ram[off:off + length] as view:
                self._recv_exact(view)

    def _recv_exact(self, buf: memoryview) -> None:
        got = 0
        total = len(buf)
        while got < total:
            n = self._io(self.sock.recv_into, buf[got:], total - got)
            if n == 0:
                raise ConnectionClosed("the peer closed the connection")
            got += n
        self.received += total

    def shutdown(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


def server_connection(sock: socket.socket, ctx: ssl.SSLContext, io_timeout: float = IO_TIMEOUT_S) -> TLSConnection:
    """An accepted socket as a TLS connection; the handshake happens on its first read."""
    tls_sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return TLSConnection(tls_sock, io_timeout=io_timeout)


def client_connection(sock: socket.socket, ctx: ssl.SSLContext, host: str,
                      guest_size: int | None = None, io_timeout: float = IO_TIMEOUT_S) -> TLSConnection:
    """TLS over a connected socket to ``host`` (whose certificate must name it); handshake done."""
    sock.settimeout(tls.HANDSHAKE_TIMEOUT)
    try:
        tls_sock = ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return TLSConnection(tls_sock, guest_size, io_timeout)


def dial(dest: tuple[str, int], ctx: ssl.SSLContext | None, guest_size: int | None = None,
         stall_s: float = IO_TIMEOUT_S) -> Connection:
    """A connection to a migration listener (progress deadline ``stall_s``): plaintext without
    ``ctx``, else mutual TLS."""
    sock = connect(dest, io_timeout=stall_s)
    if ctx is None:
        return Connection(sock, guest_size=guest_size)
    return client_connection(sock, ctx, dest[0], guest_size, stall_s)


@contextlib.contextmanager
def refusals(peer: tuple[str, int]) -> Iterator[None]:
    """A TLS failure with ``peer`` (bad certificate either way, no TLS there) as an auth-failed error.

    With TLS 1.3 the server judges the client's certificate after the client's handshake is done,
    so its refusal arrives as an alert on the first read: wrap the cluster-key handshake too.
    """
    try:
        yield
    except ssl.SSLError as e:
        raise MigrationError(ErrorCode.AUTH_FAILED,
                             f"TLS with {peer[0]}:{peer[1]} failed: {tls.describe_error(e)}") from e
