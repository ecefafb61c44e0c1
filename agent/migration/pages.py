"""Planning what goes on the wire: page ranges into batches, zero pages into ranges, the RAM digest.

This module owns the per-round work the sender does in Python, on the round's
ranges as numpy arrays (vmruntime/dirty/ranges.py ``Ranges``), so that a dirty
set of tens of thousands of scattered pages costs C loops, not bytecode per
range (docs/PERFORMANCE.md section 4):

* ``plan_batches`` cuts the ranges of a round into page batches of at most
  ``BATCH_BYTES`` payload and ``BATCH_RANGES`` ranges, and finds zero pages
  at ``ZERO_GRAIN`` granularity by comparing whole grains against a zero
  buffer (``bytearray == memoryview`` is one memcmp; a non-zero grain fails
  on its first non-zero byte). Zero grains travel as ranges without payload;
  a grain holding any non-zero byte travels whole.
* ``RamDigest`` is the digest both ends compare before READY: xxh3-128 per
  ``DIGEST_CHUNK`` of guest RAM, folded into one. A chunk with no data
  (a hole of the memfd) contributes the digest of a zero chunk without being
  read, so an idle 8 GiB guest is digested in the time of what it touched,
  and the result depends only on content, not on which pages are holes.
  Chunk digests are cached and kept valid incrementally, so most hashing
  happens during pre-copy, not in the downtime, and chunks a batch covers
  whole are hashed right after they crossed the socket, still in the CPU
  cache, instead of in a second pass over DRAM.
* ``punch_zeros`` zeroes ranges on the receiver by punching holes, which
  frees the memory rather than writing zeros into it; ``DigestingSink`` feeds
  the receiver's digest from each received piece.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter

import numpy as np
import numpy.typing as npt
import xxhash

from vmruntime.dirty.extents import data_pieces
from vmruntime.dirty.ranges import Ranges

PAGE_SIZE = 4096
ZERO_GRAIN = 64 * 1024
BATCH_BYTES = 4 * 1024 * 1024
BATCH_RANGES = 1000  # one iovec per range, plus the frame, within IOV_MAX
# Small enough that a scattered dirty page costs little rehashing, large
# enough that folding the chunk digests of a big guest stays cheap.
DIGEST_CHUNK = 64 * 1024
DIGEST_ALGORITHM = "xxh3-128-chunked"

Range = tuple[int, int]


@dataclass(slots=True)
class Batch:
    """One page batch to send: data ranges (with payload) and zero ranges (without). The wire
    takes them as lists of tuples (``tolist()``), the digest's bookkeeping as they are."""

    ranges: Ranges = field(default_factory=Ranges.empty)
    zeros: Ranges = field(default_factory=Ranges.empty)
    data_bytes: int = 0
    zero_bytes: int = 0

    @property
    def pages(self) -> int:
        return (self.data_bytes + self.zero_bytes) // PAGE_SIZE

    def __bool__(self) -> bool:
        return bool(self.ranges or self.zeros)


@lru_cache(maxsize=32)
def _zeros(n: int) -> bytearray:
    # bytearray on the left of == compares buffers with memcmp.
    return bytearray(n)


@dataclass(slots=True)
class Pieces:
    """Ranges cut where zero grains begin and end, in order; ``zeros[i]``: piece i reads as zeros."""

    ranges: Ranges
    zeros: npt.NDArray[np.bool_]


