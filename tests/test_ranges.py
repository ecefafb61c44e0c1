"""vmruntime/dirty/ranges.py (Ranges, numpy) against plain-Python references on random range sets:
empty, one range, adjacent, overlapping and unsorted input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.migration import pages
from vmruntime.dirty import uffd_async
from vmruntime.dirty.extents import merge_ranges
from vmruntime.dirty.ranges import Ranges

P = 4096
C = pages.DIGEST_CHUNK

# Page-granular ranges in a small space, so that touching and overlapping ones are common;
# any order, and (for the merge) empty ones too.
page_ranges = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)).map(
    lambda t: (t[0] * P, (t[0] + t[1]) * P)), max_size=60)
nonempty_ranges = page_ranges.map(lambda rs: [(a, b) for a, b in rs if b > a])


def chunks_reference(ranges: list[tuple[int, int]], chunk: int) -> set[int]:
    return {i for a, b in ranges if b > a for i in range(a // chunk, (b - 1) // chunk + 1)}


def covered_reference(ranges: list[tuple[int, int]], chunk: int) -> set[int]:
    return {i for a, b in ranges for i in range(-(-a // chunk), b // chunk)}


def dense_reference(written: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Block by block: the bytes of ``written`` inside it against HOT_DENSITY of its size."""
    block, out = uffd_async.HOT_BLOCK, []
    for lo in range(0, length, block):
        hi = min(lo + block, length)
        inside = sum(max(0, min(b, hi) - max(a, lo)) for a, b in written)
        if inside >= uffd_async.HOT_DENSITY * (hi - lo):
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
    return out


@settings(max_examples=300, deadline=None)
@given(page_ranges)
def test_merged_equals_merge_ranges(ranges: list[tuple[int, int]]) -> None:
    r = Ranges.from_pairs(ranges)
    assert r.merged() == merge_ranges(ranges)
    assert r.merged().tolist() == merge_ranges(ranges)


@settings(max_examples=300, deadline=None)
@given(nonempty_ranges, st.sampled_from([P, 4 * P, C]))
def test_chunk_sets_equal_the_references(ranges: list[tuple[int, int]], chunk: int) -> None:
    r = Ranges.from_pairs(ranges)
    assert set(r.chunks(chunk).tolist()) == chunks_reference(ranges, chunk)
    assert set(r.covered_chunks(chunk).tolist()) == covered_reference(ranges, chunk)
    if chunk == C:
        assert pages.chunks_of(r) == pages.chunks_of(ranges) == chunks_reference(ranges, C)
        assert pages.covered_chunks(r) == covered_reference(ranges, C)
    assert r.total_bytes() == pages.total_bytes(ranges) == sum(b - a for a, b in ranges)


@settings(max_examples=200, deadline=None)
@given(nonempty_ranges, st.integers(1, 5))
def test_dense_runs_equal_a_block_by_block_count(ranges: list[tuple[int, int]], tail_pages: int) -> None:
    scale = uffd_async.HOT_BLOCK // (64 * P)  # stretch the ranges so that blocks fill up
    written = merge_ranges([(a * scale, b * scale) for a, b in ranges])
    length = 4 * uffd_async.HOT_BLOCK + tail_pages * P
    written = [(a, min(b, length)) for a, b in written if a < length]
    assert uffd_async._dense_runs(Ranges.from_pairs(written), length) == dense_reference(written, length)


def test_edge_cases() -> None:
    empty = Ranges.empty()
    assert empty == [] and not empty and len(empty) == 0 and empty.merged() == []
    assert empty.total_bytes() == 0 and empty.chunks(C).size == 0 and empty.covered_chunks(C).size == 0
    assert Ranges.from_pairs([]) == [] and Ranges.from_pairs(iter([(0, P)])) == [(0, P)]
    one = Ranges.from_pairs([(P, 3 * P)])
    assert one.merged() is one and list(one) == [(P, 3 * P)] and isinstance(list(one)[0][0], int)
    # Adjacent ranges merge, overlapping and unsorted ones too; an empty range inside another goes.
    assert Ranges.from_pairs([(0, P), (P, 2 * P)]).merged() == [(0, 2 * P)]
    assert Ranges.from_pairs([(4 * P, 6 * P), (0, P), (5 * P, 9 * P), (2 * P, 2 * P)]).merged() == [
        (0, P), (2 * P, 2 * P), (4 * P, 9 * P)]
    assert Ranges.concat([one, Ranges.from_pairs([(3 * P, 4 * P)])]).merged() == [(P, 4 * P)]
    assert Ranges.from_pairs([(0, P)]) != [(0, 2 * P)]
    with pytest.raises(ValueError):
        Ranges.from_pairs([(0, P), (P,)])  # type: ignore[list-item]


def test_pieces_settle_data_pages_by_their_first_word_and_check_the_rest() -> None:
    ram = bytearray(64 * P)
    ram[2 * P] = 1  # first word non-zero: data without a compare
    ram[5 * P + 100] = 1  # first word zero, data further in: found by the whole compare
    ranges = Ranges.from_pairs([(2 * P, 3 * P), (5 * P, 6 * P), (7 * P, 8 * P), (16 * P, 64 * P)])
    p = pages.pieces(memoryview(ram), ranges)
    assert list(zip(p.ranges, p.zeros.tolist(), strict=True)) == [
        ((2 * P, 3 * P), False), ((5 * P, 6 * P), False), ((7 * P, 8 * P), True), ((16 * P, 64 * P), True)]
