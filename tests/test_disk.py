"""The disk device at the Machine level: requests, flush, faults, host errors, dirty blocks, saved state,
and the image file under it (create, checks, the exclusive lock)."""

from __future__ import annotations

import mmap
import os
import random
import time
from pathlib import Path

import msgpack
import pytest

from tests.test_machine import FakeClock
from vmruntime import isa
from vmruntime.asm import AsmError, assemble
from vmruntime.disk import DirtyBlocks, MemoryBackend
from vmruntime.diskimage import ImageError, ImageFile, prepare_image
from vmruntime.interp_ref import RefInterpreter
from vmruntime.machine import Machine

RAM = 1 << 20
DISK = 1 << 20  # 2048 sectors
BUF = isa.DATA_ADDR

# Writes a page of 0xAB at sector r1 (count 8), flushes, reads it back into BUF + 4096, then halts.
WRITE_READ = f"""
start:
    li r2, {BUF}
    li r3, 0xAB
    li r4, 4096
    fill r2, r4, r3
    dskw r1, DISK_SECTOR
    movi r5, 8
    dskw r5, DISK_COUNT
    dskw r2, DISK_ADDR
    movi r6, DISK_WRITE
    dskw r6, DISK_CMD
    movi r6, DISK_FLUSH
    dskw r6, DISK_CMD
    li r7, {BUF + 4096}
    dskw r7, DISK_ADDR
    movi r6, DISK_READ
    dskw r6, DISK_CMD
    dskr r8, DISK_STATUS
    dskr r9, DISK_READS
    dskr r10, DISK_WRITES
    dskr r11, DISK_SECTORS
    halt
"""


def boot(src: str, backend: MemoryBackend | None = None, args: dict[str, int] | None = None,
         block: int = 64 << 10) -> Machine:
    return Machine.boot(mmap.mmap(-1, RAM), assemble(src, "<disk>"), args or {}, FakeClock(),
                        disk=backend if backend is not None else MemoryBackend(DISK), disk_block=block)


def finish(m: Machine) -> Machine:
    while m.status == "running":
        m.run(10_000)
    return m


