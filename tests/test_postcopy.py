"""Post-copy's foundation over the real kernel and real VM processes: guest RAM registered for
userfaultfd MISSING faults in the VM process (vmruntime/postcopy.py), the faults served by the
agent's FaultServer (agent/migration/postcopy_faults.py) from a local "source": a second memfd
read in-process, no network.

The oracle is the toy VM's determinism: a `verify` guest paused on one VM process and restored
on another whose guest RAM is mostly holes prints the digest of an unmigrated run.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.migration.postcopy_faults import MISSING, PRESENT, REQUESTED, ZERO, BadPages, FaultServer
from tests.agents import digest_line, unmigrated_verify_digest
from tests.conftest import MakeMemfd, SpawnVM
from vmruntime import dirty, postcopy
from vmruntime.control import VMError, VMHandle
from vmruntime.dirty.extents import written_extents
from vmruntime.postcopy import Fault, Registered
from vmruntime.programs import load_program

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
PAGE = 4096
MEM = 16 * MiB
VERIFY_ARGS = {"ws": "4M", "steps": "400000"}

Range = tuple[int, int]


class LocalSource:
    """A PageSource over a memfd of this process: requests are answered by a thread of its own
    (as the return channel's receiver would place them), or at once (``inline``), or written
    to a socket (``socket``) that the fault server reads as one of its ``readers``."""

    def __init__(self, ram: mmap.mmap, inline: bool = False, socket_answers: bool = False) -> None:
        self.ram = ram
        self.inline = inline or socket_answers
        self.answers: tuple[socket.socket, socket.socket] | None = None
        if socket_answers:
            self.answers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.asked: list[tuple[int, int]] = []
        self.server: FaultServer | None = None
        self.errors: list[BaseException] = []
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if not inline:
            self._thread.start()

    def request(self, offset: int, npages: int) -> None:
        self.asked.append((offset, npages))
        if self.inline:
            self._answer(offset, npages)
        else:
            self._queue.put((offset, npages))

    def _answer(self, offset: int, npages: int) -> None:
        assert self.server is not None
        if self.answers is not None:  # header and pages in one packet, read by receive()
            self.answers[0].send(offset.to_bytes(8, "little") + self.ram[offset:offset + npages * PAGE])
            return
        view = memoryview(self.ram)
        try:
            self.server.place(offset, view[offset:offset + npages * PAGE])
        finally:
            view.release()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._answer(*item)
            except BaseException as e:  # the test reports it
                self.errors.append(e)

    def receive(self) -> None:
        """The reader the fault server calls when an answer waits on the socket."""
        assert self.server is not None and self.answers is not None
        data = self.answers[1].recv(1 << 20)
        self.server.place(int.from_bytes(data[:8], "little"), memoryview(data)[8:])

    def readers(self) -> dict[int, Any]:
        return {} if self.answers is None else {self.answers[1].fileno(): self.receive}

    def close(self) -> None:
        if self.answers is not None:
            for s in self.answers:
                s.close()
        if not self.inline:
            self._queue.put(None)
            self._thread.join(10)

    def asked_pages(self) -> set[int]:
        return {off // PAGE + i for off, n in self.asked for i in range(n)}


@contextlib.contextmanager
def serving(server: FaultServer, readers: dict[int, Any] | None = None) -> Iterator[list[BaseException]]:
    """Run ``server.serve`` in a thread (a migration session's) for the block; yields its errors."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.serve(stop, poll_s=0.02, readers=readers)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="fault-server")
    t.start()
    try:
        yield errors
    finally:
        stop.set()
        t.join(10)
        assert not t.is_alive()


def holes(size: int, data: list[Range]) -> list[Range]:
    out: list[Range] = []
    pos = 0
    for s, e in data:
        if s > pos:
            out.append((pos, s))
        pos = e
    if pos < size:
        out.append((pos, size))
    return out


def pages_of(ranges: list[Range]) -> list[int]:
    return [p for s, e in ranges for p in range(s // PAGE, e // PAGE)]


def as_ranges(pages: list[int]) -> list[Range]:
    return dirty.extents.pages_to_ranges(pages)


@pytest.fixture(scope="module")
def unmigrated() -> Iterator[bytes]:
    with unmigrated_verify_digest(MEM, VERIFY_ARGS) as result:
        yield result()


@pytest.fixture
def paused_verify(spawn_vm: SpawnVM) -> Iterator[tuple[dict[str, Any], mmap.mmap, VMHandle]]:
    """A verify guest run for a while on a "source" VM process, then paused: (its state, a mapping
    of its guest RAM, the handle)."""
    src = spawn_vm(MEM, "src")
    image, args = load_program("verify", VERIFY_ARGS)
    src.boot(image, args)
    give_up = time.monotonic() + 30
    while src.status()["instructions"] < 1_000_000 and time.monotonic() < give_up:
        time.sleep(0.005)
    state = src.pause()
    assert src.status()["status"] == "running", "the guest must be paused mid-run"
    ram = mmap.mmap(src.ram_fd, MEM)
    try:
        yield state, ram, src
    finally:
        with contextlib.suppress(BufferError):
            ram.close()


def restore_and_finish(dst: VMHandle, state: dict[str, Any], server: FaultServer, source: LocalSource) -> bytes:
    """Restore ``state`` on ``dst`` while ``server`` serves its faults; its digest line."""
    with serving(server, source.readers()) as errors:
        dst.request("restore", state=state, timeout=30)
        ev = dst.wait_event(["halted", "faulted"], timeout=90)
    assert not errors and not source.errors, (errors, source.errors)
    assert ev["ev"] == "halted", ev
    return digest_line(dst.take_console())


def push_the_rest(server: FaultServer, ram: mmap.mmap) -> None:
    """The background push: every page still missing, from the source."""
    view = memoryview(ram)
    try:
        for s, e in server.ranges(MISSING):
            server.place(s, view[s:e])
    finally:
        view.release()


@pytest.mark.parametrize(("readahead", "answers"), [(0, "thread"), (7, "socket")])
def test_verify_restored_on_mostly_missing_ram_ends_with_the_unmigrated_digest(
        spawn_vm: SpawnVM, make_memfd: MakeMemfd, paused_verify: Any, unmigrated: bytes, readahead: int,
        answers: str) -> None:
    state, src_ram, src = paused_verify
    written = written_extents(src.ram_fd, MEM)
    # Pre-copy delivered one written page in eight; the source's holes are known zero.
    present = [p for p in pages_of(written) if p % 8 == 0]
    dst_fd = make_memfd(MEM)
    for p in present:
        os.pwrite(dst_fd, src_ram[p * PAGE:(p + 1) * PAGE], p * PAGE)
    dst = spawn_vm(MEM, "dst", ram_fd=dst_fd)
    reg = postcopy.request_register(dst)
    assert reg.length == MEM and reg.features & postcopy.REQUIRED_FEATURES
    source = LocalSource(src_ram, socket_answers=answers == "socket")
    server = source.server = FaultServer(reg, dst_fd, source, present=as_ranges(present),
                                         zero=holes(MEM, written), readahead=readahead)
    try:
        assert restore_and_finish(dst, state, server, source) == unmigrated
        stats = server.stats()
        assert stats["postcopy-requests"] > 0 and stats["pages-zero"] > 0 and stats["faults-outside"] == 0
        assert stats["postcopy-blocktime"] > 0 and stats["postcopy-latency-p50"] is not None
        assert len(stats["postcopy-vcpu-blocktime"]) == 1  # one vCPU thread faulted
        if readahead:
            assert stats["pages-requested"] > stats["postcopy-requests"]
        assert not set(pages_of(as_ranges(present))) & source.asked_pages(), "a present page was asked for"
        push_the_rest(server, src_ram)
        assert server.wait_complete(0) and not server.ranges(MISSING) and not server.ranges(REQUESTED)
        final = server.done()
        assert final["pages-unsettled"] == 0
        assert dst.request("postcopy-end")["registered"] is True
        assert dst.status()["status"] == "halted"
        # Unregistered, guest RAM can be tracked for the VM's next migration.
        info = dst.track_start("uffd-wp-async")
        assert info.uffd is not None
        os.close(info.uffd)
    finally:
        server.close()
        source.close()


def test_discarded_pages_are_fetched_again(spawn_vm: SpawnVM, make_memfd: MakeMemfd, paused_verify: Any,
                                           unmigrated: bytes) -> None:
    """Every page arrived, but some copies are stale (the source's last dirty set): discard makes
    them missing again, and the guest's touch fetches them afresh."""
    state, src_ram, src = paused_verify
    written = written_extents(src.ram_fd, MEM)
    dst_fd = make_memfd(MEM)
    for s, e in written:
        os.pwrite(dst_fd, src_ram[s:e], s)
    below_hash_end = [p for p in pages_of(written) if p * PAGE < 4 * MiB]
    stale = below_hash_end[::16]
    for p in stale:
        os.pwrite(dst_fd, b"\xaa" * PAGE, p * PAGE)
    dst = spawn_vm(MEM, "dst", ram_fd=dst_fd)
    source = LocalSource(src_ram, inline=True)
    server = source.server = FaultServer(postcopy.request_register(dst), dst_fd, source, present=written,
                                         zero=holes(MEM, written), readahead=3)
    try:
        assert server.complete
        assert server.discard(as_ranges(stale)) == len(stale)
        assert not server.complete and server.ranges(MISSING) == as_ranges(stale)
        assert all(server.state(p * PAGE) == "missing" for p in stale)
        # The stale bytes are gone from the memfd: holes again.
        assert not set(pages_of(written_extents(dst_fd, MEM))) & set(stale)
        assert restore_and_finish(dst, state, server, source) == unmigrated
        assert set(stale) <= source.asked_pages()
        assert server.stats()["pages-discarded"] == len(stale)
    finally:
        server.close()


@pytest.fixture
def idle_registered(spawn_vm: SpawnVM, make_memfd: MakeMemfd) -> Iterator[tuple[VMHandle, int, Registered]]:
    """A VM process without a machine whose guest RAM (4 MiB of holes) is registered MISSING."""
    fd = make_memfd(4 * MiB)
    vm = spawn_vm(4 * MiB, "dst", ram_fd=fd)
    yield vm, fd, postcopy.request_register(vm)


class Recorder:
    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def request(self, offset: int, npages: int) -> None:
        self.asked.append((offset, npages))


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def test_a_page_is_never_placed_twice_and_eexist_keeps_what_is_there(idle_registered: Any) -> None:
    vm, fd, reg = idle_registered
    server = FaultServer(reg, fd, Recorder())
    try:
        assert server.place(0, page(1)) == 1
        assert server.place(0, page(2)) == 0  # present in the map: dropped, counted
        assert os.pread(fd, PAGE, 0) == page(1)
        # A page the map calls missing but the memfd holds (written behind the server's back):
        # the kernel answers EEXIST, the page stays as it is.
        os.pwrite(fd, page(3), PAGE)
        assert server.place(PAGE, page(4)) == 0
        assert os.pread(fd, PAGE, PAGE) == page(3) and server.state(PAGE) == "present"
        # A range over present and missing pages installs the missing ones only.
        assert server.place(3 * PAGE, page(5)) == 1
        assert server.place(2 * PAGE, page(6) + page(7) + page(8)) == 2
        assert os.pread(fd, 4 * PAGE, PAGE) == page(3) + page(6) + page(5) + page(8)
        stats = server.stats()
        assert stats["pages-placed"] == 4 and stats["pages-duplicate"] == 3
        # A read-only buffer (bytes) and a memoryview slice are both accepted.
        assert server.place(10 * PAGE, memoryview(page(9) * 2)[PAGE:]) == 1
        assert os.pread(fd, PAGE, 10 * PAGE) == page(9)
    finally:
        server.close()


def test_faults_on_zero_missing_and_present_pages(idle_registered: Any) -> None:
    """The fault paths, driven by hand (a guest's faults are the verify tests'): a zero page is
    installed as zeros, a missing one asked for with its readahead, a present one only woken."""
    vm, fd, reg = idle_registered
    src = Recorder()
    os.pwrite(fd, page(7), 0)
    server = FaultServer(reg, fd, src, present=[(0, PAGE), (20 * PAGE, 21 * PAGE)], zero=[(PAGE, 2 * PAGE)],
                         readahead=2)
    try:
        server.handle_fault(Fault(PAGE, reg.addr + PAGE + 8, False, 1))
        assert server.state(PAGE) == "present" and os.lseek(fd, PAGE, os.SEEK_DATA) == PAGE
        assert os.pread(fd, PAGE, PAGE) == bytes(PAGE)
        server.handle_fault(Fault(4 * PAGE, reg.addr + 4 * PAGE, True, 1))
        assert src.asked == [(4 * PAGE, 3)]
        assert [server.state(p * PAGE) for p in (4, 5, 6, 7)] == ["requested"] * 3 + ["missing"]
        server.handle_fault(Fault(5 * PAGE, reg.addr + 5 * PAGE, False, 1))  # in flight: not asked again
        assert src.asked == [(4 * PAGE, 3)]
        server.handle_fault(Fault(0, reg.addr, False, 1))
        server.place(4 * PAGE, page(1) * 3)
        stats = server.stats()
        assert stats["pages-woken"] == 1 and stats["pages-zero"] == 1 and stats["postcopy-requests"] == 1
        assert stats["postcopy-latency-p50"] is not None and stats["postcopy-vcpu-blocktime"]
        # The readahead stops at a page that is not missing.
        server.place(10 * PAGE, page(2))
        server.handle_fault(Fault(8 * PAGE, reg.addr + 8 * PAGE, False, 1))
        assert src.asked[-1] == (8 * PAGE, 2)
        assert server.ranges(REQUESTED) == [(8 * PAGE, 10 * PAGE)]
        assert server.ranges(PRESENT) == [(0, 2 * PAGE), (4 * PAGE, 7 * PAGE), (10 * PAGE, 11 * PAGE),
                                          (20 * PAGE, 21 * PAGE)]
        assert server.ranges(ZERO) == []
        # A map that says present over a hole (a caller's mistake) asks for the page rather than
        # waking the thread into the same fault forever.
        server.handle_fault(Fault(20 * PAGE, reg.addr + 20 * PAGE, False, 1))
        assert src.asked[-1] == (20 * PAGE, 3) and server.state(20 * PAGE) == "requested"
        assert server.stats()["pages-refetched"] == 1
    finally:
        server.close()


def test_zero_pages_arriving_settle_missing_pages_and_serve_requested_ones(idle_registered: Any) -> None:
    vm, fd, reg = idle_registered
    src = Recorder()
    server = FaultServer(reg, fd, src, present=[(0, PAGE)])
    try:
        server.handle_fault(Fault(2 * PAGE, reg.addr + 2 * PAGE, False, 1))  # page 2 requested
        assert server.mark_zero([(0, 4 * PAGE)]) == 3
        assert [server.state(p * PAGE) for p in range(5)] == ["present", "zero", "present", "zero", "missing"]
        assert os.lseek(fd, 2 * PAGE, os.SEEK_DATA) == 2 * PAGE  # the requested one: a zero page installed
        assert os.lseek(fd, PAGE, os.SEEK_DATA) == 2 * PAGE  # the others stay holes
        stats = server.stats()
        assert stats["pages-duplicate"] == 1 and stats["pages-zero"] == 1 and stats["postcopy-blocktime"] >= 0
        assert server.mark_zero([(4 * PAGE, reg.length)]) == reg.length // PAGE - 4
        assert server.wait_complete(0)
        server.place(2 * PAGE, page(1))  # a late answer to the request: the zero page stays
        assert os.pread(fd, PAGE, 2 * PAGE) == bytes(PAGE)
        with pytest.raises(BadPages):
            server.mark_zero([(0, 1)])
        server.done()
    finally:
        server.close()


def test_bad_input_is_refused_and_changes_nothing(idle_registered: Any) -> None:
    vm, fd, reg = idle_registered
    server = FaultServer(reg, fd, Recorder())
    size = reg.length
    try:
        for offset, data, why in [(1, page(1), "not page aligned"), (size, page(1), "outside guest RAM"),
                                  (size - PAGE, page(1) * 2, "outside guest RAM"), (0, b"x" * 100, "not page aligned"),
                                  (0, b"", "outside guest RAM")]:  # fmt: skip
            with pytest.raises(BadPages, match=why):
                server.place(offset, data)
        for bad in ([(0, 100)], [(size - PAGE, size + PAGE)], [(PAGE, PAGE)], [(0, PAGE), (3, PAGE)]):
            with pytest.raises(BadPages):
                server.discard(bad)
        with pytest.raises(BadPages, match="outside guest RAM"):
            server.handle_fault(Fault(size, reg.addr + size, False, 1))
        assert server.received_map() == bytes(size // PAGE)  # all still missing
        assert server.stats()["faults-outside"] == 1
        with pytest.raises(RuntimeError, match="not complete"):
            server.done()
        with pytest.raises(ValueError, match="readahead"):
            FaultServer(reg, fd, Recorder(), readahead=1000)
        push = bytes(size)
        assert server.place(0, push) == size // PAGE
        server.done()
        with pytest.raises(BadPages, match="after the post-copy ended"):
            server.place(0, page(1))
        with pytest.raises(BadPages, match="after the post-copy ended"):
            server.discard([(0, PAGE)])
    finally:
        server.close()


def test_register_ops_refuse_what_would_break_the_guest(spawn_vm: SpawnVM, idle_registered: Any) -> None:
    vm, fd, reg = idle_registered
    with pytest.raises(VMError, match="registered for post-copy already"):
        vm.request("postcopy-register")
    again = postcopy.request_register(vm, "postcopy-fd")
    assert (again.addr, again.length, again.vm_fd) == (reg.addr, reg.length, reg.vm_fd)
    os.close(again.uffd)
    with pytest.raises(VMError, match="busy"):  # dirty tracking on the same RAM
        vm.track_start("uffd-wp-async")
    os.close(reg.uffd)
    assert vm.request("postcopy-end")["registered"] is True
    assert vm.request("postcopy-end")["registered"] is False
    with pytest.raises(VMError, match="not registered"):
        vm.request("postcopy-fd")
    running = spawn_vm(4 * MiB, "running")
    image, args = load_program("idle", {})
    running.boot(image, args)
    with pytest.raises(VMError, match="vCPU does not run"):
        running.request("postcopy-register")
    info = running.track_start("uffd-wp-async")
    running.pause()
    with pytest.raises(VMError, match="another userfaultfd"):
        running.request("postcopy-register")
    if info.uffd is not None:
        os.close(info.uffd)


def test_a_lost_controller_leaves_the_guest_blocked_and_a_new_one_takes_the_uffd(
        spawn_vm: SpawnVM, make_memfd: MakeMemfd, paused_verify: Any, unmigrated: bytes) -> None:
    """The agent's copy of the uffd closes (an agent that died): the VM process's own copy keeps
    guest RAM registered, so the vCPU blocks on its first hole instead of reading zeros; a new
    controller takes the uffd from the process's fd table (its only thread is the blocked one)
    and the guest finishes with the right digest."""
    state, src_ram, src = paused_verify
    written = written_extents(src.ram_fd, MEM)
    dst_fd = make_memfd(MEM)
    dst = spawn_vm(MEM, "dst", ram_fd=dst_fd)
    reg = postcopy.request_register(dst)
    FaultServer(reg, dst_fd, LocalSource(src_ram, inline=True)).close()  # the first controller is gone
    with contextlib.suppress(TimeoutError):  # the restore itself may touch a hole
        dst.request("restore", state=state, timeout=1.5)
    with pytest.raises(TimeoutError):  # blocked on a hole, not running on zeros
        dst.request("status", timeout=1.0)
    assert not any(ev["ev"] in ("halted", "faulted") for ev in dst.poll_events())
    taken = Registered(postcopy.take_fd(dst.pid, reg.vm_fd), reg.addr, reg.length, reg.features, reg.vm_fd)
    source = LocalSource(src_ram)
    server = source.server = FaultServer(taken, dst_fd, source, zero=holes(MEM, written))
    try:
        assert restore_and_finish_running(dst, server, source) == unmigrated
    finally:
        server.close()
        source.close()


def restore_and_finish_running(dst: VMHandle, server: FaultServer, source: LocalSource) -> bytes:
    with serving(server) as errors:
        ev = dst.wait_event(["halted", "faulted"], timeout=90)
    assert not errors and not source.errors, (errors, source.errors)
    assert ev["ev"] == "halted", ev
    return digest_line(dst.take_console())


def test_pages_for_a_vm_process_that_died_are_refused_clearly(idle_registered: Any) -> None:
    vm, fd, reg = idle_registered
    server = FaultServer(reg, fd, Recorder())
    try:
        vm.proc.kill()
        vm.proc.wait()
        with pytest.raises(postcopy.PostcopyError, match="the VM process is gone"):
            server.place(0, page(1))
        assert server.state(0) == "missing"
    finally:
        server.close()
