"""Planning what goes on the wire: page ranges into batches, zero pages into ranges, the RAM digest.

This module owns the per-round work the sender does in Python, kept to
per-range (not per-page) cost wherever the ranges are contiguous:

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

import xxhash

from vmruntime.dirty import merge_ranges
from vmruntime.dirty.extents import data_pieces

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
    """One page batch to send: data ranges (with payload) and zero ranges (without)."""

    ranges: list[Range] = field(default_factory=list)
    zeros: list[Range] = field(default_factory=list)
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


def classify(ram: memoryview, ranges: Iterable[Range], detect_zeros: bool = True) -> Iterator[tuple[Range, bool]]:
    """Yield ``((start, end), is_zero)`` pieces of ``ranges`` in order.

    A range shorter than a ZERO_GRAIN (the scattered pages of a dirty set) is
    checked whole with one compare; a longer one grain by grain, neighbouring
    grains of the same kind merged, so a long range costs one compare per
    64 KiB and stays one piece when it holds data throughout.
    """
    for a, b in ranges:
        if not detect_zeros:
            yield (a, b), False
        elif b - a < ZERO_GRAIN:
            yield (a, b), _zeros(b - a) == ram[a:b]
        else:
            yield from _classify_grains(ram, a, b)


def _classify_grains(ram: memoryview, a: int, b: int) -> Iterator[tuple[Range, bool]]:
    start, kind = a, None
    for s, e in _split(a, b, ZERO_GRAIN):
        z = _zeros(e - s) == ram[s:e]
        if kind is not None and z != kind:
            yield (start, s), kind
            start = s
        kind = z
    yield (start, b), bool(kind)


def plan_batches(ram: memoryview, ranges: Iterable[Range], detect_zeros: bool = True,
                 batch_bytes: int = BATCH_BYTES, batch_ranges: int = BATCH_RANGES) -> Iterator[Batch]:
    """Cut ``ranges`` (sorted, disjoint) into page batches, zero grains as payload-free ranges."""
    batch = Batch()
    for (a, b), is_zero in classify(ram, ranges, detect_zeros):
        if is_zero:
            if len(batch.zeros) >= batch_ranges:
                yield batch
                batch = Batch()
            batch.zeros.append((a, b))
            batch.zero_bytes += b - a
            continue
        if len(batch.ranges) < batch_ranges and batch.data_bytes + (b - a) <= batch_bytes:
            batch.ranges.append((a, b))  # the common case, a range that fits: no cutting
            batch.data_bytes += b - a
            continue
        while a < b:
            if batch.data_bytes >= batch_bytes or len(batch.ranges) >= batch_ranges:
                yield batch
                batch = Batch()
            take = min(b - a, batch_bytes - batch.data_bytes)
            batch.ranges.append((a, a + take))
            batch.data_bytes += take
            a += take
    if batch:
        yield batch


def total_bytes(ranges: Sequence[Range]) -> int:
    return sum(b - a for a, b in ranges)


# -- the digest --------------------------------------------------------------------------------

_ZERO_CHUNK = memoryview(bytes(DIGEST_CHUNK))
_DIGEST_SIZE = 16  # xxh3-128


@lru_cache(maxsize=4)
def _zero_chunk_digest(n: int) -> bytes:
    return xxhash.xxh3_128_digest(_ZERO_CHUNK[:n])


def chunks_of(ranges: Iterable[Range]) -> set[int]:
    """Indices of the DIGEST_CHUNKs that ``ranges`` touch."""
    # Per range in the tight loop of a later round's scattered pages (a thousand per batch, on
    # both ends): a range inside one chunk, the common case, is one set.add, not a range object.
    out: set[int] = set()
    add, c = out.add, DIGEST_CHUNK
    for a, b in ranges:
        first, last = a // c, (b - 1) // c
        if first == last:
            add(first)
        else:
            out.update(range(first, last + 1))
    return out


def covered_chunks(ranges: Iterable[Range]) -> set[int]:
    """Indices of the DIGEST_CHUNKs lying wholly inside one of ``ranges`` (merge touching ranges first)."""
    out: set[int] = set()
    c = DIGEST_CHUNK
    for a, b in ranges:
        if b - a >= c:  # a shorter range covers no chunk: skip the range object
            out.update(range(-(-a // c), b // c))
    return out


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
        self._full: set[int] = set()
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
        self._full.clear()
        self._data.clear()
        self._known = True
        self._note(ranges, True)

    @property
    def _missing(self) -> set[int]:
        """The chunks without a valid digest, as a set (materialised on first use)."""
        if self._missing_set is None:
            self._missing_set = set(range(self.nchunks))
        return self._missing_set

    def invalidate(self, ranges: Sequence[Range], chunks: set[int] | None = None) -> None:
        """Forget the digests of the chunks ``ranges`` touch: the guest wrote there (so they hold
        data now). ``chunks``: ``chunks_of(ranges)``, if the caller has it already."""
        self.invalidate_chunks(chunks_of(ranges) if chunks is None else chunks)
        self._note(ranges, True)

    def _note(self, ranges: Iterable[Range], data: bool) -> None:
        """Record that ``ranges`` now hold data (written) or read as zeros (punched on the
        destination; on the source, zero when sent: a later write shows up in a harvest), if the
        rest is known (else only that chunks with a punched range may hold holes now)."""
        if not self._known:
            if not data:
                self._full.difference_update(chunks_of(ranges))
            return
        full, masks, c, n = self._full, self._data, DIGEST_CHUNK, self.nchunks
        for a, b in ranges:
            first, last = a // c, (b - 1) // c
            if data and first == last and first in full:
                # Written inside a chunk that is all data already: nothing changes. The common case
                # of later rounds (scattered pages of a written working set), met per range on both
                # ends every round: this test is much cheaper than the mask arithmetic below
                # (docs/PERFORMANCE.md section 6).
                continue
            first, last = max(0, first), min(n - 1, last)
            if last - first > 1:  # the chunks in between are covered whole: set operations in C
                inner = range(first + 1, last)
                if data:
                    full.update(inner)
                else:
                    full.difference_update(inner)
                if masks:
                    for idx in masks.keys() & inner:
                        del masks[idx]
                edges: tuple[int, ...] = (first, last)
            else:
                edges = (first,) if first == last else (first, last)
            for idx in edges:
                base = idx * c
                end = min(self.size, base + c)
                p0, p1 = max(a - base, 0) // PAGE_SIZE, -(-(min(b, end) - base) // PAGE_SIZE)
                bits = ((1 << p1) - 1) ^ ((1 << p0) - 1)
                every = (1 << -(-(end - base) // PAGE_SIZE)) - 1
                mask = every if idx in full else masks.get(idx, 0)
                mask = mask | bits if data else mask & ~bits
                if mask == every:
                    full.add(idx)
                    masks.pop(idx, None)
                else:
                    full.discard(idx)
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
        for idx in (i for i in wanted if i in full):
            c0 = idx * DIGEST_CHUNK
            self._put(idx, xxhash.xxh3_128_digest(self.ram[c0:min(self.size, c0 + DIGEST_CHUNK)]))
        wanted = [i for i in wanted if i not in full]
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

    def refresh_known(self, data: Sequence[Range], zeros: Sequence[Range],
                      hashed: set[int] | None = None, covered: set[int] | None = None) -> None:
        """Hash the chunks that ``data`` and ``zeros`` together cover whole, from what the caller
        knows: ``data`` are bytes present in the memfd, ``zeros`` read as zeros. No system call,
        so it is cheap right after a batch crossed the socket and its bytes are in the CPU cache.
        ``hashed``: the chunks lying wholly inside one data range, already hashed by
        ``hash_piece`` as they arrived (else they are hashed here, through the mapping).
        ``covered``: ``covered_chunks`` of ``data`` and ``zeros`` merged, if the caller has it."""
        self._note(zeros, False)  # punched: may hold holes now
        self._note(data, True)
        direct = self._hash_inside(data) if hashed is None else hashed
        if not zeros and len(data) <= 1:
            return  # one data range alone: the chunks it covers whole are those of ``direct``
        if covered is None:
            covered = covered_chunks(merge_ranges([*data, *zeros]))
        todo = covered - direct
        if not todo:
            return
        by_chunk = _by_chunk(data)
        for idx in todo:
            self._store(idx, by_chunk.get(idx))

    def _hash_inside(self, data: Sequence[Range]) -> set[int]:
        """Hash the chunks lying wholly inside one data range through the mapping; their indices."""
        done: set[int] = set()
        for a, b in data:
            if b - a >= DIGEST_CHUNK:  # a shorter range holds no whole chunk (scattered pages)
                with self.ram[a:b] as view:
                    done.update(self.hash_piece(a, view))
        return done

    def hash_piece(self, offset: int, data: memoryview) -> range:
        """Hash the chunks lying wholly inside ``[offset, offset + len(data))`` from ``data``,
        the bytes now at that guest offset, in a tight loop (a 4 MiB batch is 64 of them).
        Returns their indices."""
        end = offset + len(data)
        first, last = -(-offset // DIGEST_CHUNK), end // DIGEST_CHUNK
        buf, size, digest = self._buf, _DIGEST_SIZE, xxhash.xxh3_128_digest
        pos = first * DIGEST_CHUNK - offset
        for idx in range(first, last):
            buf[idx * size:(idx + 1) * size] = digest(data[pos:pos + DIGEST_CHUNK])
            pos += DIGEST_CHUNK
        done = range(first, last)
        if done:
            self._missing.difference_update(done)
            self._full.update(done)  # (a mask _data may still hold for them is never read: full wins)
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
            self._full.add(idx)
        else:
            self._full.discard(idx)

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
