"""Dirty tracking of guest RAM: three backends behind one interface.

This package owns how ferry learns which guest pages were written between
two points in time, and which parts of guest RAM were ever written:

- ``uffd-wp-async``: userfaultfd write-protect in async mode + PAGEMAP_SCAN
  of the VM process's pagemap (kernel 6.7+); exact, no fault handling.
- ``uffd-wp-sync``: synchronous userfaultfd write-protect, faults handled by
  a thread of the tracker (in the agent); exact, slower first writes.
- ``hash``: xxh3 of every page compared harvest to harvest; reports content
  changes; no kernel support needed.

The best available is chosen by :func:`choose_backend` (override by name).
The VM process calls :func:`vm_register` on "track-start" and sends the fd
to the agent, which builds the tracker with :func:`make_tracker`.

Trackers are plain blocking objects (no event loop): ``start()`` and
``harvest()`` take milliseconds per GiB for the uffd backends and a few
hundred for "hash", so an asyncio caller runs them in a worker thread. The
"uffd-wp-sync" fault handler is a thread of the caller's process: it needs the
GIL to answer a fault, so a process that holds the GIL for long stalls the guest.
"""

from __future__ import annotations

import mmap
from typing import Protocol

from .extents import PAGE_SIZE, merge_ranges, written_extents
from .hashing import HashTracker
from .names import BACKENDS, HASH, UFFD_WP_ASYNC, UFFD_WP_SYNC, check_backend
from .probe import available_backends, choose_backend
from .ranges import Ranges
from .register import vm_register
from .uffd_async import UffdAsyncTracker
from .uffd_sync import UffdSyncTracker

__all__ = [
    "BACKENDS",
    "DirtyTracker",
    "Ranges",
    "available_backends",
    "choose_backend",
    "make_tracker",
    "merge_ranges",
    "vm_register",
    "written_extents",
]


class DirtyTracker(Protocol):
    """One tracked VM, agent side."""

    name: str
    # uffd-wp-async's hot blocks (see .uffd_async): whether dense 2 MiB blocks may be left
    # un-protected and reported whole, settable between harvests (switching it off makes the next
    # harvest re-protect them, reporting them whole one last time); and the bytes the last harvest
    # reported whole that way, whether or not the guest wrote them. The other backends keep False and 0.
    hot_blocks: bool
    whole_bytes: int

    def start(self) -> None:
        """Arm: from now on every guest write is recorded."""

    def harvest(self) -> Ranges:
        """Guest byte ranges written since start()/the last harvest, merged and sorted.

        The uffd backends never report fewer pages than were written, and
        exactly those unless uffd-wp-async's opt-in hot blocks add whole dense
        blocks; for "hash" see :mod:`.hashing`.

        Re-arms atomically: no write is lost between harvests. Read the pages'
        content after this returns.
        """
        ...

    def stop(self) -> None:
        """Disarm (un-protect, unregister) and release the tracker's own fds and threads."""


def make_tracker(
    backend: str,
    *,
    pid: int,
    uffd: int | None,
    addr: int,
    length: int,
    ram: mmap.mmap,
    memfd: int | None = None,
    hot_blocks: bool = False,
) -> DirtyTracker:
    """Build the agent-side tracker for a VM process that ran ``vm_register(backend, addr, length)``.

    ``pid`` is the VM process, ``uffd`` the fd it sent (the tracker works on a
    duplicate it closes in stop(); the caller still closes ``uffd`` itself),
    ``addr``/``length`` the guest RAM mapping in the VM
    process, ``ram`` the agent's own mapping of guest RAM. ``memfd`` (optional)
    lets the hash backend skip holes. ``hot_blocks`` (uffd-wp-async only, ignored
    by the others) trades over-reporting of densely written 2 MiB blocks for fewer
    guest write faults (see :mod:`.uffd_async`). Returned unstarted: call start().
    """
    check_backend(backend)
    if addr % PAGE_SIZE or length <= 0 or length % PAGE_SIZE or len(ram) < length:
        raise ValueError(f"bad guest RAM range: addr=0x{addr:x} length={length} (agent mapping {len(ram)})")
    if backend == HASH:
        return HashTracker(ram=ram, length=length, memfd=memfd)
    if uffd is None:
        raise ValueError(f"backend {backend!r} needs the uffd from vm_register()")
    if backend == UFFD_WP_ASYNC:
        return UffdAsyncTracker(pid=pid, uffd=uffd, addr=addr, length=length, hot_blocks=hot_blocks)
    assert backend == UFFD_WP_SYNC
    return UffdSyncTracker(pid=pid, uffd=uffd, addr=addr, length=length)
