"""A VM with a disk migrates between hosts that share no storage (`ferry migrate --copy-storage`):
the image travels with the RAM, the digest of `dbverify` moved mid-run equals an unmigrated run's,
exactly one image is in use at the end, and a copy the destination cannot hold fails cleanly
(docs/RELIABILITY.md, "A VM with a disk")."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import AgentProc, make_key, small_tmpfs, start_agent, wait_for
from tests.faults import wait_status

ARGS = ("--mem", "4M", "--arg", "ws=256K", "--arg", "steps=3000000")


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Agents A and B, each with only its own STATE_DIR/disks: nothing shared."""
    key = make_key(tmp_path)
    with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key) as b:
        yield a, b


def _wait_halted(agent: AgentProc, name: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while agent.cli("vm", "info", name, json=True).json["state"] != "halted":
        assert time.monotonic() < deadline, f"{name} did not finish"
        time.sleep(0.1)


def test_dbverify_moved_mid_run_with_copy_storage_ends_with_the_unmigrated_digest(
        two_hosts: tuple[AgentProc, AgentProc]) -> None:
    a, b = two_hosts
    a_disks, b_disks = a.state_dir / "disks", b.state_dir / "disks"
    reference = a.cli("run", "dbverify", *ARGS, "--disk", f"{a_disks / 'ref.img'},size=1M").stdout
    assert reference.startswith("digest ")
    a.cli("vm", "create", "db", "--program", "dbverify", *ARGS, "--disk", "db.img,size=1M")
    time.sleep(0.3)  # mid-run: the guest has written part of its disk
    there = a.cli("migrate", "db", "--to", b.control, "--copy-storage", json=True).json
    assert there["status"] == "completed", there
    assert there["disk"]["transferred"] > 0, there
    info = b.cli("vm", "info", "db", json=True).json
    assert info["state"] == "running", "the guest finished before it moved: nothing was tested mid-run"
    assert info["disks"][0]["path"] == str(b_disks / "db.img")
    assert not (a_disks / "db.img").exists(), "the source image stays after the VM runs on its copy"
    assert not list(b_disks.glob("*.ferry-partial"))
    # and back again, into A's own directory
    back = b.cli("migrate", "db", "--to", a.control, "--copy-storage", json=True).json
    assert back["status"] == "completed", back
    _wait_halted(a, "db")
    assert a.cli("vm", "console", "db").stdout == reference
    assert not (b_disks / "db.img").exists()
    for agent in (a, b):  # neither agent keeps a descriptor of an image (only VM processes hold them)
        assert not _open_images(agent), _open_images(agent)
    # the copy is the same disk: its identity travelled with it
    assert (a_disks / "db.img.ferry-id").read_text() == there_id(a_disks / "db.img.ferry-id")


def _open_images(agent: AgentProc) -> list[str]:
    fd_dir = Path(f"/proc/{agent.proc.pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            continue
    return [t for t in targets if "/disks/" in t]


def there_id(path: Path) -> str:
    text = path.read_text()
    assert len(text.strip()) == 32
    return text


def test_copy_storage_refusals_keep_the_vm_running_on_its_image(two_hosts: tuple[AgentProc, AgentProc]) -> None:
    a, b = two_hosts
    a.cli("vm", "create", "odd", "--program", "idle", "--mem", "1M", "--disk", "odd.img,size=6K")
    odd = a.cli("migrate", "odd", "--to", b.control, "--copy-storage", check=False)
    assert odd.returncode != 0 and "whole number of 4096-byte pages" in odd.stderr + odd.stdout
    a.cli("vm", "create", "vm1", "--program", "idle", "--mem", "1M", "--disk", "vm1.img,size=1M")
    (b.state_dir / "disks" / "vm1.img").write_bytes(b"taken")
    taken = a.cli("migrate", "vm1", "--to", b.control, "--copy-storage", check=False)
    assert taken.returncode != 0 and "never replaces" in taken.stderr + taken.stdout
    outside = a.cli("migrate", "vm1", "--to", b.control, "--copy-storage", "--disk-dir", "/tmp", check=False)
    assert outside.returncode != 0 and "outside the allowed directories" in outside.stderr + outside.stdout
    assert (b.state_dir / "disks" / "vm1.img").read_bytes() == b"taken"
    for name in ("odd", "vm1"):
        assert a.cli("vm", "info", name, json=True).json["state"] == "running"
    assert (a.state_dir / "disks" / "vm1.img").exists()
    assert b.cli("vm", "list", json=True).json == []


def test_a_copy_that_fills_the_destination_fails_cleanly(tmp_path: Path) -> None:
    """The guest writes more than the destination's file system holds while the disk is copied:
    the migration fails with insufficient-storage, the VM runs on the source with its image, the
    partial copy is gone."""
    with small_tmpfs(tmp_path / "small", "2M") as small:
        key = make_key(tmp_path)
        with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key, disk_dirs=str(small)) as b:
            a.cli("vm", "create", "w", "--program", "diskstress", "--mem", "4M", "--arg", "ws=8M",
                  "--arg", "pattern=seq", "--disk", "w.img,size=16M")
            time.sleep(0.2)
            res = a.cli("migrate", "w", "--to", b.control, "--copy-storage", "--disk-dir", str(small),
                        "--bandwidth", "4M", "--json", check=False)
            info = json.loads(res.stdout)
            assert res.returncode != 0 and info["status"] == "failed", info
            assert info["error-code"] == "insufficient-storage", info
            assert "No space left on device" in info["error-desc"], info
            assert a.cli("vm", "info", "w", json=True).json["state"] == "running"
            assert list(small.iterdir()) == []
            assert b.cli("vm", "list", json=True).json == []


def test_write_blocking_moves_a_guest_that_writes_faster_than_the_link(two_hosts: tuple[AgentProc, AgentProc]) -> None:
    """A guest writing its disk flat out over a capped link: background rounds never catch up;
    write-blocking makes it write at the copy's pace, and the migration converges."""
    a, b = two_hosts
    a.cli("vm", "create", "w", "--program", "diskstress", "--mem", "4M", "--arg", "ws=16M", "--arg", "rate=0",
          "--arg", "pattern=random", "--disk", "w.img,size=32M")
    # Not compressed: diskstress's blocks compress so well that zstd alone would let it catch up.
    common = ("--copy-storage", "--bandwidth", "8M", "--max-rounds", "6", "--compress", "none", "--json")
    free = a.cli("migrate", "w", "--to", b.control, *common, "--no-auto-converge", check=False)
    info = json.loads(free.stdout)
    assert free.returncode != 0 and "did not converge" in info["error-desc"], info
    assert a.cli("vm", "info", "w", json=True).json["state"] == "running"
    assert not (b.state_dir / "disks" / "w.img").exists()
    held = a.cli("migrate", "w", "--to", b.control, *common, "--storage-mode", "write-blocking", check=False)
    info = json.loads(held.stdout)
    assert held.returncode == 0 and info["status"] == "completed", info
    assert info["disk"]["dirty-cap"] > 0 and info["params"]["storage-mode"] == "write-blocking"
    assert b.cli("vm", "info", "w", json=True).json["state"] == "running"


def test_a_cancelled_copy_leaves_the_source_image_and_no_copy(two_hosts: tuple[AgentProc, AgentProc]) -> None:
    a, b = two_hosts
    a.cli("vm", "create", "c", "--program", "diskstress", "--mem", "4M", "--arg", "ws=8M", "--arg", "rate=0",
          "--disk", "c.img,size=16M")
    a.cli("migrate", "c", "--to", b.control, "--copy-storage", "--bandwidth", "1M", "--detach")
    wait_status(a, "c", lambda info: info["status"] == "active" and info.get("disk", {}).get("transferred", 0) > 0,
                what="the copy under way")
    a.cli("migrate-cancel", "c")
    assert a.cli("migrate-status", "c", json=True).json["status"] == "cancelled"
    assert a.cli("vm", "info", "c", json=True).json["state"] == "running"
    assert (a.state_dir / "disks" / "c.img").exists()
    wait_for(lambda: list((b.state_dir / "disks").iterdir()) == [], what="B to remove its partial copy")
    assert b.cli("vm", "list", json=True).json == []