def test_write_flush_read_round_trip() -> None:
    backend = MemoryBackend(DISK)
    m = finish(boot(WRITE_READ, backend, {"s": 16}))
    assert m.status == "halted", m.fault_reason
    assert backend.data[16 * 512:16 * 512 + 4096] == b"\xab" * 4096 and backend.flushes == 1
    assert backend.data[:16 * 512] == bytes(16 * 512)
    assert m._ram[BUF + 4096:BUF + 8192] == b"\xab" * 4096
    assert m.regs[8:12] == [1, 1, 1, DISK // 512]
    assert m.disk is not None
    info = m.disk.info()
    assert (info["reads"], info["writes"], info["flushes"], info["errors"], info["dirty-blocks"]) == (1, 1, 1, 0, 1)


FAULTS = [
    ("movi r1, 0\n dskw r1, DISK_COUNT\n movi r1, DISK_READ\n dskw r1, DISK_CMD", "COUNT 0"),
    (f"li r1, {isa.DISK_MAX_COUNT + 1}\n dskw r1, DISK_COUNT\n movi r1, DISK_WRITE\n dskw r1, DISK_CMD",
     "COUNT 2049"),
    ("li r1, 2047\n dskw r1, DISK_SECTOR\n movi r1, 2\n dskw r1, DISK_COUNT\n li r1, 0x20000\n dskw r1, DISK_ADDR\n"
     " movi r1, DISK_READ\n dskw r1, DISK_CMD", "past the end of the disk"),
    ("movi r1, 1\n dskw r1, DISK_COUNT\n movi r1, 0\n dskw r1, DISK_ADDR\n movi r1, DISK_READ\n dskw r1, DISK_CMD",
     "into the image"),
    (f"movi r1, 1\n dskw r1, DISK_COUNT\n li r1, {RAM - 100}\n dskw r1, DISK_ADDR\n movi r1, DISK_WRITE\n"
     " dskw r1, DISK_CMD", "outside guest RAM"),
    ("movi r1, 9\n dskw r1, DISK_CMD", "bad disk command 9"),
    ("movi r1, 9\n dskw r1, DISK_READS", "read-only"),
    ("dskr r1, 15", "bad disk register 15"),
]


@pytest.mark.parametrize(("body", "reason"), FAULTS)
def test_bad_requests_fault_both_engines_alike(body: str, reason: str) -> None:
    src = f"start:\n {body}\n halt"
    fast = finish(boot(src))
    ref = boot(src)
    engine = RefInterpreter(ref)
    while ref.status == "running":
        engine.run(1000)
    assert fast.status == ref.status == "faulted"
    assert reason in (fast.fault_reason or "") and fast.fault_reason == ref.fault_reason
    assert (fast.pc, fast.instructions, fast.regs) == (ref.pc, ref.instructions, ref.regs)


def test_a_write_from_the_image_is_allowed() -> None:
    """A write only reads guest RAM: the code region may be its buffer (a read into it faults)."""
    backend = MemoryBackend(DISK)
    m = finish(boot("start:\n movi r1, 1\n dskw r1, DISK_COUNT\n movi r1, DISK_WRITE\n dskw r1, DISK_CMD\n halt",
                    backend))
    assert m.status == "halted" and backend.data[:8] == m._ram[:8]


def test_without_a_disk_status_reads_zero_and_the_rest_faults() -> None:
    m = Machine.boot(mmap.mmap(-1, RAM), assemble("start:\n dskr r1, DISK_STATUS\n dskr r2, DISK_SECTORS\n halt"),
                     {}, FakeClock())
    finish(m)
    assert m.status == "faulted" and "no disk" in (m.fault_reason or "") and m.regs[1] == 0
    assert m.disk is None and "disk" not in m.save_state()["devices"]


class FailingBackend(MemoryBackend):
    failures = 1  # the first write fails

    def write_from(self, offset: int, buf: memoryview) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().write_from(offset, buf)


def test_a_host_error_sets_the_error_bit_and_counts_never_faults() -> None:
    backend = FailingBackend(DISK)
    src = ("start:\n movi r1, 1\n dskw r1, DISK_COUNT\n li r1, 0x20000\n dskw r1, DISK_ADDR\n"
           " movi r1, DISK_WRITE\n dskw r1, DISK_CMD\n dskr r2, DISK_STATUS\n dskr r3, DISK_ERRORS\n"
           " dskw r1, DISK_CMD\n dskr r4, DISK_STATUS\n halt")
    m = finish(boot(src, backend))
    assert m.status == "halted" and m.regs[2:5] == [3, 1, 1]  # error, 1 error; then ok again


def test_engines_agree_on_a_disk_program() -> None:
    """Random sector writes and reads through both interpreters: same registers, RAM and disk."""
    rng = random.Random(18)
    lines = ["start:"]
    for _ in range(40):
        sector, count = rng.randrange(0, 2000), rng.randint(1, 48)
        addr = BUF + rng.randrange(0, 64) * 512
        lines += [f" li r1, {sector}", " dskw r1, DISK_SECTOR", f" movi r1, {count}", " dskw r1, DISK_COUNT",
                  f" li r1, {addr}", " dskw r1, DISK_ADDR", f" movi r2, {rng.randint(0, 255)}",
                  f" movi r3, {count * 512}", " fill r1, r3, r2" if rng.random() < 0.5 else " nop",
                  f" movi r1, {rng.choice(['DISK_READ', 'DISK_WRITE'])}", " dskw r1, DISK_CMD",
                  " dskr r4, DISK_SECTORS_WRITTEN"]
    lines.append(" halt")
    src = "\n".join(lines)
    fast_disk, ref_disk = MemoryBackend(DISK), MemoryBackend(DISK)
    fast = finish(boot(src, fast_disk))
    ref = boot(src, ref_disk)
    engine = RefInterpreter(ref)
    while ref.status == "running":
        engine.run(7)
    assert fast.status == ref.status == "halted"
    assert fast.regs == ref.regs and fast._ram[:] == ref._ram[:] and fast_disk.data == ref_disk.data
    assert fast.save_state()["devices"]["disk"] == ref.save_state()["devices"]["disk"]


# ---- dirty blocks ----

def test_dirty_blocks_mark_harvest_reset() -> None:
    d = DirtyBlocks(10 * 4096 + 512, 4096)
    assert d.blocks == 11 and d.harvest() == []
    d.mark(0, 1)
    d.mark(4096 * 2 + 100, 4096)  # straddles blocks 2 and 3
    d.mark(10 * 4096, 512)  # the last, partial block
    assert d.count() == 4
    assert d.harvest() == [(0, 4096), (8192, 8192), (40960, 512)]
    assert d.count() == 0 and d.harvest() == []
    d.mark_all()
    assert d.harvest(max_ranges=1) == [(0, 10 * 4096 + 512)]
    for b in (1, 3, 5):
        d.mark(b * 4096, 4096)
    assert d.harvest(max_ranges=2) == [(4096, 4096), (3 * 4096, 4096)]  # the rest stays marked
    assert d.harvest() == [(5 * 4096, 4096)]
    d.mark(0, 4096)
    d.reset()
    assert d.count() == 0
    with pytest.raises(ValueError):
        DirtyBlocks(4096, 1000)


@pytest.mark.parametrize("block", [512, 4096, 64 << 10, 1 << 20])
def test_guest_writes_mark_blocks_at_the_granularity(block: int) -> None:
    m = finish(boot(WRITE_READ, args={"s": 1000}, block=block))
    assert m.disk is not None
    start, end = 1000 * 512, 1000 * 512 + 4096
    first = start // block * block
    last = min(DISK, -(-end // block) * block)
    assert m.disk.dirty.harvest() == [(first, last - first)]
    assert m.disk.dirty.harvest() == []  # a read marks nothing, a harvest resets


def test_harvesting_a_64_gib_disk_map(capsys: pytest.CaptureFixture[str]) -> None:
    """A million 64 KiB blocks: marking and harvesting are C loops (figures printed, not asserted)."""
    size = 64 << 30
    d = DirtyBlocks(size)
    assert d.blocks == 1 << 20
    t0 = time.perf_counter()
    assert d.harvest() == []
    clean = time.perf_counter() - t0
    d.mark_all()
    t0 = time.perf_counter()
    assert d.harvest() == [(0, size)]
    full = time.perf_counter() - t0
    rng = random.Random(64)
    for _ in range(10_000):
        d.mark(rng.randrange(0, size), 4096)
    t0 = time.perf_counter()
    ranges = d.harvest()
    scattered = time.perf_counter() - t0
    assert 9000 < len(ranges) <= 10_000 and d.count() == 0
    for b in range(0, d.blocks, 2):  # the worst case: every other block, half a million ranges
        d.mark(b << 16, 1)
    t0 = time.perf_counter()
    assert len(d.harvest()) == d.blocks // 2
    alternate = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n64 GiB disk map: harvest clean {clean * 1e3:.2f} ms, all dirty {full * 1e3:.2f} ms, "
              f"10k scattered {scattered * 1e3:.2f} ms, 512k ranges {alternate * 1e3:.0f} ms")


# ---- saved state ----

def test_saved_state_round_trip_continues_the_request_registers() -> None:
    backend = MemoryBackend(DISK)
    src = ("start:\n movi r1, 3\n dskw r1, DISK_SECTOR\n movi r1, 2\n dskw r1, DISK_COUNT\n"
           " li r1, 0x20000\n dskw r1, DISK_ADDR\n movi r1, DISK_WRITE\n dskw r1, DISK_CMD\n"
           " movi r2, 0\n dskw r2, DISK_SECTOR\n"  # a request half set up when the state is saved...
           " movi r1, DISK_READ\n dskw r1, DISK_CMD\n dskr r3, DISK_READS\n halt")
    m = boot(src, backend)
    m.run(10)
    state = msgpack.unpackb(msgpack.packb(m.save_state()))
    assert state["version"] == 4 and state["isa_version"] == 3
    disk = state["devices"]["disk"]
    assert (disk["sectors"], disk["sector"], disk["count"], disk["writes"], disk["error"]) == (2048, 0, 2, 1, False)
    m2 = finish(Machine.restore(m._ram, state, FakeClock(), disk=backend))  # ...completes after the restore
    assert m2.status == "halted" and m2.regs[3] == 1
    assert m2.disk is not None and m2.disk.writes == 1 and m2.disk.sectors_read == 2
    assert m2.disk.dirty.count() == 0  # the tracking is the host's: a restored disk starts clean


def test_restore_checks_the_disk_state() -> None:
    m = boot(WRITE_READ)
    m.run(5)
    state = m.save_state()
    disk = state["devices"]["disk"]
    bads: list[object] = [{**disk, "sectors": 4096}, {**disk, "reads": -1}, {**disk, "error": 1}, {**disk, "addr": "0"}, []]
    for bad in bads:
        with pytest.raises(ValueError):
            Machine.restore(m._ram, {**state, "devices": {**state["devices"], "disk": bad}}, FakeClock(),
                            disk=MemoryBackend(DISK))
    with pytest.raises(ValueError, match="no image was given"):
        Machine.restore(m._ram, state, FakeClock())
    with pytest.raises(ValueError, match="sectors"):
        Machine.restore(m._ram, state, FakeClock(), disk=MemoryBackend(2 * DISK))
    for version, isa_version in ((3, 3), (4, 2)):
        with pytest.raises(ValueError, match="cannot carry a disk"):
            Machine.restore(m._ram, {**state, "version": version, "isa_version": isa_version}, FakeClock(),
                            disk=MemoryBackend(DISK))


def test_old_states_without_a_disk_restore_and_refuse_an_image() -> None:
    m = Machine.boot(mmap.mmap(-1, RAM), assemble("start:\n addi r1, r1, 1\n jmp start"), {}, FakeClock())
    m.run(100)
    state = m.save_state()
    for version, isa_version in ((3, 2), (4, 3)):
        old = {**state, "version": version, "isa_version": isa_version}
        m2 = Machine.restore(m._ram, old, FakeClock())
        assert m2.disk is None and m2.run(50) > 0
        with pytest.raises(ValueError, match="without a disk"):
            Machine.restore(m._ram, old, FakeClock(), disk=MemoryBackend(DISK))


def test_assembler_knows_the_disk() -> None:
    image = assemble("start:\n dskr r3, DISK_CMD\n dskw r4, DISK_ADDR\n li r1, DISK_SECTOR_SIZE + DISK_FLUSH")
    assert isa.decode(image.code, 0) == isa.Insn(isa.Op.DSKR, 3, 0, 0, 5, 8)
    assert isa.decode(image.code, 8) == isa.Insn(isa.Op.DSKW, 4, 0, 0, 4, 8)
    assert isa.decode(image.code, 16).imm == 512 + 3
    with pytest.raises(AsmError, match="disk register 16"):
        assemble("dskr r1, 16")
    assert "disk" in isa.ISA_FEATURES and isa.ISA_VERSION == 3 and image.isa_version == 3


# ---- the image file ----

def test_prepare_creates_sparse_reuses_and_refuses(tmp_path: Path) -> None:
    path = str(tmp_path / "a.img")
    with pytest.raises(ImageError, match="does not exist"):
        prepare_image(path, None)
    assert not os.path.exists(path)
    assert prepare_image(path, 1 << 30) == (1 << 30, True)
    st = os.stat(path)
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20  # sparse
    assert prepare_image(path, None) == (1 << 30, False)
    assert prepare_image(path, 1 << 20) == (1 << 20, False)  # a smaller disk over a bigger file
    with pytest.raises(ImageError, match="truncated"):
        prepare_image(path, 2 << 30)
    with pytest.raises(ImageError, match="multiple of 512"):
        prepare_image(str(tmp_path / "b.img"), 1000)
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    with pytest.raises(ImageError, match="whole number"):
        prepare_image(str(tmp_path / "odd.img"), None)
    with pytest.raises(ImageError, match="not a regular file"):
        prepare_image(str(tmp_path), None)
    with pytest.raises(ImageError, match="directory"):
        prepare_image(str(tmp_path / "nodir" / "c.img"), 4096)


def test_an_image_is_locked_while_open(tmp_path: Path) -> None:
    path = str(tmp_path / "a.img")
    prepare_image(path, 1 << 20)
    first = ImageFile.open(path, 1 << 20)
    with pytest.raises(ImageError, match=f"disk image {path} is in use by another VM"):
        ImageFile.open(path, 1 << 20)
    first.write_from(4096, memoryview(b"hello"))
    buf = bytearray(8)
    first.read_into(4096, memoryview(buf))
    assert bytes(buf) == b"hello\0\0\0"
    first.flush()
    first.close()
    second = ImageFile.open(path, 1 << 20)  # closing released the lock
    assert second.allocated() > 0
    second.close()
    with pytest.raises(ImageError, match="truncated"):
        ImageFile.open(path, 2 << 20)
