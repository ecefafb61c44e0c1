"""A VM's disk copied across a migration (`ferry migrate --copy-storage`): both ends' parts.

For hosts without shared storage (libvirt's --copy-storage-all, QEMU's block mirror), the image
travels with the RAM, on the same connection and in the same rounds (docs/protocol.md, DiskBatch):

- the source (`SourceCopy`) forgets the disk's dirty marks, then sends in round 0 the image's
  data extents (holes stay holes) beside the RAM's written extents; every later round the
  blocks the guest wrote meanwhile, harvested right after the RAM's; the last dirty blocks go
  while the vCPU is paused, before the CPU state. The convergence policy judges RAM and disk
  bytes together. The source image stays as it is: the VM keeps using it until the destination
  resumes, and the source removes it only once the destination said RESUMED
  (`remove_source`). In the write-blocking mode (for a guest that writes faster than the link)
  each harvest also caps the disk's dirty blocks at what half the downtime bound carries: the
  VM process stops the vCPU while that many are dirty and not yet harvested, so the guest writes
  at the copy's pace and the last dirty set fits the downtime (QEMU's active mirror makes each
  write wait for its copy; here the guest waits per cap). The cap goes with the session's lane.
- the destination (`IncomingCopy`) writes into a new image, ``PATH.ferry-partial`` beside the
  final ``PATH`` (same file name, in ``--disk-dir`` or its STATE_DIR/disks), synced at every
  Sync and at the end; at COMMIT it takes the final name (never replacing a file there) and the
  VM process locks it as it restores the VM; it carries the source image's identity (the same
  disk, whose source image goes once the VM runs here). Before that any failure removes the partial copy;
  an ENOSPC fails the migration (`DiskFull`, insufficient-storage) and the VM keeps running on
  the source. A partial copy left by a killed agent is removed when the agent starts again
  (`remove_partials`, in its STATE_DIR/disks), or replaced by the next attempt of the same VM
  (the VM's name is reserved: no other attempt writes it meanwhile).

Everything here blocks on files and sockets: for the session threads, never the loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from agent import disk_copy
from agent.disks import DiskConfig
from agent.migration.info import DiskProgress, MigrationInfo, RoundStat
from agent.migration.seams import Lane
from agent.migration.transport import Connection
from proto.messages import DiskBatch
from vmruntime.diskimage import remove_created, set_image_id

PARTIAL_SUFFIX = ".ferry-partial"
Range = tuple[int, int]


class SourceCopy:
    """The source's side: reads its own image (the VM process keeps writing it) and sends it."""

    def __init__(self, disk: DiskConfig, lane: Lane, info: MigrationInfo) -> None:
        self.disk = disk
        self.lane = lane
        self.info = info
        self.progress = info.disk = DiskProgress()
        self._fd = -1
        self._buf = bytearray(disk_copy.BATCH_BYTES)

    def start(self) -> list[Range]:
        """Forget the dirty marks, then open the image: its data extents are round 0's share.
        In this order, a write between the two is in the extents or in the next harvest."""
        disk_copy.clear_dirty(self.lane)
        self._fd = os.open(self.disk.path, os.O_RDONLY | os.O_CLOEXEC)
        extents = disk_copy.data_extents(self._fd, self.disk.size)
        self.progress.total = self.progress.remaining = disk_copy.total_bytes(extents)
        return extents

    def harvest(self, final: bool = False) -> list[Range]:
        """The blocks the guest wrote since the last harvest: the next round's share. Write-blocking
        (re)sets the cap on the dirty blocks from the bandwidth measured so far (not in the
        ``final`` harvest: the vCPU is paused, and the downtime has no time for it)."""
        dirty = disk_copy.harvest(self.lane)
        n = disk_copy.total_bytes(dirty)
        self.progress.total += n
        self.progress.remaining = n
        if self.info.params.storage_mode == "write-blocking" and self.info.bandwidth > 0 and not final:
            blocks = dirty_cap_blocks(self.info.bandwidth, self.info.params.max_downtime_ms / 1000,
                                      self.disk.block_size)
            self.lane.request("disk-dirty-cap", blocks=blocks, timeout=disk_copy.HARVEST_TIMEOUT_S)
            self.progress.cap = blocks * self.disk.block_size
        return dirty

    def send(self, conn: Connection, ranges: list[Range], stat: RoundStat, info: MigrationInfo,
             before_batch: Callable[[], None]) -> None:
        """Send ``ranges`` of the image in DiskBatches, counted in the round and the migration (the
        connection's packer compresses them, and applies the bandwidth cap)."""
        for batch in disk_copy.read_batches(self._fd, ranges, self._buf):
            before_batch()
            wire = conn.send_disk(batch.ranges, batch.zeros, batch.pieces)
            stat.bytes += wire
            stat.disk_bytes += batch.data_bytes + batch.zero_bytes
            info.transferred += wire
            p = self.progress
            p.transferred += batch.data_bytes
            p.zero += batch.zero_bytes
            p.remaining = max(0, p.remaining - batch.data_bytes - batch.zero_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def dirty_cap_blocks(bandwidth: float, max_downtime_s: float, block_size: int) -> int:
    """Write-blocking's cap on the disk's dirty blocks: what half the downtime bound carries at
    ``bandwidth`` (bytes/s), the other half left to the RAM, and at least one block."""
    return max(1, int(bandwidth * max_downtime_s / 2) // block_size)


def remove_partials(directory: Path) -> list[str]:
    """Remove the partial copies a killed agent left in ``directory`` (its own STATE_DIR/disks,
    which no other host writes); for the agent's start, before it accepts a migration. Another
    allowed directory may be shared with hosts whose copies are in flight: it is left alone."""
    removed = []
    for path in sorted(directory.glob("*" + PARTIAL_SUFFIX)):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(path))
    return removed


def remove_source(path: str) -> str | None:
    """Remove the source's image and its identity once the destination runs the VM on its copy;
    why not, if that failed (the VM is gone from here either way)."""
    try:
        remove_created(path)
    except OSError as e:
        return f"removing the source image {e.filename or path}: {e.strerror or e}"
    return None


class IncomingCopy:
    """The destination's side: the image copy being written, then installed under its name."""

    def __init__(self, disk: DiskConfig, ident: str, progress: DiskProgress) -> None:
        self.disk = disk
        self.ident = ident  # the source image's identity: the copy is the same disk
        self.progress = progress
        self.partial = disk.path + PARTIAL_SUFFIX
        self._installed = False
        try:  # O_TRUNC, not O_EXCL: a partial copy here is a dead attempt's (the name is reserved)
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise disk_copy.CopyError(f"cannot create the disk image copy {self.partial}: {e.strerror or e}") from e
        try:
            os.ftruncate(fd, disk.size)
        except OSError as e:
            os.close(fd)
            os.unlink(self.partial)
            raise disk_copy.CopyError(f"cannot create the disk image copy {self.partial}: {e.strerror or e}") from e
        self.writer = disk_copy.ImageWriter(fd, self.partial, disk.size)

    def on_batch(self, batch: DiskBatch) -> None:
        """The batch's payload is written (transport, through ``writer``): punch its zeros."""
        self.writer.punch(batch.zeros)
        data, zero = batch.payload_len, disk_copy.total_bytes(batch.zeros)
        self.progress.transferred += data
        self.progress.zero += zero
        self.progress.total += data + zero

    def sync(self) -> None:
        """Make what arrived so far durable (at every Sync: the last one then has little to do)."""
        self.writer.sync()

    def install(self) -> None:
        """At COMMIT: synced, under its final name (a file appearing there meanwhile is refused,
        never replaced), the partial name gone."""
        self.writer.sync()
        os.link(self.partial, self.disk.path)
        self._installed = True
        os.unlink(self.partial)
        set_image_id(self.disk.path, self.ident)
        self.close()  # the VM process opens the image itself

    def close(self) -> None:
        if self.writer.fd >= 0:
            os.close(self.writer.fd)
            self.writer.fd = -1

    def discard(self) -> None:
        """The VM does not run here: remove the copy, under whichever name it has."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)
        if self._installed:
            remove_created(self.disk.path)  # the image and the identity it was given
