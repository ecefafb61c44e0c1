"""The machine: boot, budgets, faults, and save/restore continuing exactly (in process and in a new one)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys

import msgpack
import pytest

from vmruntime import isa
from vmruntime.asm import Image, assemble
from vmruntime.machine import Machine
from vmruntime.programs import load_program

RAM = 1 << 20


class FakeClock:
    """A host clock the test controls (ns)."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def boot_asm(src: str, ram_size: int = RAM, args: dict[str, int] | None = None,
             clock: FakeClock | None = None) -> Machine:
    ram = mmap.mmap(-1, ram_size)
    return Machine.boot(ram, assemble(src, "<test>"), args or {}, clock or FakeClock())


def run_to_end(m: Machine, budget: int = 100_000, limit: int = 10_000_000) -> Machine:
    while m.status == "running" and m.instructions < limit:
        m.run(budget)
    return m


# ---- boot ----


def test_boot_block_and_registers() -> None:
    m = boot_asm("start: halt", args={"zeta": 9, "alpha": 1, "mid": 5})
    ram = m._ram
    assert int.from_bytes(ram[isa.BOOT_ADDR:isa.BOOT_ADDR + 8], "little") == isa.BOOT_MAGIC
    assert int.from_bytes(ram[isa.BOOT_ADDR + 16:isa.BOOT_ADDR + 24], "little") == RAM
    first = isa.BOOT_ADDR + isa.BOOT_OFF_ARGS
    assert ram[first:first + 5] == b"alpha"
    # arguments reach r1, r2, r3 sorted by name
    assert m.regs[:4] == [isa.BOOT_ADDR, 1, 5, 9]
    assert m.regs[isa.SP] == isa.STACK_TOP


def test_boot_refuses_wrong_isa_version_and_bad_args() -> None:
    ram = mmap.mmap(-1, RAM)
    image = assemble("start: halt")
    with pytest.raises(ValueError, match="ISA version"):
        Machine.boot(ram, Image(99, image.code, 0, 0), {}, FakeClock())
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Machine.boot(ram, image, {"x": -1}, FakeClock())
    with pytest.raises(ValueError, match="minimum"):
        Machine.boot(mmap.mmap(-1, isa.DATA_ADDR), image, {}, FakeClock())


