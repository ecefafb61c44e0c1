"""When compressing page batches pays: a pure function of measured figures.

A batch sent raw costs its bytes over the link; compressed, it costs the
compression on the source, its smaller bytes over the link, and the
decompression on the destination (the three run one after the other for a
batch: one sending thread, one receiving thread). Per raw byte, with ``ratio``
the compressed share of the bytes, compression pays when::

    ratio / link + 1 / compress_speed + 1 / DECOMPRESS_SPEED < 1 / link

i.e. when the link is slower than what compression saves. On loopback the
link moves gigabytes a second and compression never pays; over a 50 MB/s cap
a guest whose pages compress to a tenth gains almost 10x; random pages
(``ratio`` near 1) never pay, whatever the link.

The figures come from the sender (agent/migration/compression.py): the
compressed share and speed measured on the batches it compressed, the link
rate from the time its sends took (and the operator's bandwidth cap, which
bounds it). Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# The destination's zstd decompression speed assumed by the source (bytes/s of output), which
# never sees it: below what it measured on these machines for pages that compress (into the
# reused buffer, docs/PERFORMANCE.md section 17), so the estimate errs towards not compressing.
DECOMPRESS_SPEED = 800e6
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


def pays(sample: Sample | None, link_rate: float | None) -> bool:
    """True when compressing the next batches saves time: the link (bytes/s; None: not measured
    yet) is slower than what compression at ``sample``'s ratio and speed saves. Without a
    sample, or a link rate, the answer is no: raw batches cost nothing to try."""
    if sample is None or sample.raw < MIN_SAMPLE_BYTES or not link_rate or link_rate <= 0:
        return False
    raw_s = 1.0 / link_rate
    packed_s = sample.ratio / link_rate + 1.0 / sample.speed + 1.0 / DECOMPRESS_SPEED
    return packed_s < raw_s * (1.0 - MARGIN)


def link_rate(measured: float | None, cap: float | None) -> float | None:
    """The link's rate for the decision: the measured send rate, bounded by the operator's cap
    (the sender never goes faster); either alone when the other is unknown."""
    if measured is None or measured <= 0:
        return cap
    return measured if cap is None else min(measured, cap)
