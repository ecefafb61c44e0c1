"""The WAIT instruction in real VM processes: pause, save and restore mid-wait; output independent of waits.

Unit tests of the instruction itself (both interpreters, save/restore with
fake clocks, instruction-rate bounds of the shipped programs) live in
test_isa.py, test_machine.py and test_programs.py; these run real VM
processes over real memfds with the host's monotonic clock.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import MakeMemfd, SpawnVM
from vmruntime.control import VMHandle
from vmruntime.programs import load_program

pytestmark = pytest.mark.timeout(60)

MEM = 1 << 20
IDLE_TURN_NS = 10_000_000  # idle waits 10 ms of virtual time per turn of its loop


def run_until(vm: VMHandle, instructions: int, timeout: float = 20.0) -> int:
    """Poll the VM's status until its instruction counter reaches ``instructions``; return the count."""
    deadline = time.monotonic() + timeout
    while (count := int(vm.status()["instructions"])) < instructions:
        assert time.monotonic() < deadline, f"stuck at {count} instructions, waiting for {instructions}"
        vm.poll_events(0.01)
    return count


def console_lines(vm: VMHandle, lines: int, timeout: float = 20.0) -> bytes:
    """Console output once it holds at least ``lines`` full lines."""
    deadline = time.monotonic() + timeout
    while vm.console.count(b"\n") < lines:
        assert time.monotonic() < deadline, f"only {bytes(vm.console)!r} after {timeout} s"
        vm.poll_events(0.05)
    return bytes(vm.console)


def test_idle_paused_mid_wait_restores_in_a_new_process_and_goes_on(
        spawn_vm: SpawnVM, make_memfd: MakeMemfd) -> None:  # fmt: skip
    fd = make_memfd(MEM)
    src = spawn_vm(MEM, "idle-src", fd)
    src.boot(*load_program("idle", {}))
    run_until(src, 12)  # three turns: the guest has waited, woken and waited again
    state = src.pause()
    clock = state["devices"]["clock"]
    # A pause lands between run slices, and every slice of idle ends in its WAIT.
    assert clock["wait_until_ns"] is not None
    assert clock["wait_until_ns"] - clock["now_ns"] <= IDLE_TURN_NS
    assert state["instructions"] % 4 == 3  # clock, addi, wait completed; the jmp is next
    src.stop()

    dst = spawn_vm(MEM, "idle-dst", fd)  # the same guest RAM, as after a migration
    dst.restore(state)
    assert run_until(dst, state["instructions"] + 8) >= state["instructions"] + 8
    again = dst.pause()
    assert again["devices"]["clock"]["now_ns"] >= clock["now_ns"]  # virtual time went on, never back
    assert again["status"] == "running" and dst.status()["status"] == "running"


def test_counter_output_is_the_same_with_and_without_waits(spawn_vm: SpawnVM) -> None:
    paced = spawn_vm(MEM, "counter-paced")
    flat = spawn_vm(MEM, "counter-flat")
    paced.boot(*load_program("counter", {"every": "20000"}))
    flat.boot(*load_program("counter", {"every": "20000", "wait": "0"}))
    want = console_lines(paced, 6)
    got = console_lines(flat, want.count(b"\n"))
    assert got.startswith(want)
    assert want.splitlines()[0] == b"count 0000000000004e20"  # 20000


def process_state(pid: int) -> str:
    """The scheduler state letter of a process (R running, S sleeping, ...) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_the_vm_process_of_an_idle_guest_sleeps(spawn_vm: SpawnVM) -> None:
    vm = spawn_vm(MEM, "idle-sleeps")
    vm.boot(*load_program("idle", {}))
    run_until(vm, 12)
    # A VM process polling its socket between slices is always runnable; one
    # that sleeps through the guest's WAIT is seen sleeping nearly every time.
    states = []
    for _ in range(20):
        states.append(process_state(vm.pid))
        time.sleep(0.005)
    assert states.count("S") >= 15, states
    assert vm.status()["instructions"] > 12  # while the guest keeps going, slowly
