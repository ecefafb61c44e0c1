"""The migration data path without agents: batch planning, zero pages, the RAM digest, the transport
over real sockets into real memfds, the token bucket, MigrationParams and MigrationInfo."""

from __future__ import annotations

import errno
import mmap
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.migration import pages, transport
from agent.migration.info import MigrationInfo, MigrationParams, RoundStat, Status
from agent.migration.ratelimit import RateLimiter
from agent.migration.transport import RECV_PIECE, Connection, GuestRamFull
from proto.codec import encode
from proto.errors import ErrorCode, RemoteProtocolError
from proto.messages import PageBatch, Ready, Sync
from tests.conftest import MapGuestRam
from tests.links import socket_link
from vmruntime.dirty import merge_ranges

P = 4096
MiB = 1 << 20


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for a, b in ranges for p in range(a // P, b // P)}


# -- batch planning and zero pages -----------------------------------------------------------------


def test_zero_grains_become_ranges_and_the_rest_goes_whole() -> None:
    ram = bytearray(1 * MiB)
    ram[5 * P] = 1  # grain 0 (pages 0-15) holds data
    ram[40 * P + 7] = 9  # grain 2 (pages 32-47) holds data
    batches = list(pages.plan_batches(memoryview(ram), [(0, 64 * P)]))
    assert len(batches) == 1
    b = batches[0]
    assert b.ranges == [(0, 16 * P), (32 * P, 48 * P)]
    assert b.zeros == [(16 * P, 32 * P), (48 * P, 64 * P)]
    assert b.data_bytes == 32 * P and b.zero_bytes == 32 * P and b.pages == 64


def test_batches_respect_the_payload_and_range_limits() -> None:
    ram = bytearray(b"\x01" * (1 * MiB))
    ranges = [(i * 2 * P, (i * 2 + 1) * P) for i in range(100)]  # 100 single pages
    batches = list(pages.plan_batches(memoryview(ram), ranges, batch_bytes=16 * P, batch_ranges=7))
    assert all(len(b.ranges) <= 7 and b.data_bytes <= 16 * P for b in batches)
    assert [r for b in batches for r in b.ranges] == ranges
    big = list(pages.plan_batches(memoryview(ram), [(0, 256 * P)], batch_bytes=64 * P))
    assert [b.ranges for b in big] == [[(i * 64 * P, (i + 1) * 64 * P)] for i in range(4)]


def test_zero_detection_can_be_skipped() -> None:
    ram = bytearray(64 * P)
    (b,) = pages.plan_batches(memoryview(ram), [(0, 64 * P)], detect_zeros=False)
    assert b.ranges == [(0, 64 * P)] and b.zeros == []


@st.composite
def ram_and_ranges(draw: Any) -> tuple[bytearray, list[tuple[int, int]]]:
    npages = 96
    ram = bytearray(npages * P)
    for page in draw(st.sets(st.integers(0, npages - 1), max_size=40)):
        ram[page * P + draw(st.integers(0, P - 1))] = draw(st.integers(1, 255))
    pages_sel = draw(st.sets(st.integers(0, npages - 1), min_size=1))
    return ram, merge_ranges((p * P, (p + 1) * P) for p in pages_sel)


@settings(max_examples=150, deadline=None)
@given(ram_and_ranges(), st.integers(1, 8), st.integers(1, 5))
def test_planned_batches_are_valid_and_cover_exactly_the_input(
        case: tuple[bytearray, list[tuple[int, int]]], batch_pages: int, batch_ranges: int) -> None:
    ram, ranges = case
    mv = memoryview(ram)
    seen: list[tuple[int, int]] = []
    for b in pages.plan_batches(mv, ranges, batch_bytes=batch_pages * P, batch_ranges=batch_ranges):
        PageBatch(tuple(b.ranges.tolist()), tuple(b.zeros.tolist())).check(len(ram))  # what proto would refuse
        assert b.data_bytes <= batch_pages * P and len(b.ranges) <= batch_ranges
        assert all(not any(ram[a:z]) for a, z in b.zeros)  # zero ranges really are zero
        seen += [*b.ranges, *b.zeros]
    assert covered(seen) == covered(ranges)
    assert sum(z - a for a, z in seen) == sum(z - a for a, z in ranges)  # nothing twice


# -- the RAM digest ----------------------------------------------------------------------------------


def test_digest_depends_on_content_not_on_holes(guest_ram: MapGuestRam) -> None:
    size = 4 * MiB
    fd1, m1 = guest_ram(size)
    fd2, m2 = guest_ram(size)
    m1[MiB:MiB + 5] = b"hello"
    m2[MiB:MiB + 5] = b"hello"
    m2[3 * MiB:3 * MiB + 3 * P] = bytes(3 * P)  # written zeros: data extents, same content
    assert pages.ram_digest(fd1, memoryview(m1), size) == pages.ram_digest(fd2, memoryview(m2), size)
    m2[2 * MiB] = 1
    assert pages.ram_digest(fd1, memoryview(m1), size) != pages.ram_digest(fd2, memoryview(m2), size)


def test_digest_reads_no_hole(guest_ram: MapGuestRam) -> None:
    size = 64 * MiB
    fd, mm = guest_ram(size)
    mm[10 * MiB] = 7
    pages.ram_digest(fd, memoryview(mm), size)
    assert pages.data_pieces(fd, 0, size) == [(10 * MiB, 10 * MiB + P)]  # hashing allocated nothing


def test_incremental_digest_follows_invalidations(guest_ram: MapGuestRam) -> None:
    size = 2 * MiB
    fd, mm = guest_ram(size)
    mm[0:MiB] = os.urandom(MiB)
    d = pages.RamDigest(fd, memoryview(mm), size)
    d.refresh(range(d.nchunks))
    before = d.hexdigest()
    mm[P * 3] ^= 0xFF
    assert d.hexdigest() == before  # stale until told: the caller owns invalidation
    d.invalidate([(3 * P, 4 * P)])
    assert d.hexdigest() == pages.ram_digest(fd, memoryview(mm), size) != before


def test_chunks_touched_and_covered() -> None:
    c = pages.DIGEST_CHUNK
    ranges = [(0, c + P), (3 * c - P, 5 * c)]
    assert pages.chunks_of(ranges) == {0, 1, 2, 3, 4}
    assert pages.covered_chunks(ranges) == {0, 3, 4}
    assert pages.covered_chunks([(P, c - P)]) == set() and pages.chunks_of([(P, c - P)]) == {0}


def test_chunk_sets_match_a_page_by_page_count() -> None:
    # chunks_of / covered_chunks take shortcuts for ranges inside one chunk (scattered pages):
    # they must agree with counting page by page, for ranges of every shape.
    rng = random.Random(5)
    c, per = pages.DIGEST_CHUNK, pages.DIGEST_CHUNK // P
    for _ in range(200):
        starts = sorted(rng.sample(range(0, 4096, 3), 40))
        ranges = [(a * P, (a + rng.choice([1, 1, 2, per - 1, per, 2 * per + 1])) * P) for a in starts]
        ranges = [(a, min(b, nxt)) for (a, b), (nxt, _) in zip(ranges, [*ranges[1:], (1 << 40, 0)], strict=True)]
        ranges = [(a, b) for a, b in ranges if b > a]
        in_pages = {q for a, b in ranges for q in range(a // P, b // P)}
        assert pages.chunks_of(ranges) == {q // per for q in in_pages}
        assert pages.covered_chunks(ranges) == {
            i for i in range(4096 * P // c + 2) if any(a <= i * c and (i + 1) * c <= b for a, b in ranges)}


def test_invalidating_chunks_past_the_guest_ignores_them() -> None:
    size = 4 * pages.DIGEST_CHUNK
    fd = os.memfd_create("inv")
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    with memoryview(mm) as ram:
        d = pages.RamDigest(fd, ram, size)
        d.assume_holes_except([])
        d.invalidate_chunks({-1, 1, 4, 99})
        d.invalidate_chunks(iter([2]))
        assert d._missing == {1, 2}
        assert d.hexdigest() == pages.ram_digest(fd, ram, size)
        del d
    mm.close()
    os.close(fd)


# -- the transport over a real socket into a real memfd ---------------------------------------------


@pytest.fixture
def link() -> Iterator[tuple[Connection, Connection]]:
    with socket_link() as ends:
        yield ends


def test_the_next_frame_can_be_peeked_at_without_waiting_or_consuming(link: tuple[Connection, Connection]) -> None:
    a, b = link
    assert not b.next_frame_is(Sync)  # nothing buffered: no wait, no
    frame = encode(Sync(3))
    a.sock.sendall(frame[:10])  # half a header: not known yet
    deadline = time.monotonic() + 5
    while b.sock.recv(32, socket.MSG_PEEK) != frame[:10]:
        assert time.monotonic() < deadline
    assert not b.next_frame_is(Sync)
    a.sock.sendall(frame[10:])
    while not b.next_frame_is(Sync):
        assert time.monotonic() < deadline
    assert not b.next_frame_is(Ready)  # the type counts
    assert b.recv() == Sync(3)  # and nothing was consumed
    a.send(Ready())
    while not b.next_frame_is(Ready):
        assert time.monotonic() < deadline
    assert not b.next_frame_is(Sync)


def test_pages_land_in_guest_ram_at_their_offsets(guest_ram: MapGuestRam, link: tuple[Connection, Connection]) -> None:
    size = 8 * MiB
    _, src = guest_ram(size)
    dfd, dst = guest_ram(size)
    src[:] = os.urandom(size)
    dst[2 * MiB:3 * MiB] = b"\x55" * MiB
    sender, receiver = link
    receiver.guest_size = size
    ranges = [(0, 3 * P), (MiB, 2 * MiB), (5 * MiB, 8 * MiB)]
    got: list[Any] = []

    def recv() -> None:
        got.append(receiver.recv(memoryview(dst)))
        got.append(receiver.recv(memoryview(dst)))

    t = threading.Thread(target=recv)
    t.start()
    wire = sender.send_pages(memoryview(src), ranges, [(2 * MiB, 3 * MiB)])
    sender.send(Ready())
    t.join()
    assert isinstance(got[0], PageBatch) and isinstance(got[1], Ready)
    pages.punch_zeros(dfd, memoryview(dst), got[0].zeros)
    for a, b in ranges:
        assert dst[a:b] == src[a:b]
    assert dst[2 * MiB:3 * MiB] == bytes(MiB)  # zero range: the old bytes are gone
    assert dst[3 * MiB:5 * MiB] == bytes(2 * MiB)  # never sent: untouched
    assert wire == receiver.received - len(encode(Ready())) == sender.sent - len(encode(Ready()))


def test_scattered_pages_beyond_one_iovec_array(guest_ram: MapGuestRam, link: tuple[Connection, Connection]) -> None:
    size = 16 * MiB
    _, src = guest_ram(size)
    _, dst = guest_ram(size)
    src[:] = os.urandom(size)
    ranges = [(p * P, (p + 1) * P) for p in range(0, 4000, 2)]  # 2000 single pages: two iovec arrays
    sender, receiver = link
    receiver.guest_size = size
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(receiver.recv(memoryview(dst))))
    t.start()
    sender.send_pages(memoryview(src), ranges)
    t.join()
    assert got[0].ranges == tuple(ranges)
    for a, b in ranges:
        assert dst[a:b] == src[a:b]
        assert dst[b:b + P] == bytes(P)  # the pages between were not sent and stay untouched


class RecordingSink:
    """A transport PageSink over a real memfd that records the pieces it was handed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pieces: list[tuple[int, bytes]] = []

    def received(self, offset: int, data: memoryview) -> None:
        self.pieces.append((offset, bytes(data)))


def test_large_ranges_go_through_the_buffer_into_the_memfd(guest_ram: MapGuestRam, link: tuple[Connection, Connection]) -> None:
    size = 8 * MiB
    _, src = guest_ram(size)
    dfd, dst = guest_ram(size)
    src[:] = os.urandom(size)
    sender, receiver = link
    receiver.guest_size = size
    # Unaligned to the piece grid on purpose: a range starting and ending mid-piece.
    ranges = [(3 * P, RECV_PIECE + 5 * P), (2 * MiB + 7 * P, 6 * MiB - 9 * P)]
    sink = RecordingSink(dfd)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(receiver.recv(memoryview(dst), sink)))
    t.start()
    wire = sender.send_pages(memoryview(src), ranges)
    t.join()
    assert isinstance(got[0], PageBatch) and wire == receiver.received
    for a, b in ranges:
        assert dst[a:b] == src[a:b]  # written to the memfd, read back through the mapping
    assert dst[:3 * P] == bytes(3 * P) and dst[6 * MiB - 9 * P:] == bytes(2 * MiB + 9 * P)
    # The pieces cover exactly the ranges, in order, each inside one cell of the piece grid,
    # and what the sink saw is what landed.
    assert merge_ranges([(o, o + len(d)) for o, d in sink.pieces]) == ranges
    for off, data in sink.pieces:
        assert off // RECV_PIECE == (off + len(data) - 1) // RECV_PIECE
        assert data == src[off:off + len(data)]


def test_scattered_pages_skip_the_buffer(guest_ram: MapGuestRam, link: tuple[Connection, Connection]) -> None:
    size = 4 * MiB
    _, src = guest_ram(size)
    dfd, dst = guest_ram(size)
    src[:] = os.urandom(size)
    sender, receiver = link
    receiver.guest_size = size
    ranges = [(p * P, (p + 1) * P) for p in range(0, 200, 3)]
    sink = RecordingSink(dfd)
    t = threading.Thread(target=lambda: receiver.recv(memoryview(dst), sink))
    t.start()
    sender.send_pages(memoryview(src), ranges)
    t.join()
    assert sink.pieces == []  # straight into the mapping
    for a, b in ranges:
        assert dst[a:b] == src[a:b]


def test_a_full_memfd_is_an_error_not_a_crash(guest_ram: MapGuestRam, link: tuple[Connection, Connection],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A write through the mapping into a memfd that cannot grow takes SIGBUS; pwrite returns
    # ENOSPC instead (tmpfs limit, memory cgroup), which must become a clear error.
    size = 2 * MiB
    _, src = guest_ram(size)
    dfd, dst = guest_ram(size)
    src[:] = os.urandom(size)
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if offset >= MiB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(transport.os, "pwrite", pwrite)
    sender, receiver = link
    receiver.guest_size = size
    errors: list[BaseException] = []
    view = memoryview(dst)

    def recv() -> None:
        try:
            receiver.recv(view, RecordingSink(dfd))
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=recv)
    t.start()
    sender.send_pages(memoryview(src), [(0, size)])  # fits the socket buffers of loopback
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], GuestRamFull)
    assert errors[0].code == ErrorCode.INSUFFICIENT_MEMORY and str(errors[0]).startswith("guest RAM cannot be stored on the destination")
    view.release()  # the exception's frames still refer to it
    assert dst[:MiB] == src[:MiB]


def test_a_range_outside_the_guest_is_refused_before_any_byte_lands(
        guest_ram: MapGuestRam, link: tuple[Connection, Connection]) -> None:
    size = 1 * MiB
    _, dst = guest_ram(size)
    sender, receiver = link
    receiver.guest_size = size
    # The sender's encoder does not know the guest size: only the receiver can refuse this range.
    sender.sock.sendall(encode(PageBatch(((size - P, size + P),))) + b"\xAA" * 2 * P)
    with pytest.raises(RemoteProtocolError, match="outside the guest"):
        receiver.recv(memoryview(dst))
    assert dst[:] == bytes(size)


def test_partial_sends_resume_where_they_stopped() -> None:
    class Trickle:
        """A socket that takes at most 5 bytes per sendmsg."""

        def __init__(self) -> None:
            self.out = bytearray()

        def sendmsg(self, bufs: list[Any]) -> int:
            data = b"".join(bytes(b) for b in bufs)[:5]
            self.out += data
            return len(data)

    conn = Connection(Trickle())  # type: ignore[arg-type]
    bufs: list[Any] = [b"abc", memoryview(b"defghij"), b"", b"klmnopqrstu"]
    assert conn._sendmsg_all(bufs) == 21
    assert conn.sock.out == b"abcdefghijklmnopqrstu"  # type: ignore[attr-defined]


def test_token_bucket_paces_to_the_cap() -> None:
    class Recorder(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.waited: list[float] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.waited.append(timeout or 0.0)
            return False

    ev = Recorder()
    limiter = RateLimiter(rate=1 * MiB, stop=ev, burst_s=0.05)
    for _ in range(10):
        limiter.take(MiB)
    # Nothing really sleeps here, so the n-th MiB asks to wait until n s after the start (less the
    # burst credit): the bucket lets 10 MiB through in 10 s at 1 MiB/s, never sooner.
    assert ev.waited == pytest.approx([n - 0.05 for n in range(1, 11)], abs=0.05)


# -- params and the report --------------------------------------------------------------------------


def test_params_from_cli_names() -> None:
    p = MigrationParams.from_dict({"max-downtime": 50, "bandwidth": 1000, "auto_converge": True,
                                   "max-rounds": 4, "timeout": 9, "force": True})
    assert p == MigrationParams(50.0, 1000, True, 4, 9.0, True)
    assert MigrationParams.from_dict(p.to_dict()) == p
    assert MigrationParams.from_dict({}) == MigrationParams()
    with pytest.raises(ValueError, match="unknown migration parameter"):
        MigrationParams.from_dict({"max-dowtnime": 1})
    with pytest.raises(ValueError, match="max-downtime"):
        MigrationParams.from_dict({"max-downtime": 0})


def test_info_uses_query_migrate_names_in_milliseconds() -> None:
    info = MigrationInfo(vm="v", direction="out", mem=64 * MiB, started=100.0)
    info.setup_s, info.downtime_s, info.expected_downtime_s = 0.25, 0.0125, 0.3
    info.normal, info.duplicate, info.bandwidth = 10, 3, 125e6
    info.rounds.append(RoundStat(pages=13, bytes=10 * P, seconds=0.5, zero_pages=3))
    info.breakdown["pause"] = 0.002
    info.finished = 101.5
    info.finish(Status.FAILED, "boom", "timeout")
    d = info.to_dict()
    assert d["status"] == "failed" and d["error-desc"] == "boom" and d["error-code"] == "timeout"
    assert d["setup-time"] == 250 and d["downtime"] == 12 and d["expected-downtime"] == 300
    assert d["ram"]["normal-bytes"] == 10 * P and d["ram"]["duplicate"] == 3 and d["ram"]["total"] == 64 * MiB
    assert d["ram"]["mbps"] == 1000.0
    assert d["rounds"][0]["pages"] == 13 and d["downtime-breakdown"]["pause"] == 2.0


def test_digest_from_known_content_matches_a_fresh_one(guest_ram: MapGuestRam) -> None:
    size = 2 * MiB
    fd, mm = guest_ram(size)
    c = pages.DIGEST_CHUNK
    mm[0:c + P] = os.urandom(c + P)  # data: chunk 0 whole, one page of chunk 1
    d = pages.RamDigest(fd, memoryview(mm), size)
    # The caller sent chunk 0 and 1 as data + zero ranges: both covered whole, no file walk needed.
    d.refresh_known([(0, c + P)], [(c + P, 2 * c)])
    mm[5 * c] = 1  # a later write elsewhere, invalidated as a harvest would
    d.invalidate([(5 * c, 5 * c + P)])
    assert d.hexdigest() == pages.ram_digest(fd, memoryview(mm), size)


def test_assumed_holes_stay_right_as_long_as_writes_are_invalidated(guest_ram: MapGuestRam) -> None:
    size = 8 * MiB
    fd, mm = guest_ram(size)
    mm[MiB:MiB + 3] = b"abc"
    d = pages.RamDigest(fd, memoryview(mm), size)
    d.assume_holes_except([(MiB, MiB + P)])  # the written extents when tracking was armed
    mm[6 * MiB + 17] = 9  # a write into a chunk assumed to be a hole...
    d.invalidate([(6 * MiB, 6 * MiB + P)])  # ...reported by a harvest
    assert d.hexdigest() == pages.ram_digest(fd, memoryview(mm), size)


def test_runs_of_a_page_mask() -> None:
    assert pages._runs(0) == ()
    assert pages._runs(0b1) == ((0, 1),)
    assert pages._runs(0b1011_0000_0000_0110) == ((1, 3), (12, 14), (15, 16))
    for mask in random.Random(3).sample(range(1 << 16), 300):
        assert {p for a, b in pages._runs(mask) for p in range(a, b)} == {p for p in range(16) if mask >> p & 1}


def _pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for a, b in ranges for p in range(a // P, -(-b // P))}


def _pages_believed_data(d: pages.RamDigest) -> set[int]:
    """The pages a RamDigest that knows where the data is takes for data (full chunks and masks)."""
    per, last = pages.DIGEST_CHUNK // P, -(-d.size // P)
    out = {p for idx in np.flatnonzero(d._full).tolist() for p in range(idx * per, min(last, (idx + 1) * per))}
    return out | {idx * per + bit for idx, mask in d._data.items() for bit in range(per) if mask >> bit & 1}


def test_known_data_digest_equals_a_walked_one_and_walks_nothing(guest_ram: MapGuestRam, monkeypatch: Any) -> None:
    """Once told where the data is, the digest follows writes, punches and received pieces
    without asking the memfd (no SEEK_DATA/SEEK_HOLE walk: data_pieces is never called), and
    always equals a digest from scratch that walks the memfd."""
    rng = random.Random(11)
    size = 24 * pages.DIGEST_CHUNK - 5 * P  # a short last chunk too
    fd, mm = guest_ram(size)
    npages = size // P
    ram = memoryview(mm)
    for p in rng.sample(range(npages), npages // 5):  # written in part, like a warming working set
        ram[p * P] = rng.randrange(1, 256)
    ram[4 * pages.DIGEST_CHUNK:9 * pages.DIGEST_CHUNK] = os.urandom(5 * pages.DIGEST_CHUNK)  # and chunks in full
    extents = pages.data_pieces(fd, 0, size)
    d = pages.RamDigest(fd, ram, size)
    d.assume_holes_except(extents)

    def no_walk(*args: Any) -> Any:
        raise AssertionError("walked the memfd")

    for step in range(150):
        a = rng.randrange(npages) * P
        b = min(size, a + rng.choice([1, 1, 2, 5, 16, 17, 40]) * P)
        op = rng.choice(["write", "write", "punch", "receive", "piece", "refresh"])
        if op == "write":  # the source: the guest writes, a harvest reports it
            ram[a:b] = os.urandom(b - a)
            d.invalidate([(a, b)])
        elif op == "punch":  # the destination: a zero range
            pages.punch_zeros(fd, ram, [(a, b)])
            d.invalidate_chunks(pages.chunks_of([(a, b)]))
            d.refresh_known([], [(a, b)])
        elif op == "receive":  # the destination: a data range written through the mapping
            ram[a:b] = os.urandom(b - a)
            d.invalidate_chunks(pages.chunks_of([(a, b)]))
            d.refresh_known([(a, b)], [])
        elif op == "piece":  # the destination: a long range through the buffer and pwrite
            data = os.urandom(b - a)
            ram[a:b] = data
            done = set(d.hash_piece(a, memoryview(data)))
            d.invalidate_chunks(pages.chunks_of([(a, b)]) - done)
            d.refresh_known([(a, b)], [], done)
        else:
            d.refresh_missing(rng.sample(range(d.nchunks), 6))
        if step % 15 == 14:
            # Not just a right digest (a hole taken for data still hashes right: it reads as zeros,
            # and the read through the mapping fills it): the bookkeeping says exactly which pages
            # hold data. Checked first, before hashing reads any hole.
            assert _pages_believed_data(d) == _pages_of(pages.data_pieces(fd, 0, size)), f"step {step} ({op})"
            with monkeypatch.context() as m:
                m.setattr(pages, "data_pieces", no_walk)
                ours = d.hexdigest()
            assert ours == pages.ram_digest(fd, ram, size), f"step {step} ({op})"
    assert pages.data_pieces(fd, 0, size) != [(0, size)]  # holes were left: the masks were used
    ram.release()
