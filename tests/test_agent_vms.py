"""Tests of agent.vms: the VM manager over real VM processes and real memfds, in-process.

The migration engine's surface (CONTRACTS.md) is exercised here without a network: a VM is paused,
its RAM copied into an incoming reservation, started from its state, and it carries on.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.logs import Log
from agent.records import VMRecords
from agent.vms import VM, ConsoleBuffer, NoSuchVM, VMError, VMManager, ram

MiB = 1 << 20
MakeVMs = Callable[..., VMManager]


@pytest.fixture
async def make_vms() -> AsyncIterator[MakeVMs]:
    """Factory: ``make_vms(max_mem=256 MiB, records=None)``; every VM is stopped afterwards, pass or fail."""
    made: list[VMManager] = []

    def make(max_mem: int = 256 * MiB, records: VMRecords | None = None) -> VMManager:
        vms = VMManager(agent_name="T", max_mem=max_mem, log=Log("debug", io.StringIO(), agent="T"), records=records)
        made.append(vms)
        return vms

    yield make
    for vms in made:
        for vm in vms.list():  # VMs with a record would outlive the manager's shutdown
            await vms.drop(vm)
        await vms.shutdown()


@pytest.fixture
async def vms(make_vms: MakeVMs) -> VMManager:
    return make_vms()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state dir: a VM process's attach socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ferry-vms-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _until(predicate: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _not_alive(pid: int) -> bool:
    return not _alive(pid)


async def _refreshed_above(vm: VM, n: int) -> bool:
    await vm.refresh()
    return vm.instructions > n


def _state_is(vm: VM, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return vm.state == state

    return check


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


async def test_create_info_pause_resume_destroy(vms: VMManager) -> None:
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


async def test_refusals_name_capacity_and_unknown(make_vms: MakeVMs) -> None:
    vms = make_vms(max_mem=64 * MiB)
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


async def test_migration_surface_moves_a_vm_within_one_host(vms: VMManager) -> None:
    """pause -> copy RAM into an incoming reservation -> start_incoming: the copy carries on counting."""
    src = await vms.create("src", "counter", 8 * MiB, {"every": "4096"})
    await _until(lambda: _refreshed_above(src, 100_000))
    await src.begin_migration()
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


async def test_end_migration_puts_the_run_state_back_unless_the_guest_finished(vms: VMManager) -> None:
    vm = await vms.create("e", "counter", 4 * MiB, {})
    await vm.begin_migration()
    await vm.pause()
    await vm.end_migration("paused")
    assert (vm.state, vm.migrating) == ("paused", False)
    await vm.begin_migration()
    vm.on_event({"ev": "faulted", "reason": "test"})
    await vm.end_migration("running")
    assert vm.state == "faulted"  # a finished guest stays finished


async def test_discard_incoming_frees_the_reservation_and_its_idle_process(vms: VMManager) -> None:
    inc = vms.reserve_incoming("x", 32 * MiB)
    assert vms.free_memory() == 224 * MiB
    await vms.prepare_incoming(inc)  # the VM process is up, idle
    assert inc.spawning is not None
    pid = inc.spawning.result().pid
    assert _alive(pid) and vms.list() == []  # an incoming VM is not a VM of this host yet
    vms.discard_incoming(inc)
    assert vms.free_memory() == 256 * MiB  # at once; the RAM itself is unmapped off the loop
    await vms.incoming.released()
    with pytest.raises(OSError):
        os.fstat(inc.memfd)
    assert inc.ram.closed
    await _until(lambda: _not_alive(pid))
    await vms.create("x", "idle", 4 * MiB, {})  # the name is free again


async def test_track_start_reports_guest_writes(vms: VMManager) -> None:
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


async def test_a_killed_vm_process_shows_as_faulted(vms: VMManager) -> None:
    vm = await vms.create("k", "idle", 4 * MiB, {})
    vm.process.kill()
    await _until(_state_is(vm, "faulted"))
    assert vm.fault_reason and "exited" in vm.fault_reason
    await vms.destroy("k")  # still cleans up


async def test_concurrent_creates_of_one_name_make_one_vm(make_vms: MakeVMs) -> None:
    vms = make_vms(max_mem=64 * MiB)
    results = await asyncio.gather(*(vms.create("same", "idle", 4 * MiB, {}) for _ in range(3)),
                                   return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, VMError)]
    assert len(made) == 1 and len(refused) == 2
    assert all(e.code == "vm-exists" for e in refused)
    assert [vm.name for vm in vms.list()] == ["same"]
    assert vms.free_memory() == 60 * MiB  # the refused ones hold no memory


# -- records: written off the loop, in order ----------------------------------------------------------
def _record(state_dir: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((state_dir / "vms" / f"{name}.json").read_text()))


def _records(state_dir: Path, before_write: Callable[[dict[str, Any]], None]) -> VMRecords:
    """VMRecords whose every write first calls ``before_write(record)``, in the writing thread."""
    records = VMRecords(state_dir)
    write = records.write

    def spied(record: dict[str, Any]) -> None:
        before_write(record)
        write(record)

    records.write = spied  # type: ignore[method-assign]
    return records


async def test_the_migration_phases_are_on_disk_when_the_calls_return(make_vms: MakeVMs, state_dir: Path) -> None:
    writers: list[threading.Thread] = []
    vms = make_vms(records=_records(state_dir, lambda record: writers.append(threading.current_thread())))
    vm = await vms.create("r", "counter", 4 * MiB, {})
    rec = _record(state_dir, "r")
    assert (rec["origin"], rec["migration-phase"], rec["socket"]) == ("created", None, vm.socket_path)
    await vm.begin_migration()
    rec = _record(state_dir, "r")
    assert (rec["migration-phase"], rec["run-before-migration"]) == ("precopy", "running")
    await vm.pause()
    await asyncio.wrap_future(vm.mark_commit_sent({"id": "0123456789abcdef", "to": "127.0.0.1:1"}))
    assert _record(state_dir, "r")["migration-phase"] == "commit-sent"
    assert _record(state_dir, "r")["migration-ref"] == {"id": "0123456789abcdef", "to": "127.0.0.1:1"}
    await vm.end_migration("running")
    assert _record(state_dir, "r")["migration-phase"] is None and _record(state_dir, "r")["migration-ref"] is None
    assert writers and threading.main_thread() not in writers  # never written on the loop's thread
    await vms.destroy("r")
    assert not (state_dir / "vms" / "r.json").exists()


async def test_record_writes_of_a_vm_land_in_the_order_asked(make_vms: MakeVMs, state_dir: Path) -> None:
    def slow_precopy(record: dict[str, Any]) -> None:
        if record["migration-phase"] == "precopy":
            threading.Event().wait(0.2)  # a slow disk: the next write is asked meanwhile

    vms = make_vms(records=_records(state_dir, slow_precopy))
    vm = await vms.create("o", "counter", 4 * MiB, {})
    begun = asyncio.ensure_future(vm.begin_migration())
    await asyncio.sleep(0)
    await asyncio.wrap_future(vm.mark_commit_sent({"id": "0123456789abcdef", "to": "127.0.0.1:1"}))
    assert begun.done()
    assert _record(state_dir, "o")["migration-phase"] == "commit-sent"
    await vm.end_migration("running")


# -- nothing that blocks on the loop's thread ---------------------------------------------------------
async def test_trackers_are_stopped_and_guest_ram_released_off_the_loop(
        vms: VMManager, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: dict[str, threading.Thread] = {}
    close = ram.close_guest_ram

    def spied_close(fd: int, mapping: Any) -> None:
        threads.setdefault("release", threading.current_thread())
        close(fd, mapping)

    monkeypatch.setattr(ram, "close_guest_ram", spied_close)
    vm = await vms.create("t", "idle", 4 * MiB, {})
    tracker = await vm.track_start()
    stop = tracker.stop

    def spied_stop() -> None:
        threads["stop"] = threading.current_thread()
        stop()

    tracker.stop = spied_stop  # type: ignore[method-assign]
    await vm.track_stop()
    inc = vms.reserve_incoming("u", 4 * MiB)
    vms.discard_incoming(inc)
    await vms.incoming.released()
    await vms.destroy("t")
    assert set(threads) == {"stop", "release"}
    assert threading.main_thread() not in threads.values()
