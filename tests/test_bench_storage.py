"""Unit tests of bench/bench_storage.py's pure helpers: the image's extents, the run order, the
figures read from a MigrationInfo.

Pure functions only (and one small sparse file); the bench itself runs under ``make bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.bench_storage import (
    disk_tail,
    downtime_ms,
    fmt_mw,
    last_round_ms,
    med_worst,
    rate_label,
    rotations,
    spread_extents,
)
from bench.storage_files import extents_digest, write_image

MiB = 1 << 20
GiB = 1 << 30


def test_extents_are_spread_evenly_over_the_image_aligned_to_whole_extents() -> None:
    assert spread_extents(8 * GiB, 2 * GiB, 64 * MiB) == [i * 256 * MiB for i in range(32)]
    assert spread_extents(64 * MiB, 16 * MiB, 4 * MiB) == [i * 16 * MiB for i in range(4)]
    # an image that is not a multiple of n extents: the stride rounds down, the last extent still fits
    offsets = spread_extents(100 * MiB, 3 * MiB, MiB)
    assert offsets == [0, 33 * MiB, 66 * MiB] and offsets[-1] + MiB <= 100 * MiB
    assert spread_extents(MiB, MiB, MiB) == [0]  # all of it


@pytest.mark.parametrize(("size", "allocated", "extent"), [
    (GiB, 2 * GiB, MiB),  # more data than image
    (GiB, 3 * MiB // 2, MiB),  # not whole extents
    (GiB, 0, MiB),
    (GiB, MiB, 0),
])
def test_impossible_layouts_are_refused(size: int, allocated: int, extent: int) -> None:
    with pytest.raises(ValueError):
        spread_extents(size, allocated, extent)


def test_rotations_start_each_round_one_kind_later() -> None:
    assert rotations(["a", "b", "c"], 4) == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert rotations(["a"], 2) == ["a", "a"]
    assert rotations(["a", "b"], 0) == []


def test_median_and_worst() -> None:
    assert med_worst([3.0, 1.0, 2.0]) == (2.0, 3.0)
    assert med_worst([3.0, 1.0, 2.0], higher_is_worse=False) == (2.0, 1.0)  # a rate: the lowest is worst
    assert med_worst([]) is None
    assert fmt_mw([1.0, 4.0]) == "2.5 / 4.0"
    assert fmt_mw([0.5, 0.7], ".2f", higher_is_worse=False) == "0.60 / 0.50"
    assert fmt_mw([]) == "-"


INFO: dict[str, Any] = {
    "downtime": 5,
    "downtime-breakdown": {"pause": 0.5, "final-copy": 2.25, "state": 0.05, "digest": 0.1, "verify": 0.3,
                           "commit": 1.6},
    "rounds": [
        {"seconds": 0.2, "final": False, "disk-bytes": 4 * MiB},
        {"seconds": 0.031, "final": False, "disk-bytes": 65536},
        {"seconds": 0.002, "final": False},  # no disk bytes: the key is absent
        {"seconds": 0.001, "final": True, "disk-bytes": 131072},
    ],
}


def test_disk_tail_is_the_last_pre_copy_round_and_the_final_pass() -> None:
    assert disk_tail(INFO) == (0, 131072)
    assert disk_tail({"rounds": INFO["rounds"][:2]}) == (65536, 0)  # not switched over: no final pass
    assert disk_tail({"rounds": []}) == (0, 0)


def test_last_round_ms() -> None:
    assert last_round_ms(INFO) == pytest.approx(2.0)
    assert last_round_ms({"rounds": [{"seconds": 0.5, "final": True}]}) == 0.0


def test_downtime_is_the_sum_of_its_parts_unless_they_disagree_with_the_whole_ms() -> None:
    assert downtime_ms(INFO) == pytest.approx(4.8)
    assert downtime_ms({"downtime": 9, "downtime-breakdown": {"pause": 1.0}}) == 9.0
    assert downtime_ms({"downtime": 3}) == 3.0  # no breakdown: the whole ms


def test_rate_labels() -> None:
    assert rate_label(None) == "none (idle guest)"
    assert rate_label(0) == "flat out (rate=0)"
    assert rate_label(5000) == "5000 blocks/s"


def test_an_image_written_in_extents_stays_sparse_and_reads_back_its_data(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    offsets = spread_extents(64 * MiB, 2 * MiB, MiB)
    write_image(img, 64 * MiB, offsets, MiB)
    assert img.stat().st_size == 64 * MiB
    assert img.stat().st_blocks * 512 < 8 * MiB  # the holes stayed holes
    digest = extents_digest(img, offsets, MiB)
    assert digest == extents_digest(img, offsets, MiB)
    with open(img, "r+b") as f:  # one byte of the second extent changed
        f.seek(offsets[1] + 5)
        byte = f.read(1)
        f.seek(offsets[1] + 5)
        f.write(bytes([byte[0] ^ 1]))
    assert extents_digest(img, offsets, MiB) != digest
    assert img.read_bytes()[32 * MiB:33 * MiB] != bytes(MiB)  # random data where the second extent is
