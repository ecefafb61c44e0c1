"""Compressed page and disk batches (zstd): the sender's Packer and the receiver's Inflater.

The sender (``Packer``, on the source's Connection) sees every RangeBatch on
its way out: with ``--compress zstd`` it compresses each batch's payload, with
``auto`` only while the measured figures say it pays (compress_policy.pays),
and with ``none`` never. A batch whose compressed form is not smaller goes
raw. Zero pages never reach it: they stay ranges without payload. The Packer
also applies the operator's bandwidth cap (ratelimit.RateLimiter) to the bytes
that go on the wire, compressed or not, so compression is what lets a capped
link carry more pages per second.

``auto`` decides at each round's start from the figures of the batches before,
and again every ``DECIDE_EVERY`` batches inside a long round (round 0 of a big
guest over a thin link takes minutes). While it compresses, every batch
measures the compressed share and the speed; while it does not, the first
``SAMPLE_BYTES`` of each stretch are compressed to measure them and thrown
away (the batch goes raw): what the guest holds at that point decides, random pages turn
it off, pages that compress turn it on. The link's rate is the wire bytes over
the time the sends took, bounded by the cap.

The receiver (``Inflater``) reads a compressed payload whole, inflates it into
one reused buffer bounded by the size the batch's ranges declare (never more:
a decompression bomb stops there), and only when it inflated to exactly that
size hands it on to be written: a payload that does not is a protocol error
before any byte reached guest RAM or the disk. The zstd frame carries no
checksum: pages are compressed while the guest may write them (the round
after resends those), and zstd's checksum of racing input would not match;
like raw pages, a corrupted payload that still inflates to the right size is
caught by the RAM digest at the end (docs/protocol.md).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import zstandard

from agent.migration import compress_policy
from agent.migration.compress_policy import Sample
from agent.migration.info import COMPRESS_MODES
from agent.migration.ratelimit import RateLimiter
from proto.errors import RemoteProtocolError
from proto.limits import COMPRESSION_VERSION, PAGE_SIZE
from proto.messages import RangeBatch

if TYPE_CHECKING:
    from agent.migration.info import MigrationInfo, MigrationParams

MODES = COMPRESS_MODES
# zstd's fastest positive level: on these machines it compresses pages that hold little at
# gigabytes a second, random pages at a few hundred MB/s (docs/PERFORMANCE.md section 17).
LEVEL = 1
# auto: the stretch of batches one decision holds for, and the bytes compressed only to measure at
# its start when it does not compress (a few ms of zstd per stretch of 128 MiB, on random pages).
DECIDE_EVERY = 32
SAMPLE_BYTES = compress_policy.MIN_SAMPLE_BYTES

Piece = memoryview | bytes


# The pace at which a destination is assumed to inflate, write and hash pages, at the least (bytes/s
# of pages): a wait for its answer behind compressed batches grows by their bytes at this pace.
APPLY_SPEED = 50e6


class _Limiter(Protocol):
    def take(self, nbytes: int) -> None: ...


class _Waits(Protocol):
    """A connection whose waits have a progress deadline (transport.Connection)."""

    stall_s: float

    def set_stall_timeout(self, seconds: float) -> None: ...


@dataclass(slots=True)
class CompressionStats:
    """The compression part of a migration's figures (query-migrate's ``compression``, QEMU's
    names where they exist): pages sent compressed, their compressed bytes, and raw over
    compressed bytes (``compression-rate``); ferry's own: the mode, whether ``auto`` compresses
    at the moment, the raw bytes those pages stand for, the time spent compressing, and the
    link's own rate as auto judged it last."""

    mode: str = "auto"
    active: bool = False
    pages: int = 0
    raw_size: int = 0
    compressed_size: int = 0
    seconds: float = 0.0
    link_rate: float = 0.0  # bytes/s of the link itself as auto judged it last (0: not known)

    def to_dict(self) -> dict[str, Any]:
        rate = self.raw_size / self.compressed_size if self.compressed_size else 0.0
        return {"mode": self.mode, "active": self.active, "pages": self.pages,
                "compressed-size": self.compressed_size, "raw-size": self.raw_size,
                "compression-rate": round(rate, 3), "compress-time": int(round(self.seconds * 1000)),
                "link-rate": int(self.link_rate)}


def effective_mode(mode: str, version: int) -> str:
    """The mode a connection of protocol ``version`` can carry: an older peer gets ``none``."""
    return mode if version >= COMPRESSION_VERSION else "none"


def packer(params: MigrationParams, version: int, info: MigrationInfo, stop: threading.Event,
           sock: socket.socket | None = None) -> Packer:
    """The packer of a source session's connection (``sock``) of protocol ``version``: its mode
    (``none`` towards an older peer), the bandwidth cap (``stop`` interrupts its waits), the
    figures kept in ``info``."""
    stats = info.compression = CompressionStats()
    limiter = RateLimiter(params.bandwidth, stop) if params.bandwidth else None
    probe = None if sock is None else (lambda: tcp_held(sock))
    return Packer(effective_mode(params.compress, version), stats, limiter, params.bandwidth, probe=probe)


