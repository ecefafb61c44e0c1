"""Storage move on one host (`ferry vm move-storage`, agent/storage_move.py) between real agents' VM
processes: a guest moved mid-run ends as an unmoved run, a cancel or a failure keeps the old image, the
refusals, an agent restart afterwards; and the round policy (`next_step`) alone."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli_storage import progress_line, summary_text
from agent.storage_move import MAX_FINAL_BYTES, MAX_ROUNDS, SWITCH_BYTES, Step, next_step
from tests.agents import AgentProc, agent_list, make_key, small_tmpfs, start_agent, wait_for
from vmruntime.diskimage import ImageError, ImageFile

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
DB_ARGS = ("--mem", "4M", "--arg", "ws=256K", "--arg", "steps=3000000")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    return one, two


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    """Every agent a test starts (append to it): all stopped at the end, nothing leaked."""
    yield from agent_list()


def _agent(tmp_path: Path, agents: list[AgentProc], dirs: tuple[Path, ...], key: Path | None = None) -> AgentProc:
    agent = start_agent(tmp_path, "A", key or make_key(tmp_path), disk_dirs=":".join(map(str, dirs)))
    agent.cli_in_process = True
    agents.append(agent)
    return agent


def _halted(agent: AgentProc, name: str, timeout: float = 60.0) -> None:
    wait_for(lambda: agent.call("vm-info", name=name)["state"] == "halted", timeout=timeout,
             what=f"{name} to halt")


def _console(agent: AgentProc, name: str) -> str:
    return str(agent.cli("vm", "console", name).stdout)


def _locked(path: Path, size: int) -> bool:
    try:
        ImageFile.open(str(path), size).close()
    except ImageError as e:
        assert "in use by another VM" in str(e)
        return True
    return False


# -- the round policy ---------------------------------------------------------------------------------------
def test_policy_switches_once_the_dirty_set_is_small() -> None:
    assert next_step([0])[0] is Step.SWITCH
    assert next_step([300 * MiB, SWITCH_BYTES])[0] is Step.SWITCH
    assert next_step([300 * MiB])[0] is Step.COPY_AGAIN
    assert next_step([300 * MiB, 40 * MiB, 8 * MiB])[0] is Step.COPY_AGAIN  # still shrinking


def test_policy_switches_or_gives_up_when_the_dirty_set_stops_shrinking() -> None:
    step, why = next_step([300 * MiB, 8 * MiB, 8 * MiB])
    assert step is Step.SWITCH and "stopped shrinking" in why
    step, why = next_step([900 * MiB, 200 * MiB, 250 * MiB])
    assert step is Step.ABORT and "did not converge" in why
    shrinking = [MAX_FINAL_BYTES * 2 - i * MiB for i in range(MAX_ROUNDS + 1)]
    assert next_step(shrinking[:-1])[0] is Step.COPY_AGAIN
    assert next_step(shrinking)[0] is Step.ABORT  # the rounds ran out with too much left
    assert next_step([*shrinking[:-1], 3 * MiB])[0] is Step.SWITCH
    with pytest.raises(ValueError):
        next_step([])


def test_the_display_of_a_move() -> None:
    info = {"vm": "db", "from": "/d1/db.img", "to": "/d2/db.img", "status": "active", "total-time": 40,
            "downtime": 0, "disk": {"total": 8 * MiB, "transferred": 3 * MiB, "zero": MiB, "remaining": 4 * MiB,
                                    "size": 64 * MiB, "mbps": 800.0}, "rounds": [{}], "downtime-breakdown": {}}
    assert progress_line(info) == ("active    round   1  4.0 MiB copied of 8.0 MiB  remaining 4.0 MiB  "
                                   "bw 100.0 MB/s")
    failed = {**info, "status": "failed", "error-desc": "the disk image copy /d2/db.img cannot be stored"}
    text = summary_text(failed)
    assert "storage move of db to /d2/db.img: failed" in text and "error: the disk image copy" in text
    assert "the VM runs on its old image /d1/db.img" in text and "disk 64.0 MiB" in text


# -- moves of real VMs --------------------------------------------------------------------------------------
def test_dbverify_moved_mid_run_ends_with_the_unmoved_digest_and_survives_a_restart(
        tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    key = make_key(tmp_path)
    a = _agent(tmp_path, agents, dirs, key)
    reference = a.cli("run", "dbverify", *DB_ARGS, "--disk", f"{tmp_path / 'ref.img'},size=1M").stdout
    assert reference.startswith("digest ")
    a.cli("vm", "create", "db", "--program", "dbverify", *DB_ARGS, "--disk", f"{one / 'db.img'},size=1M")
    time.sleep(0.3)  # mid-run: the guest has written part of its disk
    moved = a.cli("vm", "move-storage", "db", "--to", str(two), json=True).json
    assert moved["status"] == "completed", moved
    assert moved["to"] == str(two / "db.img") and moved["from"] == str(one / "db.img")
    disk = moved["disk"]
    assert moved["rounds"][-1]["final"] and 0 < disk["transferred"] <= disk["total"] and disk["size"] == MiB
    assert disk["remaining"] == 0 and moved["downtime"] >= 0 and "switch" in moved["downtime-breakdown"]
    info = a.cli("vm", "info", "db", json=True).json
    assert info["state"] == "running", "the guest finished before the move: nothing was tested mid-run"
    assert info["disks"][0]["path"] == str(two / "db.img")
    assert not (one / "db.img").exists() and not (one / "db.img.ferry-id").exists()
    assert re.fullmatch(r"[0-9a-f]{32}\n", (two / "db.img.ferry-id").read_text())
    assert _locked(two / "db.img", MiB)  # the VM process holds the new image
    taken = a.cli("vm", "create", "other", "--program", "idle", "--disk", str(two / "db.img"), check=False)
    assert taken.returncode == 1 and "in use" in taken.stderr
    a.stop(keep_vms=True)
    a = _agent(tmp_path, agents, dirs, key)
    assert a.cli("vm", "info", "db", json=True).json["disks"][0]["path"] == str(two / "db.img")
    _halted(a, "db")
    assert _console(a, "db") == reference


def _make_image(path: Path, size: int, data: int, fill: bytes = b"\x5a") -> None:
    """An image of ``size`` bytes whose first ``data`` bytes are written (non-zero), the rest a hole."""
    with open(path, "wb") as f:
        chunk = fill * (4 * MiB)
        for off in range(0, data, len(chunk)):
            f.write(chunk[:data - off])
        f.truncate(size)


def test_diskstress_writing_during_the_move_converges_and_the_copy_is_the_image_at_the_switch(
        tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    a = _agent(tmp_path, agents, dirs)
    _make_image(one / "s.img", 64 * MiB, 16 * MiB)
    a.cli("vm", "create", "s", "--program", "diskstress", "--mem", "4M", "--arg", "ws=16M", "--arg", "rate=0",
          "--arg", "pattern=random", "--disk", str(one / "s.img"))
    wait_for(lambda: a.call("vm-info", name="s")["disks"][0]["writes"] > 1000, what="diskstress writing")
    frozen = tmp_path / "frozen.img"  # the old image's inode, kept: what the VM wrote until the switch
    os.link(one / "s.img", frozen)
    moved = a.cli("vm", "move-storage", "s", "--to", str(two / "t.img"), json=True).json
    assert moved["status"] == "completed", moved
    a.cli("vm", "pause", "s")
    assert not (one / "s.img").exists()
    old, new = frozen.read_bytes(), (two / "t.img").read_bytes()
    assert len(old) == len(new) == 64 * MiB
    block = 64 << 10
    # diskstress writes a block's first 4 KiB with the number of writes so far: the last one before
    # the switch holds the largest number in the old image; a block that differs in the copy must
    # have been written after the switch (a larger number), or the copy missed a write.
    at_switch = max(struct.unpack_from("<Q", old, b)[0] for b in range(0, 16 * MiB, block))
    differ = [b for b in range(0, len(old), block) if old[b:b + block] != new[b:b + block]]
    late = [b for b in differ if b < 16 * MiB and new[b + 8:b + block] == old[b + 8:b + block]
            and struct.unpack_from("<Q", new, b)[0] > at_switch]
    assert differ == late, f"blocks the copy got wrong: {[b // block for b in differ if b not in late][:10]}"
    assert a.call("vm-info", name="s")["disks"][0]["writes"] > at_switch
    a.cli("vm", "destroy", "s")


def test_cancel_mid_move_keeps_the_old_image_and_removes_the_copy(
        tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    a = _agent(tmp_path, agents, dirs)
    _make_image(one / "c.img", 1024 * MiB, 256 * MiB)
    a.cli("vm", "create", "c", "--program", "counter", "--mem", "4M", "--disk", str(one / "c.img"))
    started = a.call("vm-move-storage", name="c", to=str(two))
    assert started["to"] == str(two / "c.img")
    busy = a.cli("vm", "destroy", "c", check=False)  # nothing else touches the VM while its disk moves
    assert busy.returncode == 1 and "(busy)" in busy.stderr and "moving its storage" in busy.stderr
    again = a.cli("vm", "move-storage", "c", "--to", str(two / "d.img"), check=False)
    assert again.returncode == 1 and "already moving its storage" in again.stderr
    cancelled = a.cli("vm", "move-storage-cancel", "c")
    assert "cancelled; the VM runs on " + str(one / "c.img") in cancelled.stdout, cancelled.stdout
    info = a.cli("vm", "move-storage-status", "c", json=True).json
    assert info["status"] == "cancelled" and info["error-code"] == "cancelled"
    assert not (two / "c.img").exists() and not (two / "c.img.ferry-id").exists()
    assert (one / "c.img").stat().st_size == 1024 * MiB and _locked(one / "c.img", 1024 * MiB)
    vm = a.call("vm-info", name="c")
    assert vm["state"] == "running" and vm["disks"][0]["path"] == str(one / "c.img")
    wait_for(lambda: a.call("vm-info", name="c")["instructions"] > vm["instructions"], what="the VM to run on")
    assert a.cli("vm", "move-storage-cancel", "c", check=False).returncode == 1  # nothing to cancel now
    a.cli("vm", "destroy", "c")


def _refused(agent: AgentProc, name: str, to: str, words: str, code: str = "bad-request") -> None:
    result = agent.cli("vm", "move-storage", name, "--to", to, check=False)
    assert result.returncode == 1 and words in result.stderr and f"({code})" in result.stderr, result.stderr


def test_refusals_leave_everything_as_it_was(tmp_path: Path, dirs: tuple[Path, Path],
                                             agents: list[AgentProc]) -> None:
    one, two = dirs
    a = _agent(tmp_path, agents, dirs)
    a.cli("vm", "create", "r", "--program", "counter", "--mem", "4M", "--disk", f"{one / 'r.img'},size=1M")
    (tmp_path / "outside").mkdir()
    _refused(a, "r", str(tmp_path / "outside"), "outside the allowed directories")
    (two / "taken.img").write_bytes(b"x")
    _refused(a, "r", str(two / "taken.img"), "exists")
    assert (two / "taken.img").read_bytes() == b"x"
    _refused(a, "r", str(one), "is the VM's disk image already")
    _refused(a, "r", str(one / "r.img"), "is the VM's disk image already")
    _refused(a, "r", str(two / "missing") + "/", "does not exist")
    _refused(a, "nope", str(two), "no VM named", "no-such-vm")
    a.cli("vm", "create", "plain", "--program", "idle", "--mem", "4M")
    _refused(a, "plain", str(two), "has no disk")
    a.cli("vm", "create", "odd", "--program", "idle", "--mem", "4M", "--disk", f"{one / 'odd.img'},size=4608")
    _refused(a, "odd", str(two), "not a whole number of 4096-byte pages")
    assert sorted(p.name for p in two.iterdir()) == ["taken.img"]
    assert a.call("vm-info", name="r")["state"] == "running"
    assert a.cli("vm", "move-storage-status", "r", check=False).returncode == 1  # no move ever ran


def test_a_full_target_file_system_fails_the_move_cleanly(tmp_path: Path, dirs: tuple[Path, Path],
                                                          agents: list[AgentProc]) -> None:
    one, two = dirs
    with small_tmpfs(two / "small", "4M") as small:
        a = _agent(tmp_path, agents, dirs)
        _make_image(one / "f.img", 32 * MiB, 12 * MiB)
        a.cli("vm", "create", "f", "--program", "counter", "--mem", "4M", "--disk", str(one / "f.img"))
        result = a.cli("vm", "move-storage", "f", "--to", str(small), json=True, check=False)
        assert result.returncode == 1
        info = json.loads(result.stdout)
        assert info["status"] == "failed" and info["error-code"] == "insufficient-storage", info
        assert "cannot be stored" in info["error-desc"]
        assert os.listdir(small) == []
        vm = a.call("vm-info", name="f")
        assert vm["state"] == "running" and vm["disks"][0]["path"] == str(one / "f.img")
        assert _locked(one / "f.img", 32 * MiB)
        a.cli("vm", "destroy", "f")


def test_a_migrating_vm_is_not_moved_and_a_moving_vm_does_not_migrate(tmp_path: Path, dirs: tuple[Path, Path],
                                                                       agents: list[AgentProc]) -> None:
    one, two = dirs
    key = make_key(tmp_path)
    a = _agent(tmp_path, agents, dirs, key)
    b = start_agent(tmp_path, "B", key)
    agents.append(b)
    a.cli("vm", "create", "m", "--program", "memstress", "--mem", "32M", "--arg", "rate=0")
    a.call("migrate", name="m", to=b.control, params={"bandwidth": 1 << 20, "compress": "none"})
    _refused(a, "m", str(two), "is migrating", "busy")
    a.call("migrate-cancel", name="m")
    _make_image(one / "g.img", 1024 * MiB, 256 * MiB)
    a.cli("vm", "create", "g", "--program", "counter", "--mem", "4M", "--disk", str(one / "g.img"))
    a.call("vm-move-storage", name="g", to=str(two))
    refused = a.cli("migrate", "g", "--to", b.control, check=False)
    assert refused.returncode == 1 and "moving its storage" in refused.stderr and "(busy)" in refused.stderr
    paused = a.cli("vm", "pause", "g", check=False)
    assert paused.returncode == 1 and "moving its storage" in paused.stderr
    a.call("vm-move-storage-cancel", name="g")
    a.cli("vm", "destroy", "g")
    a.cli("vm", "destroy", "m")


def _edit_record(agent: AgentProc, name: str, **fields: object) -> None:
    path = agent.state_dir / "vms" / f"{name}.json"
    record = json.loads(path.read_text())
    record.update({k.replace("_", "-"): v for k, v in fields.items()})
    path.write_text(json.dumps(record))


def test_a_restart_after_the_switch_but_before_the_record_keeps_the_new_image(
        tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    key = make_key(tmp_path)
    a = _agent(tmp_path, agents, dirs, key)
    a.cli("vm", "create", "w", "--program", "counter", "--mem", "4M", "--disk", f"{one / 'w.img'},size=1M")
    a.cli("vm", "move-storage", "w", "--to", str(two))
    a.stop(keep_vms=True)
    # the crash window: the VM process switched, the record still names the old image, which is still there
    (one / "w.img").write_bytes(bytes(MiB))
    (one / "w.img.ferry-id").write_text((two / "w.img.ferry-id").read_text())
    record = json.loads((a.state_dir / "vms" / "w.json").read_text())
    _edit_record(a, "w", disk={**record["disk"], "path": str(one / "w.img")},
                 storage_move={"from": str(one / "w.img"), "to": str(two / "w.img"), "run-before": "running"})
    a = _agent(tmp_path, agents, dirs, key)
    vm = a.call("vm-info", name="w")
    assert vm["state"] == "running" and vm["disks"][0]["path"] == str(two / "w.img")
    assert not (one / "w.img").exists() and not (one / "w.img.ferry-id").exists()
    assert json.loads((a.state_dir / "vms" / "w.json").read_text())["disk"]["path"] == str(two / "w.img")
    assert "storage move cut by an agent restart" in a.log()


def test_a_restart_before_the_switch_keeps_the_old_image_and_removes_the_copy(
        tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    key = make_key(tmp_path)
    a = _agent(tmp_path, agents, dirs, key)
    a.cli("vm", "create", "p", "--program", "counter", "--mem", "4M", "--disk", f"{one / 'p.img'},size=1M")
    a.cli("vm", "pause", "p")  # as the move's pause left it
    a.stop(keep_vms=True)
    (two / "p.img").write_bytes(bytes(MiB))  # the partial copy
    (two / "p.img.ferry-id").write_text("0" * 32 + "\n")
    _edit_record(a, "p", storage_move={"from": str(one / "p.img"), "to": str(two / "p.img"), "run-before": "running"})
    a = _agent(tmp_path, agents, dirs, key)
    vm = a.call("vm-info", name="p")
    assert vm["state"] == "running" and vm["disks"][0]["path"] == str(one / "p.img")
    assert not (two / "p.img").exists() and not (two / "p.img.ferry-id").exists()
    assert _locked(one / "p.img", MiB)


def test_a_paused_vm_moves_and_stays_paused(tmp_path: Path, dirs: tuple[Path, Path], agents: list[AgentProc]) -> None:
    one, two = dirs
    a = _agent(tmp_path, agents, dirs)
    a.cli("vm", "create", "z", "--program", "counter", "--mem", "4M", "--paused", "--disk", f"{one / 'z.img'},size=1M")
    moved = a.cli("vm", "move-storage", "z", "--to", "z2.img", json=True).json  # relative: in STATE_DIR/disks
    target = a.state_dir / "disks" / "z2.img"
    assert moved["status"] == "completed" and moved["downtime"] == 0 and moved["to"] == str(target), moved
    vm = a.call("vm-info", name="z")
    assert vm["state"] == "paused" and vm["disks"][0]["path"] == str(target) and _locked(target, MiB)
    assert "storage move of z to " + str(target) + ": completed" in a.cli("vm", "move-storage-status", "z").stdout