def test_boot_touches_only_image_and_boot_block_pages() -> None:
    size = 1 << 30  # a sparse 1 GiB memfd: booting must not populate it
    fd = os.memfd_create("boot-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as ram:
            image, args = load_program("idle", {})
            m = Machine.boot(ram, image, args, FakeClock())
            m.run(10_000)
            assert m.status == "running"
            assert _data_extents(fd, size) == [(0, 4096), (isa.BOOT_ADDR, isa.BOOT_ADDR + 4096)]
            del m
    finally:
        os.close(fd)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


# ---- budgets ----


def test_run_stops_near_budget_and_counts_exactly() -> None:
    m = boot_asm("start: movi r1, 0\nloop: addi r1, r1, 1\n jmp loop")
    n = m.run(1000)
    assert 1000 <= n < 1000 + 64
    # r1 counts loop iterations, each two instructions, after one setup instruction
    assert m.instructions == n == 1 + 2 * m.regs[1]
    total = n + m.run(5)
    assert m.instructions == total == 1 + 2 * m.regs[1]
    assert m.run(0) == 0


def test_budget_of_one_steps_through_a_long_block() -> None:
    src = "start: " + "\n".join(f" addi r1, r1, {i}" for i in range(40)) + "\n halt"
    m = boot_asm(src)
    steps = 0
    while m.status == "running":
        m.run(1)
        steps += 1
    assert m.regs[1] == sum(range(40))
    assert m.instructions == 41


# ---- faults ----


def _fault(src: str) -> Machine:
    m = run_to_end(boot_asm(src))
    assert m.status == "faulted"
    assert m.fault_reason
    return m


def test_store_outside_ram_faults_with_pc_and_address() -> None:
    m = _fault(f"start: movi r2, 7\n li r1, {RAM - 4}\n st64 r2, [r1]\n movi r3, 1\n halt")
    assert "0xffffc" in (m.fault_reason or "") and "pc=0x18" in (m.fault_reason or "")
    assert m.pc == 0x18
    assert m.regs[2] == 7 and m.regs[3] == 0  # registers as they were before the faulting instruction
    assert m.instructions == 2
    assert m.run(1000) == 0
    assert m.status == "faulted"


def test_load_outside_ram_faults() -> None:
    m = _fault("start: li r1, 0xffffffffffff0000\n ld8 r2, [r1]\n halt")
    assert "load" in (m.fault_reason or "")


def test_store_into_code_region_faults() -> None:
    m = _fault("start: movi r1, 0\n movi r2, 0x01\n st8 r2, [r1]\n halt")
    assert "read-only code" in (m.fault_reason or "")
    assert m._ram[0] == 0x04  # the code is intact


def test_invalid_opcode_faults() -> None:
    m = _fault("start: movi r1, 1\n .byte 0xEE, 0, 0, 0, 0, 0, 0, 0\n halt")
    assert "invalid opcode 0xee" in (m.fault_reason or "")
    assert m.pc == 8 and m.instructions == 1


def test_jump_outside_code_faults() -> None:
    m = _fault(f"start: li r1, {isa.DATA_ADDR}\n jr r1")
    assert "outside the code region" in (m.fault_reason or "")


def test_division_by_zero_faults() -> None:
    m = _fault("start: movi r1, 5\n movi r2, 0\n divu r3, r1, r2\n halt")
    assert "division by zero" in (m.fault_reason or "")


def test_fill_and_copy_out_of_range_fault() -> None:
    m = _fault(f"start: li r1, {RAM - 10}\n movi r2, 11\n fill r1, r2, r2\n halt")
    assert "fill range" in (m.fault_reason or "")
    m = _fault(f"start: li r1, {isa.DATA_ADDR}\n movi r2, 0\n movi r3, 16\n copy r2, r1, r3\n halt")
    assert "copy destination" in (m.fault_reason or "")


def test_stack_overflow_into_code_faults_and_host_survives() -> None:
    m = _fault("start: call start")
    assert "call push" in (m.fault_reason or "")
    # the stack ran down through the boot block area until it reached the code image
    assert m.regs[isa.SP] < isa.STACK_TOP


def test_fault_state_survives_save_and_restore() -> None:
    m = _fault("start: movi r1, 0\n movi r2, 5\n divu r3, r2, r1")
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    m2 = Machine.restore(m._ram, state, FakeClock())
    assert (m2.status, m2.fault_reason, m2.pc) == ("faulted", m.fault_reason, m.pc)


# ---- save / restore ----


def _verify(ws: str = "64K", steps: str = "3000") -> tuple[Image, dict[str, int]]:
    return load_program("verify", {"ws": ws, "steps": steps})


def _reference(image: Image, args: dict[str, int], size: int) -> tuple[bytes, bytes, list[int], int]:
    m = run_to_end(Machine.boot(mmap.mmap(-1, size), image, args, FakeClock()))
    assert m.status == "halted"
    return m.console_drain(), bytes(m._ram), m.regs, m.instructions


def test_restore_at_random_split_points_continues_identically() -> None:
    size = 512 << 10
    image, args = _verify()
    want = _reference(image, args, size)
    assert want[0].startswith(b"digest ")
    rng = random.Random(1234)
    for _ in range(40):
        m = Machine.boot(mmap.mmap(-1, size), image, args, FakeClock())
        out = bytearray()
        for _ in range(rng.randint(1, 3)):  # a chain of migrations
            m.run(rng.randint(1, want[3] // 2))
            out += m.console_drain()
            state = msgpack.unpackb(msgpack.packb(m.save_state()))
            ram = mmap.mmap(-1, size)
            ram[:] = m._ram[:]
            m = Machine.restore(ram, state, FakeClock(rng.randint(0, 1 << 40)))
        run_to_end(m)
        out += m.console_drain()
        assert (bytes(out), bytes(m._ram), m.regs, m.instructions) == want


def test_restore_in_place_without_msgpack() -> None:
    size = 512 << 10
    image, args = _verify(steps="500")
    want = _reference(image, args, size)
    m = Machine.boot(mmap.mmap(-1, size), image, args, FakeClock())
    m.run(777)
    m2 = Machine.restore(m._ram, m.save_state(), FakeClock())
    run_to_end(m2)
    assert m2.console_drain() == want[0]
    assert m2.instructions == want[3]


def test_state_is_versioned_and_checked() -> None:
    m = boot_asm("start: jmp start")
    state = m.save_state()
    assert state["version"] == 4 and state["isa_version"] == isa.ISA_VERSION
    assert state["devices"]["clock"]["wait_until_ns"] is None
    bad_values: tuple[tuple[str, object], ...] = (("version", 5), ("version", 0), ("ram_size", RAM * 2), ("status", "exploded"), ("regs", [0] * 15),
                  ("regs", [-1] * 16), ("cmp", [0]), ("pc", "0"), ("instructions", -5), ("code", [0, 1 << 40]),
                  ("devices", {"console": {}}), ("devices", {"console": {"pending": "x"}, "clock": {"now_ns": 0}}),
                  ("devices", {"console": {"pending": b""}, "clock": {"now_ns": 0}}),  # v2 lacks the deadline
                  ("devices", {"console": {"pending": b""}, "clock": {"now_ns": 0, "wait_until_ns": -1}}),
                  ("devices", {"console": {"pending": b""}, "clock": {"now_ns": 0, "wait_until_ns": "1"}}))
    for key, bad in bad_values:
        with pytest.raises(ValueError):
            Machine.restore(m._ram, {**state, key: bad}, FakeClock())
    Machine.restore(m._ram, state, FakeClock())  # the untouched state is accepted


def test_clock_continues_across_restore_without_jumping() -> None:
    host_a = FakeClock(10**12)
    m = boot_asm("start: clock r1\n jmp start", clock=host_a)
    host_a.now += 5_000
    m.run(10)
    assert m.regs[1] == 5_000
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    host_b = FakeClock(42)  # another host, another epoch
    m2 = Machine.restore(m._ram, state, host_b)
    host_b.now += 300
    m2.run(10)
    assert m2.regs[1] == 5_300


def test_console_pending_output_migrates() -> None:
    m = run_to_end(boot_asm("start: movi r1, 0x41\n out r1\n halt"))
    m2 = Machine.restore(m._ram, msgpack.unpackb(msgpack.packb(m.save_state())), FakeClock())
    assert m2.console_drain() == b"A"


_CHILD = r"""
import mmap, os, sys, msgpack
from vmruntime.machine import Machine
fd, size = int(sys.argv[1]), int(sys.argv[2])
state = msgpack.unpackb(sys.stdin.buffer.read())
ram = mmap.mmap(fd, size)
m = Machine.restore(ram, state, lambda: 7)
while m.status == "running":
    m.run(100000)
sys.stdout.buffer.write(m.console_drain())
"""


def test_restore_in_a_fresh_process_over_a_shared_memfd() -> None:
    size = 512 << 10
    image, args = _verify(steps="4000")
    want = _reference(image, args, size)
    fd = os.memfd_create("guest", 0)
    try:
        os.ftruncate(fd, size)
        ram = mmap.mmap(fd, size)
        m = Machine.boot(ram, image, args, FakeClock())
        m.run(want[3] // 3)
        assert m.status == "running"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(fd), str(size)], pass_fds=(fd,),
                              input=msgpack.packb(m.save_state()), capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == want[0]
        assert bytes(ram) == want[1]
        ram.close()
    finally:
        os.close(fd)


def test_a_host_side_error_inside_execution_faults_the_vm_instead_of_raising() -> None:
    m = boot_asm(f"start: li r1, {isa.DATA_ADDR}\n movi r2, 64\n hash r3, r1, r2\n halt")

    def broken(*args: object) -> int:
        raise RuntimeError("disk on fire")

    m._compiler.ns["HASH"] = broken  # unit-level fault injection into the device helper
    m.run(100)  # must not raise
    assert m.status == "faulted"
    # the block never completed: state stays at its start, nothing half-committed
    assert (m.pc, m.instructions, m.regs[1]) == (0, 0, 0)
    assert "internal error: RuntimeError: disk on fire" in (m.fault_reason or "")


# ---- WAIT across save and restore ----

WAITER = "start: clock r1\n addi r1, r1, 1000\n wait r1\n addi r2, r2, 1\n jmp start"


def test_version_1_states_are_still_accepted_but_cannot_wait() -> None:
    m = boot_asm(WAITER)
    m.run(2)  # before the WAIT
    state = m.save_state()
    old = {**state, "version": 1, "devices": {"console": {"pending": b""}, "clock": {"now_ns": 0}}}
    m1 = Machine.restore(m._ram, old, FakeClock())
    assert m1.wait_until_ns is None and m1.run(10) > 0
    bad = {**old, "devices": {"console": {"pending": b""}, "clock": {"now_ns": 0, "wait_until_ns": 5}}}
    with pytest.raises(ValueError, match="version 1"):
        Machine.restore(m._ram, bad, FakeClock())


def test_a_waiting_vm_restored_elsewhere_waits_only_for_the_remainder() -> None:
    host_a = FakeClock(10**12)
    m = boot_asm(WAITER, clock=host_a)
    m.run(100)
    host_a.now += 400  # 400 of the 1000 ns have passed when the VM is saved
    assert m.run(100) == 0
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    assert state["devices"]["clock"] == {"now_ns": 400, "wait_until_ns": 1000}
    assert state["pc"] == 24 and state["instructions"] == 3  # the WAIT itself has completed
    host_b = FakeClock(77)  # another host, another epoch; downtime is not guest time
    m2 = Machine.restore(m._ram, state, host_b)
    assert m2.wait_until_ns == 1000 and m2.wait_seconds() == pytest.approx(600e-9)
    host_b.now += 599
    assert m2.run(100) == 0 and m2.instructions == 3
    host_b.now += 1
    assert m2.run(100) == 5 and m2.regs[2] == 1 and m2.wait_until_ns == 2000


def test_restore_of_a_passed_deadline_runs_at_once() -> None:
    clock = FakeClock()
    m = boot_asm(WAITER, clock=clock)
    m.run(100)
    clock.now += 5000  # the deadline passed while the VM was not run (e.g. right before a pause)
    state = m.save_state()
    assert state["devices"]["clock"]["wait_until_ns"] == 1000  # still recorded: run() clears it
    m2 = Machine.restore(m._ram, state, FakeClock())
    assert m2.run(100) == 5 and m2.regs[2] == 1


def _paced_run(program: str, args: dict[str, str], steps: list[int], migrate_at: set[int]) -> tuple[bytes, bytes, int]:
    """Drive a paced guest through a schedule of virtual-time steps, saving and restoring it on a
    new host (another clock epoch, a copy of RAM) before the steps in migrate_at; return
    (console, RAM, instructions)."""
    size = 2 << 20
    image, boot_args = load_program(program, args)
    clock = FakeClock(10**12)
    m = Machine.boot(mmap.mmap(-1, size), image, boot_args, clock)
    out = bytearray()
    for i, step in enumerate(steps):
        if i in migrate_at:
            out += m.console_drain()
            state = msgpack.unpackb(msgpack.packb(m.save_state()))
            ram = mmap.mmap(-1, size)
            ram[:] = m._ram[:]
            clock = FakeClock(i * 7919)  # the new host's epoch; the downtime is not guest time
            m = Machine.restore(ram, state, clock)
        clock.now += step
        m.run(1 << 20)
    out += m.console_drain()
    return bytes(out), bytes(m._ram), m.instructions


@pytest.mark.parametrize(("program", "args"), [
    ("memstress", {"ws": "1M", "rate": "3000", "pattern": "random", "values": "random"}),
    ("counter", {"every": "30000", "wait": "1"}),
    ("idle", {}),
])
def test_paced_guests_migrated_mid_wait_end_as_if_never_migrated(program: str, args: dict[str, str]) -> None:
    rng = random.Random(program)
    steps = [rng.choice([1, 50_000, 333_333, 1_000_000, 2_500_000]) for _ in range(120)]
    want = _paced_run(program, args, steps, set())
    assert want[2] > 20  # the guest ran (idle: ~4 instructions per 10 virtual ms)
    for _ in range(4):
        got = _paced_run(program, args, steps, set(rng.sample(range(1, 120), rng.randint(1, 6))))
        assert got == want
