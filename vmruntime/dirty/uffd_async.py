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
kernel's fast path). The Python part is kept to C loops: region starts and
ends are gathered with array slicing, and the list of (start, end) tuples is
built once, at the end, by ``zip``/``map`` with the cyclic GC paused.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from array import array
from collections.abc import Callable
from itertools import repeat
from operator import sub

from . import _uapi
from .names import UFFD_WP_ASYNC

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
        # struct page_region[] as flat u64s (start, end, categories): slicing an
        # array copies in C, where a ctypes struct access per region costs bytecode.
        self._vec = array("Q", bytes(_VEC_LEN * ctypes.sizeof(_uapi.PageRegion)))
        # One ioctl argument, reused: only start and end change between calls.
        self._arg = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_WP_MATCHING | _uapi.PM_SCAN_CHECK_WPASYNC,
            vec=self._vec.buffer_info()[0],
            vec_len=_VEC_LEN,
            category_mask=_uapi.PAGE_IS_WRITTEN,
            return_mask=_uapi.PAGE_IS_WRITTEN,
        )
        # The same without WP_MATCHING: reports written pages, re-protects nothing (hot blocks).
        self._peek = _uapi.PmScanArg(
            size=ctypes.sizeof(_uapi.PmScanArg),
            flags=_uapi.PM_SCAN_CHECK_WPASYNC,
            vec=self._vec.buffer_info()[0],
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

    def harvest(self) -> list[tuple[int, int]]:
        """Guest ranges written since start()/the last harvest; they are re-protected atomically."""
        if self._pagemap is None:
            raise RuntimeError("harvest() on a tracker not started (or stopped)")
        # Virtual addresses of the VM process, gathered in C (array slices and
        # concatenation); turned into guest offsets once, at the end.
        starts, ends = array("Q"), array("Q")
        self.kernel_seconds = 0.0
        # Re-protect the hot blocks this time: every HOT_ROUNDS-th harvest, or the first after
        # hot_blocks was switched off with blocks still un-protected.
        cooling = self._hot_age + 1 >= HOT_ROUNDS if self.hot_blocks else bool(self._hot)
        hot = self._hot
        if self.hot_blocks and not cooling:
            hot = self._find_hot()
        self._walk(hot, starts, ends, self._arg, protect_hot=cooling)
        # A cooling scan reads un-protected pages as written: those blocks come out whole as well.
        self.whole_bytes = sum(hi - lo for lo, hi in hot)
        if self.hot_blocks or cooling:
            self._arm_hot(hot, cooling)
        if not starts:
            return []
        return _offsets(starts, ends, self.addr)

    def _walk(self, hot: list[tuple[int, int]], starts: array[int], ends: array[int],
              arg: _uapi.PmScanArg, protect_hot: bool) -> None:
        """Scan guest RAM with ``arg``, but report the ``hot`` ranges whole without scanning
        them (scan them too if ``protect_hot``)."""
        pos = 0
        for lo, hi in [*hot, (self.length, self.length)]:
            self._scan_range(pos, lo, starts, ends, arg)
            if lo < hi:
                if protect_hot:
                    self._scan_range(lo, hi, starts, ends, arg)
                elif not _extend_last(starts, ends, self.addr + lo, self.addr + hi):
                    starts.append(self.addr + lo)
                    ends.append(self.addr + hi)
            pos = hi

    def _find_hot(self) -> list[tuple[int, int]]:
        """The blocks to report whole from now on: those written at HOT_DENSITY since the last
        harvest, found by a scan that re-protects nothing (so a block turning hot takes no
        fault storm between a re-protect and the un-protect). Current hot blocks, un-protected,
        read as wholly written and stay hot."""
        peek_starts, peek_ends = array("Q"), array("Q")
        self._walk(self._hot, peek_starts, peek_ends, self._peek, protect_hot=False)
        written = sum(peek_ends) - sum(peek_starts)  # C loops
        # A HOT_BLOCK written at HOT_DENSITY has at most (1 - HOT_DENSITY) * 512 + 1 runs;
        # when the average run is shorter than 4 pages nothing can be hot, and the per-range
        # loop of _dense_runs (costly for tens of thousands of ranges) is skipped.
        if not peek_starts or len(peek_starts) * 4 * _uapi.PAGE_SIZE > written:
            return []
        return _dense_runs(peek_starts, peek_ends, self.addr, self.length)

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

    def _scan_range(self, lo: int, hi: int, starts: array[int], ends: array[int], arg: _uapi.PmScanArg) -> None:
        """PAGEMAP_SCAN guest range [lo, hi) with ``arg``, in chunks of at most _CHUNK."""
        pos, end = self.addr + lo, self.addr + hi
        while pos < end:
            chunk_end = min(end, pos + _CHUNK)
            self._scan(pos, chunk_end, starts, ends, arg)
            pos = chunk_end

    def _scan(self, start: int, end: int, starts: array[int], ends: array[int], arg: _uapi.PmScanArg) -> None:
        """One PAGEMAP_SCAN call over [start, end) (at most _VEC_LEN pages); append its regions."""
        assert self._pagemap is not None
        arg.start, arg.end, arg.walk_end = start, end, 0
        t0 = time.perf_counter()
        n = _uapi.ioctl(self._pagemap, _uapi.PAGEMAP_SCAN, arg)
        self.kernel_seconds += time.perf_counter() - t0
        if n >= _VEC_LEN:  # impossible for a chunk of _VEC_LEN pages; never drop what it re-protected
            raise OSError(f"PAGEMAP_SCAN filled its vector over 0x{start:x}-0x{end:x}")
        if not n:
            return
        vec = self._vec
        # The kernel merges adjacent pages within one call (one region for a
        # wholly written chunk); only the seam between two calls is ours to merge.
        first = 1 if _extend_last(starts, ends, vec[0], vec[1]) else 0
        starts += vec[first * _WORDS : n * _WORDS : _WORDS]
        ends += vec[first * _WORDS + 1 : n * _WORDS : _WORDS]

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


def _offsets(starts: array[int], ends: array[int], base: int) -> list[tuple[int, int]]:
    """[(start - base, end - base), ...] built in C loops (zip, map).

    The cyclic GC is paused meanwhile: tens of thousands of new tuples would
    otherwise trigger collections that cost about a fifth of building them
    (they hold only ints; pausing merely delays collecting other threads'
    garbage). It is re-enabled only if it was enabled, so a caller that turned
    it off keeps it off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        b = repeat(base)
        return list(zip(map(sub, starts, b), map(sub, ends, b), strict=True))
    finally:
        if was_enabled:
            gc.enable()


def _extend_last(starts: array[int], ends: array[int], start: int, end: int) -> bool:
    """Extend the last range to ``end`` when [start, end) touches it (True); else change nothing."""
    if ends and ends[-1] == start:
        ends[-1] = end
        return True
    return False


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


def _dense_runs(starts: array[int], ends: array[int], base: int, length: int) -> list[tuple[int, int]]:
    """Guest ranges (runs of whole HOT_BLOCKs, clipped to ``length``) written at HOT_DENSITY or more."""
    written: dict[int, int] = {}
    for s, e in zip(starts, ends, strict=True):
        s -= base
        e -= base
        while s < e:
            b = s // HOT_BLOCK
            stop = min(e, (b + 1) * HOT_BLOCK)
            written[b] = written.get(b, 0) + stop - s
            s = stop
    runs: list[tuple[int, int]] = []
    for b in sorted(written):
        lo, hi = b * HOT_BLOCK, min((b + 1) * HOT_BLOCK, length)
        if written[b] < HOT_DENSITY * (hi - lo):
            continue
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Call an ioctl wrapper, ignoring OSError: on teardown the VM process may have exited."""
    try:
        fn(*args)
    except OSError:
        pass
