"""Page range lists: the C-speed fast path agrees with the plain rules, range by range."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import PAGE_SIZE, ranges
from proto.errors import FieldError
from tests.test_proto_support import near_valid_ranges

P = PAGE_SIZE
_pages = st.integers(0, 40).map(lambda p: p * P)
_values = st.one_of(_pages, _pages.map(lambda v: v + 1), _pages.map(lambda v: v + 256), st.integers(0, 2**64 - 1))
_pairs = st.lists(st.tuples(_values, _values), max_size=10)


def plainly_valid(pairs: list[tuple[int, int]]) -> bool:
    """The rules written the obvious way."""
    prev = 0
    for start, end in pairs:
        if start % P or end % P or not prev <= start < end:
            return False
        prev = end
    return True


@settings(max_examples=250, deadline=None)
@given(st.one_of(_pairs, st.deferred(lambda: _valid_lists().map(list)), near_valid_ranges()))
def test_wire_rules_match_the_plain_rules(pairs: list[tuple[int, int]]) -> None:
    blob = b"".join(struct.pack("<QQ", s, e) for s, e in pairs)
    try:
        decoded = ranges.from_wire(blob)
    except FieldError:
        assert not plainly_valid(pairs)
        with pytest.raises(FieldError):
            ranges.to_wire(tuple(pairs))
        return
    assert plainly_valid(pairs) and decoded == tuple(pairs)
    assert ranges.to_wire(decoded) == blob


def _valid_lists() -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    return st.sets(st.integers(0, 60), max_size=12).map(
        lambda cuts: tuple((a * P, b * P) for a, b in zip(sorted(cuts)[0::2], sorted(cuts)[1::2], strict=False))
    )


@settings(max_examples=250, deadline=None)
@given(_valid_lists(), _valid_lists())
def test_disjoint_matches_pairwise_overlap(a: ranges.Ranges, b: ranges.Ranges) -> None:
    overlap = any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
    if overlap:
        with pytest.raises(FieldError, match="overlaps a zero range"):
            ranges.check_disjoint(a, b)
    else:
        ranges.check_disjoint(a, b)


@settings(deadline=None)
@given(_valid_lists(), st.integers(0, 70))
def test_bounds_and_helpers(rs: ranges.Ranges, guest_pages: int) -> None:
    guest = guest_pages * P
    inside = all(e <= guest for _, e in rs)
    if inside:
        ranges.check_bounds(rs, 100, guest)
    else:
        with pytest.raises(FieldError, match="outside the guest"):
            ranges.check_bounds(rs, 100, guest)
    assert ranges.total_length(rs) == sum(e - s for s, e in rs)
    assert ranges.targets(rs) == [(s, e - s) for s, e in rs]


def test_count_limit_and_bad_shapes() -> None:
    with pytest.raises(FieldError, match="the limit is 1"):
        ranges.check_bounds(((0, P), (2 * P, 3 * P)), 1, 10 * P)
    with pytest.raises(FieldError, match="not a \\(start, end\\) pair"):
        ranges.to_wire(((0, P, 2 * P),))  # type: ignore[arg-type]
    with pytest.raises(FieldError, match="non-negative 64-bit"):
        ranges.to_wire(((-P, 0),))
    with pytest.raises(FieldError, match="expected a range blob"):
        ranges.from_wire([0, P])