def pieces(ram: memoryview, ranges: Ranges, detect_zeros: bool = True) -> Pieces:
    """``ranges`` as data and zero pieces.

    A range shorter than a ZERO_GRAIN (the scattered pages of a dirty set) is
    one piece. Its first 8 bytes are read for all such ranges at once: a data
    page nearly always has a non-zero word there, which settles it; only those
    starting with a zero word are compared whole (one memcmp each). A longer
    range is checked grain by grain, neighbouring grains of the same kind
    merged, so it costs one compare per 64 KiB and stays one piece when it
    holds data throughout.
    """
    n = len(ranges)
    if not detect_zeros or n == 0:
        return Pieces(ranges, np.zeros(n, dtype=bool))
    s, e = ranges.starts, ranges.ends
    short = (e - s) < ZERO_GRAIN
    maybe_zero = short.copy()
    if len(ram) % 8 == 0 and not np.any(s & 7):  # page-aligned ranges: the first word of each
        words = np.frombuffer(ram, dtype=np.uint64)
        maybe_zero[short] = words[s[short] >> 3] == 0
        del words  # (no export of the caller's buffer outlives this call)
    zeros = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(maybe_zero).tolist():
        a, b = int(s[i]), int(e[i])
        zeros[i] = _zeros(b - a) == ram[a:b]
    long = np.flatnonzero(~short).tolist()
    if not long:
        return Pieces(ranges, zeros)
    out_s: list[npt.NDArray[np.int64]] = []
    out_e: list[npt.NDArray[np.int64]] = []
    out_z: list[npt.NDArray[np.bool_]] = []
    prev = 0
    for i in long:  # few: a long range is a whole run of pages
        out_s.append(s[prev:i])
        out_e.append(e[prev:i])
        out_z.append(zeros[prev:i])
        grains = list(_classify_grains(ram, int(s[i]), int(e[i])))
        out_s.append(np.array([a for (a, _), _ in grains], dtype=np.int64))
        out_e.append(np.array([b for (_, b), _ in grains], dtype=np.int64))
        out_z.append(np.array([z for _, z in grains], dtype=bool))
        prev = i + 1
    out_s.append(s[prev:])
    out_e.append(e[prev:])
    out_z.append(zeros[prev:])
    return Pieces(Ranges(np.concatenate(out_s), np.concatenate(out_e)), np.concatenate(out_z))


def _classify_grains(ram: memoryview, a: int, b: int) -> Iterator[tuple[Range, bool]]:
    start, kind = a, None
    for s, e in _split(a, b, ZERO_GRAIN):
        z = _zeros(e - s) == ram[s:e]
        if kind is not None and z != kind:
            yield (start, s), kind
            start = s
        kind = z
    yield (start, b), bool(kind)


def plan_batches(ram: memoryview, ranges: Ranges | Iterable[Range], detect_zeros: bool = True,
                 batch_bytes: int = BATCH_BYTES, batch_ranges: int = BATCH_RANGES) -> Iterator[Batch]:
    """Cut ``ranges`` (sorted, disjoint) into page batches, zero grains as payload-free ranges.

    A loop per batch, not per range: each batch takes data pieces up to
    ``batch_ranges`` of them or ``batch_bytes`` (found on the running byte
    count, the piece that crosses it cut there); zero pieces go with the
    batch whose data precedes them, ``batch_ranges`` at most (the rest in
    batches of their own).
    """
    p = pieces(ram, Ranges.from_pairs(ranges), detect_zeros)
    data, zero = p.ranges[~p.zeros], p.ranges[p.zeros]
    cuts = _cut_data(data, batch_bytes, batch_ranges)
    # The zero pieces of batch k lie before batch k + 1's first data byte (those before any data: batch 0).
    firsts = np.array([int(c.starts[0]) for c in cuts], dtype=np.int64)
    owner = np.maximum(np.searchsorted(firsts, zero.starts, side="right") - 1, 0)
    bounds = np.searchsorted(owner, np.arange(max(len(cuts), 1) + 1))
    for k in range(max(len(cuts), 1)):
        d = cuts[k] if cuts else Ranges.empty()
        z = zero[bounds[k]:bounds[k + 1]]
        for i in range(0, max(len(z), 1), batch_ranges):
            zs = z[i:i + batch_ranges]
            if d or zs:
                yield Batch(d, zs, d.total_bytes(), zs.total_bytes())
            d = Ranges.empty()


