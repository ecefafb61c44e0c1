"""Dirty tracking (vmruntime.dirty): every backend against a real writer process.

The writer (vmruntime.dirty.writer) maps a real memfd shared, registers it
with vm_register like a VM process, and writes pages on command; the test
process plays the agent: it holds the tracker and its own mapping of the
memfd. Tracking is the kernel's own (userfaultfd write-protect, PAGEMAP_SCAN).

What "exact" means per backend: the uffd backends report exactly the pages
the guest wrote; "hash" reports exactly the pages whose content changed (the
writer stamps fresh values, so there the two coincide; see
test_rewriting_same_content for where they differ). uffd-wp-async with its
opt-in hot blocks reports a superset (whole dense 2 MiB blocks): tested at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmruntime import dirty
from vmruntime.dirty import _uapi, probe, uffd_async
from vmruntime.dirty.extents import PAGE_SIZE, bitmap_ranges, merge_ranges, pages_to_ranges
from vmruntime.dirty.hashing import HashTracker
from vmruntime.dirty.ranges import Ranges
from vmruntime.dirty.writer import WriterProc, stamp, stream_rng

P = PAGE_SIZE
NPAGES = 96
AVAILABLE = dirty.available_backends()
UFFD_BACKENDS = [b for b in AVAILABLE if b != "hash"]


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for s, e in ranges for p in range(s // P, e // P)}


@dataclass
class Tracked:
    """A writer process with a started tracker over it, and the agent's own mapping."""

    writer: WriterProc
    tracker: dirty.DirtyTracker
    ram: mmap.mmap
    uffd: int | None

    def close(self) -> None:
        self.tracker.stop()
        if self.uffd is not None:
            os.close(self.uffd)


def track(writer: WriterProc, ram: mmap.mmap, backend: str) -> Tracked:
    """Register in the writer, build and start the agent-side tracker."""
    addr, length, uffd = writer.register(backend)
    tracker = dirty.make_tracker(
        backend, pid=writer.pid, uffd=uffd, addr=addr, length=length, ram=ram, memfd=writer.memfd
    )
    tracker.start()
    return Tracked(writer, tracker, ram, uffd)


@pytest.fixture
def fresh() -> Iterator[tuple[WriterProc, mmap.mmap]]:
    """A new writer over a new (all-holes) memfd, and the agent's mapping of it."""
    writer = WriterProc(NPAGES * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    yield writer, ram
    writer.close()
    ram.close()


@pytest.fixture(scope="module")
def shared_writer() -> Iterator[tuple[WriterProc, mmap.mmap]]:
    """One writer for all hypothesis examples of the module (spawning one per example is slow)."""
    writer = WriterProc(NPAGES * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    yield writer, ram
    writer.close()
    ram.close()


# ---- written extents and range helpers ----


def test_written_extents_finds_written_pages_rounded_out() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64 * P)
        assert dirty.written_extents(fd, 64 * P) == []
        os.pwrite(fd, b"x", 3 * P + 100)  # one byte mid-page -> the whole page
        os.pwrite(fd, b"y" * (P + 1), 10 * P)  # spills into page 11
        os.pwrite(fd, b"z", 12 * P)  # adjacent: merges with 10..12
        os.pwrite(fd, b"w", 63 * P)
        assert dirty.written_extents(fd, 64 * P) == [(3 * P, 4 * P), (10 * P, 13 * P), (63 * P, 64 * P)]
        # Clipped to the size asked for.
        assert dirty.written_extents(fd, 11 * P) == [(3 * P, 4 * P), (10 * P, 11 * P)]
    finally:
        os.close(fd)


def test_written_extents_sees_writes_through_a_mapping() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 32 * P)
        with mmap.mmap(fd, 32 * P) as m:
            m[5 * P] = 1
            m[31 * P + 4095] = 1
        assert dirty.written_extents(fd, 32 * P) == [(5 * P, 6 * P), (31 * P, 32 * P)]
    finally:
        os.close(fd)


