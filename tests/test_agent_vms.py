"""Tests of agent.vms: the VM manager over real VM processes and real memfds, in-process.

The migration engine's surface (CONTRACTS.md) is exercised here without a network: a VM is paused,
its RAM copied into an incoming reservation, started from its state, and it carries on.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from agent.logs import Log
from agent.vms import ConsoleBuffer, NoSuchVM, VMError, VMManager

T = TypeVar("T")
MiB = 1 << 20


def run(body: Callable[[VMManager], Awaitable[T]], max_mem: int = 256 * MiB) -> T:
    """Run body(manager) on a fresh event loop; every VM is stopped afterwards, pass or fail."""

    async def main() -> T:
        vms = VMManager(agent_name="T", max_mem=max_mem, log=Log("debug", io.StringIO(), agent="T"))
        try:
            return await body(vms)
        finally:
            await vms.shutdown()

    return asyncio.run(main())


async def _not_alive(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_console_buffer_keeps_the_tail_and_counts_everything() -> None:
    buf = ConsoleBuffer(limit=8)
    buf.write(b"0123")
    assert buf.read(0) == (b"0123", 4, 0)
    buf.write(b"456789ab")
    assert buf.total == 12
    data, nxt, dropped = buf.read(0)
    assert (data, nxt, dropped) == (b"456789ab", 12, 4)
    assert buf.read(10) == (b"ab", 12, 0)
    assert buf.read(12) == (b"", 12, 0)


def test_create_info_pause_resume_destroy() -> None:
    async def body(vms: VMManager) -> None:
        vm = await vms.create("c1", "counter", 16 * MiB, {"every": "1024"})
        assert vm.state == "running" and vms.get("c1") is vm
        assert vms.free_memory() == 240 * MiB
        await _until(lambda: _refreshed_above(vm, 0))
        state = await vm.pause()
        assert vm.state == "paused" and state["instructions"] == vm.instructions > 0
        await vm.refresh()
        assert vm.state == "paused" and vm.instructions == state["instructions"]
        await vm.resume()
        await _until(lambda: _refreshed_above(vm, state["instructions"]))
        assert vm.console.total > 0 and b"count" in vm.console.read(0)[0]
        pid = vm.pid
        await vms.destroy("c1")
        assert not _alive(pid)
        with pytest.raises(KeyError):
            vms.get("c1")
        assert vms.free_memory() == 256 * MiB

    run(body)


async def _refreshed_above(vm: object, n: int) -> bool:
    await vm.refresh()  # type: ignore[attr-defined]
    return bool(vm.instructions > n)  # type: ignore[attr-defined]


def test_refusals_name_capacity_and_unknown() -> None:
    async def body(vms: VMManager) -> None:
        with pytest.raises(NoSuchVM, match="no VM named 'x' on agent T"):
            vms.get("x")
        await vms.create("a", "idle", 48 * MiB, {})
        with pytest.raises(VMError) as e:
            await vms.create("a", "idle", 4 * MiB, {})
        assert e.value.code == "vm-exists"
        with pytest.raises(VMError) as e:
            await vms.create("b", "idle", 32 * MiB, {})
        assert e.value.code == "insufficient-memory"
        with pytest.raises(VMError) as e:
            vms.reserve_incoming("b", 32 * MiB)
        assert e.value.code == "insufficient-memory"
        for bad_name in ("", "a b", "x" * 64, "-lead"):
            with pytest.raises(VMError):
                await vms.create(bad_name, "idle", 4 * MiB, {})
        with pytest.raises(VMError) as e:
            await vms.create("c", "idle", 4097, {})
        assert e.value.code == "bad-request"
        assert [vm.name for vm in vms.list()] == ["a"]

    run(body, max_mem=64 * MiB)


def test_migration_surface_moves_a_vm_within_one_host() -> None:
    """pause -> copy RAM into an incoming reservation -> start_incoming: the copy carries on counting."""

    async def body(vms: VMManager) -> None:
        src = await vms.create("src", "counter", 8 * MiB, {"every": "4096"})
        await _until(lambda: _refreshed_above(src, 100_000))
        src.state = "migrating"
        assert src.state == "migrating"
        state = await src.pause()
        assert src.state == "migrating"  # the engine owns it until it says otherwise
        inc = vms.reserve_incoming("dst", 8 * MiB)
        assert vms.free_memory() == 256 * MiB - 16 * MiB
        with pytest.raises(VMError):
            vms.reserve_incoming("dst", 4 * MiB)  # the name is taken while reserved
        inc.ram[:] = src.ram[:]
        dst = await vms.start_incoming(inc, state, None)
        assert dst.state == "running" and vms.get("dst") is dst
        await _until(lambda: _refreshed_above(dst, state["instructions"]))
        await vms.remove_migrated("src")
        assert [vm.name for vm in vms.list()] == ["dst"]
        assert not _alive(src.pid)

    run(body)


def test_discard_incoming_frees_the_reservation_and_its_idle_process() -> None:
    async def body(vms: VMManager) -> None:
        inc = vms.reserve_incoming("x", 32 * MiB)
        assert vms.free_memory() == 224 * MiB
        await vms.prepare_incoming(inc)  # the VM process is up, idle
        assert inc.spawning is not None
        pid = inc.spawning.result().pid
        assert _alive(pid) and vms.list() == []  # an incoming VM is not a VM of this host yet
        vms.discard_incoming(inc)
        await _until(lambda: _not_alive(pid))
        assert vms.free_memory() == 256 * MiB
        with pytest.raises(OSError):
            os.fstat(inc.memfd)
        await vms.create("x", "idle", 4 * MiB, {})  # the name is free again

    run(body)


def test_track_start_reports_guest_writes() -> None:
    async def body(vms: VMManager) -> None:
        vm = await vms.create("m", "memstress", 16 * MiB, {"ws": "4M", "rate": "2000"})
        tracker = await vm.track_start()
        assert tracker.name == vm.dirty_backend
        tracker.start()
        ranges: list[tuple[int, int]] = []

        async def written() -> bool:
            ranges.extend(await asyncio.to_thread(tracker.harvest))
            return bool(ranges)

        await _until(written)  # memstress keeps writing: some harvest reports it
        assert all(s < e and s % 4096 == 0 and e <= 16 * MiB for s, e in ranges)
        await vm.track_stop()
        await vm.track_stop()  # idempotent

    run(body)


def test_a_killed_vm_process_shows_as_faulted() -> None:
    async def body(vms: VMManager) -> None:
        vm = await vms.create("k", "idle", 4 * MiB, {})
        vm.process.kill()
        await _until(_state_is(vm, "faulted"))
        assert vm.fault_reason and "exited" in vm.fault_reason
        await vms.destroy("k")  # still cleans up

    run(body)


def _state_is(vm: object, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(vm.state == state)  # type: ignore[attr-defined]

    return check


def test_concurrent_creates_of_one_name_make_one_vm() -> None:
    async def body(vms: VMManager) -> None:
        results = await asyncio.gather(*(vms.create("same", "idle", 4 * MiB, {}) for _ in range(3)),
                                       return_exceptions=True)
        made = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, VMError)]
        assert len(made) == 1 and len(refused) == 2
        assert all(e.code == "vm-exists" for e in refused)
        assert [vm.name for vm in vms.list()] == ["same"]
        assert vms.free_memory() == 60 * MiB  # the refused ones hold no memory

    run(body, max_mem=64 * MiB)
