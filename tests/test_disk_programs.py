"""The shipped disk programs: diskstress (disk dirty-rate generator) and dbverify (deterministic, its digest
covering the disk), on both interpreters, across save/restore, and in a VM process over a real image."""

from __future__ import annotations

import io
import mmap
import re
from pathlib import Path

import msgpack
import pytest

from tests.test_machine import FakeClock
from vmruntime import runlocal
from vmruntime.disk import MemoryBackend
from vmruntime.interp_ref import RefInterpreter
from vmruntime.machine import Machine
from vmruntime.programs import load_program

MiB = 1 << 20
RAM = 4 * MiB


def boot(name: str, args: dict[str, str], disk: MemoryBackend | None, clock: FakeClock | None = None) -> Machine:
    image, boot_args = load_program(name, args)
    return Machine.boot(mmap.mmap(-1, RAM), image, boot_args, clock or FakeClock(), disk=disk)


def finish(m: Machine, run: object = None) -> bytes:
    step = getattr(run, "run", m.run)
    while m.status == "running":
        step(10_000)
    assert m.status == "halted", m.fault_reason
    return m.console_drain()


ARGS = {"ws": "256K", "steps": "20000"}


def test_dbverify_is_deterministic_and_both_engines_agree() -> None:
    fast_disk, ref_disk = MemoryBackend(MiB), MemoryBackend(MiB)
    fast = boot("dbverify", ARGS, fast_disk)
    out = finish(fast)
    assert re.fullmatch(rb"digest [0-9a-f]{16}\n", out)
    ref = boot("dbverify", ARGS, ref_disk)
    assert finish(ref, RefInterpreter(ref)) == out and fast_disk.data == ref_disk.data
    assert fast.disk is not None and fast.disk.writes > 100 and fast.disk.reads > 100
    # the digest covers the disk's working set, pages the steps never touched included
    few = {"ws": "256K", "steps": "640"}
    plain, other = MemoryBackend(MiB), MemoryBackend(MiB)
    other.data[:256 << 10] = b"\1" * (256 << 10)
    assert finish(boot("dbverify", few, other)) != finish(boot("dbverify", few, plain))
    beyond = MemoryBackend(MiB)
    beyond.data[256 << 10:] = b"\1" * (MiB - (256 << 10))  # outside the working set: not covered
    assert finish(boot("dbverify", few, beyond)) == finish(boot("dbverify", few, MemoryBackend(MiB)))


@pytest.mark.parametrize("cut", [5_000, 60_000, 150_000])
def test_dbverify_digest_survives_save_and_restore(cut: int) -> None:
    reference = finish(boot("dbverify", ARGS, MemoryBackend(MiB)))
    disk = MemoryBackend(MiB)
    m = boot("dbverify", ARGS, disk)
    while m.instructions < cut and m.status == "running":
        m.run(1000)
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    ram = mmap.mmap(-1, RAM)
    ram[:] = m._ram[:]
    moved = MemoryBackend(MiB)  # the disk's bytes move with the VM (what a disk migration will do)
    moved.data[:] = disk.data
    restored = Machine.restore(ram, state, FakeClock(10**15), disk=moved)
    assert finish(restored) == reference


def test_programs_without_a_disk_say_so() -> None:
    for name in ("dbverify", "diskstress"):
        assert finish(boot(name, {}, None)) == f"{name}: no disk\n".encode()


@pytest.mark.parametrize("pattern", ["seq", "random"])
def test_diskstress_dirties_blocks_of_its_working_set(pattern: str) -> None:
    disk = MemoryBackend(2 * MiB)
    m = boot("diskstress", {"ws": "512K", "pattern": pattern}, disk)
    m.run(20_000)
    assert m.status == "running" and m.disk is not None and m.disk.writes > 100
    ranges = m.disk.dirty.harvest()
    assert ranges and all(off + length <= 512 << 10 for off, length in ranges)
    assert disk.data[512 << 10:] == bytes(len(disk.data) - (512 << 10))  # nothing outside the working set
    if pattern == "seq":
        assert ranges == [(0, 512 << 10)]


def test_diskstress_paces_itself() -> None:
    clock = FakeClock()
    m = boot("diskstress", {"ws": "1M", "rate": "1000"}, MemoryBackend(MiB), clock)
    for _ in range(100):  # one block per batch at 1000 blocks/s: a wait of 1 ms after each
        m.run(10_000)
        clock.now += 1_000_000
    assert m.disk is not None and 90 <= m.disk.writes <= 110 and m.wait_until_ns is not None


def test_dbverify_run_locally_on_an_image_matches_the_in_process_digest(tmp_path: Path) -> None:
    reference = finish(boot("dbverify", ARGS, MemoryBackend(MiB)))
    out = io.BytesIO()
    assert runlocal.run_local("dbverify", RAM, ARGS, out, disk=(str(tmp_path / "db.img"), MiB)) == 0
    assert out.getvalue() == reference
