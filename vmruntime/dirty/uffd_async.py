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

Hot blocks (opt-in, ``hot_blocks=True``): each first write to a page after
a harvest costs the guest a write-protect fault (docs/PERFORMANCE.md section 5),
so a guest rewriting a large working set pays that for every page every
round. With hot blocks on, a 2 MiB block of which at least HOT_DENSITY of the
pages were written in one round (found by a first scan that re-protects
nothing) is reported whole by that harvest and un-protected, and the
following harvests report it whole without scanning it: no fault there, and
no write missed, since every page of it is reported every time. The tracker
then reports a superset of the written pages: up to 1/HOT_DENSITY times the
written bytes in the round a block turns hot, and the whole block (2 MiB,
however little was written) in each of the up to HOT_ROUNDS harvests until it
is scanned again, the final copy's included. Off by default (a migration
asks with MigrationParams.hot_blocks, ``ferry migrate --hot-blocks``): it
speeds a flat-out guest up clearly with the tracker alone, little in
migrations of a few rounds (it acts from the second round on), and its whole
hot blocks set a floor under the reported dirty set, so the remainder stops
shrinking later and higher and more bytes are sent: why they are not the
default (bench/bench_slowdown.py measures both; docs/PERFORMANCE.md section 5).
Auto-converge turns them off at its first throttle step, since whole blocks
would keep the remainder up whatever the throttle. Every
HOT_ROUNDS-th harvest scans hot blocks like any other (reporting what they
hold, re-protecting it), so the next round measures afresh which are hot.
Un-protecting can never lose a write: an un-protected page reads as written
to PAGEMAP_SCAN, and a block stops being reported whole only through such a
scan. ``hot_blocks`` may be switched off between harvests (the migration
source does so with auto-converge's first throttle step, and before its final
harvest; see agent/migration/policy.py): the next harvest then scans the hot
blocks like a cooling one (reporting them whole one last time) and none turns
hot again.

Cost of a harvest (1 GiB, one page in four written, 65536 ranges): the
kernel's part (walk, re-protect, TLB flushes) is a few ms and cannot be cut
from here (category_mask = return_mask = PAGE_IS_WRITTEN is already the
kernel's fast path). The rest is numpy, with no Python per region: each
call's region vector is read in place (a strided view of the start and end
words), the mapping's base taken off as it is copied out, and the pieces
joined and their seams merged once, at the end (:class:`.ranges.Ranges`).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

import numpy as np

from . import _uapi
from .names import UFFD_WP_ASYNC
from .ranges import Ranges

# Regions per PAGEMAP_SCAN call, and the most pages one call covers. A call
# over at most _VEC_LEN pages cannot fill the caller's vector, so it always
# walks its whole chunk and we never need walk_end. Why not trust walk_end:
# on this kernel (6.18) it is set only when the kernel's internal buffer fills
# mid-walk, and when a later pass of the same call finishes the walk it stays
# stale, short of regions that call did report. Restarting there would re-walk
# pages already reported and put the output out of order, and the seam merge
# (which assumes sorted input) would drop a region: pages re-protected but never
# reported, lost writes (tests/test_migration_tracking.py checks for them).
# 64 MiB chunks: larger ones (a bigger vector) measured no faster, the
# per-call cost being small next to the per-page walk.
_VEC_LEN = 16384
_CHUNK = _VEC_LEN * 4096
_WORDS = 3  # u64 words per struct page_region: start, end, categories

# Hot blocks (see the module docstring): 2 MiB, the span of one page table.
HOT_BLOCK = 2 << 20
HOT_DENSITY = 0.75  # share of a block's pages written in one round that makes it hot
HOT_ROUNDS = 8  # harvests a hot set lives before a round with everything protected re-measures it


