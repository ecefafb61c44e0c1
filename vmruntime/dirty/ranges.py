"""Page ranges as two numpy arrays: the form a harvest takes from the kernel to the round's batches.

A dirty set of one page in four over 1 GiB is 65536 ranges. As a list of
``(start, end)`` tuples, building it and every walk over it by the round's
bookkeeping (merge check, byte count, digest chunk sets) cost Python bytecode
per range; as two int64 arrays these are a few C loops each
(docs/PERFORMANCE.md section 4). ``Ranges`` is that pair, ``starts[i]`` to
``ends[i]`` half open. It iterates as ``(start, end)`` tuples of Python ints
and compares equal to a sequence of such pairs, so code that sends or tests
ranges one by one keeps working on it.

The plain-Python references these functions must agree with are
``merge_ranges`` and friends in :mod:`.extents` (tests check them against
each other on random range sets).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt

Offsets = npt.NDArray[np.int64]


class Ranges:
    """Half-open byte ranges ``[starts[i], ends[i])`` as two int64 arrays of equal length."""

    __slots__ = ("ends", "starts")
    __hash__ = None  # type: ignore[assignment]  # compares by content, like a list

    def __init__(self, starts: Offsets, ends: Offsets) -> None:
        if starts.shape != ends.shape or starts.ndim != 1:
            raise ValueError(f"starts and ends must be 1-d of one length, not {starts.shape} and {ends.shape}")
        self.starts = starts
        self.ends = ends

    @classmethod
    def empty(cls) -> Ranges:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> Ranges:
        """From ``(start, end)`` pairs (a list of tuples, or a Ranges, returned as is)."""
        if isinstance(pairs, Ranges):
            return pairs
        items = pairs if isinstance(pairs, Sequence) else list(pairs)
        if not items:
            return cls.empty()
        # fromiter over the flattened pairs: several times faster than np.array on a list of tuples.
        flat = np.fromiter(chain.from_iterable(items), dtype=np.int64)
        if flat.shape[0] != 2 * len(items):
            raise ValueError("ranges must be (start, end) pairs")
        return cls(flat[0::2].copy(), flat[1::2].copy())

    @classmethod
    def concat(cls, parts: Sequence[Ranges]) -> Ranges:
        """The ranges of ``parts`` one after the other (not merged)."""
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]))

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __bool__(self) -> bool:
        return self.starts.shape[0] > 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts.tolist(), self.ends.tolist(), strict=True)

    def __getitem__(self, i: slice | npt.NDArray[np.bool_]) -> Ranges:
        """The ranges a slice or a boolean mask selects."""
        return Ranges(self.starts[i], self.ends[i])

    def tolist(self) -> list[tuple[int, int]]:
        """The ranges as a list of ``(start, end)`` tuples of Python ints (the wire's form).

        The cyclic GC is paused meanwhile: thousands of new tuples would
        otherwise trigger collections, in a process holding many objects, that
        cost more than building them (they hold only ints; pausing merely
        delays collecting other threads' garbage). Re-enabled only if it was
        enabled, so a caller that turned it off keeps it off.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return list(zip(self.starts.tolist(), self.ends.tolist(), strict=True))
        finally:
            if was_enabled:
                gc.enable()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ranges):
            return bool(np.array_equal(self.starts, other.starts) and np.array_equal(self.ends, other.ends))
        if isinstance(other, Sequence):
            return self.tolist() == [tuple(p) for p in other]
        return NotImplemented

    def __repr__(self) -> str:
        n = len(self)
        if n <= 4:
            return f"Ranges({self.tolist()!r})"
        return f"Ranges(<{n} ranges {int(self.starts[0]):#x}..{int(self.ends[-1]):#x}>)"

    def total_bytes(self) -> int:
        return int(self.ends.sum() - self.starts.sum())

    def is_merged(self) -> bool:
        """Sorted, non-empty and apart: start0 < end0 < start1 < end1 < ..."""
        s, e = self.starts, self.ends
        return bool(np.all(s < e) and np.all(s[1:] > e[:-1]))

    def merged(self) -> Ranges:
        """Sorted, overlapping or touching ranges merged (self when already so).

        The same result as extents.merge_ranges: after sorting by start, a
        range opens a new run when it starts past every end before it in its
        run (the running maximum of the ends), else it joins the run.
        """
        if not self or self.is_merged():
            return self
        s, e = self.starts, self.ends
        if not np.all(s[1:] >= s[:-1]):
            order = np.argsort(s, kind="stable")
            s, e = s[order], e[order]
        reach = np.maximum.accumulate(e)
        opens = np.empty(len(s), dtype=bool)
        opens[0] = True
        np.greater(s[1:], reach[:-1], out=opens[1:])
        first = np.flatnonzero(opens)
        last = np.append(first[1:] - 1, len(s) - 1)
        return Ranges(s[first], reach[last])

    def shifted(self, delta: int) -> Ranges:
        return Ranges(self.starts + delta, self.ends + delta)

    def chunks(self, chunk: int) -> npt.NDArray[np.int64]:
        """Sorted indices of the ``chunk``-sized blocks the ranges touch (empty ranges touch none)."""
        s, e = self.starts, self.ends
        keep = e > s
        if not np.all(keep):
            s, e = s[keep], e[keep]
        first, last = s // chunk, (e - 1) // chunk
        if np.array_equal(first, last):  # the common case, scattered pages: one chunk each
            if first.size and np.all(first[1:] >= first[:-1]):  # sorted: drop repeats, no hashing
                return first[np.append(True, first[1:] != first[:-1])]
            return np.unique(first)
        return _spans(first, last + 1)

    def covered_chunks(self, chunk: int) -> npt.NDArray[np.int64]:
        """Sorted indices of the ``chunk``-sized blocks lying wholly inside one of the ranges."""
        lo, hi = -(-self.starts // chunk), self.ends // chunk
        keep = hi > lo
        return _spans(lo[keep], hi[keep])


def _spans(lo: Offsets, hi: Offsets) -> npt.NDArray[np.int64]:
    """Sorted, distinct integers of the union of [lo[i], hi[i]) (lo < hi), without a per-index loop
    when the spans are few and long: a +1/-1 step at each edge, summed, marks where any span is."""
    if lo.size == 0:
        return np.empty(0, np.int64)
    base = int(lo.min())
    n = int(hi.max()) - base + 1
    steps = np.bincount(lo - base, minlength=n) - np.bincount(hi - base, minlength=n)
    return np.flatnonzero(np.cumsum(steps[:-1]) > 0).astype(np.int64) + base
