"""Faults at every phase of a `--copy-storage` migration: a cut, kill -9 of either agent or of the
VM process. Afterwards exactly one copy of the VM runs, it writes exactly one image (the one it
locks), a destination that did not start the VM keeps no copy of the image, and a `dbverify`
guest still ends with the digest of an unmigrated run (docs/RELIABILITY.md, "A VM with a disk")."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.messages import Commit, DeviceState, DiskBatch, MigrateStart, Ready, Sync
from tests.agents import AgentProc, agent_trio, finished, names, runs_on, start_agent, wait_for
from tests.faults import AFTER, C2S, CALL, CUT, S2C, FaultProxy, Rule, kill9, kill_agent, migration_target
from tests.test_faults_cuts import migrate_via, only_on
from vmruntime.diskimage import ImageError, lock_exclusive

pytestmark = pytest.mark.timeout(120)

COPY = {"copy-storage": True}


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    """Source A, destination B (cut or killed), and C for the next migration; no shared storage."""
    yield from agent_trio(tmp_path)


def disks(agent: AgentProc) -> Path:
    return agent.state_dir / "disks"


def writer(agent: AgentProc, name: str) -> None:
    """A guest that keeps writing its disk (and so sends dirty blocks every round)."""
    agent.call("vm-create", name=name, program="diskstress", mem="4M",
               args={"ws": "4M", "rate": "0", "pattern": "random"}, disk={"path": f"{name}.img", "size": "8M"})
    wait_for(lambda: agent.call("vm-info", name=name)["disks"][0]["writes"] > 20, what="diskstress under way")


def one_image(owner: AgentProc, other: AgentProc, name: str) -> None:
    """The VM runs on ``owner`` on its image there, which it holds locked; ``other`` holds no copy."""
    only_on(owner, other, name)
    image = disks(owner) / f"{name}.img"
    assert owner.call("vm-info", name=name)["disks"][0]["path"] == str(image)
    fd = os.open(image, os.O_RDWR)
    try:
        with pytest.raises(ImageError, match="in use by another VM"):  # its VM process holds the lock
            lock_exclusive(fd, str(image))
    finally:
        os.close(fd)
    wait_for(lambda: not [p for p in disks(other).iterdir() if p.name.startswith(name)],
             what=f"no copy of {name}'s image on {other.name}")


CUTS = [
    pytest.param(Rule(C2S, MigrateStart, CUT), id="setup"),
    pytest.param(Rule(C2S, DiskBatch, CUT, nth=2), id="bulk-copy"),
    pytest.param(Rule(C2S, Sync, CUT, nth=2), id="dirty-rounds"),  # round 1 (dirty blocks) sent
    pytest.param(Rule(C2S, DeviceState, CUT), id="stop-and-copy"),
    pytest.param(Rule(S2C, Ready, CUT), id="before-Ready"),
]


@pytest.mark.parametrize("rule", CUTS)
def test_a_cut_before_commit_leaves_the_vm_on_its_image_and_no_copy(
        trio: tuple[AgentProc, AgentProc, AgentProc], rule: Rule) -> None:
    a, b, c = trio
    writer(a, "d")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(rule)
        migrate_via(a, b, proxy, "d", **COPY, **{"max-downtime": 1, "max-rounds": 8, "force": True})
        out = finished(a, "d")
    if rule.msg is Ready and out["status"] == "failed" and "in doubt" in out["error-desc"]:
        pytest.fail(f"a cut before READY must not leave the VM in doubt: {out}")
    assert out["status"] == "failed", out
    one_image(a, b, "d")
    a.call("migrate", name="d", to=c.control, params=COPY)  # and the VM moves on, with its disk
    assert finished(a, "d")["status"] == "completed"
    one_image(c, a, "d")


@pytest.mark.parametrize("msg, nth", [(DiskBatch, 2), (DeviceState, 1)], ids=["bulk-copy", "stop-and-copy"])
def test_destination_killed_before_commit_leaves_the_vm_on_its_image(
        trio: tuple[AgentProc, AgentProc, AgentProc], msg: type, nth: int) -> None:
    a, b, c = trio
    writer(a, "d")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, msg, CALL, nth=nth, callback=kill_agent(b)))
        migrate_via(a, b, proxy, "d", **COPY)
        out = finished(a, "d")
        assert rule.fired.is_set()
    assert out["status"] == "failed", out
    assert names(a) == ["d"]
    runs_on(a, "d")
    # B died with its partial copy on its disk; nothing runs on it, it never becomes an image, and
    # B removes it when it starts again.
    assert not (disks(b) / "d.img").exists()
    assert [p.name for p in disks(b).iterdir()] == ["d.img.ferry-partial"]
    again = start_agent(b.state_dir.parent, "B", b.state_dir.parent / "cluster.key")
    try:
        assert list(disks(again).iterdir()) == []
        assert "removed a disk image copy an interrupted migration left" in again.log()
    finally:
        again.stop()
    a.call("migrate", name="d", to=c.control, params=COPY)
    assert finished(a, "d")["status"] == "completed"
    one_image(c, a, "d")


def test_source_killed_mid_copy_makes_the_destination_remove_its_copy(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    writer(a, "d")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, DiskBatch, CALL, nth=2, callback=kill_agent(a)))
        try:
            migrate_via(a, b, proxy, "d", **COPY)
        except Exception:
            pass  # the source died under the call
        wait_for(rule.fired.is_set, what="the kill")
    wait_for(lambda: list(disks(b).iterdir()) == [], what="the destination to remove its partial copy")
    assert names(b) == []
    assert (disks(a) / "d.img").exists()  # the source's image is untouched


def test_source_vm_process_killed_mid_copy_fails_cleanly(trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    writer(a, "d")
    pid = a.call("vm-info", name="d")["pid"]
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(C2S, DiskBatch, CALL, nth=2, callback=lambda: kill9(pid)))
        migrate_via(a, b, proxy, "d", **COPY)
        out = finished(a, "d")
    assert out["status"] == "failed", out
    assert names(b) == []
    wait_for(lambda: list(disks(b).iterdir()) == [], what="the destination to remove its partial copy")
    assert (disks(a) / "d.img").exists()


def test_source_killed_after_commit_leaves_the_vm_on_the_copy(trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    writer(a, "d")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, Commit, CALL, when=AFTER, callback=kill_agent(a)))
        migrate_via(a, b, proxy, "d", **COPY)
        wait_for(rule.fired.is_set, what="the kill")
    wait_for(lambda: "d" in names(b), what="the VM on the destination")
    runs_on(b, "d")
    assert b.call("vm-info", name="d")["disks"][0]["path"] == str(disks(b) / "d.img")
    assert not list(disks(b).glob("*.ferry-partial"))
    # The source agent died before RESUMED: its image stays (nobody writes it: its VM is paused for
    # good, or gone), and the operator removes it; the VM writes B's copy only.
    assert (disks(a) / "d.img").exists()


@pytest.mark.slow
def test_dbverify_cut_mid_copy_then_moved_ends_with_the_unmigrated_digest(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    args = ("--mem", "4M", "--arg", "ws=256K", "--arg", "steps=3000000")
    reference = a.cli("run", "dbverify", *args, "--disk", f"{disks(a) / 'ref.img'},size=1M").stdout
    a.cli("vm", "create", "db", "--program", "dbverify", *args, "--disk", "db.img,size=1M")
    time.sleep(0.3)
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(C2S, DiskBatch, CUT, nth=2))
        migrate_via(a, b, proxy, "db", **COPY)
        assert finished(a, "db")["status"] == "failed"
    a.call("migrate", name="db", to=b.control, params=COPY)
    assert finished(a, "db")["status"] == "completed"
    wait_for(lambda: b.call("vm-info", name="db")["state"] == "halted", timeout=60, what="dbverify to finish")
    assert b.cli("vm", "console", "db").stdout == reference