@given(st.lists(st.booleans(), max_size=200))
def test_bitmap_ranges_matches_pages_to_ranges(bits: list[bool]) -> None:
    bitmap = bytearray(bits)
    assert bitmap_ranges(bitmap) == pages_to_ranges(i for i, b in enumerate(bits) if b)


def test_merge_and_pages_to_ranges() -> None:
    assert merge_ranges([(8 * P, 9 * P), (0, P), (P, 2 * P), (8 * P, 10 * P)]) == [(0, 2 * P), (8 * P, 10 * P)]
    assert pages_to_ranges([5, 3, 4, 9]) == [(3 * P, 6 * P), (9 * P, 10 * P)]
    assert pages_to_ranges([]) == []


# ---- probe and choice ----


def test_available_backends_best_first_and_hash_always() -> None:
    found = dirty.available_backends()
    assert found[-1] == "hash"
    assert found == [b for b in dirty.BACKENDS if b in found]
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if os.geteuid() == 0 and (major, minor) >= (6, 7):
        assert found == list(dirty.BACKENDS)  # root on 6.7+: all three work


def test_choose_backend() -> None:
    assert dirty.choose_backend(None) == AVAILABLE[0]
    assert dirty.choose_backend("auto") == AVAILABLE[0]
    for b in AVAILABLE:
        assert dirty.choose_backend(b) == b
    with pytest.raises(ValueError, match="unknown.*available: " + ", ".join(AVAILABLE)):
        dirty.choose_backend("soft-dirty")


def test_choose_backend_refuses_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "available_backends", lambda: ["hash"])
    assert dirty.choose_backend(None) == "hash"
    with pytest.raises(ValueError, match="'uffd-wp-async' is unavailable on this host; available: hash"):
        dirty.choose_backend("uffd-wp-async")