class UffdAsyncTracker:
    """Dirty tracker for one VM over an async write-protect userfaultfd.

    Works on its own duplicate of ``uffd`` (closed in ``stop()``); the caller
    keeps and closes the fd it passed in.
    """

    name = UFFD_WP_ASYNC

    def __init__(self, *, pid: int, uffd: int, addr: int, length: int, hot_blocks: bool = False) -> None:
        self.pid = pid
        self.hot_blocks = hot_blocks
        self.hot_bytes = 0  # bytes the last harvest left un-protected (hot blocks)
        self.whole_bytes = 0  # bytes the last harvest reported whole for hot blocks (live or cooled)
        self._hot_age = 0  # harvests since the last all-protected round
        self._hot: list[tuple[int, int]] = []  # guest ranges left un-protected (whole hot blocks)
        self.uffd = os.dup(uffd)
        self.addr = addr
        self.length = length
        self._pagemap: int | None = None
        # Seconds the last harvest spent in PAGEMAP_SCAN (the kernel's share), for benchmarks.
        self.kernel_seconds = 0.0
        # struct page_region[] as rows of three int64 words (start, end, categories), which numpy
        # reads in place after each call (user-space addresses fit an int64).
        self._vec = np.zeros((_VEC_LEN, _WORDS), dtype=np.int64)
        # One ioctl argument, reused: only start and end change between calls.
        self._arg = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_WP_MATCHING | _uapi.PM_SCAN_CHECK_WPASYNC,
            vec=self._vec.ctypes.data,
            vec_len=_VEC_LEN,
            category_mask=_uapi.PAGE_IS_WRITTEN,
            return_mask=_uapi.PAGE_IS_WRITTEN,
        )
        # The same without WP_MATCHING: reports written pages, re-protects nothing (hot blocks).
        self._peek = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_CHECK_WPASYNC,
            vec=self._vec.ctypes.data,
            vec_len=_VEC_LEN,
            category_mask=_uapi.PAGE_IS_WRITTEN,
            return_mask=_uapi.PAGE_IS_WRITTEN,
        )

    def start(self) -> None:
        """Open the VM's pagemap and write-protect all of guest RAM (never-touched pages too)."""
        if self._pagemap is None:
            self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        _uapi.uffd_writeprotect(self.uffd, self.addr, self.length, protect=True)
        self.hot_bytes, self.whole_bytes, self._hot_age, self._hot = 0, 0, 0, []

    def harvest(self) -> Ranges:
        """Guest ranges written since start()/the last harvest; they are re-protected atomically."""
        if self._pagemap is None:
            raise RuntimeError("harvest() on a tracker not started (or stopped)")
        parts: list[Ranges] = []
        self.kernel_seconds = 0.0
        # Re-protect the hot blocks this time: every HOT_ROUNDS-th harvest, or the first after
        # hot_blocks was switched off with blocks still un-protected.
        cooling = self._hot_age + 1 >= HOT_ROUNDS if self.hot_blocks else bool(self._hot)
        hot = self._hot
        if self.hot_blocks and not cooling:
            hot = self._find_hot()
        self._walk(hot, parts, self._arg, protect_hot=cooling)
        # A cooling scan reads un-protected pages as written: those blocks come out whole as well.
        self.whole_bytes = sum(hi - lo for lo, hi in hot)
        if self.hot_blocks or cooling:
            self._arm_hot(hot, cooling)
        # In address order by construction; the kernel merges adjacent pages within one call,
        # the seams between calls and the hot blocks reported whole are merged here.
        return Ranges.concat(parts).merged()

    def _walk(self, hot: list[tuple[int, int]], parts: list[Ranges], arg: _uapi.PmScanArg,
              protect_hot: bool) -> None:
        """Scan guest RAM with ``arg``, but report the ``hot`` ranges whole without scanning
        them (scan them too if ``protect_hot``)."""
        pos = 0
        for lo, hi in [*hot, (self.length, self.length)]:
            self._scan_range(pos, lo, parts, arg)
            if lo < hi:
                if protect_hot:
                    self._scan_range(lo, hi, parts, arg)
                else:
                    parts.append(Ranges.from_pairs([(lo, hi)]))
            pos = hi

    def _find_hot(self) -> list[tuple[int, int]]:
        """The blocks to report whole from now on: those written at HOT_DENSITY since the last
        harvest, found by a scan that re-protects nothing (so a block turning hot takes no
        fault storm between a re-protect and the un-protect). Current hot blocks, un-protected,
        read as wholly written and stay hot."""
        parts: list[Ranges] = []
        self._walk(self._hot, parts, self._peek, protect_hot=False)
        written = Ranges.concat(parts).merged()
        # A round of scattered writes (runs shorter than 4 pages on average) turns nothing hot and
        # lets the hot blocks cool: whole blocks are for a guest rewriting a dense working set.
        if not written or len(written) * 4 * _uapi.PAGE_SIZE > written.total_bytes():
            return []
        return _dense_runs(written, self.length)

    def _arm_hot(self, hot: list[tuple[int, int]], cooling: bool) -> None:
        """Un-protect the blocks that turned hot in this harvest, or forget them all when cooling.

        Un-protecting cannot lose a write: this and every later harvest report these
        blocks whole until one scans them (cooling), which re-protects what it reports.
        """
        if cooling:
            self._hot, self.hot_bytes, self._hot_age = [], 0, 0  # the coming round runs all protected
            return
        self._hot_age += 1
        old = {b for lo, hi in self._hot for b in range(lo // HOT_BLOCK, -(-hi // HOT_BLOCK))}
        for lo, hi in hot:
            for blo, bhi in _runs_without(lo, hi, old):
                _uapi.uffd_writeprotect(self.uffd, self.addr + blo, bhi - blo, protect=False)
        self._hot = hot
        self.hot_bytes = sum(hi - lo for lo, hi in hot)

    def _scan_range(self, lo: int, hi: int, parts: list[Ranges], arg: _uapi.PmScanArg) -> None:
        """PAGEMAP_SCAN guest range [lo, hi) with ``arg``, in chunks of at most _CHUNK."""
        pos, end = self.addr + lo, self.addr + hi
        while pos < end:
            chunk_end = min(end, pos + _CHUNK)
            self._scan(pos, chunk_end, parts, arg)
            pos = chunk_end

    def _scan(self, start: int, end: int, parts: list[Ranges], arg: _uapi.PmScanArg) -> None:
        """One PAGEMAP_SCAN call over [start, end) (at most _VEC_LEN pages); append its regions
        as guest offsets."""
        assert self._pagemap is not None
        arg.start, arg.end, arg.walk_end = start, end, 0
        t0 = time.perf_counter()
        n = _uapi.ioctl(self._pagemap, _uapi.PAGEMAP_SCAN, arg)
        self.kernel_seconds += time.perf_counter() - t0
        if n >= _VEC_LEN:  # impossible for a chunk of _VEC_LEN pages; never drop what it re-protected
            raise OSError(f"PAGEMAP_SCAN filled its vector over 0x{start:x}-0x{end:x}")
        if n:  # the subtraction copies the strided columns out of the reused vector
            rows = self._vec[:n]
            parts.append(Ranges(rows[:, 0] - self.addr, rows[:, 1] - self.addr))

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


def _runs_without(lo: int, hi: int, blocks: set[int]) -> list[tuple[int, int]]:
    """[lo, hi) (whole HOT_BLOCKs but for a clipped last one) minus the blocks in ``blocks``, as runs."""
    runs: list[tuple[int, int]] = []
    for b in range(lo // HOT_BLOCK, -(-hi // HOT_BLOCK)):
        if b in blocks:
            continue
        blo, bhi = b * HOT_BLOCK, min((b + 1) * HOT_BLOCK, hi)
        if runs and runs[-1][1] == blo:
            runs[-1] = (runs[-1][0], bhi)
        else:
            runs.append((blo, bhi))
    return runs


def _dense_runs(written: Ranges, length: int) -> list[tuple[int, int]]:
    """Guest ranges (runs of whole HOT_BLOCKs, clipped to ``length``) of which ``written``
    (sorted, disjoint) covers HOT_DENSITY or more.

    The bytes written below each block boundary x are those of every range
    ending before it plus the part of the one it falls in, read off the
    running sum of the range lengths: no loop per range or per block.
    """
    if not written:
        return []
    s, e = written.starts, written.ends
    edges = np.minimum(np.arange(0, length + HOT_BLOCK, HOT_BLOCK, dtype=np.int64), length)
    edges = edges[np.append(True, edges[1:] > edges[:-1])]  # a length not a multiple of HOT_BLOCK
    below = np.concatenate(([0], np.cumsum(e - s)))
    j = np.searchsorted(s, edges, side="right")  # ranges starting at or before each edge
    inside = np.clip(edges - s[np.maximum(j - 1, 0)], 0, (e - s)[np.maximum(j - 1, 0)])
    upto = below[np.maximum(j - 1, 0)] + np.where(j > 0, inside, 0)
    per_block = np.diff(upto)
    dense = per_block >= HOT_DENSITY * np.diff(edges)
    return Ranges(edges[:-1][dense], edges[1:][dense]).merged().tolist()


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Call an ioctl wrapper, ignoring OSError: on teardown the VM process may have exited."""
    try:
        fn(*args)
    except OSError:
        pass
