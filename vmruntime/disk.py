"""The disk device: guest-visible registers, sector requests between guest RAM and an image, dirty blocks.

Owns the device model of docs/isa.md ("The disk"): the registers the
`dskr`/`dskw` instructions reach, the request rules (bounds, the command
doorbell, the error bit), the counters, the device's part of the saved state,
and the dirty-block map a disk migration harvests round by round (the disk's
counterpart of guest RAM dirty tracking).  The bytes themselves go through a
`BlockBackend`: the VM process's image file (vmruntime/diskimage.py), or
memory in tests.  A request runs to completion inside the `dskw` that rings
the doorbell, so at an instruction boundary no request is half done: the
request registers (sector, count, address) are the device's in-flight state.

Register accessors return a fault reason (a str) instead of raising, so the
block compiler can write its registers back before it raises GuestFault.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import Any, Protocol

from vmruntime import isa

SECTOR = isa.DISK_SECTOR_SIZE
MAX_COUNT = isa.DISK_MAX_COUNT
DEFAULT_BLOCK_SIZE = 64 << 10

# Register numbers (the assembler's DISK_* constants).
STATUS, SECTORS, REQ_SECTOR, COUNT, ADDR, CMD = 0, 1, 2, 3, 4, 5
READS, WRITES, FLUSHES, ERRORS, SECTORS_READ, SECTORS_WRITTEN = 6, 7, 8, 9, 10, 11
NUM_REGS = 12
STATUS_PRESENT, STATUS_ERROR = 1, 2
CMD_READ, CMD_WRITE, CMD_FLUSH = 1, 2, 3

# Saved fields, in register order from REQ_SECTOR (STATUS and SECTORS are derived).
_FIELDS = ("sector", "count", "addr", "cmd", "reads", "writes", "flushes", "errors", "sectors_read",
           "sectors_written")


class BlockBackend(Protocol):
    """Where a disk's bytes live: an image file (vmruntime/diskimage.py) or memory (MemoryBackend).

    Failures raise OSError; the device turns them into its ERROR bit, never into a guest fault.
    """

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill buf with the bytes at offset (zeros past the end of what is stored)."""

    def write_from(self, offset: int, buf: memoryview) -> None:
        """Store all of buf at offset."""

    def flush(self) -> None:
        """Make every write done so far durable."""