def test_probe_falls_back_to_hash_without_userfaultfd(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(flags: int = 0) -> int:
        raise PermissionError(1, "userfaultfd: Operation not permitted")

    monkeypatch.setattr(_uapi, "userfaultfd", refuse)
    probe._probe_all.cache_clear()
    try:
        assert dirty.available_backends() == ["hash"]
        with pytest.raises(ValueError, match="unavailable on this host; available: hash"):
            dirty.choose_backend("uffd-wp-sync")
    finally:
        probe._probe_all.cache_clear()


def test_vm_register_checks_arguments() -> None:
    assert dirty.vm_register("hash", 0x1000, P) is None
    with pytest.raises(ValueError, match="unknown"):
        dirty.vm_register("nope", 0x1000, P)
    for b in UFFD_BACKENDS:
        with pytest.raises(ValueError, match="page aligned"):
            dirty.vm_register(b, 0x1001, P)


def test_make_tracker_checks_arguments() -> None:
    with mmap.mmap(-1, 2 * P) as m:
        for b in AVAILABLE:
            for addr, length in ((0x1001, P), (0, P + 1), (0, 0), (0, 4 * P)):
                with pytest.raises(ValueError, match="bad guest RAM range"):
                    dirty.make_tracker(b, pid=os.getpid(), uffd=None, addr=addr, length=length, ram=m)
        with pytest.raises(ValueError, match="unknown"):
            dirty.make_tracker("nope", pid=os.getpid(), uffd=None, addr=0, length=P, ram=m)
        for b in UFFD_BACKENDS:
            with pytest.raises(ValueError, match="needs the uffd"):
                dirty.make_tracker(b, pid=os.getpid(), uffd=None, addr=0, length=P, ram=m)


# ---- exactness: each backend reports the pages the guest wrote ----

_values = itertools.count(1 << 20)
rounds_strategy = st.lists(
    st.tuples(st.sets(st.integers(0, NPAGES - 1), max_size=40), st.sets(st.integers(0, NPAGES - 1), max_size=8)),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("backend", AVAILABLE)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=rounds_strategy)
def test_harvest_reports_exactly_the_guest_writes(
    shared_writer: tuple[WriterProc, mmap.mmap], backend: str, rounds: list[tuple[set[int], set[int]]]
) -> None:
    writer, ram = shared_writer
    t = track(writer, ram, backend)
    try:
        for guest_pages, agent_pages in rounds:
            # A fresh value every round so that content always changes (makes "hash" exact too).
            value = next(_values)
            writer.call("write", pages=sorted(guest_pages), value=value)
            if backend != "hash":  # hash cannot tell the agent's writes apart (documented)
                for p in agent_pages:
                    ram[p * P + 16 : p * P + 24] = value.to_bytes(8, "little")
            assert t.tracker.harvest() == pages_to_ranges(guest_pages)
        assert t.tracker.harvest() == []
    finally:
        t.close()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_first_writes_to_never_touched_memory_are_reported(
    fresh: tuple[WriterProc, mmap.mmap], backend: str
) -> None:
    writer, ram = fresh
    writer.call("write", pages=[1, 2], value=11)  # populated before tracking starts
    t = track(writer, ram, backend)
    try:
        assert t.tracker.harvest() == []  # writes before start() are not reported
        writer.call("write", pages=[0, 2, 50, NPAGES - 1], value=12)  # 0, 50, last: never touched
        assert t.tracker.harvest() == [(0, P), (2 * P, 3 * P), (50 * P, 51 * P), ((NPAGES - 1) * P, NPAGES * P)]
    finally:
        t.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", AVAILABLE)
def test_many_scattered_ranges(backend: str) -> None:
    """More regions than one PAGEMAP_SCAN call returns (the walk resumes at walk_end)."""
    npages = 2 * uffd_async._VEC_LEN + 2 * 1000
    writer = WriterProc(npages * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    try:
        t = track(writer, ram, backend)
        try:
            for first in (0, 1):  # every other page: no two ranges merge
                writer.call("time", first=first, count=npages // 2, step=2, repeat=1)
                got = t.tracker.harvest()
                assert got == [(p * P, (p + 1) * P) for p in range(first, npages, 2)]
        finally:
            t.close()
    finally:
        writer.close()
        ram.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", AVAILABLE)
def test_concurrent_writer_threads(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    """Several vCPU-like threads faulting at once (sync: several fault messages per read)."""
    writer, ram = fresh
    t = track(writer, ram, backend)
    try:
        for value, pages in ((41, range(0, NPAGES, 2)), (42, range(NPAGES))):
            writer.call("threads", pages=list(pages), value=value, nthreads=4)
            assert t.tracker.harvest() == pages_to_ranges(pages)
            assert all(ram[p * P : p * P + 8] == value.to_bytes(8, "little") for p in pages)
    finally:
        t.close()


@pytest.mark.parametrize("backend", UFFD_BACKENDS)
def test_agent_writes_never_show_up(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    writer, ram = fresh
    writer.call("write", pages=[4], value=1)
    t = track(writer, ram, backend)
    try:
        ram[0 : 8 * P] = b"\xa5" * (8 * P)  # never-touched pages and a populated one
        ram[60 * P : 61 * P] = b"\x01" * P
        assert t.tracker.harvest() == []
        writer.call("write", pages=[4, 60], value=2)  # the guest writes some of the same pages
        assert t.tracker.harvest() == [(4 * P, 5 * P), (60 * P, 61 * P)]
        assert ram[4 * P : 4 * P + 8] == (2).to_bytes(8, "little")
    finally:
        t.close()


def test_hash_reports_agent_writes_as_documented(fresh: tuple[WriterProc, mmap.mmap]) -> None:
    writer, ram = fresh
    t = track(writer, ram, "hash")
    try:
        ram[7 * P] = 1
        assert t.tracker.harvest() == [(7 * P, 8 * P)]
    finally:
        t.close()


@pytest.mark.parametrize("backend", AVAILABLE)
def test_rewriting_same_content(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    """uffd backends report writes; hash reports content changes, so rewriting the same bytes is silent."""
    writer, ram = fresh
    writer.call("fill", pages=[3], byte=9)
    t = track(writer, ram, backend)
    try:
        writer.call("fill", pages=[3], byte=9)  # the bytes already there
        writer.call("fill", pages=[8], byte=0)  # zeros over a hole
        expected = [] if backend == "hash" else [(3 * P, 4 * P), (8 * P, 9 * P)]
        assert t.tracker.harvest() == expected
    finally:
        t.close()


@pytest.mark.parametrize("memfd", [True, False])
def test_hash_tracker_in_process_with_odd_stride(memfd: bool) -> None:
    """HashTracker alone: stride not dividing the size, with and without hole skipping."""
    size = 37 * P
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    try:
        with mmap.mmap(fd, size) as m:
            m[2 * P] = 1
            t = HashTracker(ram=m, length=size, memfd=fd if memfd else None, stride=8 * P)
            t.start()
            assert t.harvest() == []
            m[36 * P + 5] = 1  # in the short last chunk, a hole until now
            m[2 * P] = 2
            m[3 * P] = 0  # no change
            assert t.harvest() == [(2 * P, 3 * P), (36 * P, 37 * P)]
            m[36 * P + 5] = 0  # back to zeros: a change again
            assert t.harvest() == [(36 * P, 37 * P)]
            t.stop()
    finally:
        os.close(fd)


# ---- nothing lost while the writer keeps writing ----


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", AVAILABLE)
def test_no_write_lost_while_writer_keeps_writing(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    """Harvest repeatedly while the writer streams; copy what each harvest names, like a migration.

    The copy must end equal to guest RAM (every page whose final content
    differs from what was read right after its last harvest is in a later
    harvest), and the harvests together must name exactly the pages written.
    """
    writer, ram = fresh
    seed = 1234
    t = track(writer, ram, backend)
    try:
        copy = bytearray(ram[:])  # what a destination holds after round 0
        union: set[int] = set()
        writer.send("stream", seed=seed, npages=NPAGES)
        nonempty = 0
        give_up = time.monotonic() + 30  # a liveness bound, not a performance check
        while time.monotonic() < give_up:  # until the harvests have raced the writer a few times
            time.sleep(0.001)  # let the writer (and a sync fault handler thread) run
            ranges = t.tracker.harvest()
            for s, e in ranges:
                copy[s:e] = ram[s:e]
            union |= pages_of(ranges)
            nonempty += bool(ranges)
            if nonempty >= 12:
                break
        writer.send("halt")
        count = writer.recv()["count"]
        final = t.tracker.harvest()
        for s, e in final:
            copy[s:e] = ram[s:e]
        union |= pages_of(final)
    finally:
        t.close()
    assert nonempty >= 12
    rng = stream_rng(seed)
    written = [rng.randrange(NPAGES) for _ in range(count)]
    assert union == set(written)
    assert bytes(copy) == ram[:]
    last = {p: i for i, p in enumerate(written)}  # and the copy holds each page's last stamp
    assert all(copy[p * P : p * P + 8] == stamp(i) for p, i in last.items())


# ---- teardown: nobody stays blocked ----


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", UFFD_BACKENDS)
def test_stop_while_writer_streams_then_retrack(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    writer, ram = fresh
    t = track(writer, ram, backend)
    writer.send("stream", seed=5, npages=NPAGES)
    while not t.tracker.harvest():
        pass
    t.close()  # the writer is mid-stream, possibly blocked in a sync fault
    writer.send("halt")
    assert writer.recv()["count"] > 0
    t2 = track(writer, ram, backend)  # the range can be registered again
    try:
        writer.call("write", pages=[9], value=3)
        assert t2.tracker.harvest() == [(9 * P, 10 * P)]
    finally:
        t2.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", UFFD_BACKENDS)
def test_stop_after_vm_process_exit(fresh: tuple[WriterProc, mmap.mmap], backend: str) -> None:
    writer, ram = fresh
    t = track(writer, ram, backend)
    writer.proc.kill()
    writer.proc.wait()
    t.close()  # must not raise: the VM's mm is gone


@pytest.mark.timeout(60)
@pytest.mark.skipif("uffd-wp-sync" not in AVAILABLE, reason="uffd-wp-sync unavailable")
def test_sync_handler_failure_lets_the_guest_run_and_harvest_raise(
    fresh: tuple[WriterProc, mmap.mmap], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, ram = fresh
    t = track(writer, ram, "uffd-wp-sync")
    try:

        def broken(data: bytes) -> set[int]:
            raise ValueError("bad fault message")

        monkeypatch.setattr(t.tracker, "_fault_pages", broken)
        writer.sock.settimeout(30)
        assert writer.call("write", pages=[2, 3], value=5) == {"ok": True}  # not left blocked
        with pytest.raises(RuntimeError, match="bad fault message"):
            t.tracker.harvest()
    finally:
        writer.sock.settimeout(None)
        t.close()


def wait_for(cond: Callable[[], bool], limit: float = 20.0) -> bool:
    """Poll ``cond`` until true or ``limit`` seconds pass (a liveness bound, not a timing check)."""
    give_up = time.monotonic() + limit
    while not cond():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.005)
    return True


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def proc_wchan(pid: int) -> str:
    """Where the process sleeps in the kernel (its main thread)."""
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


_AGENT = """
import sys, time
from vmruntime.dirty.uffd_sync import UffdSyncTracker
pid, uffd, addr, length = map(int, sys.argv[1:5])
UffdSyncTracker(pid=pid, uffd=uffd, addr=addr, length=length).start()
print("armed", flush=True)
time.sleep(3600)
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif("uffd-wp-sync" not in AVAILABLE, reason="uffd-wp-sync unavailable")
def test_sync_writer_wakes_when_agent_dies(fresh: tuple[WriterProc, mmap.mmap]) -> None:
    """The agent holds the only uffd; it stops handling faults, then is killed: the writer resumes."""
    writer, ram = fresh
    addr, length, uffd = writer.register("uffd-wp-sync")
    assert uffd is not None
    args = [str(x) for x in (writer.pid, uffd, addr, length)]
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, *args], pass_fds=(uffd,), stdout=subprocess.PIPE)
    os.close(uffd)  # now only the agent holds it
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"armed\n"
        agent.send_signal(signal.SIGSTOP)  # the fault handler can no longer answer
        assert wait_for(lambda: proc_state(agent.pid) == "T")
        writer.send("write", pages=[6], value=77)  # blocks in a write-protect fault
        assert wait_for(lambda: proc_wchan(writer.pid) == "handle_userfault")
        agent.kill()
        agent.wait()
        writer.sock.settimeout(30)
        assert writer.recv() == {"ok": True}
        assert ram[6 * P : 6 * P + 8] == (77).to_bytes(8, "little")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        writer.sock.settimeout(None)


# ---- uffd-wp-async hot blocks (opt-in): whole dense blocks reported, no write lost ----

B = uffd_async.HOT_BLOCK
needs_async = pytest.mark.skipif("uffd-wp-async" not in AVAILABLE, reason="uffd-wp-async unavailable")


def track_async(writer: WriterProc, ram: mmap.mmap, hot_blocks: bool) -> Tracked:
    """Like track(), for uffd-wp-async with or without hot blocks."""
    addr, length, uffd = writer.register("uffd-wp-async")
    tracker = dirty.make_tracker(
        "uffd-wp-async", pid=writer.pid, uffd=uffd, addr=addr, length=length, ram=ram, hot_blocks=hot_blocks
    )
    tracker.start()
    return Tracked(writer, tracker, ram, uffd)


@contextlib.contextmanager
def populated_hot_tracker(npages: int) -> Iterator[tuple[WriterProc, mmap.mmap, uffd_async.UffdAsyncTracker]]:
    """A writer of ``npages`` pages, every one written (value 1) before uffd-wp-async with hot blocks
    is armed over it: (the writer, the agent's mapping, the tracker)."""
    writer = WriterProc(npages * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    try:
        writer.call("write", pages=list(range(npages)), value=1)
        t = track_async(writer, ram, hot_blocks=True)
        try:
            assert isinstance(t.tracker, uffd_async.UffdAsyncTracker)
            yield writer, ram, t.tracker
        finally:
            t.close()
    finally:
        writer.close()
        ram.close()


def test_dense_runs_finds_blocks_written_at_hot_density() -> None:
    """The block-density helper on virtual addresses: 3 whole blocks and a short tail block.

    The tail counts against its own (clipped) size, the threshold is inclusive (exactly
    HOT_DENSITY is dense), ranges crossing block boundaries are split between blocks, and
    adjacent dense blocks come out as one run.
    """
    assert uffd_async.HOT_DENSITY == 0.75 and B == 512 * P  # the figures below assume these
    length = 3 * B + 8 * P

    def dense(pages: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return uffd_async._dense_runs(Ranges.from_pairs([(s * P, e * P) for s, e in pages]), length)

    # Block 0 all written, one page in block 1, block 2 all written and 6 of the 8 tail pages.
    assert dense([(0, 512), (700, 701), (1024, 1536 + 6)]) == [(0, B), (2 * B, 3 * B + 8 * P)]
    # Exactly 75% (384 of 512, 6 of 8) is dense, one page less is not; pieces add up per block.
    assert dense([(0, 100), (200, 484)]) == [(0, B)]
    assert dense([(0, 100), (200, 483)]) == []
    assert dense([(1536, 1538), (1539, 1543)]) == [(3 * B, 3 * B + 8 * P)]
    assert dense([(1536, 1541)]) == []
    # A range across a block boundary counts for both blocks: 400 pages in block 0, 400 in block 1.
    assert dense([(112, 912)]) == [(0, 2 * B)]
    # Half of block 1 and half of block 2 in one range: neither is dense.
    assert dense([(768, 1280)]) == []
    # Dense blocks 0 and 2 with block 1 sparse between them stay two runs.
    assert dense([(0, 512), (1024, 1536)]) == [(0, B), (2 * B, 3 * B)]
    assert dense([]) == []


@needs_async
@pytest.mark.timeout(60)
@pytest.mark.parametrize("hot_blocks", [False, True])
def test_hot_blocks_off_reports_dense_blocks_page_exact(hot_blocks: bool) -> None:
    """A block written at 7/8 density, then one page of it per round, for more than HOT_ROUNDS rounds.

    Off (the default): every harvest is exactly the pages written, and nothing is ever hot.
    On, as a control that the same pattern does turn the block hot: the block is reported
    whole from the round that made it hot until the HOT_ROUNDS-th harvest, which scans it
    (finding it all written, as un-protected), re-protects it and forgets it; the round after
    that is page-exact again.
    """
    npages = 3 * 512 + 8
    writer = WriterProc(npages * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    try:
        writer.call("write", pages=list(range(npages)), value=1)  # populated, like a booted guest
        t = track_async(writer, ram, hot_blocks)
        tracker = t.tracker
        assert isinstance(tracker, uffd_async.UffdAsyncTracker) and tracker.hot_blocks == hot_blocks
        try:
            dense_pages = [p for p in range(512) if p % 8]  # 448 of block 0's 512 pages
            writer.call("write", pages=[*dense_pages, 600, npages - 1], value=2)
            got = tracker.harvest()
            if hot_blocks:
                assert got == [(0, B), (600 * P, 601 * P), ((npages - 1) * P, npages * P)]
                assert tracker.hot_bytes == B
            else:
                assert got == pages_to_ranges([*dense_pages, 600, npages - 1])
                assert tracker.hot_bytes == 0
            for n in range(2, uffd_async.HOT_ROUNDS + 3):  # harvests 2 .. HOT_ROUNDS + 2
                writer.call("write", pages=[3, 700], value=n + 2)
                got = tracker.harvest()
                exact = [(3 * P, 4 * P), (700 * P, 701 * P)]
                if hot_blocks and n <= uffd_async.HOT_ROUNDS:  # hot, then the cooling harvest
                    assert got == [(0, B), (700 * P, 701 * P)], n
                else:
                    assert got == exact, n
                still_hot = hot_blocks and n < uffd_async.HOT_ROUNDS
                assert tracker.hot_bytes == (B if still_hot else 0), n
            assert tracker.harvest() == []
            assert ram[3 * P : 3 * P + 8] == (uffd_async.HOT_ROUNDS + 4).to_bytes(8, "little")
        finally:
            t.close()
    finally:
        writer.close()
        ram.close()


@needs_async
@pytest.mark.timeout(60)
def test_hot_blocks_switched_off_are_cooled_by_the_next_harvest_and_stay_off() -> None:
    """``hot_blocks`` switched off between harvests (the migration source does so with auto-converge's
    first throttle step, and before its final harvest): the next harvest scans the live hot block,
    reporting it whole one last time (un-protected, it reads as written) and counting it in
    whole_bytes; from then on every harvest is page-exact, and a block written densely again does not
    turn hot."""
    with populated_hot_tracker(3 * 512) as (writer, ram, tracker):
        writer.call("write", pages=list(range(512)), value=2)
        assert tracker.harvest() == [(0, B)]
        assert (tracker.hot_bytes, tracker.whole_bytes) == (B, B)
        writer.call("write", pages=[3, 700], value=3)
        assert tracker.harvest() == [(0, B), (700 * P, 701 * P)]  # hot: whole, without a scan
        assert tracker.whole_bytes == B
        tracker.hot_blocks = False
        writer.call("write", pages=[5, 701], value=4)
        assert tracker.harvest() == [(0, B), (701 * P, 702 * P)]  # the cooling scan
        assert (tracker.hot_bytes, tracker.whole_bytes) == (0, B)
        writer.call("write", pages=[*range(512), 1000], value=5)  # dense again
        assert tracker.harvest() == [(0, B), (1000 * P, 1001 * P)]
        assert (tracker.hot_bytes, tracker.whole_bytes) == (0, 0)
        writer.call("write", pages=[3], value=6)
        assert tracker.harvest() == [(3 * P, 4 * P)]  # block 0 protected: page-exact
        assert tracker.harvest() == []
        assert ram[3 * P : 3 * P + 8] == (6).to_bytes(8, "little")


@needs_async
@pytest.mark.timeout(60)
def test_hot_block_with_never_touched_pages() -> None:
    """A hot block of an unpopulated guest: un-protecting it drops the pte markers of its 64
    never-touched pages. It is reported whole every round, even rounds that write nothing
    there (the over-reporting is per round, not bounded by that round's writes); the cooling
    harvest reports at least what was written and re-protects the empty ptes, so first
    writes to them afterwards are reported page-exact."""
    npages = 1024
    writer = WriterProc(npages * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    try:
        t = track_async(writer, ram, hot_blocks=True)
        tracker = t.tracker
        assert isinstance(tracker, uffd_async.UffdAsyncTracker)
        try:
            dense_pages = [p for p in range(512) if p % 8]  # 448 of block 0; 0, 8, 16, ... never touched
            writer.call("write", pages=dense_pages, value=7)
            assert tracker.harvest() == [(0, B)]
            writer.call("write", pages=[600], value=8)  # outside the hot block: exact
            assert tracker.harvest() == [(0, B), (600 * P, 601 * P)]
            for n in range(3, uffd_async.HOT_ROUNDS):
                assert tracker.harvest() == [(0, B)], n  # nothing written, still reported whole
                assert tracker.hot_bytes == B
            writer.call("write", pages=[5], value=9)
            cooling = pages_of(tracker.harvest())  # the HOT_ROUNDS-th harvest
            assert set(dense_pages) <= cooling <= set(range(512))
            assert tracker.hot_bytes == 0
            writer.call("write", pages=[8, 16, 601], value=10)  # first writes to never-touched pages
            assert tracker.harvest() == [(8 * P, 9 * P), (16 * P, 17 * P), (601 * P, 602 * P)]
            assert tracker.harvest() == []
            assert ram[16 * P : 16 * P + 8] == (10).to_bytes(8, "little")
        finally:
            t.close()
    finally:
        writer.close()
        ram.close()


@needs_async
@pytest.mark.timeout(60)
def test_hot_block_dropped_by_a_scattered_round_is_reported_whole() -> None:
    """A round of scattered single pages (average run 2 pages: _find_hot does not look for
    dense blocks then) ends the hot set early: the hot block is scanned like any other in that
    round, reported whole (un-protected, it reads as written) and re-protected, and the next
    round is page-exact."""
    npages = 3 * 512
    with populated_hot_tracker(npages) as (writer, _, tracker):
        writer.call("write", pages=list(range(512)), value=2)
        assert tracker.harvest() == [(0, B)]
        assert tracker.hot_bytes == B
        scattered = list(range(512, npages, 2))  # every other page of blocks 1 and 2: 50%, not hot
        writer.call("write", pages=[*scattered, 3], value=3)
        assert tracker.harvest() == pages_to_ranges([*range(512), *scattered])
        assert tracker.hot_bytes == 0
        writer.call("write", pages=[3, 513], value=4)
        assert tracker.harvest() == [(3 * P, 4 * P), (513 * P, 514 * P)]
        assert tracker.harvest() == []


@needs_async
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("npages", "span", "populated"),
    [(2148, 600, True), (2148, 2148, True), (1024, 1024, True), (2148, 600, False)],
)
def test_hot_blocks_lose_no_write_while_writer_streams(npages: int, span: int, populated: bool) -> None:
    """Hot blocks on, the writer streaming over ``span`` pages of an ``npages`` guest.

    The guest is populated first (every page mapped in the writer, as after boot) except in
    the last case, where un-protecting a hot block turns never-touched pages' pte markers
    into empty ptes, which must still read as written when a cooling harvest scans them.
    Harvest about every 3 ms (some longer pauses let wide spans reach HOT_DENSITY too) and
    copy what each harvest names, like a migration. Each harvest must be sorted and merged;
    at the end, after halting the writer and a final harvest, the copy must equal guest RAM
    with every page's last stamp, every written page must have been reported, pages reported
    but never written must lie in blocks that were hot, and blocks must have been hot at
    least once (else the mode was not exercised). 2148 pages end in a short 100-page block.
    """
    seed = 4321 + span
    writer = WriterProc(npages * P)
    ram = mmap.mmap(writer.memfd, writer.size)
    try:
        if populated:
            writer.call("write", pages=list(range(npages)), value=0)  # zeros: no stamp is zero
        t = track_async(writer, ram, hot_blocks=True)
        tracker = t.tracker
        assert isinstance(tracker, uffd_async.UffdAsyncTracker)
        try:
            copy = bytearray(ram[:])
            union: set[int] = set()
            hot_pages: set[int] = set()  # pages of blocks hot after some harvest
            harvests = hot_harvests = 0
            writer.send("stream", seed=seed, npages=span)
            give_up = time.monotonic() + 20  # a liveness bound under load, not a performance check
            while (harvests < 60 or not hot_harvests) and time.monotonic() < give_up:
                # Mostly ~3 ms rounds; every 10th a longer one, and only long ones if a starved
                # writer has not made any block hot by the 60th harvest.
                time.sleep(0.1 if harvests >= 60 else 0.003 if harvests % 10 else 0.03)
                ranges = tracker.harvest()
                assert ranges == merge_ranges(ranges)
                for s, e in ranges:
                    copy[s:e] = ram[s:e]
                union |= pages_of(ranges)
                hot = tracker._hot
                assert pages_of(hot) <= pages_of(ranges)  # a hot block is reported whole
                assert tracker.hot_bytes == sum(e - s for s, e in hot)
                hot_pages |= pages_of(hot)
                hot_harvests += bool(hot)
                harvests += 1
            writer.send("halt")
            count = writer.recv()["count"]
            final = tracker.harvest()
            assert final == merge_ranges(final)
            for s, e in final:
                copy[s:e] = ram[s:e]
            union |= pages_of(final)
        finally:
            t.close()
    finally:
        writer.close()
        ram_now = ram[:]
        ram.close()
    assert harvests >= 60 and hot_harvests > 0, (harvests, hot_harvests)
    rng = stream_rng(seed)
    written = [rng.randrange(span) for _ in range(count)]
    assert set(written) <= union
    assert union - set(written) <= hot_pages  # over-reporting only in hot blocks
    assert bytes(copy) == ram_now
    last = {p: i for i, p in enumerate(written)}
    assert all(copy[p * P : p * P + 8] == stamp(i) for p, i in last.items())
