"""The destination's post-copy record: what an agent restarted in the post-copy phase needs to
take the phase up again (docs/RELIABILITY.md, "Post-copy").

A destination agent killed after COMMIT of a post-copy leaves its VM process running on partial
guest RAM (or blocked in the kernel on a missing page) and the source paused, reconnecting
(postcopy_recover). The VM's own record (agent/records.py) names the migration it arrived by;
this one, a file per VM under ``<state dir>/postcopy/``, written before COMMIT's claim and removed
once the VM process dropped its userfaultfd (``postcopy-end``) or the VM was stopped, says that the
VM is still in the post-copy of that migration, from which peer, and what the received map
cannot be rebuilt without:

* the stale map at the switch-over (pages whose copies here were stale when the VM started);
* the registration: the VM process's guest-RAM mapping address and length, the number of the
  process's own copy of the userfaultfd (:func:`vmruntime.postcopy.take_fd` takes it from the
  process's fd table while its only thread is blocked in a fault), and the mode.

:func:`rebuild` derives the received map from that record and what the kernel still shows. It
must never let the guest see a stale page, nor overwrite a page the guest may have written:

* a hole of the memfd is missing if it was stale at the switch-over, else it reads as zero
  (pre-copy sends zero pages as ranges without data: docs/protocol.md);
* data that was not stale is up to date (sent in pre-copy and not dirtied since, or placed);
* data that was stale: outside MINOR mode the stale copies were punched at the switch-over, so
  data there was placed since, and is up to date. In MINOR mode the stale copies stayed in the
  page cache: such a page is up to date only if it is mapped in the VM process (a fresh copy is
  written into the memfd before UFFDIO_CONTINUE maps it, and the guest can only write a page it
  has mapped); unmapped, it is missing again, and rewriting it is safe (the guest never saw it).
  That test needs shmem pages never reclaimed while mapped: with swap on, a reclaimed page loses
  its mapping and would look unmapped, so :func:`rebuild` refuses MINOR mode then.

Pure data and file I/O; the pagemap and swap checks are the only reads of /proc.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.migration.info import PAGE_SIZE
from agent.records import VMRecords

SUBDIR = "postcopy"
FORMAT = 1

Range = tuple[int, int]

# /proc/PID/pagemap: 8 bytes a page, bit 63 set where the page is mapped (present in RAM).
_PAGEMAP_PRESENT = 1 << 63


class RecordError(ValueError):
    """A post-copy record that cannot be used (unreadable, of another format, inconsistent)."""


@dataclass(frozen=True)
class PostcopyRecord:
    """One VM's post-copy in progress here (see the module's docstring)."""

    vm: str
    migration_id: str
    peer: str  # the source agent's name: a recovery from another host is refused
    mem: int
    minor: bool
    addr: int  # the VM process's guest-RAM mapping
    vm_fd: int  # the VM process's own copy of the userfaultfd
    stale: bytes  # one byte per page, non-zero where the copy here was stale at the switch-over
    features: int = 0  # the userfaultfd's features, as the registration granted them

    def __post_init__(self) -> None:
        if self.mem <= 0 or self.mem % PAGE_SIZE:
            raise RecordError(f"guest RAM of {self.mem} bytes is not a positive number of pages")
        if len(self.stale) != self.mem // PAGE_SIZE:
            raise RecordError(f"stale map of {len(self.stale)} pages for guest RAM of {self.mem // PAGE_SIZE}")
        if not self.vm or "/" in self.vm or self.vm.startswith("."):
            raise RecordError(f"bad VM name {self.vm!r}")
        if not self.migration_id or not self.peer:
            raise RecordError("a post-copy record needs a migration id and a peer")
        if self.vm_fd < 0 or self.addr <= 0:
            raise RecordError("a post-copy record needs the registration's address and fd number")

    def to_json(self) -> dict[str, Any]:
        bits = np.packbits(np.frombuffer(self.stale, np.uint8) != 0)
        return {"format": FORMAT, "vm": self.vm, "migration-id": self.migration_id, "peer": self.peer,
                "mem": self.mem, "minor": self.minor, "addr": self.addr, "vm-fd": self.vm_fd,
                "features": self.features,
                "stale": base64.b64encode(zlib.compress(bits.tobytes(), 1)).decode("ascii")}

    @classmethod
    def from_json(cls, raw: object) -> PostcopyRecord:
        if not isinstance(raw, dict):
            raise RecordError("a post-copy record is a JSON object")
        if raw.get("format") != FORMAT:
            raise RecordError(f"post-copy record format {raw.get('format')!r}, this agent reads {FORMAT}")
        try:
            mem = int(raw["mem"])
            packed = zlib.decompress(base64.b64decode(str(raw["stale"]), validate=True))
            stale = np.unpackbits(np.frombuffer(packed, np.uint8))[:max(mem, 0) // PAGE_SIZE].tobytes()
            return cls(vm=str(raw["vm"]), migration_id=str(raw["migration-id"]), peer=str(raw["peer"]), mem=mem,
                       minor=bool(raw["minor"]), addr=int(raw["addr"]), vm_fd=int(raw["vm-fd"]), stale=stale,
                       features=int(raw.get("features", 0)))
        except RecordError:
            raise
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise RecordError(f"a damaged post-copy record: {exc!r}") from exc

    def stale_ranges(self) -> list[Range]:
        return _runs(np.frombuffer(self.stale, np.uint8) != 0)


def directory(state_dir: Path) -> Path:
    return state_dir / SUBDIR


def _path(dir_: Path, vm: str) -> Path:
    return dir_ / f"{vm}.json"


def write(dir_: Path, rec: PostcopyRecord) -> None:
    """Create or replace ``rec``'s file, atomically (written beside, renamed): a killed agent
    leaves the old one or the new one. Not fsynced: the record matters only while the VM process
    lives, and a host crash that loses the page cache loses that process too (it is written in
    the switch-over's pause, where two fsyncs would cost about as much as the whole downtime)."""
    dir_.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _path(dir_, rec.vm)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(rec.to_json(), sort_keys=True).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(dir_: Path, vm: str) -> PostcopyRecord | None:
    """``vm``'s record, None when there is none; RecordError for one that cannot be used."""
    try:
        text = _path(dir_, vm).read_text()
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"post-copy record of {vm!r} is not JSON: {exc}") from exc
    rec = PostcopyRecord.from_json(raw)
    if rec.vm != vm:
        raise RecordError(f"post-copy record of {vm!r} names VM {rec.vm!r}")
    return rec


