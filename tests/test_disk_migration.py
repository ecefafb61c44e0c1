"""A VM with a disk migrates on shared storage: `dbverify` moved mid-run A->B->A between two real
agents that both allow the images' directory ends with the digest of an unmigrated run, and the
image is never writable by two processes (docs/RELIABILITY.md, "A VM with a disk")."""

from __future__ import annotations

import time
from pathlib import Path

from tests.agents import make_key, start_agent

ARGS = ("--mem", "4M", "--arg", "ws=256K", "--arg", "steps=3000000")


def _console(agent, name: str) -> str:  # type: ignore[no-untyped-def]
    return str(agent.cli("vm", "console", name).stdout)


def test_dbverify_moved_mid_run_on_shared_storage_ends_with_the_unmigrated_digest(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    with start_agent(tmp_path, "A", key, disk_dirs=str(shared)) as a, \
            start_agent(tmp_path, "B", key, disk_dirs=str(shared)) as b:
        reference = a.cli("run", "dbverify", *ARGS, "--disk", f"{shared / 'ref.img'},size=1M").stdout
        assert reference.startswith("digest ")
        a.cli("vm", "create", "db", "--program", "dbverify", *ARGS, "--disk", f"{shared / 'db.img'},size=1M")
        time.sleep(0.3)  # mid-run: the guest has written part of its disk
        there = a.cli("migrate", "db", "--to", b.control, json=True).json
        assert there["status"] == "completed", there
        info = b.cli("vm", "info", "db", json=True).json
        assert info["state"] == "running", "the guest finished before it moved: nothing was tested mid-run"
        assert info["disks"][0]["path"] == str(shared / "db.img")
        # B's process holds the image: A cannot give it to another VM meanwhile
        taken = a.cli("vm", "create", "other", "--program", "idle", "--disk", str(shared / "db.img"), check=False)
        assert taken.returncode == 1 and "in use by another VM" in taken.stderr
        back = b.cli("migrate", "db", "--to", a.control, json=True).json
        assert back["status"] == "completed", back
        deadline = time.monotonic() + 60
        while a.cli("vm", "info", "db", json=True).json["state"] != "halted":
            assert time.monotonic() < deadline, "dbverify did not finish"
            time.sleep(0.1)
        assert _console(a, "db") == reference
        assert b.cli("vm", "list", json=True).json == []
        a.cli("vm", "destroy", "db")
        a.cli("vm", "create", "again", "--program", "idle", "--disk", str(shared / "db.img"))  # unlocked now
        a.cli("vm", "destroy", "again")
