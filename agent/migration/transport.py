"""The migration data path: proto frames over a blocking TCP socket, guest RAM in and out.

This module is the only part of the migration engine that touches sockets.
It runs in a session's own thread (blocking calls release the GIL), and it
is written for speed:

* sending a page batch is one ``sendmsg`` of the frame header+body followed
  by memoryview slices of the agent's shared mapping of guest RAM: no copy
  in Python, one iovec per contiguous range;
* receiving a page batch reads the header and body, then the payload, at
  the offsets proto has checked against the guest size. Large ranges (round
  0, dense guests) go through one reused ``RECV_PIECE`` buffer and ``pwrite``
  into the memfd: a fresh shared mapping costs a page fault, an allocation
  and a zeroing per 4 KiB written through it, a ``pwrite`` of whole pages
  neither the fault nor the zeroing (docs/PERFORMANCE.md section 2), and the
  receiver hashes each piece for the RAM digest while it is in the CPU cache.
  A full memfd (tmpfs limit, memory cgroup) is an error (``GuestRamFull``)
  rather than the SIGBUS a write through the mapping would take. Scattered
  pages (later rounds) go straight into the mapping with one
  ``recvmsg_into`` per IOV_MAX ranges;
* a stalled peer is detected in seconds (docs/RELIABILITY.md, "Stalls"):
  every blocking send or receive has a progress deadline, a kernel socket
  timeout (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket, without the poll
  per call a Python-level timeout costs; and TCP keep-alive probes with
  TCP_USER_TIMEOUT drop a connection whose peer host or path died. The
  kernel answers both for a frozen (SIGSTOPped) process, so only the
  deadline catches that one;
* cancelling is ``shutdown()`` from another thread: every blocked call
  returns at once;
* the connecting side (always the migration source, the one that streams
  guest RAM) sizes its send buffer for a long path: a TCP sender keeps at
  most its send buffer unacknowledged, so the buffer caps throughput at
  buffer / round trip, and Linux autotuning stops at ``net.ipv4.tcp_wmem``
  max (a few MiB by default: too little for a long path). The round trip
  measured by the TCP handshake times ``PATH_RATE`` gives the buffer wanted
  (at most ``SEND_BUFFER``); a short path (loopback, a LAN) keeps
  autotuning, which a fixed buffer would turn off. The accepting side (the
  destination) does the same for its receive buffer (``accepted``): the
  window it advertises is about its receive buffer, and autotuning stops at
  ``net.ipv4.tcp_rmem`` max (docs/PERFORMANCE.md section 3). A bigger
  window means more bytes in flight when the source pauses; the source's
  Sync at every round end drains them before the pause, so they cost no
  downtime.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from agent.migration import compression
from proto.channel import Channel, Machine
from proto.codec import message_class
from proto.errors import ErrorCode, ProtocolError, RemoteProtocolError
from proto.frame import HEADER_SIZE, parse_header
from proto.messages import DiskBatch, ErrorResponse, Message, PageBatch, RangeBatch

T = TypeVar("T")

# Linux IOV_MAX: the most buffers one sendmsg call takes.
IOV_MAX = 1024

# Progress deadline of every blocking send or receive on a migration connection (no byte moved for
# this long: the peer is dead or frozen). Each silent wait of the protocol is bounded well below it
# (docs/RELIABILITY.md, "Stalls"); agent config and `ferry migrate --stall-timeout` change it.
STALL_TIMEOUT_S = 4.0
IO_TIMEOUT_S = STALL_TIMEOUT_S
# TCP keep-alive: first probe after this much idle time, then one per interval; the connection is
# dropped once probes or data stay unacknowledged for the stall timeout (TCP_USER_TIMEOUT).
KEEPALIVE_IDLE_S = 1
KEEPALIVE_INTERVAL_S = 1
CONNECT_TIMEOUT_S = 5.0

# Most send buffer the connecting side asks for (the kernel doubles it): room for bandwidth x
# round trip, 0.6 GiB/s x 50 ms is ~32 MB. Memory is only used by data in flight. 0: leave
# autotuning on. FERRY_MIGRATION_SNDBUF (bytes) overrides it: for a longer path, or to compare.
SEND_BUFFER = int(os.environ.get("FERRY_MIGRATION_SNDBUF", 32 << 20))
# Most receive buffer the accepting side asks for (the kernel doubles it, and advertises about half
# of that as window): 1 GiB/s x 50 ms. FERRY_MIGRATION_RCVBUF (bytes) overrides it; 0: autotuning.
RECV_BUFFER = int(os.environ.get("FERRY_MIGRATION_RCVBUF", 64 << 20))
# Bytes/s the data path may reach (above what it does on these machines): the buffer asked for is
# this times the handshake round trip, so a 50 ms path asks for SEND_BUFFER, a 1 ms one for ~1 MiB
# (below autotuning's own reach: nothing is set).
PATH_RATE = 1 << 30

# The receive buffer's size, and the guest-address grid pieces are cut on: a multiple of the RAM
# digest's chunk (agent/migration/pages.DIGEST_CHUNK), so a chunk inside a range is inside one
# piece and hashed from it; small enough to stay in the L2 cache between the copy and the hash.
# Its size within a wide range measured alike (docs/PERFORMANCE.md section 2).
RECV_PIECE = 512 * 1024
# Ranges at least this long on average make a batch go through the buffer. Below, the pages are
# scattered (later rounds) and mostly already allocated: recvmsg_into the mapping saves a pwrite
# per range.
PIECE_MIN_RANGE = 64 * 1024


class PageSink(Protocol):
    """Where a page batch's large ranges go: the memfd behind guest RAM, and a callback per piece."""

    fd: int

    def received(self, offset: int, data: memoryview) -> None:
        """``data`` was just written at guest offset ``offset`` (a piece within one range)."""