def remove(dir_: Path, vm: str) -> None:
    """Forget ``vm``'s post-copy (its VM dropped its userfaultfd, or was stopped); idempotent."""
    for path in (_path(dir_, vm), _path(dir_, vm).with_suffix(".tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def names(dir_: Path) -> list[str]:
    """The VMs with a post-copy record here."""
    try:
        return sorted(p.stem for p in dir_.glob("*.json"))
    except FileNotFoundError:
        return []


# ---- the received map rebuilt after a restart ------------------------------------------------


@dataclass(frozen=True)
class Rebuilt:
    """The FaultServer's starting map (agent/migration/postcopy_faults.py): ``present`` and
    ``zero`` ranges, and ``stale_map`` (one byte per page, non-zero: missing; in MINOR mode a
    stale copy the memfd still holds)."""

    present: list[Range]
    zero: list[Range]
    stale_map: bytearray

    @property
    def missing(self) -> int:
        return self.stale_map.count(1)


def rebuild(rec: PostcopyRecord, data: list[Range], mapped: bytes | None, swap: bool = False) -> Rebuilt:
    """The received map from ``rec``, the memfd's data extents ``data`` and, in MINOR mode, ``mapped``
    (one byte per page, non-zero where the VM process has the page mapped: :func:`mapped_pages`).
    RecordError where it cannot be decided safely (MINOR mode without ``mapped``, or with ``swap``)."""
    npages = rec.mem // PAGE_SIZE
    stale = np.frombuffer(rec.stale, np.uint8) != 0
    has_data = _mask(data, npages)
    if rec.minor:
        if swap:
            raise RecordError("swap is on: a reclaimed page would look unmapped, and which stale pages the "
                              "guest saw cannot be told")
        if mapped is None or len(mapped) != npages:
            raise RecordError("MINOR mode needs the VM process's mapped pages")
        still_stale = stale & has_data & ~(np.frombuffer(mapped, np.uint8) != 0)
    else:
        still_stale = np.zeros(npages, bool)
    missing = (stale & ~has_data) | still_stale
    present = has_data & ~missing if not rec.minor else has_data  # MINOR: stale copies stay cached
    zero = ~has_data & ~missing
    return Rebuilt(present=_runs(present), zero=_runs(zero),
                   stale_map=bytearray(missing.astype(np.uint8).tobytes()))


def mapped_pages(pid: int, addr: int, length: int) -> bytes:
    """One byte per page of ``pid``'s mapping at ``addr``: 1 where the page is mapped (pagemap's
    present bit). Needs ptrace access to ``pid`` (the agent is root, or the VM's user)."""
    npages = length // PAGE_SIZE
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = bytearray(npages * 8)
        view = memoryview(raw)
        got = 0
        while got < len(raw):
            n = os.preadv(fd, [view[got:]], (addr // PAGE_SIZE) * 8 + got)
            if n <= 0:
                raise OSError(f"short read of /proc/{pid}/pagemap")
            got += n
        view.release()
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, np.uint64)
    return ((entries & np.uint64(_PAGEMAP_PRESENT)) != 0).astype(np.uint8).tobytes()


def swap_active(swaps: Path = Path("/proc/swaps")) -> bool:
    """Whether any swap area is on (its first line is a header)."""
    try:
        return len(swaps.read_text().strip().splitlines()) > 1
    except OSError:
        return True  # unknown: assume the worst


def _mask(ranges: list[Range], npages: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    out = np.zeros(npages, bool)
    for a, b in ranges:
        out[a // PAGE_SIZE:(b + PAGE_SIZE - 1) // PAGE_SIZE] = True
    return out


def _runs(mask: np.ndarray[Any, np.dtype[np.bool_]]) -> list[Range]:
    """The byte ranges of the True runs of a per-page mask."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a) * PAGE_SIZE, int(b) * PAGE_SIZE) for a, b in zip(edges[::2], edges[1::2], strict=True)]


__all__ = ["PostcopyRecord", "RecordError", "Rebuilt", "dir_for", "directory", "mapped_pages", "names", "read", "rebuild",
           "remove", "swap_active", "write"]


def dir_for(vms: object) -> Path | None:
    """The post-copy records' directory of an agent's VM manager (beside its VM records), None for
    a manager that keeps no records (a test's)."""
    records = getattr(vms, "records", None)
    if not isinstance(records, VMRecords):
        return None
    return directory(records.directory.parent)