def _cut_data(data: Ranges, batch_bytes: int, batch_ranges: int) -> list[Ranges]:
    """``data`` as the data ranges of consecutive batches: at most ``batch_ranges`` ranges and
    ``batch_bytes`` bytes each, filled greedily (a range that crosses the byte limit is cut)."""
    s, e = data.starts, data.ends
    n = len(s)
    before = np.concatenate(([0], np.cumsum(e - s)))  # data bytes before piece i
    out: list[Ranges] = []
    i, pos = 0, int(s[0]) if n else 0  # the next batch starts at guest offset pos, inside piece i
    while i < n:
        limit = int(before[i]) + pos - int(s[i]) + batch_bytes
        j = min(int(np.searchsorted(before, limit, side="right")) - 1, i + batch_ranges, n)  # whole: i..j-1
        bs, be = s[i:j].copy(), e[i:j]
        if j > i:
            bs[0] = pos
        nxt = pos if j == i else int(s[j]) if j < n else 0
        room = limit - (int(before[i]) + pos - int(s[i]) if j == i else int(before[j]))
        if j < min(i + batch_ranges, n) and room > 0:  # piece j crosses the byte limit: cut it there
            bs, be = np.append(bs, nxt), np.append(be, nxt + room)
            nxt += room
        out.append(Ranges(bs, be))
        i, pos = j, nxt
    return out


def received(data: Sequence[Range], zeros: Sequence[Range]) -> tuple[Ranges, Ranges, Ranges]:
    """A received batch's data and zero ranges (the wire's tuples) as Ranges, and both merged."""
    d, z = Ranges.from_pairs(data), Ranges.from_pairs(zeros)
    return d, z, Ranges.concat([d, z]).merged()


def total_bytes(ranges: Ranges | Sequence[Range]) -> int:
    if isinstance(ranges, Ranges):
        return ranges.total_bytes()
    return sum(map(itemgetter(1), ranges)) - sum(map(itemgetter(0), ranges))  # C loops


# -- the digest --------------------------------------------------------------------------------

_ZERO_CHUNK = memoryview(bytes(DIGEST_CHUNK))
_DIGEST_SIZE = 16  # xxh3-128


@lru_cache(maxsize=4)
def _zero_chunk_digest(n: int) -> bytes:
    return xxhash.xxh3_128_digest(_ZERO_CHUNK[:n])


def chunks_of(ranges: Ranges | Iterable[Range]) -> set[int]:
    """Indices of the DIGEST_CHUNKs that ``ranges`` touch."""
    return set(Ranges.from_pairs(ranges).chunks(DIGEST_CHUNK).tolist())


def covered_chunks(ranges: Ranges | Iterable[Range]) -> set[int]:
    """Indices of the DIGEST_CHUNKs lying wholly inside one of ``ranges`` (merge touching ranges first)."""
    return set(Ranges.from_pairs(ranges).covered_chunks(DIGEST_CHUNK).tolist())


