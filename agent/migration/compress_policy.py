"""When compressing page batches pays: a pure function of measured figures.

A batch sent raw costs its bytes over the link; compressed, it costs the
compression on the source, its smaller bytes over the link, and the
decompression on the destination (the three run one after the other for a
batch: one sending thread, one receiving thread). Per raw byte, with ``ratio``
the compressed share of the bytes and ``wire`` the link's time per byte,
compression pays when::

    ratio * wire + 1 / compress_speed + 1 / DECOMPRESS_SPEED < wire

i.e. when the link is slower than what compression saves. Under a bandwidth
cap, ``wire`` is the cap's (the sender waits for it; the destination's own
work on the pages overlaps the wait). Without one, the rate the sends
measured includes the time the destination's own work on the pages (writing
them to the memfd, hashing them) held the sender back, which compression
does not remove: the kernel counts it (TCP_INFO's rwnd_limited, the share of
the connection's busy time the receiver's window was the limit), and that
share is taken out; where the kernel does not say, the work is taken to go at
``RECEIVE_SPEED``. So on loopback, where the receiver is the limit, compression
never pays; over a 50 MB/s cap a guest whose pages compress to a tenth gains
almost 10x; random pages (``ratio`` near 1) never pay, whatever the link.

The figures come from the sender (agent/migration/compression.py): the
compressed share and speed measured on the batches it compressed, the send
rate from the time its sends took, the receiver's share from the kernel, and
the operator's cap. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# The destination's zstd decompression speed assumed by the source (bytes/s of output), which
# never sees it: below what it measured on these machines for pages that compress (into the
# reused buffer, docs/PERFORMANCE.md section 17), so the estimate errs towards not compressing.
DECOMPRESS_SPEED = 800e6
# The destination's write and hash of raw pages (bytes/s), part of any uncapped send rate, when
# the kernel does not say how long the receiver held the sender back.
RECEIVE_SPEED = 1e9
# Compression must win by this share of the raw time: a near tie is not worth the CPU.
MARGIN = 0.1
# Fewer raw bytes than this measured is no sample (a few scattered pages say little).
MIN_SAMPLE_BYTES = 1 << 20
# Fewer wire bytes than this is no measure of the link: the first megabytes fill the socket's
# buffers at memory speed, whatever the link behind them.
MIN_LINK_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class Sample:
    """What compression did to some batches: ``raw`` bytes in, ``compressed`` out, in ``seconds``."""

    raw: int
    compressed: int
    seconds: float

    @property
    def ratio(self) -> float:
        """The compressed share of the bytes (0.1: a tenth of them went on the wire)."""
        return self.compressed / self.raw if self.raw else 1.0

    @property
    def speed(self) -> float:
        """Raw bytes compressed per second (inf for a sample too quick to time)."""
        return self.raw / self.seconds if self.seconds > 0 else float("inf")


def wire_time(measured: float | None, cap: float | None, receiver_share: float | None = None) -> float | None:
    """Seconds per byte the link itself takes: the cap's when it is the bound, else the measured
    send rate's less the destination's own work (``receiver_share``: of the send time, the share
    the receiver held the sender back; None: unknown, RECEIVE_SPEED's then). None: unknown, or
    nothing left for the link."""
    if cap is not None and (measured is None or cap <= measured):
        return 1.0 / cap
    if measured is None or measured <= 0:
        return None
    if receiver_share is None:
        wire = 1.0 / measured - 1.0 / RECEIVE_SPEED
    else:
        wire = (1.0 - min(max(receiver_share, 0.0), 1.0)) / measured
    return wire if wire > 0 else None


def pays(sample: Sample | None, measured: float | None, cap: float | None = None,
         receiver_share: float | None = None) -> bool:
    """True when compressing the next batches saves time: the link (the send rate ``measured``
    in bytes/s, None: not yet, with the receiver's share of it; the operator's ``cap``) is slower
    than what compression at ``sample``'s ratio and speed saves. Without a sample or a link the
    answer is no: raw batches cost nothing to try."""
    wire = wire_time(measured, cap, receiver_share)
    if sample is None or sample.raw < MIN_SAMPLE_BYTES or wire is None:
        return False
    packed = sample.ratio * wire + 1.0 / sample.speed + 1.0 / DECOMPRESS_SPEED
    return packed < wire * (1.0 - MARGIN)
