"""Copying a running VM's disk image: what a storage migration and a storage move share.

A running VM's image is copied the way its RAM is: everything once, then again what the guest
changed meanwhile, until little is left, and the rest while the vCPU is paused.

- `data_extents`: what the first pass copies, the image's data extents (SEEK_DATA/SEEK_HOLE):
  the holes of a sparse image are never read and stay holes in the copy.
- `harvest`: what the guest wrote since the last harvest, the VM process's dirty blocks
  (request `disk-dirty`, repeated while it answers `more`). The device marks a write and does it
  within one instruction, and the VM process serves the request between two vCPU slices, so a
  block written after a harvest is in the next one and a read of it after the harvest sees at
  least what the harvest covered.
- `read_batches`: the source image read in batches for the copy, whole zero grains set apart
  (sent and written as holes, not as bytes).
- `ImageWriter`: the copy being written: data written, zeros punched out, synced at the end; a
  full file system raises `DiskFull`, any other failure `CopyError` (the copy then fails and is
  removed; the VM keeps its image).

The disk's ranges are half-open byte ranges ``(start, end)``, page aligned (a disk whose size is
not a whole number of pages is not copied: `check_copyable`). Everything here blocks on the file
system or on a VM process's socket: for a session's thread, never the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from proto.errors import ErrorCode
from vmruntime.dirty import merge_ranges
from vmruntime.dirty.extents import data_pieces
from vmruntime.diskimage import read_full

PAGE_SIZE = 4096
BATCH_BYTES = 4 << 20  # data one batch reads (and one DiskBatch frame carries) at most
BATCH_RANGES = 1000
ZERO_GRAIN = 64 << 10  # zeros this long and aligned are copied as a hole
HARVEST_TIMEOUT_S = 10.0  # a VM process answers between two slices; this bounds a stuck one

Range = tuple[int, int]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CopyError(Exception):
    """The copy of an image cannot be made or written here: the copy fails (the VM keeps its image).
    Not an OSError: this host's storage, not a connection, failed."""

    code: str = ErrorCode.MIGRATION_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DiskFull(CopyError):
    """The copy's file system cannot take more."""

    code = ErrorCode.INSUFFICIENT_STORAGE


class DirtySource(Protocol):
    """A lane to the VM process whose disk is copied (vmruntime.control.Lane)."""

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]: ...


def check_copyable(size: int) -> str | None:
    """Why a disk of ``size`` bytes cannot be copied (its ranges must be whole pages), or None."""
    if size % PAGE_SIZE:
        return (f"a disk of {size} bytes is not a whole number of {PAGE_SIZE}-byte pages: "
                f"it cannot be copied live (make the image's size a multiple of {PAGE_SIZE})")
    return None


def data_extents(fd: int, size: int) -> list[Range]:
    """The image's data extents within [0, size), rounded out to pages and merged."""
    out: list[Range] = []
    for a, b in data_pieces(fd, 0, size):
        a, b = a - a % PAGE_SIZE, min(-(-b // PAGE_SIZE) * PAGE_SIZE, size)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def clear_dirty(lane: DirtySource) -> None:
    """Forget every dirty mark: a first pass that copies every extent is about to start."""
    lane.request("disk-dirty", clear=True, timeout=HARVEST_TIMEOUT_S)


def harvest(lane: DirtySource) -> list[Range]:
    """The byte ranges the guest wrote since the last harvest (or clear), reset as returned."""
    out: list[Range] = []
    while True:
        reply = lane.request("disk-dirty", timeout=HARVEST_TIMEOUT_S)
        out.extend((int(a), int(a) + int(n)) for a, n in reply.get("ranges", ()))
        if not reply.get("more"):
            return merge_ranges(out)


def total_bytes(ranges: Iterable[Range]) -> int:
    return sum(b - a for a, b in ranges)


@dataclass(slots=True)
class Batch:
    """One batch read from the image: data ranges with their bytes in ``pieces`` (in order), and
    ranges that read as zeros (no bytes)."""

    ranges: list[Range] = field(default_factory=list)
    zeros: list[Range] = field(default_factory=list)
    pieces: list[memoryview] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return total_bytes(self.ranges)

    @property
    def zero_bytes(self) -> int:
        return total_bytes(self.zeros)


def read_batches(fd: int, ranges: Iterable[Range], buf: bytearray | None = None) -> Iterator[Batch]:
    """Read ``ranges`` (sorted, disjoint, page aligned) of image ``fd`` in batches of at most
    BATCH_BYTES. A batch's pieces are views of ``buf`` (BATCH_BYTES long), valid until the next
    batch is asked for: send or write a batch before taking the next."""
    buf = buf if buf is not None else bytearray(BATCH_BYTES)
    view = memoryview(buf)
    zero = bytearray(ZERO_GRAIN)  # on the left of ==: one memcmp
    used = 0
    batch = Batch()
    for a, b in ranges:
        while a < b:
            if used == len(buf) or len(batch.ranges) + len(batch.zeros) >= BATCH_RANGES:
                yield batch
                batch, used = Batch(), 0
            n = min(b - a, len(buf) - used)
            read_full(fd, view[used:used + n], a)
            _split_zeros(batch, view, used, a, n, zero)
            used += n
            a += n
    if batch.ranges or batch.zeros:
        yield batch


def _split_zeros(batch: Batch, view: memoryview, at: int, offset: int, n: int, zero: bytearray) -> None:
    """Add ``n`` bytes read into ``view[at:]`` from image ``offset`` to ``batch``: aligned zero
    grains as zero ranges, the rest as data (neighbours of one kind merged)."""
    pos = 0
    while pos < n:
        grain = min(ZERO_GRAIN - (offset + pos) % ZERO_GRAIN, n - pos)
        is_zero = grain == ZERO_GRAIN and zero == view[at + pos:at + pos + grain]
        start, end = offset + pos, offset + pos + grain
        if is_zero:
            if batch.zeros and batch.zeros[-1][1] == start:
                batch.zeros[-1] = (batch.zeros[-1][0], end)
            else:
                batch.zeros.append((start, end))
        elif batch.ranges and batch.ranges[-1][1] == start:
            batch.ranges[-1] = (batch.ranges[-1][0], end)
            last = batch.pieces[-1]
            batch.pieces[-1] = view[at + pos - len(last):at + pos + grain]
        else:
            batch.ranges.append((start, end))
            batch.pieces.append(view[at + pos:at + pos + grain])
        pos += grain


class ImageWriter:
    """The copy of an image being written (an open file the caller owns)."""

    def __init__(self, fd: int, path: str, size: int) -> None:
        self.fd = fd
        self.path = path
        self.size = size

    def check(self, ranges: Iterable[Range]) -> None:
        """ValueError for a range outside the disk (sent by a peer: never written)."""
        for a, b in ranges:
            if not 0 <= a < b <= self.size:
                raise ValueError(f"disk range [{a:#x}, {b:#x}) lies outside the disk ({self.size:#x} bytes)")

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.pwrite(self.fd, data[done:], offset + done)
            except OSError as e:
                raise self._full(e) from e

    def punch(self, zeros: Iterable[Range]) -> None:
        """Make ``zeros`` read as zeros: holes punched (no space used), zeros written where not."""
        for a, b in zeros:
            if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, a, b - a) != 0:
                self.write(a, memoryview(bytes(b - a)))

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise self._full(e) from e

    def _full(self, e: OSError) -> CopyError:
        why = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in _FULL:
            return DiskFull(f"the disk image copy {self.path} cannot be stored: {why}")
        return CopyError(f"the disk image copy {self.path} cannot be written: {why}")