class RamDigest:
    """The digest both ends compare before READY, kept up to date chunk by chunk.

    xxh3-128 of every DIGEST_CHUNK of guest RAM, folded into one xxh3-128. A
    chunk is hashed through the agent's mapping where the memfd has data and
    as zeros where it has holes (never read: reading a shmem hole through a
    mapping would allocate it), so the result depends only on content. Chunk
    digests are cached: ``invalidate`` drops those whose bytes may have
    changed, ``refresh`` recomputes chosen chunks ahead of time, and
    ``hexdigest`` computes what is still missing. Hashing stable chunks
    during pre-copy keeps the digest out of the downtime.

    Valid only if every change to guest RAM after a chunk was hashed is
    passed to ``invalidate`` (the source: each dirty harvest; the
    destination: each page batch).

    The chunk digests live side by side in one buffer, with the set of
    chunks still to hash beside it, so ``hexdigest`` (in the downtime) costs
    the chunks that changed plus one hash over the buffer, not a Python walk
    over every chunk (that walk alone was ~1 ms per GiB of guest).
    """

    def __init__(self, memfd: int, ram: memoryview, size: int) -> None:
        self.memfd = memfd
        self.ram = ram
        self.size = size
        self.nchunks = (size + DIGEST_CHUNK - 1) // DIGEST_CHUNK
        self._buf = bytearray(_DIGEST_SIZE * self.nchunks)  # chunk i's digest at [16 i, 16 i + 16)
        # Chunks whose digest in _buf is not valid; None stands for all of them. Built only when
        # needed: both ends call assume_holes_except right away, which keeps just the chunks of
        # the written extents, so an 8 GiB guest never builds (and drops) a set of 131072 indices
        # (~3 ms of the setup on each side, another ~2 ms to intersect it).
        self._missing_set: set[int] | None = None
        # Chunks known to hold no hole: rehashed straight through the mapping, with no
        # SEEK_DATA/SEEK_HOLE walk (SEEK_HOLE runs to the end of a data extent: ~7 ms per GiB of
        # a dense guest, per walk). Only a punched zero range makes holes in such a chunk again;
        # and if this were ever wrong, reading a hole still reads zeros: the digest stays right.
        # One flag per chunk (numpy), so that a round's ranges are checked against it all at once.
        self._full = np.zeros(self.nchunks, dtype=bool)
        # Once assume_holes_except said where the data is (_known), every write is passed in
        # (invalidate: written; refresh_known: written or punched), so which pages hold data is
        # known without asking the memfd: _data has a bit mask of them (bit p: page p of the
        # chunk) for chunks partly written, a chunk in neither _full nor _data is all hole. A
        # working set written in part has thousands of extents, and walking them with
        # SEEK_DATA/SEEK_HOLE is costly inside the downtime (docs/PERFORMANCE.md section 6).
        # So every write must be passed in before the chunk is hashed (as every write must
        # invalidate it anyway): a page taken for a hole is hashed as zeros unread. The other
        # way round costs only memory: a hole taken for data (say, a punch that fell back to
        # writing zeros) reads as zeros through the mapping.
        self._known = False
        self._data: dict[int, int] = {}

    def assume_holes_except(self, ranges: Iterable[Range]) -> None:
        """Give every chunk that ``ranges`` do not touch the digest of zeros, without reading it.

        For RAM known to be holes outside ``ranges`` right now (the source: its
        written extents just after tracking was armed; the destination: fresh
        reserved RAM, ``ranges`` empty). Later writes must be invalidated as
        usual. Saves hashing, or even visiting, the untouched bulk of a big
        guest in the downtime.
        """
        # Per range, not per chunk: the chunk spans the ranges touch are kept as whole slices of
        # _buf, so a fully written 8 GiB guest (131072 chunks, one range) costs a few copies of
        # 2 MiB rather than a dict of 131072 digests (~50 ms before round 0).
        n, size = self.nchunks, _DIGEST_SIZE
        spans = [(max(0, a // DIGEST_CHUNK), min(n, (b - 1) // DIGEST_CHUNK + 1)) for a, b in ranges if b > a]
        kept = [(i0, bytes(self._buf[i0 * size:i1 * size])) for i0, i1 in spans if i0 < i1]
        self._buf[:] = _zero_chunk_digest(DIGEST_CHUNK) * n  # one fill, not a loop per chunk
        last = n - 1
        if last * DIGEST_CHUNK + DIGEST_CHUNK > self.size:  # a short last chunk hashes fewer zeros
            self._buf[last * size:] = _zero_chunk_digest(self.size - last * DIGEST_CHUNK)
        keep: set[int] = set()
        for i0, saved in kept:  # overlapping spans restore the same saved bytes: harmless
            self._buf[i0 * size:i0 * size + len(saved)] = saved
            keep.update(range(i0, i0 + len(saved) // size))
        if self._missing_set is None:  # all were missing: those kept still are
            self._missing_set = keep
        else:
            self._missing_set &= keep
        self._full[:] = False
        self._data.clear()
        self._known = True
        self._note(ranges, True)

    @property
    def _missing(self) -> set[int]:
        """The chunks without a valid digest, as a set (materialised on first use)."""
        if self._missing_set is None:
            self._missing_set = set(range(self.nchunks))
        return self._missing_set

    def invalidate(self, ranges: Ranges | Sequence[Range], chunks: set[int] | None = None) -> None:
        """Forget the digests of the chunks ``ranges`` touch: the guest wrote there (so they hold
        data now). ``chunks``: ``chunks_of(ranges)``, if the caller has it already."""
        self.invalidate_chunks(chunks_of(ranges) if chunks is None else chunks)
        self._note(ranges, True)

    def _note(self, ranges: Ranges | Iterable[Range], data: bool) -> None:
        """Record that ``ranges`` now hold data (written) or read as zeros (punched on the
        destination; on the source, zero when sent: a later write shows up in a harvest), if the
        rest is known (else only that chunks with a punched range may hold holes now)."""
        r = Ranges.from_pairs(ranges)
        full, masks, c, n = self._full, self._data, DIGEST_CHUNK, self.nchunks
        if not self._known:
            if not data:
                touched = r.chunks(c)
                full[touched[touched < n]] = False
            return
        if not r:
            return
        first, last = r.starts // c, (r.ends - 1) // c
        if data:
            # Written inside a chunk that is all data already: nothing changes. The common case of
            # later rounds (scattered pages of a written working set), met on both ends every
            # round: filtered out for all ranges at once, the loop below sees only the rest.
            same = (first == last) & (first < n) & (first >= 0)
            same[same] = full[first[same]]
            if np.all(same):
                return
            r = r[~same]
            first, last = first[~same], last[~same]
        for a, b, f, lt in zip(r.starts.tolist(), r.ends.tolist(), first.tolist(), last.tolist(), strict=True):
            f, lt = max(0, f), min(n - 1, lt)
            if lt - f > 1:  # the chunks in between are covered whole: one slice of the flags
                full[f + 1:lt] = data
                if masks:
                    for idx in masks.keys() & range(f + 1, lt):
                        del masks[idx]
                edges: tuple[int, ...] = (f, lt)
            else:
                edges = (f,) if f == lt else (f, lt)
            for idx in edges:
                base = idx * c
                end = min(self.size, base + c)
                p0, p1 = max(a - base, 0) // PAGE_SIZE, -(-(min(b, end) - base) // PAGE_SIZE)
                bits = ((1 << p1) - 1) ^ ((1 << p0) - 1)
                every = (1 << -(-(end - base) // PAGE_SIZE)) - 1
                mask = every if full[idx] else masks.get(idx, 0)
                mask = mask | bits if data else mask & ~bits
                if mask == every:
                    full[idx] = True
                    masks.pop(idx, None)
                else:
                    full[idx] = False
                    if mask:
                        masks[idx] = mask
                    else:
                        masks.pop(idx, None)

    def invalidate_chunks(self, indices: Iterable[int]) -> None:
        n = self.nchunks
        wanted = indices if isinstance(indices, set | frozenset) else set(indices)
        if wanted and (min(wanted) < 0 or max(wanted) >= n):  # (two C passes, not a Python filter)
            wanted = {i for i in wanted if 0 <= i < n}
        self._missing.update(wanted)

    def refresh(self, indices: Iterable[int]) -> None:
        """(Re)hash the given chunks now, their holes known (see _data) or found with one
        SEEK_DATA/SEEK_HOLE walk.

        One walk over the span of all of them, not one per chunk: SEEK_HOLE
        runs to the end of the data extent it starts in, so per-chunk walks
        over a dense guest would cost the square of its size. Chunks known to
        hold no hole skip the walk altogether.
        """
        wanted = sorted({i for i in indices if 0 <= i < self.nchunks})
        full = self._full
        for idx in (i for i in wanted if full[i]):
            c0 = idx * DIGEST_CHUNK
            self._put(idx, xxhash.xxh3_128_digest(self.ram[c0:min(self.size, c0 + DIGEST_CHUNK)]))
        wanted = [i for i in wanted if not full[i]]
        if not wanted:
            return
        if self._known:  # where the data is, without a walk
            masks = self._data
            for idx in wanted:
                mask = masks.get(idx, 0)
                c0 = idx * DIGEST_CHUNK
                self._store(idx, [(c0 + p0 * PAGE_SIZE, min(self.size, c0 + p1 * PAGE_SIZE))
                                  for p0, p1 in _runs(mask)] or None)
            return
        span_end = min(self.size, (wanted[-1] + 1) * DIGEST_CHUNK)
        pieces = data_pieces(self.memfd, wanted[0] * DIGEST_CHUNK, span_end)
        # Look up each wanted chunk's pieces (bisect) rather than cutting the whole span into
        # chunks: a few scattered chunks of a dense guest cost their own number, not the span's.
        starts = [a for a, _ in pieces]
        for idx in wanted:
            c0 = idx * DIGEST_CHUNK
            c1 = min(self.size, c0 + DIGEST_CHUNK)
            j = max(0, bisect.bisect_right(starts, c0) - 1)
            mine: list[Range] = []
            while j < len(pieces) and pieces[j][0] < c1:
                a, b = pieces[j]
                if b > c0:
                    mine.append((max(a, c0), min(b, c1)))
                j += 1
            self._store(idx, mine or None)

    def refresh_known(self, data: Ranges | Sequence[Range], zeros: Ranges | Sequence[Range],
                      hashed: set[int] | None = None, covered: set[int] | None = None) -> None:
        """Hash the chunks that ``data`` and ``zeros`` together cover whole, from what the caller
        knows: ``data`` are bytes present in the memfd, ``zeros`` read as zeros. No system call,
        so it is cheap right after a batch crossed the socket and its bytes are in the CPU cache.
        ``hashed``: the chunks lying wholly inside one data range, already hashed by
        ``hash_piece`` as they arrived (else they are hashed here, through the mapping).
        ``covered``: ``covered_chunks`` of ``data`` and ``zeros`` merged, if the caller has it."""
        data, zeros = Ranges.from_pairs(data), Ranges.from_pairs(zeros)
        self._note(zeros, False)  # punched: may hold holes now
        self._note(data, True)
        direct = self._hash_inside(data) if hashed is None else hashed
        if not zeros and len(data) <= 1:
            return  # one data range alone: the chunks it covers whole are those of ``direct``
        if covered is None:
            covered = covered_chunks(Ranges.concat([data, zeros]).merged())
        todo = covered - direct
        if not todo:
            return
        by_chunk = _by_chunk(data)
        for idx in todo:
            self._store(idx, by_chunk.get(idx))

    def _hash_inside(self, data: Ranges) -> set[int]:
        """Hash the chunks lying wholly inside one data range through the mapping; their indices."""
        done: set[int] = set()
        for a, b in data[(data.ends - data.starts) >= DIGEST_CHUNK]:  # shorter ones hold no whole chunk
            with self.ram[a:b] as view:
                done.update(self.hash_piece(a, view))
        return done

    def hash_piece(self, offset: int, data: memoryview) -> range:
        """Hash the chunks lying wholly inside ``[offset, offset + len(data))`` from ``data``,
        the bytes now at that guest offset, in a tight loop (a 4 MiB batch is 64 of them).
        Returns their indices."""
        return self.put_chunks(*chunk_digests(offset, data))

    def put_chunks(self, done: range, digests: bytes) -> range:
        """Store what ``chunk_digests`` computed for the chunks ``done`` (whoever shares this
        digest between threads holds its lock here, and only here). Returns ``done``."""
        if done:
            self._buf[done.start * _DIGEST_SIZE:done.stop * _DIGEST_SIZE] = digests
            self._missing.difference_update(done)
            self._full[done.start:done.stop] = True  # (a mask _data may still hold for them is never read: full wins)
        return done

    def refresh_missing(self, indices: Iterable[int]) -> int:
        """Hash those of the given chunks that have no valid digest; returns how many that was."""
        missing = self._missing
        todo = [i for i in indices if i in missing]
        self.refresh(todo)
        return len(todo)

    def hexdigest(self) -> str:
        """The digest of guest RAM as it is now (given the invalidations so far)."""
        self.refresh(list(self._missing))
        return xxhash.xxh3_128_hexdigest(self._buf)

    def _store(self, idx: int, pieces: list[Range] | None) -> None:
        """Hash chunk ``idx`` whose data pieces are ``pieces`` (the rest reads as zeros)."""
        c0 = idx * DIGEST_CHUNK
        c1 = min(self.size, c0 + DIGEST_CHUNK)
        self._put(idx, _zero_chunk_digest(c1 - c0) if pieces is None else self._chunk(c0, c1, pieces))
        if pieces is not None and len(pieces) == 1 and pieces[0] == (c0, c1):
            self._full[idx] = True
        else:
            self._full[idx] = False

    def _put(self, idx: int, digest: bytes) -> None:
        self._buf[idx * _DIGEST_SIZE:(idx + 1) * _DIGEST_SIZE] = digest
        self._missing.discard(idx)

    def _chunk(self, start: int, end: int, pieces: list[Range]) -> bytes:
        """xxh3-128 of one chunk: data pieces through the mapping, the holes between them as zeros."""
        if len(pieces) == 1 and pieces[0] == (start, end):  # all data, the common case: one call
            return xxhash.xxh3_128_digest(self.ram[start:end])
        h = xxhash.xxh3_128()
        pos = start
        for a, b in pieces:
            if a > pos:
                h.update(_ZERO_CHUNK[:a - pos])
            h.update(self.ram[a:b])
            pos = b
        if pos < end:
            h.update(_ZERO_CHUNK[:end - pos])
        return h.digest()


def chunk_digests(offset: int, data: memoryview) -> tuple[range, bytes]:
    """The chunks lying wholly inside ``[offset, offset + len(data))`` and their digests side by
    side, hashed from ``data`` in a tight loop; reads nothing else, so any thread may call it
    without the digest's lock (RamDigest.put_chunks stores the result)."""
    first, last = -(-offset // DIGEST_CHUNK), (offset + len(data)) // DIGEST_CHUNK
    pos, digest = first * DIGEST_CHUNK - offset, xxhash.xxh3_128_digest
    return range(first, last), b"".join(digest(data[p:p + DIGEST_CHUNK])
                                       for p in range(pos, pos + (last - first) * DIGEST_CHUNK, DIGEST_CHUNK))


@lru_cache(maxsize=1 << 16)
def _runs(mask: int) -> tuple[Range, ...]:
    """The runs of set bits of ``mask`` as (first, end) bit indices, lowest first."""
    out: list[Range] = []
    p = 0
    while mask:
        if mask & 1:
            start = p
            while mask & 1:
                mask >>= 1
                p += 1
            out.append((start, p))
        else:
            low = (mask & -mask).bit_length() - 1  # skip the zeros below the next set bit
            mask >>= low
            p += low
    return tuple(out)


def _by_chunk(pieces: Iterable[Range]) -> dict[int, list[Range]]:
    """Sorted data pieces cut at chunk boundaries, grouped by chunk index."""
    out: dict[int, list[Range]] = {}
    for a, b in pieces:
        for s, e in _split(a, b, DIGEST_CHUNK):
            out.setdefault(s // DIGEST_CHUNK, []).append((s, e))
    return out


def _split(a: int, b: int, step: int) -> Iterator[Range]:
    pos = a
    while pos < b:
        nxt = min(b, (pos // step + 1) * step)
        yield pos, nxt
        pos = nxt


def ram_digest(memfd: int, ram: memoryview, size: int) -> str:
    """The digest of guest RAM computed from scratch."""
    return RamDigest(memfd, ram, size).hexdigest()


# -- zeroing on the receiver -------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def punch_zeros(memfd: int, ram: memoryview, zeros: Iterable[Range]) -> None:
    """Make ``zeros`` read as zero: punch holes in the memfd (frees the pages); write zeros if that fails."""
    for a, b in zeros:
        if _libc.fallocate(memfd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, a, b - a) != 0:
            ram[a:b] = bytes(b - a)  # no hole punching here (errno in ctypes): zero by hand


class DigestingSink:
    """The receiving end of transport's piece path: the memfd, and the RAM digest fed from each
    piece while it is in the cache. Collects the chunks it hashed for the batch being received."""

    def __init__(self, fd: int, digest: RamDigest) -> None:
        self.fd = fd
        self._digest = digest
        self._hashed: set[int] = set()

    def received(self, offset: int, data: memoryview) -> None:
        self._hashed.update(self._digest.hash_piece(offset, data))

    def take(self) -> set[int]:
        """The chunks hashed since the last call (empty when the batch took the mapping path)."""
        out, self._hashed = self._hashed, set()
        return out
