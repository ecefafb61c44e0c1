"""Shared pytest fixtures: real VM processes over real memfds, cleaned up after each test; a
module's pair of agents; the digest of an unmigrated `verify` run.

Helpers that start agents or inject faults are plain modules (tests/agents.py, tests/faults.py):
import them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator

import pytest

from tests.agents import AgentProc, agent_pair, names, unmigrated_verify_digest
from tests.netlan import Lan, make_lan
from vmruntime import dirty, guestram
from vmruntime.control import TrackInfo, VMHandle

MiB = 1 << 20
VERIFY_MEM = 16 * MiB  # the `verify` guest's size unless a module sets VERIFY_MEM

SpawnVM = Callable[..., VMHandle]
MakeMemfd = Callable[[int], int]
MapGuestRam = Callable[[int], tuple[int, mmap.mmap]]


@pytest.fixture
def lan() -> Iterator[Lan]:
    """A host bridge and a client namespace on it (tests/netlan.py); the test module skips
    without root, `ip` or /dev/net/tun (tests.netlan.net_unavailable)."""
    with make_lan() as net:
        yield net


@pytest.fixture
def spawn_vm() -> Iterator[SpawnVM]:
    """Factory: ``spawn_vm(ram_size=4 MiB, **kw)`` starts a VM process; all are killed at teardown.

    On a failing test the VM process's stderr (inherited) is in pytest's
    captured output, next to the assertion.
    """
    handles: list[VMHandle] = []

    def spawn(ram_size: int = 4 * MiB, name: str = "vm", ram_fd: int | None = None, *,
              on_eof: str = "exit") -> VMHandle:  # fmt: skip
        vm = VMHandle.spawn(ram_size, name, ram_fd, on_eof=on_eof)
        handles.append(vm)
        return vm

    yield spawn
    for vm in handles:
        vm.close()


@pytest.fixture
def make_memfd() -> Iterator[MakeMemfd]:
    """Factory: ``make_memfd(size)`` creates a guest-RAM memfd, closed at teardown."""
    fds: list[int] = []

    def make(size: int) -> int:
        fd = guestram.create_memfd(size, "ferry-test")
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def guest_ram() -> Iterator[MapGuestRam]:
    """Factory: ``guest_ram(size)`` is (memfd, shared mapping) of new guest RAM; both closed at teardown."""
    made: list[tuple[int, mmap.mmap]] = []

    def make(size: int) -> tuple[int, mmap.mmap]:
        fd = guestram.create_memfd(size)
        mm = guestram.map_shared(fd, size)
        made.append((fd, mm))
        return fd, mm

    yield make
    for fd, mm in made:
        with contextlib.suppress(BufferError):  # a digest's view of the mapping may outlive the test body
            mm.close()
        os.close(fd)


@contextlib.contextmanager
def tracking(vm: VMHandle, backend: str, *,
             hot_blocks: bool = False) -> Iterator[tuple[TrackInfo, dirty.DirtyTracker, mmap.mmap]]:
    """The agent's side of dirty tracking of ``vm``'s guest RAM, as a migration source sets it up:
    track-start, a mapping of guest RAM, a started tracker. Yields (track-start's info, the tracker,
    the mapping); all of it is undone on leaving."""
    info = vm.track_start(backend)
    ram = mmap.mmap(vm.ram_fd, vm.ram_size)
    tracker = dirty.make_tracker(backend, pid=vm.pid, uffd=info.uffd, addr=info.addr, length=info.length,
                                 ram=ram, memfd=vm.ram_fd, hot_blocks=hot_blocks)
    try:
        tracker.start()
        yield info, tracker, ram
    finally:
        tracker.stop()
        if info.uffd is not None:
            os.close(info.uffd)
        vm.track_stop()
        ram.close()


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Two agents for a test module (starting agents costs seconds); a module that needs them set
    up otherwise defines its own."""
    yield from agent_pair(tmp_path_factory.mktemp("agents"))


@pytest.fixture
def pair(shared_pair: tuple[AgentProc, AgentProc]) -> Iterator[tuple[AgentProc, AgentProc]]:
    """The module's agents, emptied of VMs after each test (no migration may still be running)."""
    yield shared_pair
    for agent in shared_pair:
        for name in names(agent):
            agent.call("vm-destroy", name=name)


@pytest.fixture(scope="module")
def unmigrated_digest(request: pytest.FixtureRequest) -> Iterator[Callable[[], bytes]]:
    """The `digest` line of an unmigrated `verify` run with the module's VERIFY_ARGS (and
    VERIFY_MEM bytes of RAM, if it sets it), computed once per module, in the background."""
    mem = getattr(request.module, "VERIFY_MEM", VERIFY_MEM)
    with unmigrated_verify_digest(mem, request.module.VERIFY_ARGS) as result:
        yield result
