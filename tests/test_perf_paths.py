"""The fast paths of the data path and the downtime keep their results (unit level, real memfds).

* The RAM digest keeps its definition (xxh3-128 of each 64 KiB chunk, folded by one xxh3-128 over
  the chunk digests in order) whatever shortcut computed it: the digest buffer, the set of chunks
  known to hold no hole, the tight loop over chunks inside one data range. Checked against an
  independent reference computed from the bytes.
* Hashing never allocates a hole of the memfd, even in a chunk that was full before zeros were
  punched into it.
* bench/run.py puts the hand-written docs/PERFORMANCE.md into the generated report.
"""

from __future__ import annotations

import mmap
import os

import xxhash

from agent.migration import pages
from tests.conftest import MapGuestRam

P = 4096
C = pages.DIGEST_CHUNK
MiB = 1 << 20


def reference_digest(mm: mmap.mmap, size: int) -> str:
    """The digest by its definition, from the bytes alone (reading holes as zeros via a copy)."""
    data = bytes(mm[:size])
    digests = b"".join(xxhash.xxh3_128_digest(data[o:min(size, o + C)]) for o in range(0, size, C))
    return xxhash.xxh3_128_hexdigest(digests)


def holes(fd: int, size: int) -> int:
    """Bytes of the memfd that are holes."""
    return size - sum(b - a for a, b in pages.data_pieces(fd, 0, size))


def test_dense_guest_digest_matches_the_definition(guest_ram: MapGuestRam) -> None:
    size = 4 * MiB
    fd, mm = guest_ram(size)
    mm[:] = os.urandom(size)
    d = pages.RamDigest(fd, memoryview(mm), size)
    for off in range(0, size, MiB):  # as batches arrive: chunks inside one data range, tight loop
        d.refresh_known([(off, off + MiB)], [])
    assert d.hexdigest() == reference_digest(mm, size)


def test_short_last_chunk_and_holes_match_the_definition(guest_ram: MapGuestRam) -> None:
    size = 3 * C + 2 * P  # the last chunk is two pages long
    fd, mm = guest_ram(size)
    mm[C + 5] = 7
    mm[size - 1] = 9
    d = pages.RamDigest(fd, memoryview(mm), size)
    d.assume_holes_except([(C, C + P), (size - P, size)])
    assert d.hexdigest() == reference_digest(mm, size)


def test_assume_holes_keeps_what_was_already_hashed_in_the_kept_chunks(guest_ram: MapGuestRam) -> None:
    size = 2 * MiB
    fd, mm = guest_ram(size)
    mm[0:C] = os.urandom(C)
    d = pages.RamDigest(fd, memoryview(mm), size)
    d.refresh_known([(0, C)], [])  # chunk 0 hashed from what arrived
    d.assume_holes_except([(0, C)])  # must neither forget nor overwrite chunk 0's digest
    assert d.hexdigest() == reference_digest(mm, size)


def test_scattered_rewrites_of_a_dense_guest_are_rehashed(guest_ram: MapGuestRam) -> None:
    size = 4 * MiB
    fd, mm = guest_ram(size)
    mm[:] = os.urandom(size)
    d = pages.RamDigest(fd, memoryview(mm), size)
    assert d.hexdigest() == reference_digest(mm, size)  # every chunk now known to hold no hole
    dirty = [(p * P, p * P + P) for p in (3, 77, 500, 1023)]
    for a, _ in dirty:
        mm[a + 100] ^= 0xFF
    d.invalidate(dirty)
    assert d.hexdigest() == reference_digest(mm, size)


def test_punched_zeros_in_a_full_chunk_are_hashed_without_filling_the_holes(guest_ram: MapGuestRam) -> None:
    size = 1 * MiB
    fd, mm = guest_ram(size)
    mm[:] = os.urandom(size)
    ram = memoryview(mm)
    d = pages.RamDigest(fd, ram, size)
    d.refresh_known([(0, size)], [])  # all chunks full
    zeros = [(C + P, C + 3 * P)]  # two pages in the middle of chunk 1
    pages.punch_zeros(fd, ram, zeros)
    d.refresh_known([], zeros)  # as the destination does for a batch of zero ranges
    d.invalidate(zeros)
    assert holes(fd, size) == 2 * P
    assert d.hexdigest() == reference_digest(mm, size)
    # reference_digest copied through the mapping; punch again to check the digest itself reads no hole
    pages.punch_zeros(fd, ram, zeros)
    d.invalidate(zeros)
    d.hexdigest()
    assert holes(fd, size) == 2 * P
    ram.release()


def test_mixed_batch_of_data_and_zero_ranges_matches_the_definition(guest_ram: MapGuestRam) -> None:
    size = 2 * MiB
    fd, mm = guest_ram(size)
    mm[0:C // 2] = os.urandom(C // 2)
    mm[2 * C:4 * C] = os.urandom(2 * C)
    d = pages.RamDigest(fd, memoryview(mm), size)
    d.assume_holes_except([])
    d.invalidate([(0, 4 * C)])
    # chunk 0: half data, half zeros (covered by the two together); chunks 2-3 inside one data range
    d.refresh_known([(0, C // 2), (2 * C, 4 * C)], [(C // 2, 2 * C)])
    assert d.hexdigest() == reference_digest(mm, size)


# -- the report includes the hand-written performance narrative -----------------------------------


def test_report_includes_the_performance_narrative_under_its_own_heading() -> None:
    from bench import run
    from bench.common import Machine

    machine = Machine("CPU Z", 2, "6.18", "3.11.7", "2026-01-01 00:00:00 UTC")
    narrative = ("## Performance work\n\nIntro.\n\n### Idle downtime\n\n61 ms -> 8 ms.\n\n"
                 "```sh\n# a shell comment\necho advise\n```\n")
    report = run.Report(machine, True, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 1.0, (), (), narrative)
    text = run.render(report)
    assert "## What the optimisations bought" in text
    assert "#### Idle downtime" in text and "61 ms -> 8 ms." in text
    assert "## Performance work" not in text  # its title is replaced by the report's heading
    assert "\n# a shell comment\n" in text  # code blocks are left as they are
    plain = run.render(run.Report(machine, True, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 1.0, (), ()))
    assert "What the optimisations bought" not in plain
