"""Page range lists: their wire form and the rules every list obeys.

A range is a half-open ``(start, end)`` byte range of guest RAM, page
aligned, non-empty. A list is sorted and not overlapping. On the wire a list
is one msgpack ``bin``: little-endian u64 ``start, end`` pairs. Its size is
checked before it is decoded, and the structural rules (aligned, non-empty,
ascending) are checked while converting, in C-speed passes over the whole
list (no Python loop per range: a 64 MiB batch of scattered pages has 16384
ranges). Only a bad list is walked range by range, to name the culprit.
Bounds against the guest size need the guest size, so they are separate.
"""

from __future__ import annotations

import sys
from array import array
from itertools import chain
from operator import itemgetter, lt
from typing import Any, NoReturn

from proto.errors import FieldError
from proto.limits import MAX_RANGES, MAX_ZERO_RANGES, PAGE_SIZE

#: A list of half-open, page-aligned guest ranges ``(start, end)``, sorted, not overlapping.
Ranges = tuple[tuple[int, int], ...]

PAIR_BYTES = 16
MAX_BLOB = max(MAX_RANGES, MAX_ZERO_RANGES) * PAIR_BYTES

_START = itemgetter(0)
_END = itemgetter(1)
# Second byte (bits 8-15) of a little-endian u64 whose bits 8-11 are clear: with a zero
# first byte, exactly the page-aligned values (PAGE_SIZE = 4096 = bit 12).
_ALIGNED_BYTE1 = bytes(b for b in range(256) if b & 0x0F == 0)
assert PAGE_SIZE == 4096, "the alignment check below assumes 4 KiB pages"


def _structure_ok(blob: bytes, flat: list[int]) -> bool:
    """Aligned, start < end, ascending: ``blob`` is the little-endian form of ``flat``."""
    if blob[0::8].count(0) != len(flat) or blob[1::8].translate(None, _ALIGNED_BYTE1):
        return False
    if not all(map(lt, flat[0::2], flat[1::2])):
        return False
    return flat == sorted(flat)  # already sorted input: a single linear pass in C


def _little_endian(words: array[int]) -> None:
    if sys.byteorder == "big":
        words.byteswap()


def from_wire(value: Any) -> Ranges:
    """Decode a range blob; its size is checked before anything is allocated for it."""
    if not isinstance(value, bytes):
        raise FieldError(f"expected a range blob (bin), got {type(value).__name__}")
    if len(value) % PAIR_BYTES or len(value) > MAX_BLOB:
        raise FieldError(f"range blob of {len(value)} bytes is not a whole number of pairs within the limit")
    words = array("Q", value)
    _little_endian(words)
    flat = words.tolist()
    pairs = iter(flat)
    ranges = tuple(zip(pairs, pairs, strict=True))
    if not _structure_ok(value, flat):
        explain(ranges)
    return ranges


def to_wire(value: Ranges) -> bytes:
    """Encode ranges as a blob of little-endian u64 ``start, end`` pairs, checking their structure."""
    flat = list(chain.from_iterable(value))
    try:
        words = array("Q", flat)
    except (TypeError, OverflowError) as exc:
        raise FieldError(f"ranges must be pairs of non-negative 64-bit integers: {exc}") from None
    _little_endian(words)
    blob = words.tobytes()
    if len(flat) != 2 * len(value) or not _structure_ok(blob, flat):
        explain(value)
    return blob


def explain(ranges: Ranges, guest_size: int | None = None) -> NoReturn:
    """Walk the ranges and raise ``FieldError`` naming the first bad one."""
    prev_end = 0
    for pair in ranges:
        if len(pair) != 2 or not all(type(v) is int for v in pair):
            raise FieldError(f"range {pair!r} is not a (start, end) pair of integers")
        start, end = pair
        if (start | end) & (PAGE_SIZE - 1):
            raise FieldError(f"range [{start:#x}, {end:#x}) is not page aligned")
        if start < prev_end or end <= start:
            raise FieldError(f"range [{start:#x}, {end:#x}) is empty, unsorted or overlaps the previous")
        if guest_size is not None and end > guest_size:
            raise FieldError(f"range [{start:#x}, {end:#x}) lies outside the guest ({guest_size:#x} bytes)")
        prev_end = end
    raise FieldError("invalid range list")


def check_bounds(ranges: Ranges, limit: int, guest_size: int) -> None:
    """Count within ``limit`` and every range inside the guest (the list is already structurally valid)."""
    if len(ranges) > limit:
        raise FieldError(f"{len(ranges)} ranges in one batch, the limit is {limit}")
    if ranges and ranges[-1][1] > guest_size:  # sorted: the last end is the highest
        explain(ranges, guest_size)


def check_ranges(ranges: Ranges, limit: int, guest_size: int) -> int:
    """Every rule at once, for lists that did not come through the wire; returns the total length."""
    to_wire(ranges)
    check_bounds(ranges, limit, guest_size)
    return total_length(ranges)


def check_disjoint(a: Ranges, b: Ranges) -> None:
    """Two valid lists must not share a byte (a page is either data or zero)."""
    if not a or not b:
        return
    # Sorted together, the ends pair up into the ranges covered an odd number of times; their
    # total is |A| + |B| - 2|A and B|, so it equals |A| + |B| exactly when nothing overlaps.
    points = sorted(chain(chain.from_iterable(a), chain.from_iterable(b)))
    if sum(points[1::2]) - sum(points[0::2]) == total_length(a) + total_length(b):
        return
    for start, end in a:
        if any(zs < end and start < ze for zs, ze in b):
            raise FieldError(f"data range [{start:#x}, {end:#x}) overlaps a zero range")
    raise FieldError("data and zero ranges overlap")  # unreachable: the sort check found an overlap


def total_length(ranges: Ranges) -> int:
    """Sum of the range lengths."""
    return sum(map(_END, ranges)) - sum(map(_START, ranges))


def targets(ranges: Ranges) -> list[tuple[int, int]]:
    """``(start, length)`` per range, in order."""
    return [(start, end - start) for start, end in ranges]


def summary(ranges: Ranges) -> str:
    """A short form of a list for logs and error messages (a batch may hold 16384 ranges)."""
    if len(ranges) <= 4:
        return repr(ranges)
    return f"<{len(ranges)} ranges {ranges[0][0]:#x}..{ranges[-1][1]:#x}>"
