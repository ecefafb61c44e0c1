"""agent/disk_copy.py: what a live copy of a disk image reads, harvests and writes."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

import pytest

from agent import disk_copy
from agent.disk_copy import ZERO_GRAIN, CopyError, DiskFull, ImageWriter


def _image(path: Path, size: int, writes: dict[int, bytes]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    for off, data in writes.items():
        os.pwrite(fd, data, off)
    return fd


def test_data_extents_skip_holes_and_are_page_aligned(tmp_path: Path) -> None:
    fd = _image(tmp_path / "a.img", 8 << 20, {0: b"x", (4 << 20) + 100: b"y" * 5000})
    try:
        extents = disk_copy.data_extents(fd, 8 << 20)
    finally:
        os.close(fd)
    assert extents[0][0] == 0 and extents[-1][1] <= 8 << 20
    assert all(a % 4096 == 0 and b % 4096 == 0 for a, b in extents)
    covered = disk_copy.total_bytes(extents)
    assert covered < 1 << 20  # the 8 MiB image's holes are not read
    assert any(a <= (4 << 20) + 100 and (4 << 20) + 5100 <= b for a, b in extents)


def test_read_batches_sets_whole_zero_grains_apart_and_keeps_the_bytes(tmp_path: Path) -> None:
    g = ZERO_GRAIN
    content = {0: b"a" * g, 2 * g: b"b" * 100, 5 * g - 10: b"c" * 10}
    fd = _image(tmp_path / "a.img", 8 * g, content)
    try:
        batches = []
        for batch in disk_copy.read_batches(fd, [(0, 6 * g)], bytearray(4 * g)):
            batches.append((list(batch.ranges), list(batch.zeros), b"".join(bytes(p) for p in batch.pieces)))
    finally:
        os.close(fd)
    ranges = [r for b in batches for r in b[0]]
    zeros = [z for b in batches for z in b[1]]
    assert disk_copy.total_bytes(ranges) + disk_copy.total_bytes(zeros) == 6 * g
    assert (g, 2 * g) in zeros and (3 * g, 4 * g) in zeros and (5 * g, 6 * g) in zeros
    data = {}
    for rs, _, payload in batches:
        pos = 0
        for a, b in rs:
            data[a] = payload[pos:pos + b - a]
            pos += b - a
        assert pos == len(payload)
    assert data[0] == b"a" * g
    assert data[2 * g] == b"b" * 100 + bytes(g - 100)
    assert data[4 * g][-10:] == b"c" * 10
    assert len(batches) == 2  # the 4-grain buffer cut the 6 grains in two


def test_image_writer_writes_punches_and_refuses_what_lies_outside(tmp_path: Path) -> None:
    fd = _image(tmp_path / "b.img", 4 * ZERO_GRAIN, {0: b"z" * (4 * ZERO_GRAIN)})
    w = ImageWriter(fd, str(tmp_path / "b.img"), 4 * ZERO_GRAIN)
    try:
        w.write(10, memoryview(b"hello"))
        w.punch([(ZERO_GRAIN, 3 * ZERO_GRAIN)])
        w.sync()
        assert os.pread(fd, 5, 10) == b"hello"
        assert os.pread(fd, 2 * ZERO_GRAIN, ZERO_GRAIN) == bytes(2 * ZERO_GRAIN)
        assert os.pread(fd, 1, 3 * ZERO_GRAIN) == b"z"
        with pytest.raises(ValueError, match="outside the disk"):
            w.check([(0, 4096), (3 * ZERO_GRAIN, 5 * ZERO_GRAIN)])
    finally:
        os.close(fd)


def test_image_writer_turns_a_full_file_system_into_disk_full(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fd = _image(tmp_path / "c.img", 4096, {})
    try:
        monkeypatch.setattr(disk_copy.os, "pwrite", full)
        with pytest.raises(DiskFull, match="No space left on device") as got:
            ImageWriter(fd, "c.img", 4096).write(0, memoryview(b"x"))
        assert got.value.code == "insufficient-storage"

        def broken(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(disk_copy.os, "pwrite", broken)
        with pytest.raises(CopyError, match="cannot be written: Input/output error") as other:
            ImageWriter(fd, "c.img", 4096).write(0, memoryview(b"x"))
        assert not isinstance(other.value, DiskFull) and other.value.code == "migration-failed"
    finally:
        os.close(fd)


class _Lane:
    """A VM process answering disk-dirty in pages of at most two ranges (offset, length)."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.left = list(ranges)
        self.calls: list[dict[str, Any]] = []

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        assert op == "disk-dirty"
        self.calls.append(fields)
        if fields.get("clear"):
            self.left = []
            return {"ranges": [], "more": False}
        out, self.left = self.left[:2], self.left[2:]
        return {"ranges": [list(r) for r in out], "more": bool(self.left)}


