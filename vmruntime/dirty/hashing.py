"""The "hash" backend: xxh3 hashes of guest pages, compared harvest to harvest.

Needs no kernel support and no cooperation from the VM process: the agent
hashes guest RAM through its own mapping. ``start()`` takes the reference
hashes; each harvest reports the pages whose hash differs and keeps the new
ones. To spend less than one Python call per page, it first hashes chunks of
``stride`` bytes and re-hashes single pages only inside chunks that changed;
with the memfd at hand it also skips holes (never-written memory reads as
zeros, whose hashes are known).

What it reports, exactly: the pages whose *content* differs from what it hashed
at the previous harvest, not the pages written. Hence:

- a write that stores the bytes already there is not reported (harmless:
  the page still holds what the receiver has);
- it cannot tell guest writes from the agent's own writes to guest RAM
  (on the source of a migration the agent never writes guest RAM; do not use
  it where the agent does);
- a page changed after its harvest hashed it but before the caller read it,
  that later returns to exactly the hashed content, is not reported again
  (the caller sent the intermediate content); so is, with odds of 2**-64,
  a change that keeps the xxh3_64 hash. Write-protect backends have neither
  gap; the end-of-migration RAM digest catches both.
"""

from __future__ import annotations

import mmap
from array import array

import xxhash

from .extents import PAGE_SIZE, written_extents
from .names import HASH
from .ranges import Ranges

DEFAULT_STRIDE = 64 * 1024

_h = xxhash.xxh3_64_intdigest


class HashTracker:
    """Dirty tracker for one VM by content hashing of its guest RAM mapping."""

    name = HASH
    hot_blocks = False  # uffd-wp-async only (DirtyTracker): ignored here
    whole_bytes = 0

    def __init__(
        self, *, ram: mmap.mmap, length: int, memfd: int | None = None, stride: int = DEFAULT_STRIDE
    ) -> None:
        if stride % PAGE_SIZE or stride <= 0:
            raise ValueError(f"stride must be a positive multiple of {PAGE_SIZE}")
        self.ram = ram
        self.length = length
        self.memfd = memfd
        self.stride = stride
        self._zero_page = _h(bytes(PAGE_SIZE))
        nchunks = -(-length // stride)
        # The last chunk is shorter when length is not a multiple of stride.
        self._zero_chunk = _h(bytes(stride))
        self._zero_last = _h(bytes(length - (nchunks - 1) * stride))
        self._chunks: array[int] = array("Q", [0]) * nchunks  # per chunk, as of the last harvest
        self._pages: array[int] = array("Q")  # per page, as of the last time its chunk changed
        self._started = False

    def start(self) -> None:
        """Take reference hashes of every chunk and page of guest RAM."""
        with memoryview(self.ram) as mv:
            has_data = self._data_chunks()
            self._chunks = self._chunk_hashes(mv, has_data)
            pages = array("Q")
            for c in range(len(self._chunks)):
                pages.extend(self._page_hashes(mv, c, has_data[c]))
            self._pages = pages
        self._started = True

    def harvest(self) -> Ranges:
        """Guest ranges whose content changed since start()/the last harvest (merged, sorted)."""
        if not self._started:
            raise RuntimeError("harvest() on a tracker not started (or stopped)")
        out: list[tuple[int, int]] = []
        with memoryview(self.ram) as mv:
            has_data = self._data_chunks()
            new = self._chunk_hashes(mv, has_data)
            if new != self._chunks:  # compared in C: the idle case costs no Python loop
                changed = [c for c, (a, b) in enumerate(zip(new, self._chunks, strict=True)) if a != b]
                for c in changed:
                    self._changed_pages(mv, c, has_data[c], out)
            self._chunks = new
        return Ranges.from_pairs(out)

    def stop(self) -> None:
        self._started = False

    def _chunk_hashes(self, mv: memoryview, has_data: bytearray) -> array[int]:
        """Hashes of every chunk; chunks wholly in memfd holes get the known hash of zeros."""
        zero, stride = self._zero_chunk, self.stride
        hashes = array(
            "Q", [_h(mv[o : o + stride]) if has_data[c] else zero for c, o in enumerate(range(0, self.length, stride))]
        )
        if not has_data[-1]:
            hashes[-1] = self._zero_last
        return hashes

    def _page_hashes(self, mv: memoryview, c: int, data: int) -> array[int]:
        """Hashes of the pages of chunk ``c`` (all the zero-page hash if it lies in a hole)."""
        lo, hi = c * self.stride, min((c + 1) * self.stride, self.length)
        if not data:
            return array("Q", [self._zero_page]) * ((hi - lo) // PAGE_SIZE)
        return array("Q", [_h(mv[o : o + PAGE_SIZE]) for o in range(lo, hi, PAGE_SIZE)])

    def _changed_pages(self, mv: memoryview, c: int, data: int, out: list[tuple[int, int]]) -> None:
        """Re-hash the pages of chunk ``c``; append the changed ones to ``out`` (merged)."""
        new = self._page_hashes(mv, c, data)
        first = c * self.stride // PAGE_SIZE
        old = self._pages[first : first + len(new)]
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            if a != b:
                start = (first + i) * PAGE_SIZE
                if out and out[-1][1] == start:
                    out[-1] = (out[-1][0], start + PAGE_SIZE)
                else:
                    out.append((start, start + PAGE_SIZE))
        self._pages[first : first + len(new)] = new

    def _data_chunks(self) -> bytearray:
        """One byte per chunk: 1 if it may hold data, 0 if it lies wholly in a memfd hole."""
        n = len(self._chunks)
        if self.memfd is None:
            return bytearray(b"\x01") * n
        flags = bytearray(n)
        for start, end in written_extents(self.memfd, self.length):
            first, last = start // self.stride, (end - 1) // self.stride
            flags[first : last + 1] = b"\x01" * (last + 1 - first)
        return flags
