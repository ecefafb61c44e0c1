"""The "uffd-wp-async" backend: userfaultfd write-protect in async mode plus PAGEMAP_SCAN.

The VM process registered guest RAM with a userfaultfd created with
UFFD_FEATURE_WP_ASYNC (see :mod:`.register`) and handed the fd over. This
tracker write-protects the whole range (start), and each harvest walks
``/proc/<vm pid>/pagemap`` with PAGEMAP_SCAN asking for PAGE_IS_WRITTEN pages
with PM_SCAN_WP_MATCHING: the kernel reports and re-protects each written
page under its page-table lock, so a write either lands before the page is
reported (and the caller reads it after harvest returns) or after it is
re-protected (and shows up next time). Nothing is lost between harvests.

In async mode the kernel resolves the first write to a protected page itself
(no fault message, the vCPU never waits for us), so no handler thread exists.
Only the VM process's page tables are protected: writes the agent makes
through its own mapping of the memfd never show up.
"""

from __future__ import annotations

import ctypes
import os
from array import array
from collections.abc import Callable

from . import _uapi
from .extents import append_range
from .names import UFFD_WP_ASYNC

# Regions per PAGEMAP_SCAN call, and the most pages one call covers. A call
# over at most _VEC_LEN pages cannot fill the caller's vector, so it always
# walks its whole chunk and we never need walk_end. Why not trust walk_end:
# on this kernel (6.18) it is set only when the kernel's internal buffer fills
# mid-walk, and when a later pass of the same call finishes the walk it stays
# stale, short of regions that call did report. Restarting there re-walked
# pages already reported, the output went out of order, and the seam merge
# (which assumes sorted input) dropped a region: pages re-protected but never
# reported, lost writes (found by tests/test_migration_tracking.py).
_VEC_LEN = 16384
_CHUNK = _VEC_LEN * 4096


class UffdAsyncTracker:
    """Dirty tracker for one VM over an async write-protect userfaultfd.

    Works on its own duplicate of ``uffd`` (closed in ``stop()``); the caller
    keeps and closes the fd it passed in.
    """

    name = UFFD_WP_ASYNC

    def __init__(self, *, pid: int, uffd: int, addr: int, length: int) -> None:
        self.pid = pid
        self.uffd = os.dup(uffd)
        self.addr = addr
        self.length = length
        self._pagemap: int | None = None
        # struct page_region[] as flat u64s (start, end, categories): reading an
        # array is much cheaper than a ctypes struct access per region.
        self._vec = array("Q", bytes(_VEC_LEN * ctypes.sizeof(_uapi.PageRegion)))

    def start(self) -> None:
        """Open the VM's pagemap and write-protect all of guest RAM (never-touched pages too)."""
        if self._pagemap is None:
            self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        _uapi.uffd_writeprotect(self.uffd, self.addr, self.length, protect=True)

    def harvest(self) -> list[tuple[int, int]]:
        """Guest ranges written since start()/the last harvest; they are re-protected atomically."""
        if self._pagemap is None:
            raise RuntimeError("harvest() on a tracker not started (or stopped)")
        out: list[tuple[int, int]] = []
        pos, end = self.addr, self.addr + self.length
        while pos < end:
            chunk_end = min(end, pos + _CHUNK)
            self._scan(pos, chunk_end, out)
            pos = chunk_end
        return out

    def _scan(self, start: int, end: int, out: list[tuple[int, int]]) -> None:
        """One PAGEMAP_SCAN call over [start, end) (at most _VEC_LEN pages); append guest ranges to ``out``."""
        arg = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_WP_MATCHING | _uapi.PM_SCAN_CHECK_WPASYNC,
            start=start,
            end=end,
            vec=self._vec.buffer_info()[0],
            vec_len=_VEC_LEN,
            category_mask=_uapi.PAGE_IS_WRITTEN,
            return_mask=_uapi.PAGE_IS_WRITTEN,
        )
        assert self._pagemap is not None
        n = _uapi.ioctl(self._pagemap, _uapi.PAGEMAP_SCAN, arg)
        if n >= _VEC_LEN:  # impossible for a chunk of _VEC_LEN pages; never drop what it re-protected
            raise OSError(f"PAGEMAP_SCAN filled its vector over 0x{start:x}-0x{end:x}")
        if n:
            base, vec = self.addr, self._vec
            # The kernel merges adjacent pages within one call; only the seam
            # between two calls may need merging by us.
            first = (vec[0] - base, vec[1] - base)
            append_range(out, *first)
            out.extend((s - base, e - base) for s, e in zip(vec[3 : 3 * n : 3], vec[4 : 3 * n : 3], strict=True))

    def stop(self) -> None:
        """Un-protect and unregister guest RAM (best effort: the VM may be gone), close the fds."""
        if self.uffd >= 0:
            _quietly(_uapi.uffd_writeprotect, self.uffd, self.addr, self.length, False)
            _quietly(_uapi.uffd_unregister, self.uffd, self.addr, self.length)
            os.close(self.uffd)
            self.uffd = -1
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Call an ioctl wrapper, ignoring OSError: on teardown the VM process may have exited."""
    try:
        fn(*args)
    except OSError:
        pass