class MemoryBackend:
    """A disk in a bytearray: tests and reference runs that need no file."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def write_from(self, offset: int, buf: memoryview) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        self.flushes += 1


def no_disk_read(reg: int) -> int | str:
    """dskr on a machine without a disk: STATUS reads 0 (so a guest can probe), anything else faults."""
    return 0 if reg == STATUS else "no disk"


def no_disk_write(reg: int, value: int) -> str | None:
    return "no disk"


class DirtyBlocks:
    """Which blocks of a disk were written since the last harvest: one byte per block.

    One byte per block rather than one bit: marking a write is one slice assignment, and a
    harvest finds runs with bytes.find (C loops), so a 64 GiB disk (a million 64 KiB blocks)
    costs a 1 MiB map and a harvest costs per run, not per block.
    """

    def __init__(self, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < SECTOR or block_size & (block_size - 1):
            raise ValueError(f"dirty block size {block_size} is not a power of two of at least {SECTOR}")
        self.size = size
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self.blocks = (size + block_size - 1) >> self._shift
        self._map = bytearray(self.blocks)

    def mark(self, offset: int, length: int) -> None:
        """Bytes [offset, offset+length) were written."""
        if length <= 0:
            return
        first = offset >> self._shift
        last = min(self.blocks, ((offset + length - 1) >> self._shift) + 1)
        self._map[first:last] = b"\1" * (last - first)

    def mark_all(self) -> None:
        self._map[:] = b"\1" * self.blocks

    def count(self) -> int:
        """Blocks marked now."""
        return self._map.count(1)

    def harvest(self, max_ranges: int | None = None) -> list[tuple[int, int]]:
        """The dirty byte ranges (offset, length), in order, merged, the last clipped to the disk's
        size; the blocks returned are reset (clean until written again), the rest stay marked.

        max_ranges bounds the answer (a reply must fit a control message); a caller harvests
        again while ranges come back full.
        """
        found = self._map.find
        out: list[tuple[int, int]] = []
        add = out.append
        shift, blocks = self._shift, self.blocks
        limit = blocks if max_ranges is None else max_ranges
        first = pos = found(1)
        end = 0
        while pos >= 0 and len(out) < limit:
            end = found(0, pos)
            if end < 0:
                end = blocks
            add((pos << shift, (end - pos) << shift))
            pos = found(1, end)
        if out:
            # One clear for the whole span: the gaps between the runs are clean already.
            self._map[first:end] = bytes(end - first)
            last_start, last_length = out[-1]
            if last_start + last_length > self.size:
                out[-1] = (last_start, self.size - last_start)
        return out

    def reset(self) -> None:
        """Forget every mark (a migration's first round takes the whole disk instead)."""
        self._map[:] = bytes(self.blocks)


class DiskDevice:
    """One disk over one guest RAM mapping and one backend; see docs/isa.md "The disk"."""

    def __init__(self, ram: mmap.mmap, code_end: int, backend: BlockBackend,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        size = backend.size
        if size <= 0 or size % SECTOR:
            raise ValueError(f"disk of {size} bytes is not a positive whole number of {SECTOR}-byte sectors")
        self._ram = ram
        self._ram_size = len(ram)
        self._code_end = code_end
        self.backend = backend
        self.sectors = size // SECTOR
        self.dirty = DirtyBlocks(size, block_size)
        self.error = False  # the last command failed on the host side
        self.sector = self.count = self.addr = self.cmd = 0
        self.reads = self.writes = self.flushes = self.errors = 0
        self.sectors_read = self.sectors_written = 0

    # ---- guest side: registers ----

    def read(self, reg: int) -> int | str:
        if reg == STATUS:
            return STATUS_PRESENT | (STATUS_ERROR if self.error else 0)
        if reg == SECTORS:
            return self.sectors
        if 0 < reg < NUM_REGS:
            return int(getattr(self, _FIELDS[reg - REQ_SECTOR]))
        return f"bad disk register {reg}"

    def write(self, reg: int, value: int) -> str | None:
        if reg == REQ_SECTOR:
            self.sector = value
        elif reg == COUNT:
            self.count = value
        elif reg == ADDR:
            self.addr = value
        elif reg == CMD:
            return self._command(value)
        elif 0 <= reg < NUM_REGS:
            return f"disk register {reg} is read-only"
        else:
            return f"bad disk register {reg}"
        return None

    def _command(self, cmd: int) -> str | None:
        if cmd == CMD_FLUSH:
            self.cmd = cmd
            self._host(self.backend.flush)
            self.flushes += 1
            return None
        if cmd not in (CMD_READ, CMD_WRITE):
            return f"bad disk command {cmd}"
        reason = self._check_request(cmd)
        if reason is not None:
            return reason
        self.cmd = cmd
        offset, length = self.sector * SECTOR, self.count * SECTOR
        with memoryview(self._ram) as view, view[self.addr:self.addr + length] as buf:
            if cmd == CMD_READ:
                self._host(self.backend.read_into, offset, buf)
                self.reads += 1
                self.sectors_read += self.count
            else:
                # Marked before the write: a write that fails half way may still have changed blocks.
                self.dirty.mark(offset, length)
                self._host(self.backend.write_from, offset, buf)
                self.writes += 1
                self.sectors_written += self.count
        return None

    def _check_request(self, cmd: int) -> str | None:
        count, sector, addr = self.count, self.sector, self.addr
        if not 1 <= count <= MAX_COUNT:
            return f"disk COUNT {count} outside 1..{MAX_COUNT}"
        if sector + count > self.sectors:
            return f"disk sectors [{sector}, +{count}) past the end of the disk ({self.sectors} sectors)"
        length = count * SECTOR
        low = self._code_end if cmd == CMD_READ else 0  # a read stores into RAM: never into the image
        if not (low <= addr and addr + length <= self._ram_size):
            what = "outside guest RAM or into the image" if cmd == CMD_READ else "outside guest RAM"
            return f"disk buffer [{addr:#x}, +{length:#x}) {what}"
        return None

    def _host(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except OSError:
            self.error = True
            self.errors += 1
        else:
            self.error = False

    # ---- host side ----

    def info(self) -> dict[str, Any]:
        return {"size": self.sectors * SECTOR, "reads": self.reads, "writes": self.writes,
                "flushes": self.flushes, "errors": self.errors, "dirty-blocks": self.dirty.count(),
                "block-size": self.dirty.block_size}

    # ---- state ----

    def save(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sectors": self.sectors, "error": self.error}
        state.update((name, getattr(self, name)) for name in _FIELDS)
        return state

    @classmethod
    def restore(cls, ram: mmap.mmap, code_end: int, backend: BlockBackend, state: object,
                block_size: int = DEFAULT_BLOCK_SIZE) -> DiskDevice:
        """A device continuing from save() over backend; ValueError on anything malformed or on a
        backend whose size is not the saved one."""
        if not isinstance(state, Mapping):
            raise ValueError("state's disk device is malformed")
        dev = cls(ram, code_end, backend, block_size)
        if state.get("sectors") != dev.sectors:
            raise ValueError(f"state's disk has {state.get('sectors')!r} sectors, the image "
                             f"{dev.sectors} ({dev.sectors * SECTOR} bytes)")
        if not isinstance(state.get("error"), bool):
            raise ValueError("state's disk error bit is malformed")
        dev.error = state["error"]
        for name in _FIELDS:
            value = state.get(name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= isa.MASK64):
                raise ValueError(f"state's disk field {name} is malformed")
            setattr(dev, name, value)
        return dev