def test_harvest_asks_again_while_more_and_merges() -> None:
    lane = _Lane([(0, 65536), (65536, 65536), (1 << 20, 65536)])
    assert disk_copy.harvest(lane) == [(0, 131072), (1 << 20, (1 << 20) + 65536)]
    assert len(lane.calls) == 2
    disk_copy.clear_dirty(lane)
    assert disk_copy.harvest(lane) == []


def test_check_copyable() -> None:
    assert disk_copy.check_copyable(1 << 20) is None
    assert "4096" in str(disk_copy.check_copyable(6144))


def test_the_write_blocking_cap_is_half_the_downtime_bound_at_the_bandwidth() -> None:
    from agent.migration.storage_copy import dirty_cap_blocks

    assert dirty_cap_blocks(100 << 20, 0.3, 65536) == int((100 << 20) * 0.15) // 65536
    assert dirty_cap_blocks(1.0, 0.3, 65536) == 1  # never zero: zero lifts the cap


def test_storage_mode_params() -> None:
    from agent.migration.info import MigrationParams

    p = MigrationParams.from_dict({"copy-storage": True, "storage-mode": "write-blocking"})
    assert p.to_dict()["storage-mode"] == "write-blocking"
    assert MigrationParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="copy-storage only"):
        MigrationParams.from_dict({"storage-mode": "write-blocking"})
    with pytest.raises(ValueError, match="storage-mode must be one of"):
        MigrationParams.from_dict({"copy-storage": True, "storage-mode": "eager"})
    with pytest.raises(ValueError, match="disk-dir"):
        MigrationParams.from_dict({"disk-dir": "/x"})


def test_params_a_peer_does_not_know_are_left_out_and_ignored() -> None:
    from agent.migration.incoming_checks import params_of as _params_of
    from agent.migration.info import PARAMS_SINCE, MigrationParams
    from proto.messages import MigrateStart

    p = MigrationParams(copy_storage=True, disk_map={"/a": "/b"})
    old = p.for_peer(2)
    assert not set(old) & set(PARAMS_SINCE) and old["disk-map"] == {"/a": "/b"}
    assert set(p.for_peer(3)) == set(p.to_dict()) - {"postcopy-after", "compress", "streams"}
    assert set(p.for_peer(4)) == set(p.to_dict()) - {"compress", "streams"}
    assert set(p.for_peer(5)) == set(p.to_dict()) - {"streams"}
    assert set(p.for_peer(6)) == set(p.to_dict())
    # A destination keeps the params it knows when a newer source sends one it does not.
    start = MigrateStart("m" * 16, "v", 1 << 20, 4096, 3, (), "x", {**p.to_dict(), "from-the-future": 1})
    assert _params_of(start).disk_map == {"/a": "/b"} and _params_of(start).copy_storage


def test_slice_budget_shrinks_as_the_dirty_blocks_near_the_cap(tmp_path: Path) -> None:
    from vmruntime.devices import CAP_INSNS_PER_BLOCK, HostDevices, HostDisk
    from vmruntime.disk import DiskDevice, MemoryBackend
    from vmruntime.diskimage import ImageFile, prepare_image

    class _Machine:
        disk = DiskDevice(mmap.mmap(-1, 1 << 20), 0, MemoryBackend(1 << 20))

    prepare_image(str(tmp_path / "i.img"), 1 << 20)
    devices = HostDevices(disk=HostDisk(ImageFile.open(str(tmp_path / "i.img"), 1 << 20), 65536))
    m: Any = _Machine()
    try:
        assert devices.slice_budget(m, 5000) == 5000 and not devices.holds_vcpu(m)  # no cap
        devices.disk.dirty_cap = 4  # type: ignore[union-attr]
        assert devices.slice_budget(m, 5000) == 4 * CAP_INSNS_PER_BLOCK
        m.disk.dirty.mark(0, 3 * 65536)
        assert devices.slice_budget(m, 5000) == CAP_INSNS_PER_BLOCK and not devices.holds_vcpu(m)
        m.disk.dirty.mark(3 * 65536, 65536)
        assert devices.holds_vcpu(m)
        devices.lane_closed()
        assert not devices.holds_vcpu(m) and devices.slice_budget(m, 5000) == 5000
    finally:
        devices.close()
