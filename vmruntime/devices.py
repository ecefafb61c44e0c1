"""The host side of a VM's devices, in the VM process: its TAP and its disk image.

Owns opening and closing what a VM's devices hold on the host, and the control
requests that reach the devices rather than the vCPU (docs/CONTRACTS.md):

- a ``boot`` or ``restore`` request's ``nic`` field ({tap, bridge, mac}) opens a TAP
  (vmruntime/tap.py) and its ``disk`` field ({path, size, block-size}) opens and locks
  the image (vmruntime/diskimage.py); `start_machine` then builds the machine over
  them, and a refusal on any side leaves nothing open: no TAP or locked image without
  a machine, no machine without its devices;
- ``nic-send`` / ``nic-drain`` (the agent's announce, a paused VM leaving),
  ``disk-reopen`` (the image a pause released, taken back), ``disk-switch`` (the
  device moved to a copy of its image, a storage move), and ``disk-dirty``: the
  dirty blocks of the disk since the last harvest, reset as they are returned (the
  disk's counterpart of RAM dirty tracking, for a disk migration's rounds), or all
  forgotten (``clear``); ``disk-dirty-cap``: a write-blocking copy's cap on the dirty
  blocks, which stops the vCPU (`holds_vcpu`) until a harvest takes them;
- the devices' part of the ``status`` reply; closing everything when the process ends.

The guest side of each device is the machine's (vmruntime/nic.py, vmruntime/disk.py);
the VM process's loop (vmruntime/vmproc.py) decides when to call in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from vmruntime.disk import DEFAULT_BLOCK_SIZE, BlockBackend, DirtyBlocks
from vmruntime.diskimage import ImageFile, allocated_bytes

if TYPE_CHECKING:
    from vmruntime.machine import Machine
    from vmruntime.tap import HostNic

# Under a dirty-block cap, a slice's budget per block of the cap still free: a guest writing a block
# every this many instructions or more never passes the cap (diskstress writes one per ~18).
CAP_INSNS_PER_BLOCK = 16
# Ranges one disk-dirty reply carries at most (each a few bytes of msgpack: well under control.MAX_MSG).
MAX_DIRTY_RANGES = 16384

# build(nic MAC or None, disk backend or None, dirty block size) -> the machine
Build = Callable[[int | None, BlockBackend | None, int], "Machine"]


class HostDisk:
    """One VM's open, locked image and the size of its dirty blocks.

    A VM leaving on shared storage releases its image at the pause (flushed, closed, unlocked: the
    destination locks it before it resumes the VM); one that stays after all takes it back
    (``reopen``) before its vCPU runs again, and is refused if another holds it meanwhile.
    """

    def __init__(self, image: ImageFile, block_size: int) -> None:
        self.image = image
        self.block_size = block_size
        self.released = False
        # Write-blocking copy (``disk-dirty-cap``): the vCPU waits while this many blocks or more
        # are dirty, until a harvest takes them; 0: no cap.
        self.dirty_cap = 0

    def release(self) -> None:
        """Flush and close the image, which unlocks it (the vCPU is paused: nothing writes)."""
        if not self.released:
            self.image.flush()
            self.image.close()
            self.released = True

    def reopen(self, machine: Machine | None) -> None:
        """Open and lock the released image again, under the machine's disk device; ImageError if
        it is locked by another (the VM must then not run: it would write an image it no longer owns)."""
        if not self.released:
            return
        image = ImageFile.open(self.image.path, self.image.size)
        self.image, self.released = image, False
        if machine is not None and machine.disk is not None:
            machine.disk.backend = image

    @classmethod
    def open(cls, raw: object) -> HostDisk:
        """From a request's ``disk`` field; ValueError / ImageError refuse the request."""
        if not isinstance(raw, Mapping):
            raise ValueError("disk must be a map {path, size, [block-size]}")
        path, size = raw.get("path"), raw.get("size")
        block = raw.get("block-size", DEFAULT_BLOCK_SIZE)
        if not (isinstance(path, str) and os.path.isabs(path)):
            raise ValueError(f"disk path {path!r} must be an absolute path")
        if not isinstance(size, int) or not isinstance(block, int):
            raise ValueError("disk size and block-size must be integers")
        DirtyBlocks(1, block)  # refuses a bad block size before the image is locked
        return cls(ImageFile.open(path, size), block)

    def switch(self, path: str, machine: Machine | None) -> None:
        """Move the device to ``path``, a copy of the image (a storage move; the vCPU is paused): the
        current image flushed, the copy opened and locked, the device pointed at it, the old one
        closed (which unlocks it). OSError / ImageError before the device moved: nothing changed."""
        if self.released:
            raise RuntimeError("the disk image was released by a pause: take it back first")
        if path == self.image.path:
            raise ValueError(f"the disk is already on {path}")
        self.image.flush()  # the copy was made from what the file holds: nothing may stay behind
        image = ImageFile.open(path, self.image.size)
        old, self.image = self.image, image
        if machine is not None and machine.disk is not None:
            machine.disk.backend = image
        old.close()

    def status(self, machine: Machine | None) -> dict[str, Any]:
        st = os.stat(self.image.path) if self.released else os.fstat(self.image.fd)
        fields: dict[str, Any] = {"path": self.image.path, "size": self.image.size,
                                  "allocated": allocated_bytes(st), "released": self.released}
        info = machine.disk.info() if machine is not None and machine.disk is not None else {}
        for key in ("reads", "writes", "flushes", "errors", "dirty-blocks"):
            fields[key] = info.get(key, 0)
        fields["block-size"] = self.block_size
        return fields

    def close(self) -> None:
        self.image.close()


