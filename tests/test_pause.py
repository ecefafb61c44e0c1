"""Pause, resume, save and restore of real VM processes: the guest never notices.

The oracle is an uninterrupted run of the ``verify`` program (it prints a
digest of its working set and registers, then halts): a run paused at random
moments, throttled, or saved and restored in new processes must end with the
same console output, the same registers and instruction count, and the same
guest RAM, byte for byte.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import pytest
import xxhash

from tests.conftest import MakeMemfd, SpawnVM
from vmruntime import guestram
from vmruntime.control import VMError, VMHandle
from vmruntime.programs import load_program

pytestmark = pytest.mark.timeout(60)

MEM = 1 << 20
# About 4 M instructions, 0.15 s of guest work on an idle core: dozens of pauses fit in.
VERIFY_ARGS = {"ws": "512K", "steps": "250000"}


@dataclass(frozen=True)
class Outcome:
    """Everything a finished guest leaves behind that must not depend on how it was run."""

    console: bytes
    cpu: tuple[Any, ...]
    ram_digest: str


def ram_digest(fd: int, size: int) -> str:
    with guestram.map_shared(fd, size) as mm:
        return xxhash.xxh3_128_hexdigest(mm)


def cpu_of(state: dict[str, Any]) -> tuple[Any, ...]:
    # Everything but the clock device, whose reading depends on wall time.
    return (state["pc"], tuple(state["regs"]), tuple(state["cmp"]), state["instructions"],
            state["status"], state["fault_reason"], state["devices"]["console"]["pending"])  # fmt: skip


def finish(vm: VMHandle) -> tuple[bytes, dict[str, Any]]:
    """Wait for the guest to halt; return the console output not yet taken and the final state."""
    ev = vm.wait_event(["halted", "faulted"], timeout=60)
    assert ev["ev"] == "halted", ev
    state = vm.pause()
    return vm.take_console(), state


def run_until(vm: VMHandle, instructions: int) -> None:
    """Let the guest run until it has executed at least ``instructions``."""
    while vm.status()["instructions"] < instructions:
        vm.poll_events(0.001)


def boot_verify(vm: VMHandle, *, paused: bool = False) -> None:
    image, args = load_program("verify", VERIFY_ARGS)
    vm.boot(image, args, paused=paused)


@pytest.fixture(scope="module")
def reference() -> Outcome:
    """The uninterrupted run every other run must match."""
    with VMHandle.spawn(MEM, name="reference") as vm:
        boot_verify(vm)
        console, state = finish(vm)
        assert console.startswith(b"digest ") and console.endswith(b"\n")
        return Outcome(console, cpu_of(state), ram_digest(vm.ram_fd, MEM))


def test_pause_at_random_moments_keeps_the_digest(spawn_vm: SpawnVM, reference: Outcome) -> None:
    rng = random.Random(20261122)
    vm = spawn_vm(MEM)
    boot_verify(vm)
    seen: list[int] = []
    while not any(ev["ev"] == "halted" for ev in vm.poll_events(rng.uniform(0.0, 0.004))):
        state = vm.pause()
        st = vm.status()
        # Paused means stopped: the counter in the reply is where the vCPU stands.
        assert st["paused"] is True and st["instructions"] == state["instructions"]
        seen.append(state["instructions"])
        vm.resume()
    assert seen == sorted(seen)
    mid_run = {n for n in seen if 0 < n < reference.cpu[3]}
    assert len(mid_run) >= 10, f"only {len(mid_run)} pauses landed mid-run"
    state = vm.pause()
    assert (vm.take_console(), cpu_of(state), ram_digest(vm.ram_fd, MEM)) == (
        reference.console, reference.cpu, reference.ram_digest)


def test_throttled_run_keeps_the_digest(spawn_vm: SpawnVM, reference: Outcome) -> None:
    vm = spawn_vm(MEM)
    vm.throttle(50)
    boot_verify(vm)
    assert vm.status()["throttle"] == 50
    console, state = finish(vm)
    assert (console, cpu_of(state), ram_digest(vm.ram_fd, MEM)) == (
        reference.console, reference.cpu, reference.ram_digest)


def _copy_memfd(src: int, make_memfd: MakeMemfd) -> int:
    dst = make_memfd(MEM)
    with guestram.map_shared(src, MEM) as a, guestram.map_shared(dst, MEM) as b:
        b[:] = a
    return dst


@pytest.mark.parametrize("fresh_ram", [False, True], ids=["same-memfd", "copied-memfd"])
def test_save_and_restore_in_new_processes(spawn_vm: SpawnVM, make_memfd: MakeMemfd,
                                           reference: Outcome, fresh_ram: bool) -> None:  # fmt: skip
    """Three hops, each: pause, stop the process, restore the state in a new one over the RAM."""
    rng = random.Random(7 + fresh_ram)
    total = reference.cpu[3]
    fd = make_memfd(MEM)
    vm = spawn_vm(MEM, ram_fd=fd)
    boot_verify(vm)
    console = b""
    for hop in range(3):
        # Hop at 20-30%, 40-50%, 60-70% of the run, whatever the speed of the host.
        low = total * (hop + 1) // 5
        run_until(vm, rng.randrange(low, low + total // 10))
        state = vm.pause()
        assert state["status"] == "running"
        console += vm.take_console()
        assert vm.stop() == 0
        if fresh_ram:
            fd = _copy_memfd(fd, make_memfd)
        vm = spawn_vm(MEM, ram_fd=fd)
        vm.restore(state, paused=True)
        assert vm.status()["instructions"] == state["instructions"]
        vm.resume()
    rest, final = finish(vm)
    assert (console + rest, cpu_of(final), ram_digest(fd, MEM)) == (
        reference.console, reference.cpu, reference.ram_digest)


def test_boot_paused_runs_nothing_until_resumed_and_halted_stays(spawn_vm: SpawnVM, reference: Outcome) -> None:
    vm = spawn_vm(MEM)
    boot_verify(vm, paused=True)
    assert vm.poll_events(0.05) == []
    st = vm.status()
    assert (st["status"], st["paused"], st["instructions"]) == ("running", True, 0)
    vm.resume()
    console, state = finish(vm)
    assert (console, cpu_of(state)) == (reference.console, reference.cpu)
    # Halted, the process stays and answers; resuming a halted guest runs nothing.
    vm.resume()
    st = vm.status()
    assert (st["status"], st["paused"], st["instructions"]) == ("halted", False, reference.cpu[3])


FAULTING = """
start:
    movi r1, 7
    out r1
    movi r2, 0
    divu r3, r1, r2
    halt
