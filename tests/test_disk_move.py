"""agent/migration/disk_move.py and the image identity (vmruntime/diskimage.py): what a destination
on shared storage accepts of a source's disk, and what it refuses before any page moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.disk_copy import DiskFull
from agent.disks import DiskConfig, DiskError
from agent.migration import disk_move
from agent.migration.common import MigrationError
from agent.migration.info import MigrationParams
from vmruntime.diskimage import ID_SUFFIX, ImageError, image_id, prepare_image, remove_created

MiB = 1 << 20
SHARED = MigrationParams()
COPY = MigrationParams(copy_storage=True)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    return d


def image(path: Path, size: int = MiB) -> DiskConfig:
    prepare_image(str(path), size)
    return DiskConfig(path=str(path), size=size)


def test_an_image_gets_one_identity_that_stays(shared: Path) -> None:
    disk = image(shared / "a.img")
    assert image_id(disk.path) is None  # none until asked to make one
    first = image_id(disk.path, create=True)
    assert first is not None and image_id(disk.path) == first == image_id(disk.path, create=True)
    (shared / ("a.img" + ID_SUFFIX)).write_text("not an id\n")
    with pytest.raises(ImageError, match="malformed"):
        image_id(disk.path)
    remove_created(disk.path)  # a failed create takes its identity with it
    assert not (shared / "a.img").exists() and not (shared / ("a.img" + ID_SUFFIX)).exists()


def test_the_same_image_on_shared_storage_is_accepted(shared: Path) -> None:
    disk = image(shared / "a.img")
    params = {"disk": disk_move.proposal(disk, SHARED, 3), "max-downtime": 300}
    got = disk_move.incoming(params, {}, [shared])
    assert got == (DiskConfig(path=str(shared / "a.img"), size=MiB), None)  # None: nothing to copy
    assert disk_move.incoming({}, {}, [shared]) is None  # no disk: nothing to check


def test_disk_map_names_the_image_on_the_destination(tmp_path: Path, shared: Path) -> None:
    disk = image(shared / "a.img")
    proposal = disk_move.proposal(disk, SHARED, 3)
    elsewhere = tmp_path / "mnt"
    elsewhere.mkdir()
    (elsewhere / "a.img").symlink_to(shared / "a.img")  # the same file, another name (another mount here)
    (elsewhere / ("a.img" + ID_SUFFIX)).symlink_to(shared / ("a.img" + ID_SUFFIX))
    by_dir = disk_move.incoming({"disk": proposal}, {str(shared): str(elsewhere)}, [elsewhere, shared])
    assert by_dir is not None and by_dir[0].path == str(shared / "a.img")  # resolved: the real file
    assert disk_move.map_path(str(shared / "a.img"), {str(shared / "a.img"): "/x/b.img"}) == "/x/b.img"
    assert disk_move.map_path("/data/vm/a.img", {"/data": "/d1", "/data/vm": "/d2"}) == "/d2/a.img"
    assert disk_move.map_path("/database/a.img", {"/data": "/d1"}) == "/database/a.img"  # a prefix of words


@pytest.mark.parametrize(("change", "words"), [
    ("missing", "does not exist on the destination"),
    ("other", "not the same image"),
    ("no-id", "has no identity"),
    ("smaller", "not the same image"),
    ("larger", "truncated"),
    ("outside", "outside the allowed directories"),
])
def test_a_destination_that_does_not_see_the_source_image_refuses(tmp_path: Path, shared: Path, change: str,
                                                                  words: str) -> None:
    disk = image(shared / "a.img")
    proposal = disk_move.proposal(disk, SHARED, 3)
    allowed = [shared]
    if change == "missing":
        (shared / "a.img").unlink()
    elif change == "other":  # another image at the same path: its own identity
        (shared / ("a.img" + ID_SUFFIX)).unlink()
        image_id(disk.path, create=True)
    elif change == "no-id":
        (shared / ("a.img" + ID_SUFFIX)).unlink()
    elif change == "smaller":
        proposal["size"] = MiB // 2
    elif change == "larger":
        proposal["size"] = 2 * MiB
    elif change == "outside":
        allowed = [tmp_path / "elsewhere"]
    with pytest.raises(DiskError, match=words):
        disk_move.incoming({"disk": proposal}, {}, allowed)


@pytest.mark.parametrize("raw", [
    "x", {"path": "rel.img", "size": MiB, "id": "0" * 32}, {"path": "/a.img", "size": 100, "id": "0" * 32},
    {"path": "/a.img", "size": MiB}, {"path": "/a.img", "size": "1M", "id": "0" * 32},
])
def test_a_malformed_proposal_is_refused(raw: object, shared: Path) -> None:
    with pytest.raises(DiskError):
        disk_move.incoming({"disk": raw}, {}, [shared])


def test_disk_map_text() -> None:
    assert disk_move.parse_disk_map(["/a=/b", " /c = /d "]) == {"/a": "/b", "/c": "/d"}
    assert disk_move.parse_disk_map({"/a": "/b"}) == {"/a": "/b"}
    for bad in (["/a"], ["a=/b"], "x"):
        with pytest.raises(DiskError):
            disk_move.parse_disk_map(bad)


def test_a_copy_goes_into_the_destination_directory_under_the_same_name(tmp_path: Path, shared: Path) -> None:
    disk = image(shared / "a.img")
    proposal = disk_move.proposal(disk, COPY, 3)
    assert proposal["copy"] is True and proposal["allocated"] == 0  # sparse: nothing written yet
    here = tmp_path / "here"
    other = tmp_path / "other"
    here.mkdir()
    other.mkdir()
    got = disk_move.incoming({"disk": proposal}, {}, [here, other])
    assert got == (DiskConfig(path=str(here / "a.img"), size=MiB), image_id(disk.path))
    into = disk_move.incoming({"disk": {**proposal, "dir": str(other)}}, {}, [here, other])
    assert into is not None and into[0].path == str(other / "a.img")


@pytest.mark.parametrize(("change", "words"), [
    ("exists", "never replaces"),
    ("outside", "outside the allowed directories"),
    ("no-dir", "does not exist on the destination"),
    ("odd-size", "whole number of 4096-byte pages"),
    ("bad-dir", "not an absolute path"),
])
def test_a_copy_the_destination_cannot_take_is_refused(tmp_path: Path, shared: Path, change: str,
                                                       words: str) -> None:
    proposal = disk_move.proposal(image(shared / "a.img"), COPY, 3)
    here = tmp_path / "here"
    here.mkdir()
    if change == "exists":
        (here / "a.img").write_bytes(b"mine")
    elif change == "outside":
        proposal["dir"] = str(tmp_path)
    elif change == "no-dir":
        proposal["dir"] = str(here / "sub")
    elif change == "odd-size":
        proposal["size"] = MiB + 512
    elif change == "bad-dir":
        proposal["dir"] = "rel"
    with pytest.raises(DiskError, match=words):
        disk_move.incoming({"disk": proposal}, {}, [here])
    if change == "exists":
        assert (here / "a.img").read_bytes() == b"mine"


def test_a_copy_larger_than_the_free_space_is_refused(tmp_path: Path, shared: Path) -> None:
    proposal = disk_move.proposal(image(shared / "a.img"), COPY, 3)
    proposal["allocated"] = 1 << 60
    with pytest.raises(DiskFull, match="free"):
        disk_move.incoming({"disk": proposal}, {}, [shared.parent])


def test_the_source_refuses_a_copy_it_cannot_make(shared: Path) -> None:
    with pytest.raises(MigrationError, match="has no disk"):
        disk_move.proposal(None, COPY, 3)
    with pytest.raises(MigrationError, match="protocol version 2"):
        disk_move.proposal(image(shared / "a.img"), COPY, 2)
    with pytest.raises(MigrationError, match="4096-byte pages"):
        disk_move.proposal(image(shared / "b.img", MiB + 512), COPY, 3)
    assert "copy" not in disk_move.proposal(image(shared / "c.img", MiB + 512), SHARED, 2)  # shared: any size
