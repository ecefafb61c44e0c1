"""Micro-benchmark of the wire protocol: encode/decode cost per page batch.

Measures what the migration data path pays per frame besides moving payload
bytes: ``encode`` on the source; ``parse_header`` + ``decode_body`` (range
checks against the guest) + ``payload_targets`` on the destination. Prints a
Markdown table of medians of this thread's CPU time (``time.thread_time``), so
the figures hold on shared cores. Run: ``python -m bench.bench_proto [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import proto

GUEST = 4 << 30  # a 4 GiB guest: ranges spread over it
P = proto.PAGE_SIZE


def scattered(count: int, stride_pages: int = 3) -> proto.PageBatch:
    """``count`` single-page data ranges with gaps: the worst case for range handling."""
    return proto.PageBatch(tuple((i * stride_pages * P, (i * stride_pages + 1) * P) for i in range(count)))


def contiguous(pages: int) -> proto.PageBatch:
    """One range of ``pages`` pages: the best case."""
    return proto.PageBatch(((0, pages * P),))


def mixed(count: int) -> proto.PageBatch:
    """Alternating data and zero pages (a touched-but-zeroed region)."""
    data = tuple((2 * i * P, (2 * i + 1) * P) for i in range(count))
    zeros = tuple(((2 * i + 1) * P, (2 * i + 2) * P) for i in range(count))
    return proto.PageBatch(data, zeros)


def decode(frame: bytes) -> list[tuple[int, int]]:
    """The destination's work for one frame (payload excluded)."""
    header = proto.check_header(proto.parse_header(frame))
    batch = proto.decode_body(header, memoryview(frame)[proto.HEADER_SIZE :], guest_size=GUEST)
    assert isinstance(batch, proto.PageBatch)
    return batch.payload_targets()


def median_seconds(fn: Callable[[], object], runs: int, inner: int) -> float:
    """Median CPU seconds of this thread per call: the cost on the data path's own thread,
    and stable when other processes share the cores (wall time would count their turns)."""
    samples = []
    for _ in range(runs):
        start = time.thread_time()
        for _ in range(inner):
            fn()
        samples.append((time.thread_time() - start) / inner)
    return statistics.median(samples)


def row(name: str, batch: proto.PageBatch, runs: int) -> str:
    frame = proto.encode(batch)
    inner = max(1, 2000 // max(1, len(batch.ranges) + len(batch.zeros)))
    enc = median_seconds(lambda: proto.encode(batch), runs, inner)
    dec = median_seconds(lambda: decode(frame), runs, inner)
    count = len(batch.ranges) + len(batch.zeros)
    per_range = f"{(enc + dec) / count * 1e9:.0f}" if count >= 100 else "-"  # fixed costs dominate below
    ceiling = batch.payload_len / dec / (1 << 30) if batch.payload_len else float("nan")
    return (
        f"| {name} | {len(batch.ranges)}+{len(batch.zeros)} | {batch.payload_len >> 20} MiB | {len(frame)} B "
        f"| {enc * 1e6:.0f} | {dec * 1e6:.0f} | {per_range} | {ceiling:.0f} |"
    )


def control_row(runs: int) -> str:
    """A small control message through the buffered Decoder, for scale."""
    req = proto.Request(42, "vm-info", {"name": "vm1", "verbose": True})
    frame = proto.encode(req)

    def buffered_decode() -> None:
        dec = proto.Decoder()
        dec.receive_data(frame)
        dec.next_event()

    enc = median_seconds(lambda: proto.encode(req), runs, 2000)
    dec = median_seconds(buffered_decode, runs, 2000)
    return f"| control Request (buffered Decoder) | - | - | {len(frame)} B | {enc * 1e6:.1f} | {dec * 1e6:.1f} | - | - |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller batches")
    args = parser.parse_args()
    runs = 3 if args.quick else 9
    cases = [
        ("scattered 1-page ranges", scattered(1024 if args.quick else proto.MAX_RANGES)),
        ("scattered 1-page ranges", scattered(256)),
        ("data/zero alternating", mixed(1024 if args.quick else proto.MAX_RANGES)),
        ("one contiguous range", contiguous(proto.MAX_PAYLOAD_SIZE // P)),
    ]
    print(f"proto page batch cost: CPU time per batch, median of {runs} runs (guest {GUEST >> 30} GiB)\n")
    print("| batch | ranges (data+zero) | payload | header+body | encode µs | decode µs | ns/range (enc+dec) "
          "| payload per decode CPU-second, GiB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch in cases:
        print(row(name, batch, runs))
    print(control_row(runs))


if __name__ == "__main__":
    main()
