"""The RAM digest fed by several threads at once (docs/PERFORMANCE.md section 21): the source's
stream threads each hash the batches they send (SourceDigest.hash_hot), the destination's each
hash the pieces they receive (stream_recv.SharedSink), the digest's lock held only to store the
result. The oracle: the digest computed from scratch over the same memfd."""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.migration import pages
from agent.migration.source_digest import SourceDigest
from agent.migration.stream_recv import SharedSink
from vmruntime.dirty.ranges import Ranges

SIZE = 32 << 20
PAGE = 4096


@pytest.fixture
def ram() -> Iterator[tuple[int, memoryview]]:
    fd = os.memfd_create("digest-threads")
    os.ftruncate(fd, SIZE)
    mm = mmap.mmap(fd, SIZE)
    view = memoryview(mm)
    rng = random.Random(7)
    view[:SIZE // 2] = rng.randbytes(SIZE // 2)
    for _ in range(300):  # scattered pages beyond: ranges that end and start inside a chunk
        p = rng.randrange(SIZE // 2, SIZE, PAGE)
        view[p:p + PAGE] = rng.randbytes(PAGE)
    try:
        yield fd, view
    finally:
        view.release()
        mm.close()
        os.close(fd)


def _ranges() -> Ranges:
    """Data ranges not aligned to the digest's chunks, and zero ranges between them."""
    out, pos, rng = [], 0, random.Random(3)
    while pos < SIZE:
        end = min(SIZE, pos + rng.randrange(1, 200) * PAGE)
        out.append((pos, end))
        pos = end + rng.randrange(0, 3) * PAGE
    return Ranges.from_pairs(out)


def _in_threads(shares: list[list[Any]], fn: Callable[[Any], None]) -> None:
    """Call ``fn`` on each item, one thread per share, all at once."""
    errors: list[BaseException] = []

    def run(items: list[Any]) -> None:
        try:
            for item in items:
                fn(item)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_source_batches_hashed_by_several_threads_give_the_digest(ram: tuple[int, memoryview]) -> None:
    fd, view = ram
    digest = SourceDigest(fd, view, SIZE)
    digest.start(Ranges.from_pairs([(0, SIZE)]))
    batches = list(pages.plan_batches(view, _ranges(), batch_bytes=1 << 20, batch_ranges=64))
    assert len(batches) > 8
    _in_threads([batches[i::4] for i in range(4)], digest.hash_hot)
    ram_digest = digest._ram_digest
    assert len(ram_digest._missing) < ram_digest.nchunks // 4  # the batches did hash most chunks
    assert ram_digest.hexdigest() == pages.ram_digest(fd, view, SIZE)
    digest.release()


def test_destination_pieces_hashed_by_several_streams_give_the_digest(ram: tuple[int, memoryview]) -> None:
    fd, view = ram
    digest = pages.RamDigest(fd, view, SIZE)
    digest.assume_holes_except([])
    digest.invalidate(Ranges.from_pairs([(0, SIZE)]))
    lock = threading.Lock()
    sinks = [SharedSink(fd, digest, lock) for _ in range(4)]
    rng = random.Random(5)
    pieces = []  # (offset, length): pieces of 64-640 KiB at page offsets, a quarter to each stream
    pos = 0
    while pos < SIZE:
        n = min(SIZE - pos, rng.randrange(16, 160) * PAGE)
        pieces.append((pos, n))
        pos += n
    shares: list[list[Any]] = [[(sink, a, n) for a, n in pieces[i::4]] for i, sink in enumerate(sinks)]

    def feed(item: tuple[SharedSink, int, int]) -> None:
        sink, a, n = item
        with view[a:a + n] as piece:
            sink.received(a, piece)

    _in_threads(shares, feed)
    hashed = set().union(*(sink.take() for sink in sinks))
    whole = {i for a, n in pieces for i in range(-(-a // pages.DIGEST_CHUNK), (a + n) // pages.DIGEST_CHUNK)}
    assert hashed == whole
    assert len(digest._missing) == digest.nchunks - len(whole)
    assert digest.hexdigest() == pages.ram_digest(fd, view, SIZE)