class DiskSink(Protocol):
    """Where a DiskBatch's payload goes: the disk image's copy (agent/disk_copy.ImageWriter)."""

    def check(self, ranges: Iterable[tuple[int, int]]) -> None:
        """ValueError for a range outside the disk (nothing is written then)."""

    def write(self, offset: int, data: memoryview) -> None: ...


class GuestRamFull(Exception):
    """The memfd refused guest pages (no space or memory): the destination cannot hold the guest.
    Not an OSError: this host's problem, not the connection's."""

    code = ErrorCode.INSUFFICIENT_MEMORY

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or we shut it down)."""


def _set_io_timeout(sock: socket.socket, seconds: float) -> None:
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def keep_alive(sock: socket.socket, stall_s: float) -> None:
    """TCP keep-alive probes and TCP_USER_TIMEOUT: a peer host that died, or a path that broke,
    drops the connection after about ``stall_s`` (whether we send or wait). Best effort: an
    option this kernel lacks leaves the progress deadline alone to do the job."""
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), KEEPALIVE_IDLE_S),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), KEEPALIVE_INTERVAL_S),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), max(1, int(stall_s / KEEPALIVE_INTERVAL_S))),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), max(1, int(stall_s * 1000)))]
    for level, opt, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)


def set_stall_timeout(sock: socket.socket, stall_s: float) -> None:
    """The progress deadline of every blocking call on ``sock``, and the keep-alive that goes with it."""
    _set_io_timeout(sock, stall_s)
    keep_alive(sock, stall_s)


def prepare_socket(sock: socket.socket, io_timeout: float = IO_TIMEOUT_S) -> socket.socket:
    """Blocking mode with kernel timeouts and keep-alive, no Nagle delay (READY/COMMIT are tiny and latency-bound)."""
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_stall_timeout(sock, io_timeout)
    return sock


def _sysctl_max(name: str) -> int:
    """The last number of a /proc/sys value (the max of tcp_wmem, or wmem_max itself); 0 if unreadable."""
    try:
        with open(f"/proc/sys/net/{name}") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _big_buffer(sock: socket.socket, size: int, send: bool = True) -> None:
    """Ask for a ``size``-byte send (or receive) buffer, silently keeping autotuning when that
    would not be larger.

    A fixed SO_SNDBUF (SO_RCVBUF) turns that buffer's autotuning off for the socket, so it is
    only set when it beats what autotuning may reach (``tcp_wmem`` / ``tcp_rmem`` max). The
    FORCE option passes ``wmem_max`` / ``rmem_max`` but needs CAP_NET_ADMIN; without it the
    plain option is capped there (the kernel doubles either value for its bookkeeping).
    """
    if send:
        autotune, cap, plain, force = "ipv4/tcp_wmem", "core/wmem_max", socket.SO_SNDBUF, _SO_SNDBUFFORCE
    else:
        autotune, cap, plain, force = "ipv4/tcp_rmem", "core/rmem_max", socket.SO_RCVBUF, _SO_RCVBUFFORCE
    autotune_max = _sysctl_max(autotune)
    if 2 * size <= autotune_max:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
        return
    except OSError:
        pass  # not privileged: the plain option, if its cap still beats autotuning
    if 2 * min(size, _sysctl_max(cap)) > autotune_max:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _buffer_for_path(sock: socket.socket, most: int) -> int:
    """Bytes in flight the path wants: its handshake round trip x PATH_RATE, at most ``most``.
    An unknown round trip (no TCP_INFO) gets ``most``: a long path is the costly miss."""
    rtt = handshake_rtt(sock)
    return most if rtt is None else min(most, int(rtt * PATH_RATE))


def connect(addr: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S,
            io_timeout: float = IO_TIMEOUT_S) -> socket.socket:
    """A connected, prepared socket to ``addr``, with a send buffer sized for the path's round trip."""
    sock = socket.create_connection(addr, timeout=timeout)
    if SEND_BUFFER:
        _big_buffer(sock, _buffer_for_path(sock, SEND_BUFFER), send=True)
    return prepare_socket(sock, io_timeout)