# struct tcp_info (linux/tcp.h, Linux 4.10 on): u64 tcpi_busy_time, tcpi_rwnd_limited (microseconds).
_TCPI_BUSY = struct.Struct("QQ")
_TCPI_BUSY_OFFSET = 168


def tcp_held(sock: socket.socket) -> tuple[int, int] | None:
    """The kernel's account of a sending socket: microseconds it was busy sending, and of those
    the ones the receiver's window held it back (the receiving application was the limit, not
    the path). None where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BUSY_OFFSET + _TCPI_BUSY.size)
        if len(info) < _TCPI_BUSY_OFFSET + _TCPI_BUSY.size:
            return None
        busy, rwnd = _TCPI_BUSY.unpack_from(info, _TCPI_BUSY_OFFSET)
    except (OSError, AttributeError, struct.error):
        return None
    return int(busy), int(rwnd)


class Packer:
    """The sending side: compresses batches when asked or when it pays, applies the cap."""

    def __init__(self, mode: str, stats: CompressionStats, limiter: _Limiter | None = None,
                 cap: float | None = None, level: int = LEVEL,
                 probe: Callable[[], tuple[int, int] | None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"compress must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.stats = stats
        stats.mode, stats.active = mode, mode == "zstd"
        self._limiter = limiter
        self._cap = cap
        self._cctx = zstandard.ZstdCompressor(level=level) if mode != "none" else None
        self._batches = 0  # in the current stretch
        self._unapplied = 0  # bytes of pages sent compressed since the destination's last answer
        self._to_sample = SAMPLE_BYTES  # raw bytes still to compress only to measure, this stretch
        self._sample: Sample | None = None  # the latest stretch's compressed batches
        self._window = [0, 0, 0.0]  # this stretch: raw bytes compressed, their compressed bytes, seconds
        self._link = [0, 0.0]  # this stretch: wire bytes sent, seconds in the sends
        self._link_rate: float | None = None
        # The kernel's account of the connection (tcp_held): the receiver's share of the send time.
        self._probe = probe
        self._held: tuple[int, int] | None = probe() if probe is not None else None
        self._receiver_share: float | None = None

    def sibling(self, sock: socket.socket | None = None) -> Packer:
        """The packer of another stream of the same migration (on ``sock``): its own compressor
        and link figures (a zstd context is one thread's), the same figures in the JSON and the
        same bandwidth cap, which all streams share."""
        probe = None if sock is None else (lambda: tcp_held(sock))
        twin = Packer(self.mode, self.stats, self._limiter, self._cap, probe=probe)
        twin.stats.active = self.stats.active
        return twin

    @contextlib.contextmanager
    def draining(self, conn: _Waits | None) -> Iterator[None]:
        """Around a wait for the destination's answer behind the batches (SyncAck, Ready): a
        compressed batch is small on the wire and large in work, so a receive buffer's worth of
        them is seconds of inflating and writing there, with no byte moving meanwhile; the wait's
        progress deadline grows by the bytes sent compressed since the last answer, at
        APPLY_SPEED. (Raw batches need no such thing: the path's buffers bound them.)"""
        extra, base = self._unapplied / APPLY_SPEED, conn.stall_s if conn is not None else 0.0
        if conn is not None and extra > 0:
            conn.set_stall_timeout(base + extra)
        try:
            yield
        finally:
            self._unapplied = 0
            if conn is not None and extra > 0:
                conn.set_stall_timeout(base)

    def new_round(self) -> None:
        """A round starts: decide from the figures so far, sample again."""
        self._decide()

    def send(self, batch: RangeBatch, pieces: list[Piece], send_raw: Callable[[RangeBatch, list[Piece]], int]) -> int:
        """Send ``batch`` with its payload ``pieces`` through ``send_raw`` (frame and payload as
        given), compressed when this packer wants it. Returns wire bytes."""
        # The first sample decides at once: a capped round 0 need not send a stretch raw first.
        if self.mode == "auto" and (self._batches >= DECIDE_EVERY or self._sample is None and self._to_sample <= 0):
            self._decide()
        self._batches += 1
        raw = batch.payload_len
        if raw and self._cctx is not None and self.stats.active:
            batch, pieces = self._compress(batch, pieces, raw)
        elif raw and self._cctx is not None and self._to_sample > 0:
            self._measure(pieces)
        if self._limiter is not None:
            self._limiter.take(batch.compressed or raw)
        t = time.monotonic()
        wire = send_raw(batch, pieces)
        self._link[0] += wire
        self._link[1] += time.monotonic() - t
        return wire

    def _compress(self, batch: RangeBatch, pieces: list[Piece], raw: int) -> tuple[RangeBatch, list[Piece]]:
        assert self._cctx is not None
        t = time.monotonic()
        if len(pieces) == 1:
            out = [self._cctx.compress(pieces[0])]
        else:
            cobj = self._cctx.compressobj(size=raw)
            out = [cobj.compress(p) for p in pieces]
            out.append(cobj.flush())
        seconds = time.monotonic() - t
        size = sum(map(len, out))
        w = self._window
        w[0], w[1], w[2] = w[0] + raw, w[1] + min(size, raw), w[2] + seconds
        self.stats.seconds += seconds
        if size >= raw:  # incompressible: raw costs the receiver nothing
            return batch, pieces
        self.stats.pages += raw // PAGE_SIZE
        self._unapplied += raw
        self.stats.raw_size += raw
        self.stats.compressed_size += size
        return type(batch)(batch.ranges, batch.zeros, compressed=size), [p for p in out if p]

    def _measure(self, pieces: list[Piece]) -> None:
        """Compress the first bytes of ``pieces`` (what is left of this stretch's sample) only to
        measure how well and how fast they compress."""
        assert self._cctx is not None
        t = time.monotonic()
        cobj = self._cctx.compressobj()
        size = taken = 0
        for p in pieces:
            part = memoryview(p)[:self._to_sample - taken]
            size += len(cobj.compress(part))
            taken += len(part)
            if taken >= self._to_sample:
                break
        size += len(cobj.flush())
        seconds = time.monotonic() - t
        self._to_sample -= taken
        w = self._window
        w[0], w[1], w[2] = w[0] + taken, w[1] + min(size, taken), w[2] + seconds
        self.stats.seconds += seconds

    def _decide(self) -> None:
        """End a stretch: keep its figures, decide whether the next one compresses."""
        raw, packed, seconds = self._window
        if raw >= compress_policy.MIN_SAMPLE_BYTES:
            self._sample = Sample(int(raw), int(packed), float(seconds))
        sent, secs = self._link
        held = self._probe() if self._probe is not None else None
        if sent >= compress_policy.MIN_LINK_BYTES and secs > 0:  # while it compresses well, rarely: the cap bounds it
            self._link_rate = sent / secs
            if held is not None and self._held is not None and held[0] > self._held[0]:
                self._receiver_share = (held[1] - self._held[1]) / (held[0] - self._held[0])
        self._held = held
        if self.mode == "auto":
            self.stats.active = compress_policy.pays(self._sample, self._link_rate, self._cap, self._receiver_share)
        wire = compress_policy.wire_time(self._link_rate, self._cap, self._receiver_share)
        self.stats.link_rate = 1.0 / wire if wire else 0.0
        self._batches = 0
        self._to_sample = SAMPLE_BYTES
        self._window = [0, 0, 0.0]
        self._link = [0, 0.0]


class Inflater:
    """The receiving side: a compressed payload in, its checked raw bytes out (reused buffers)."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._in = bytearray()
        self._out = bytearray()

    def inflate(self, batch: RangeBatch, fill: Callable[[memoryview], None]) -> Callable[[int], memoryview]:
        """Read ``batch``'s compressed payload with ``fill`` (fills a buffer from the connection),
        inflate it, and return ``take(n)``: the next ``n`` bytes of the raw payload, in order.
        RemoteProtocolError unless it inflates to exactly the ranges' size."""
        size, raw = batch.compressed, batch.payload_len
        if len(self._in) < size:
            self._in = bytearray(size)
        if len(self._out) < raw + 1:  # one more byte: room to see a payload that inflates past
            self._out = bytearray(raw + 1)
        src = memoryview(self._in)[:size]
        fill(src)
        out = memoryview(self._out)[:raw + 1]
        got = self._inflate(type(batch).__name__, src, out)
        if got != raw:
            raise RemoteProtocolError(f"{type(batch).__name__}: compressed payload inflates to "
                                      f"{'more than ' if got > raw else ''}{min(got, raw)} bytes, "
                                      f"its ranges need {raw}")
        return _Cursor(out[:raw]).take

    def _inflate(self, name: str, src: memoryview, out: memoryview) -> int:
        """Inflate ``src`` into ``out``, at most ``len(out)`` bytes; the bytes written."""
        got = 0
        try:
            with self._dctx.stream_reader(src, read_across_frames=False) as reader:
                while got < len(out):
                    n = reader.readinto(out[got:])
                    if not n:
                        break
                    got += n
        except zstandard.ZstdError as e:
            raise RemoteProtocolError(f"{name}: compressed payload does not decompress: {e}") from None
        return got


class _Cursor:
    """Hands out a buffer's bytes in order."""

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0

    def take(self, n: int) -> memoryview:
        piece = self._buf[self._pos:self._pos + n]
        self._pos += n
        return piece


def scatter(take: Callable[[int], memoryview], ram: memoryview, targets: Sequence[tuple[int, int]]) -> None:
    """Copy an inflated page payload into guest RAM's mapping at its targets."""
    for off, length in targets:
        ram[off:off + length] = take(length)