class HostDevices:
    """What one VM process holds for its machine's devices; either may be absent."""

    def __init__(self, nic: HostNic | None = None, disk: HostDisk | None = None) -> None:
        self.nic = nic
        self.disk = disk
        self.paused = False  # the vCPU's pause, as the VM process sets it (some requests need it)

    @classmethod
    def open(cls, msg: Mapping[str, Any]) -> HostDevices:
        """The devices a boot or restore request asks for; all or none are open when this returns."""
        devices = cls()
        try:
            if msg.get("nic") is not None:
                from vmruntime.tap import HostNic

                devices.nic = HostNic.open(msg["nic"])
            if msg.get("disk") is not None:
                devices.disk = HostDisk.open(msg["disk"])
        except BaseException:
            devices.close()
            raise
        return devices

    def holds_vcpu(self, machine: Machine | None) -> bool:
        """Whether the disk's dirty-block cap stops the vCPU: as many blocks dirty as the cap
        allows, not yet harvested by the copy (the guest then writes at the copy's pace)."""
        disk = self.disk
        if disk is None or not disk.dirty_cap or machine is None or machine.disk is None:
            return False
        return machine.disk.dirty.count() >= disk.dirty_cap

    def slice_budget(self, machine: Machine | None, budget: int) -> int:
        """The instructions the next slice may run: ``budget``, but under a dirty-block cap at most
        CAP_INSNS_PER_BLOCK per block still free. The cap is checked between slices, and a slice
        runs about half a millisecond, time enough to write dozens of blocks past the cap: slices
        shrink as the dirty blocks near it instead."""
        disk = self.disk
        if disk is None or not disk.dirty_cap or machine is None or machine.disk is None:
            return budget
        free = disk.dirty_cap - machine.disk.dirty.count()
        return max(1, min(budget, free * CAP_INSNS_PER_BLOCK))

    def lane_closed(self) -> None:
        """A lane closed (the copy's session ended, or its agent died): no cap outlives it."""
        if self.disk is not None:
            self.disk.dirty_cap = 0

    def status(self, machine: Machine | None) -> dict[str, Any]:
        """The devices' fields of a status reply: ``nic`` and ``disk``, each only when present."""
        fields: dict[str, Any] = {}
        if self.nic is not None:
            fields["nic"] = self.nic.status(machine)
        if self.disk is not None:
            fields["disk"] = self.disk.status(machine)
        return fields

    def close(self) -> None:
        """Close the TAP (the kernel removes it) and the image (which unlocks it; the file stays)."""
        if self.nic is not None:
            self.nic.close()
        if self.disk is not None:
            self.disk.close()