def accepted(sock: socket.socket, io_timeout: float = IO_TIMEOUT_S) -> socket.socket:
    """An accepted socket, prepared, with a receive buffer sized for the path's round trip."""
    if RECV_BUFFER:
        _big_buffer(sock, _buffer_for_path(sock, RECV_BUFFER), send=False)
    return prepare_socket(sock, io_timeout)


def handshake_rtt(sock: socket.socket) -> float | None:
    """The kernel's round-trip estimate of a just-connected TCP socket (from the SYN exchange), seconds."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return float(struct.unpack_from("I", info, _TCPI_RTT_OFFSET)[0]) / 1e6
    except (OSError, AttributeError, struct.error):
        return None


# struct tcp_info (linux/tcp.h): eight u8 fields, then u32 tcpi_rto ... tcpi_rcv_ssthresh, tcpi_rtt (microseconds).
_TCPI_RTT_OFFSET = 8 + 15 * 4


class Connection:
    """Proto frames over one blocking socket; counts the bytes it moves.

    Every frame goes through ``channel`` (proto.channel): once a session has
    called ``start(machine)`` after the handshake, ``send`` and ``recv`` also
    check and step the role's state machine, and an out-of-order message is
    refused by its header, before its body or payload is read.

    agent/migration/tls.py's TLSConnection overrides ``_sendmsg_all``, ``_recv_scatter``,
    ``_recv_exact``, ``next_frame_is`` and ``shutdown`` (an SSLSocket has no sendmsg/recvmsg_into): keep their
    signatures, or change both classes together.
    """

    def __init__(self, sock: socket.socket, guest_size: int | None = None) -> None:
        self.sock = sock
        self.channel = Channel(guest_size=guest_size)
        self.sent = 0
        self.received = 0
        self._hdr = bytearray(HEADER_SIZE)
        self._piece_buf: memoryview | None = None  # the receive buffer of _take, made on first use
        self.packer: compression.Packer | None = None  # the sender's compression and bandwidth cap
        self._inflater = compression.Inflater()
        self._closed = False
        self.stall_s = _io_timeout_of(sock)  # the progress deadline of each blocking call

    def set_stall_timeout(self, seconds: float) -> None:
        """Change the progress deadline of every later blocking call (and the keep-alive)."""
        set_stall_timeout(self.sock, seconds)
        self.stall_s = seconds

    @property
    def guest_size(self) -> int | None:
        """The guest RAM size page ranges are checked against (None: not agreed yet)."""
        return self.channel.guest_size

    @guest_size.setter
    def guest_size(self, size: int | None) -> None:
        self.channel.guest_size = size

    def start(self, machine: Machine) -> None:
        """From now on every message sent or received steps ``machine`` (call after the handshake)."""
        self.channel.start(machine)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Send one message without payload."""
        self._send_frame(self.channel.send(msg))

    def send_error(self, msg: ErrorResponse) -> None:
        """Tell the peer why we give up the connection, whatever the state (nothing may follow)."""
        self._send_frame(self.channel.send_error(msg))

    def _send_frame(self, frame: bytes) -> None:
        self._io(self.sock.sendall, frame)
        self.sent += len(frame)

    def send_pages(self, ram: memoryview, ranges: Sequence[tuple[int, int]],
                   zeros: Sequence[tuple[int, int]] = ()) -> int:
        """Send one page batch: frame, then each data range straight from guest RAM. Returns wire bytes."""
        views: list[memoryview | bytes] = [ram[a:b] for a, b in ranges]
        try:
            return self.send_batch(PageBatch(tuple(ranges), tuple(zeros)), views)
        finally:
            for v in views:
                if isinstance(v, memoryview):
                    v.release()

    def send_disk(self, ranges: Sequence[tuple[int, int]], zeros: Sequence[tuple[int, int]],
                  pieces: Sequence[memoryview]) -> int:
        """Send one batch of a disk image: frame, then each data range's bytes (``pieces``, in
        order, as read from the image). Returns wire bytes."""
        return self.send_batch(DiskBatch(tuple(ranges), tuple(zeros)), list(pieces))

    def send_batch(self, batch: RangeBatch, pieces: list[memoryview | bytes]) -> int:
        """A batch and its data ranges' bytes (``pieces``, in order), through ``packer`` when one is
        set (compression, the bandwidth cap: agent/migration/compression.py). Returns wire bytes."""
        return self._send_raw(batch, pieces) if self.packer is None else self.packer.send(batch, pieces, self._send_raw)

    def _send_raw(self, batch: RangeBatch, pieces: list[memoryview | bytes]) -> int:
        total = self._sendmsg_all([self.channel.send(batch), *pieces])
        self.sent += total
        return total

    def _sendmsg_all(self, bufs: list[memoryview | bytes]) -> int:
        """sendmsg every buffer, IOV_MAX at a time, resuming after partial sends."""
        total = 0
        i = 0
        while i < len(bufs):
            chunk = bufs[i:i + IOV_MAX]
            n = self._io(self.sock.sendmsg, chunk)
            total += n
            i, rest = _advance(chunk, n, i)
            if rest is not None:
                bufs[i] = rest
        return total

    # -- receiving -------------------------------------------------------------------------------
    def recv(self, ram: memoryview | None = None, sink: PageSink | None = None,
             disk: DiskSink | None = None) -> Message:
        """Receive one message; a page batch's payload goes into guest RAM: ``ram`` (the
        mapping), or through ``sink`` (the memfd behind it) when its ranges are large; a disk
        batch's into ``disk``. Without either a frame that carries data is refused by its header."""
        self._recv_exact(memoryview(self._hdr))
        takes_data = ram is not None or disk is not None
        header = self.channel.receive_header(self._hdr, max_payload=None if takes_data else 0)
        body = bytearray(header.body_len)
        self._recv_exact(memoryview(body))
        msg = self.channel.receive_body(header, body)
        if not isinstance(msg, RangeBatch) or not msg.ranges and not isinstance(msg, DiskBatch):
            return msg
        # A compressed payload is read and inflated whole first: nothing is written unless it checks out.
        take = self._inflater.inflate(msg, self._recv_exact) if msg.compressed else self._take
        if isinstance(msg, DiskBatch):
            self._recv_disk(msg, disk, take)
        elif ram is None:
            raise RemoteProtocolError("page data on a connection that takes none")
        elif sink is not None and (msg.compressed or msg.payload_len >= PIECE_MIN_RANGE * len(msg.ranges)):
            self._recv_pieces(sink, msg.payload_targets(), take)
        elif msg.compressed:
            compression.scatter(take, ram, msg.payload_targets())
        else:
            self._recv_scatter(ram, msg.payload_targets())
        return msg

    def next_frame_is(self, cls: type[Message]) -> bool:
        """True when the next frame's header has arrived already and announces a ``cls``.

        A peek: it neither waits nor consumes, and any doubt (less than a header buffered, a
        bad header) is False; the next ``recv`` reads and checks the frame as always.
        """
        try:
            head = self.sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return len(head) == HEADER_SIZE and message_class(parse_header(head)) is cls
        except (OSError, ProtocolError):
            return False

    def _take(self, n: int) -> memoryview:
        """The next ``n`` (at most RECV_PIECE) bytes of a payload, received into the one buffer."""
        if self._piece_buf is None:
            self._piece_buf = memoryview(bytearray(RECV_PIECE))
        piece = self._piece_buf[:n]
        self._recv_exact(piece)
        return piece

    def _recv_pieces(self, sink: PageSink, targets: list[tuple[int, int]], take: Callable[[int], memoryview]) -> None:
        """Receive a batch payload piece by piece (``take``: into one buffer, or from an inflated
        payload), ``pwrite`` each piece to the memfd, and hand it to ``sink.received`` while it is
        still in the cache. Pieces are cut on the RECV_PIECE grid of guest addresses."""
        for off, length in targets:
            pos, end = off, off + length
            while pos < end:
                n = min(end, (pos // RECV_PIECE + 1) * RECV_PIECE) - pos
                piece = take(n)
                _pwrite_all(sink.fd, piece, pos)
                sink.received(pos, piece)
                pos += n

    def _recv_disk(self, msg: DiskBatch, disk: DiskSink | None, take: Callable[[int], memoryview]) -> None:
        """Check a disk batch's ranges against the disk, then write its payload piece by piece
        (its zeros are the caller's: holes punched, not bytes received)."""
        if disk is None:
            raise RemoteProtocolError("disk data on a connection that copies no disk")
        try:
            disk.check(msg.ranges)
            disk.check(msg.zeros)
        except ValueError as e:
            raise RemoteProtocolError(f"DiskBatch: {e}") from None
        for off, length in msg.payload_targets():
            pos, end = off, off + length
            while pos < end:
                piece = take(min(end - pos, RECV_PIECE))
                disk.write(pos, piece)
                pos += len(piece)

    def _recv_scatter(self, ram: memoryview, targets: list[tuple[int, int]]) -> None:
        """Receive a batch payload into its guest offsets: one ``recvmsg_into`` per IOV_MAX ranges,
        so a batch of scattered single pages costs a few syscalls, not one per page."""
        views = [ram[off:off + length] for off, length in targets]
        try:
            i = 0
            while i < len(views):
                chunk = views[i:i + IOV_MAX]
                n = self._io(self.sock.recvmsg_into, chunk, 0, socket.MSG_WAITALL)[0]
                if n == 0:
                    raise ConnectionClosed("the peer closed the connection")
                self.received += n
                i, rest = _advance(chunk, n, i)  # a short read (signal, timeout) resumes mid-buffer
                if rest is not None:
                    views[i] = rest
        finally:
            for v in views:
                v.release()

    def _recv_exact(self, buf: memoryview) -> None:
        """Fill ``buf`` completely from the socket."""
        got = 0
        n_total = len(buf)
        while got < n_total:
            n = self._io(self.sock.recv_into, buf[got:], n_total - got, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionClosed("the peer closed the connection")
            got += n
        self.received += n_total

    # -- plumbing --------------------------------------------------------------------------------
    def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one socket call; a kernel timeout becomes TimeoutError, a shut-down socket ConnectionClosed."""
        try:
            return fn(*args)
        except BlockingIOError:
            raise TimeoutError(f"the peer stalled: nothing moved on the connection for {self.stall_s:g} s "
                               "(stall-timeout)") from None
        except OSError as e:
            if self._closed:
                raise ConnectionClosed("connection shut down") from e
            raise

    def linger(self, seconds: float) -> None:
        """After a last message sent in mid-stream (an Abort): stop sending, and read and drop what
        the peer still sends until it closes, for at most ``seconds``. Closing with its data unread
        would reset the connection, and a reset can reach the peer before it read that message."""
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + seconds
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if self.sock.recv_into(buf) == 0:
                    return
        except OSError:  # the peer is gone, or took long: nothing more to do either way
            pass

    def shutdown(self) -> None:
        """Wake every thread blocked on this connection; safe from any thread, idempotent."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def _io_timeout_of(sock: socket.socket) -> float:
    """The kernel receive timeout set on ``sock`` (seconds), or its Python timeout (a TLS socket)."""
    try:
        timeout = sock.gettimeout()
        if timeout is not None:
            return float(timeout)
        sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    except (OSError, AttributeError, struct.error):  # not a kernel socket (a test's stand-in)
        return IO_TIMEOUT_S
    return sec + usec / 1e6 or IO_TIMEOUT_S


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a memfd that cannot take it raises GuestRamFull."""
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT):
                raise GuestRamFull(f"guest RAM cannot be stored on the destination: {os.strerror(e.errno)}") from e
            raise


def _advance(chunk: Sequence[memoryview | bytes], n: int, i: int) -> tuple[int, memoryview | None]:
    """After sending ``n`` bytes of ``chunk`` (starting at index ``i``): next index, and the
    unsent tail of a partly sent buffer (to put back at that index) or None."""
    for b in chunk:
        ln = len(b)
        if n < ln:
            return i, memoryview(b)[n:]
        n -= ln
        i += 1
    return i, None