"""


def _boot_source(vm: VMHandle, source: str, tmp_path: Any) -> None:
    path = tmp_path / "guest.fasm"
    path.write_text(source)
    image, args = load_program(str(path), {})
    vm.boot(image, args)


def test_guest_fault_leaves_the_process_answering(spawn_vm: SpawnVM, tmp_path: Any) -> None:
    vm = spawn_vm(MEM)
    _boot_source(vm, FAULTING, tmp_path)
    ev = vm.wait_event(["faulted", "halted"])
    assert ev["ev"] == "faulted" and ev["reason"]
    assert vm.take_console() == b"\x07"  # output before the fault is delivered
    st = vm.status()
    assert (st["status"], st["fault_reason"]) == ("faulted", ev["reason"])
    state = vm.pause()
    assert (state["status"], state["fault_reason"], state["instructions"]) == (
        "faulted", ev["reason"], st["instructions"])
    vm.resume()  # accepted, but a faulted vCPU stays stopped
    assert vm.status()["instructions"] == st["instructions"] and vm.proc.poll() is None
    assert vm.stop() == 0


def test_restoring_a_faulted_state_reports_the_fault(spawn_vm: SpawnVM, make_memfd: MakeMemfd,
                                                     tmp_path: Any) -> None:  # fmt: skip
    fd = make_memfd(MEM)
    first = spawn_vm(MEM, ram_fd=fd)
    _boot_source(first, FAULTING, tmp_path)
    reason = first.wait_event(["faulted"])["reason"]
    state = first.pause()
    first.stop()
    second = spawn_vm(MEM, ram_fd=fd)
    second.restore(state)
    assert second.wait_event(["faulted"])["reason"] == reason
    assert second.status()["status"] == "faulted"


def test_boot_errors_are_replies_not_crashes(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm(MEM)
    image, args = load_program("verify", VERIFY_ARGS)
    bad = {"isa_version": image.isa_version, "code": image.code, "entry": len(image.code) + 64,
           "load_addr": image.load_addr}  # fmt: skip
    with pytest.raises(VMError, match="entry"):
        vm.boot(bad, args)
    with pytest.raises(VMError, match="state"):
        vm.restore({"version": 999})
    vm.boot(image, args, paused=True)
    with pytest.raises(VMError, match="already"):
        vm.boot(image, args)
    assert vm.status()["status"] == "running"


BIG_OUTPUT = """
start:
    li r1, DATA_ADDR
    li r2, 3145728
    movi r3, 65
    fill r1, r2, r3
    outs r1, r2
    movi r3, 10
    out r3
    halt
"""


def test_console_larger_than_a_packet_arrives_whole(spawn_vm: SpawnVM, tmp_path: Any) -> None:
    vm = spawn_vm(4 << 20)
    _boot_source(vm, BIG_OUTPUT, tmp_path)
    assert vm.wait_event(["halted", "faulted"])["ev"] == "halted"
    assert vm.take_console() == b"A" * 3145728 + b"\n"


def test_live_copy_with_dirty_tracking_then_restore_keeps_the_digest(
        spawn_vm: SpawnVM, make_memfd: MakeMemfd, reference: Outcome) -> None:  # fmt: skip
    """A migration in miniature: pre-copy rounds while the guest runs, pause, last round, restore."""
    from vmruntime import dirty

    backend = dirty.choose_backend(None)
    src = spawn_vm(MEM)
    boot_verify(src, paused=True)
    info = src.track_start(backend)
    dst_fd = make_memfd(MEM)
    with guestram.map_shared(src.ram_fd, MEM) as ram, guestram.map_shared(dst_fd, MEM) as copy:
        tracker = dirty.make_tracker(backend, pid=src.pid, uffd=info.uffd, addr=info.addr,
                                     length=info.length, ram=ram, memfd=src.ram_fd)  # fmt: skip
        try:
            tracker.start()
            for start, end in dirty.written_extents(src.ram_fd, MEM):
                copy[start:end] = ram[start:end]
            src.resume()
            for _round in range(3):
                run_until(src, src.status()["instructions"] + reference.cpu[3] // 8)
                for start, end in tracker.harvest():
                    copy[start:end] = ram[start:end]
            # The guest writes on after the last round: only the final harvest has those pages.
            run_until(src, src.status()["instructions"] + reference.cpu[3] // 8)
            state = src.pause()
            assert state["status"] == "running"
            for start, end in tracker.harvest():
                copy[start:end] = ram[start:end]
        finally:
            tracker.stop()
            if info.uffd is not None:
                os.close(info.uffd)
    console = src.take_console()
    src.stop()
    dst = spawn_vm(MEM, ram_fd=dst_fd)
    dst.restore(state)
    rest, final = finish(dst)
    assert (console + rest, cpu_of(final), ram_digest(dst_fd, MEM)) == (
        reference.console, reference.cpu, reference.ram_digest)
