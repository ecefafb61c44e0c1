"""Post-copy in userfaultfd MINOR mode over the real kernel and real VM processes: stale pages left
in the page cache (not punched), served by writing the fresh copy and UFFDIO_CONTINUE; up-to-date
pages mapped by UFFDIO_CONTINUE without the source (vmruntime/postcopy.py, agent/migration/postcopy_faults.py).

The oracle is the toy VM's determinism, as in test_postcopy.py: a `verify` guest restored on a VM
process whose page cache holds wrong bytes for some pages prints the digest of an unmigrated run
only if it never saw them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from agent.migration.postcopy_faults import MISSING, PRESENT, FaultServer
from tests.agents import agent_pair, digest_line, unmigrated_verify_digest, wait_for
from tests.conftest import MakeMemfd, SpawnVM
from tests.test_postcopy import (  # noqa: F401  (fixtures: pytest finds them by name)
    MEM,
    PAGE,
    LocalSource,
    Recorder,
    as_ranges,
    holes,
    page,
    pages_of,
    paused_verify,
    restore_and_finish,
    unmigrated,
)
from vmruntime import postcopy
from vmruntime.control import VMHandle
from vmruntime.dirty.extents import written_extents
from vmruntime.postcopy import Fault, Registered

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not postcopy.minor_available(), reason="no userfaultfd MINOR mode on shmem here")]

MiB = 1 << 20
WRONG = b"\xaa" * PAGE


@pytest.mark.parametrize("bulk", [False, True], ids=["faults", "map-present"])
def test_stale_pages_in_the_page_cache_are_never_seen_and_clean_pages_need_no_request(
        spawn_vm: SpawnVM, make_memfd: MakeMemfd, paused_verify: Any, unmigrated: bytes,  # noqa: F811
        bulk: bool) -> None:
    """Every written page arrived, some with wrong bytes (stale): they stay in the memfd, and the
    guest still reads only fresh copies. Only stale pages are asked of the source; clean ones are
    mapped by UFFDIO_CONTINUE, on the guest's faults or in bulk before it runs (``bulk``)."""
    state, src_ram, src = paused_verify
    written = written_extents(src.ram_fd, MEM)
    dst_fd = make_memfd(MEM)
    for s, e in written:
        os.pwrite(dst_fd, src_ram[s:e], s)
    stale = [p for p in pages_of(written) if p * PAGE < 4 * MiB][::16]
    for p in stale:
        os.pwrite(dst_fd, WRONG, p * PAGE)
    dst = spawn_vm(MEM, "dst", ram_fd=dst_fd)
    reg = postcopy.request_register(dst, minor=True)
    assert reg.minor and reg.features & postcopy.MINOR_FEATURE
    source = LocalSource(src_ram, inline=True)
    server = source.server = FaultServer(reg, dst_fd, source, present=written, zero=holes(MEM, written),
                                         stale=as_ranges(stale), readahead=0)
    try:
        assert server.ranges(MISSING) == as_ranges(stale) and server.stats()["postcopy-mode"] == "minor"
        # Not punched: the wrong bytes are still in the page cache, where the guest could see them.
        assert all(os.pread(dst_fd, PAGE, p * PAGE) == WRONG for p in stale)
        if bulk:
            clean = sum(e - s for s, e in server.ranges(PRESENT)) // PAGE
            assert server.map_present() == clean
        assert restore_and_finish(dst, state, server, source) == unmigrated
        stats = server.stats()
        # The source was asked for the stale pages (all of them: verify hashes that region) and
        # for nothing else; every clean page the guest touched was mapped without it.
        assert source.asked_pages() == set(stale)
        assert stats["postcopy-requests"] == len(stale) and stats["pages-placed"] == len(stale)
        assert stats["pages-continued"] > 0 and stats["pages-stale-mapped"] == 0
        assert all(os.pread(dst_fd, PAGE, p * PAGE) != WRONG for p in stale)
    finally:
        server.close()


@pytest.fixture
def idle_minor(spawn_vm: SpawnVM, make_memfd: MakeMemfd) -> Iterator[tuple[VMHandle, int, Registered]]:
    """A VM process without a machine whose guest RAM (4 MiB, pages 0-7 written) is registered MISSING|MINOR."""
    fd = make_memfd(4 * MiB)
    for p in range(8):
        os.pwrite(fd, page(1), p * PAGE)
    vm = spawn_vm(4 * MiB, "dst", ram_fd=fd)
    yield vm, fd, postcopy.request_register(vm, minor=True)


