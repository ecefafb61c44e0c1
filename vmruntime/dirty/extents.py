"""Page-range helpers: written extents of a memfd, and merging of ranges.

A range is a half-open byte range ``(start, end)`` of guest RAM, page aligned.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from itertools import chain, islice
from operator import lt

PAGE_SIZE = 4096


def page_floor(x: int) -> int:
    return x - x % PAGE_SIZE


def page_ceil(x: int) -> int:
    return -(-x // PAGE_SIZE) * PAGE_SIZE


def data_pieces(memfd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The data (non-hole) pieces of ``memfd`` within [start, end), as lseek SEEK_DATA/SEEK_HOLE
    report them (not rounded to pages)."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(memfd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(memfd, data, os.SEEK_HOLE), end)
        out.append((data, hole))
        pos = hole
    return out


def written_extents(memfd: int, size: int) -> list[tuple[int, int]]:
    """The extents of ``memfd`` that hold data (not holes) within [0, size), page aligned.

    A memfd page never written (or punched) is a hole and reads as zeros, so
    round 0 of a migration sends only these. Extents are rounded out to whole
    pages, merged, and clipped to ``size``.
    """
    out: list[tuple[int, int]] = []
    for data, hole in data_pieces(memfd, 0, size):
        append_range(out, page_floor(data), min(page_ceil(hole), page_ceil(size)))
    return out


def append_range(out: list[tuple[int, int]], start: int, end: int) -> None:
    """Append [start, end) to sorted ``out``, merging with the last range when they touch."""
    if out and start <= out[-1][1]:
        if end > out[-1][1]:
            out[-1] = (out[-1][0], end)
        return
    out.append((start, end))


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or adjacent ranges (into a new list).

    Input that is already sorted and merged (a harvest's result) is recognised
    in C loops and copied as is: start0 < end0 < start1 < end1 < ... holds
    exactly when every range is non-empty and apart from the next, when the
    loop below would change nothing. That check costs about half the loop.
    """
    items = list(ranges)
    flat = list(chain.from_iterable(items))
    if all(map(lt, flat, islice(flat, 1, None))):
        return items
    out: list[tuple[int, int]] = []
    for start, end in sorted(items):
        append_range(out, start, end)
    return out


def pages_to_ranges(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Page numbers -> merged byte ranges."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        append_range(out, p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
    return out


def bitmap_ranges(bitmap: bytes | bytearray) -> list[tuple[int, int]]:
    """A page bitmap (one byte per page, non-zero = set) -> merged byte ranges.

    Runs are found with ``find`` (C speed): the Python cost is per run, not per page.
    """
    out: list[tuple[int, int]] = []
    pos = bitmap.find(1)
    while pos != -1:
        end = bitmap.find(0, pos)
        if end == -1:
            end = len(bitmap)
        out.append((pos * PAGE_SIZE, end * PAGE_SIZE))
        pos = bitmap.find(1, end)
    return out