def start_machine(msg: Mapping[str, Any], build: Build) -> tuple[Machine, HostDevices]:
    """Open the devices a boot or restore request asks for, then build the machine over them.

    A refusal on either side leaves neither: the devices are closed if the machine is refused
    (or a restored machine does not match them).
    """
    devices = HostDevices.open(msg)
    try:
        disk = devices.disk
        machine = build(None if devices.nic is None else devices.nic.mac,
                        None if disk is None else disk.image, DEFAULT_BLOCK_SIZE if disk is None else disk.block_size)
        if devices.nic is not None:
            devices.nic.check_machine(machine)
    except BaseException:
        devices.close()
        raise
    return machine, devices


# -- requests served by the devices: (devices, machine or None, request) -> reply fields --

def _nic_send(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    return {"sent": _require_nic(devices).inject(list(msg.get("frames") or []))}


def _nic_drain(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    return {"drained": _require_nic(devices).drain()}


def _require_nic(devices: HostDevices) -> HostNic:
    if devices.nic is None:
        raise RuntimeError("this VM has no NIC")
    return devices.nic


def _disk_dirty(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    """The disk's dirty byte ranges since the last harvest, reset as returned (``more``: harvest
    again); ``clear``: forget every mark instead (a migration's bulk pass copies the whole disk)."""
    if machine is None or machine.disk is None:
        raise RuntimeError("this VM has no disk")
    dirty = machine.disk.dirty
    if msg.get("clear"):
        dirty.reset()
        return {"block-size": dirty.block_size, "ranges": [], "more": False}
    limit = msg.get("max-ranges", MAX_DIRTY_RANGES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_DIRTY_RANGES:
        raise ValueError(f"max-ranges must be an integer 1..{MAX_DIRTY_RANGES}, got {limit!r}")
    ranges = dirty.harvest(limit)
    more = len(ranges) == limit and dirty.count() > 0
    return {"block-size": dirty.block_size, "ranges": [list(r) for r in ranges], "more": more}


def _disk_dirty_cap(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    """Cap the disk's dirty blocks (``blocks``; 0 lifts the cap) for a write-blocking copy. The cap
    lasts until it is lifted or any lane closes (the copy holds one for as long as it runs)."""
    if devices.disk is None or machine is None or machine.disk is None:
        raise RuntimeError("this VM has no disk")
    blocks = msg.get("blocks")
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
        raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
    devices.disk.dirty_cap = blocks
    return {"blocks": blocks, "dirty-blocks": machine.disk.dirty.count()}


def _disk_reopen(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    """Take back an image released at a pause (a migration that did not happen); a no-op when held."""
    if devices.disk is None:
        raise RuntimeError("this VM has no disk")
    devices.disk.reopen(machine)
    return {}


def _disk_switch(devices: HostDevices, machine: Machine | None, msg: Mapping[str, Any]) -> dict[str, Any]:
    """Move the disk to ``path``, a complete copy of its image (a storage move), while paused; the
    old image stays open and in use when the new one cannot be opened and locked."""
    if devices.disk is None or machine is None:
        raise RuntimeError("this VM has no disk")
    if not devices.paused:
        raise RuntimeError("disk-switch needs the vCPU paused")
    path = msg.get("path")
    if not (isinstance(path, str) and os.path.isabs(path)):
        raise ValueError(f"disk-switch path {path!r} must be an absolute path")
    devices.disk.switch(path, machine)
    return {"path": path}


DeviceOp = Callable[[HostDevices, "Machine | None", Mapping[str, Any]], dict[str, Any]]
DEVICE_OPS: dict[str, DeviceOp] = {"nic-send": _nic_send, "nic-drain": _nic_drain, "disk-dirty": _disk_dirty,
                                   "disk-reopen": _disk_reopen, "disk-dirty-cap": _disk_dirty_cap,
                                   "disk-switch": _disk_switch}