def test_stale_pages_are_written_then_continued_and_never_overwritten(idle_minor: Any) -> None:
    vm, fd, reg = idle_minor
    src = Recorder()
    server = FaultServer(reg, fd, src, present=[(0, 8 * PAGE)], zero=[(8 * PAGE, reg.length)],
                         stale=[(2 * PAGE, 4 * PAGE), (9 * PAGE, 10 * PAGE)])
    try:
        assert server.state(2 * PAGE) == server.state(9 * PAGE) == "missing"
        assert server.stats()["pages-discarded"] == 3
        # A MINOR fault on a clean page: mapped at once, nobody asked.
        server.handle_fault(Fault(0, reg.addr, False, 1, minor=True))
        assert src.asked == [] and server.stats()["pages-continued"] == 1
        # A MINOR fault on a stale page asks the source; its answer is written into the memfd.
        server.handle_fault(Fault(2 * PAGE, reg.addr + 2 * PAGE, False, 1, minor=True))
        assert src.asked == [(2 * PAGE, 1)] and server.state(2 * PAGE) == "requested"
        assert server.place(2 * PAGE, page(5) * 2) == 2  # the requested page and the other stale one
        assert os.pread(fd, 2 * PAGE, 2 * PAGE) == page(5) * 2 and server.state(3 * PAGE) == "present"
        # Present now: a later copy is dropped, the page keeps what the guest may have written.
        assert server.place(2 * PAGE, page(6)) == 0 and os.pread(fd, PAGE, 2 * PAGE) == page(5)
        # A page that was a hole (zero) when discarded is installed by UFFDIO_COPY as ever.
        assert server.place(9 * PAGE, page(7)) == 1 and os.pread(fd, PAGE, 9 * PAGE) == page(7)
        stats = server.stats()
        assert stats["pages-placed"] == 3 and stats["pages-stale-mapped"] == 0 and server.complete
        # map_present maps the clean pages left (0 was mapped by its fault, 2-3 and 9 by their installs).
        assert server.map_present() == 5
    finally:
        server.close()


def test_a_stale_page_settled_as_zero_is_zeroed_in_the_memfd(idle_minor: Any) -> None:
    vm, fd, reg = idle_minor
    server = FaultServer(reg, fd, Recorder(), present=[(0, 8 * PAGE)], zero=[(8 * PAGE, reg.length)],
                         stale=[(4 * PAGE, 6 * PAGE)])
    try:
        server.handle_fault(Fault(4 * PAGE, reg.addr + 4 * PAGE, True, 1, minor=True))
        assert server.mark_zero([(4 * PAGE, 6 * PAGE)]) == 2
        assert os.pread(fd, 2 * PAGE, 4 * PAGE) == bytes(2 * PAGE) and server.complete
        assert server.state(4 * PAGE) == server.state(5 * PAGE) == "present"
    finally:
        server.close()


def test_minor_mode_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    postcopy.minor_available.cache_clear()
    try:
        monkeypatch.setenv(postcopy.MINOR_ENV, "0")
        assert postcopy.minor_available() is False
        monkeypatch.delenv(postcopy.MINOR_ENV)
        postcopy.minor_available.cache_clear()
        assert postcopy.minor_available() is True
    finally:
        postcopy.minor_available.cache_clear()


@pytest.mark.slow
def test_without_minor_mode_the_destination_punches_and_says_so(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback end to end: the destination agent cannot use MINOR mode (turned off in its
    environment), punches the stale pages instead, and its migration info says which it used."""
    args = {"ws": "8M", "steps": "3000000"}
    monkeypatch.setenv(postcopy.MINOR_ENV, "0")
    pair = agent_pair(tmp_path)
    a, b = next(pair)
    monkeypatch.delenv(postcopy.MINOR_ENV)
    try:
        a.call("vm-create", name="pm1", program="verify", mem="16M", args=args)
        wait_for(lambda: a.call("vm-info", name="pm1")["instructions"] > 100_000, what="verify under way")
        out = a.cli("migrate", "pm1", "--to", b.control, "--postcopy", json=True).json
        assert out["status"] == "completed", out
        incoming: dict[str, Any] = b.call("migrate-status", name="pm1")
        assert incoming["postcopy-mode"] == "punch" and incoming["pages-continued"] == 0, incoming
        wait_for(lambda: b.call("vm-info", name="pm1")["state"] == "halted", timeout=120, what="verify to halt")
        with unmigrated_verify_digest(16 << 20, args) as result:
            assert digest_line(b.cli("vm", "console", "pm1").stdout.encode()) == result()
    finally:
        next(pair, None)


def test_page_maps_mark_overlapping_unsorted_ranges_and_refuse_outside_ones() -> None:
    from agent.migration import page_maps

    target = bytearray(8)
    assert page_maps.mark(target, [(5 * PAGE, 7 * PAGE), (0, 2 * PAGE), (PAGE, 3 * PAGE)]) == 5
    assert target == bytearray([1, 1, 1, 0, 0, 1, 1, 0])
    assert page_maps.mark(target, []) == 0
    with pytest.raises(ValueError, match="outside"):
        page_maps.mark(target, [(7 * PAGE, 9 * PAGE)])


def test_map_present_over_a_hole_the_map_calls_present_leaves_it_to_its_fault(idle_minor: Any) -> None:
    vm, fd, reg = idle_minor
    src = Recorder()
    server = FaultServer(reg, fd, src, present=[(0, 9 * PAGE)], zero=[(9 * PAGE, reg.length)])
    try:
        server.map_present()  # page 8 is a hole: UFFDIO_CONTINUE refuses it, nothing is raised
        server.handle_fault(Fault(8 * PAGE, reg.addr + 8 * PAGE, False, 1))  # a MISSING fault there
        assert src.asked == [(8 * PAGE, 1)] and server.stats()["pages-refetched"] == 1
    finally:
        server.close()
