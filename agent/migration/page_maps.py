"""Page maps (one byte per guest page) and the byte ranges that mark them, vectorised.

Post-copy keeps per-page maps on both sides (the source's pages still to send, the
destination's received map, agent/migration/postcopy_faults.py), and marks whole dirty sets in
them at the switch-over, tens of thousands of ranges while the guest is paused. A Python loop
of slice assignments costs about a microsecond a range; these do it as a few numpy passes over
the map (docs/PERFORMANCE.md, section 20). Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from vmruntime.dirty.ranges import Ranges

PAGE_SIZE = 4096


def covered(ranges: Ranges | Iterable[tuple[int, int]], npages: int) -> npt.NDArray[np.bool_]:
    """A boolean per page of ``npages``: True where any of the page-aligned ``ranges`` covers it
    (ranges may overlap or come unsorted). ValueError for a range outside the map."""
    r = Ranges.from_pairs(ranges) if not isinstance(ranges, Ranges) else ranges
    firsts, ends = r.starts // PAGE_SIZE, r.ends // PAGE_SIZE
    if len(firsts) and (int(firsts.min()) < 0 or int(ends.max()) > npages):
        raise ValueError(f"a range lies outside a map of {npages} pages")
    # +1 where a range starts, -1 where one ends: the running sum is the ranges over each page.
    edges = np.bincount(firsts, minlength=npages + 1) - np.bincount(ends, minlength=npages + 1)
    return np.cumsum(edges[:-1]) > 0


def mark(target: bytearray, ranges: Ranges | Iterable[tuple[int, int]], value: int = 1) -> int:
    """Set the pages ``ranges`` cover to ``value`` in ``target``; returns how many pages they cover."""
    hit = covered(ranges, len(target))
    view = np.frombuffer(target, np.uint8)
    view[hit] = value
    del view  # the bytearray must not stay exported (it could not be resized)
    return int(np.count_nonzero(hit))


__all__ = ["covered", "mark"]
