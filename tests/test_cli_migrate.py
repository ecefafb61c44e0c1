"""`ferry migrate`, `migrate-status` and `migrate-cancel` end to end: two real agents, real VMs, real sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import (
    FINAL_STATUSES,
    AgentProc,
    agent_pair,
    free_port,
    make_key,
    names,
    runs_on,
    start_agent,
    wait_for,
)


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Two agents for the module (B accepts at most 96M of guests)."""
    tmp = tmp_path_factory.mktemp("pair")
    yield from agent_pair(tmp, b={"max_mem": "96M"})


@pytest.fixture
def pair(shared_pair: tuple[AgentProc, AgentProc]) -> Iterator[tuple[AgentProc, AgentProc]]:
    """The shared agents, emptied after each test."""
    for agent in shared_pair:
        agent.cli_in_process = True  # faster; test_migrate_there_and_back also uses the entry point
    yield shared_pair
    for agent in shared_pair:
        agent.destroy_all_vms()


def test_migrate_there_and_back(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.cli("vm", "create", "c1", "--program", "counter", "--mem", "64M")
    before = a.call("vm-info", name="c1")["instructions"]
    out = a.cli("migrate", "c1", "--to", b.control, json=True).json
    assert out["status"] == "completed" and out["vm"] == "c1"
    assert out["ram"]["total"] == 64 << 20 and out["downtime"] >= 0
    assert names(a) == [] and names(b) == ["c1"]
    info = b.call("vm-info", name="c1")
    assert info["state"] == "running" and info["host"] == "B" and info["instructions"] >= before
    runs_on(b, "c1")
    assert a.call("migrate-status", name="c1")["direction"] == "out"
    assert b.cli("migrate-status", "c1", json=True).json["direction"] == "in"

    # Back again through the real entry point, with the progress display and summary (one line per round).
    b.cli_in_process = False
    r = b.cli("migrate", "c1", "--to", a.control, "--max-downtime", "50")
    assert "completed" in r.stdout and "round" in r.stdout and "dirty tracking:" in r.stdout
    assert names(b) == [] and names(a) == ["c1"]
    runs_on(a, "c1")
    text = a.cli("migrate-status", "c1").stdout
    assert "migration of c1 from" in text and "completed" in text


def test_refused_migration_fails_and_the_vm_stays(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.cli("vm", "create", "big", "--program", "counter", "--mem", "128M")  # B accepts at most 96M
    r = a.cli("migrate", "big", "--to", b.control, "--json", check=False)
    assert r.returncode != 0
    outcome = r.stderr + r.stdout
    assert "memory" in outcome
    if r.stdout.strip():  # refused after it started: the final MigrationInfo says so
        assert json.loads(r.stdout)["status"] == "failed"
    assert names(a) == ["big"] and names(b) == []
    assert a.call("vm-info", name="big")["state"] == "running"
    runs_on(a, "big")


def test_a_failed_migration_is_reported_once_the_destination_let_go(pair: tuple[AgentProc, AgentProc]) -> None:
    """A migration that does not converge fails; by the time the source says so, the destination
    has dropped its copy (RAM, the disk's partial copy) and the VM's name, so a retry at once is
    not refused (vm-exists)."""
    a, b = pair
    a.cli("vm", "create", "w", "--program", "diskstress", "--mem", "16M", "--arg", "ws=32M", "--arg", "rate=0",
          "--disk", "w.img,size=64M")
    a.call("migrate", name="w", to=b.control, params={"max-rounds": 1, "max-downtime": 1, "copy-storage": True,
                                                            "auto-converge": False})
    while (status := a.call("migrate-status", name="w"))["status"] not in ("completed", "failed", "cancelled"):
        pass  # polled without a pause: the destination is asked the moment the source reports
    assert "did not converge" in status["error-desc"], status
    info = b.call("agent-info")
    assert info["free-mem"] == info["max-mem"] and names(b) == []
    again = a.cli("migrate", "w", "--to", b.control, "--copy-storage", "--force", "--max-rounds", "2", "--json",
                  check=False)
    assert json.loads(again.stdout)["status"] == "completed", again.stdout
    assert names(b) == ["w"]


def test_bad_destinations_are_refused_before_anything_starts(pair: tuple[AgentProc, AgentProc]) -> None:
    a, _ = pair
    a.cli("vm", "create", "lonely", "--program", "idle", "--mem", "4M")
    r = a.cli("migrate", "lonely", "--to", f"127.0.0.1:{free_port()}", check=False)
    assert r.returncode == 1 and "cannot reach destination agent" in r.stderr
    r = a.cli("migrate", "lonely", "--to", a.control, check=False)
    assert r.returncode == 1 and "is this agent" in r.stderr and "(bad-request)" in r.stderr
    r = a.cli("migrate", "ghost", "--to", a.control, check=False)
    assert r.returncode == 1 and "(no-such-vm)" in r.stderr
    r = a.cli("migrate-status", "lonely", check=False)
    assert r.returncode == 1 and "no migration of VM 'lonely'" in r.stderr
    assert a.call("vm-info", name="lonely")["state"] == "running"


def test_a_destination_with_another_key_is_refused(pair: tuple[AgentProc, AgentProc], tmp_path: Path) -> None:
    a, _ = pair
    stranger = start_agent(tmp_path, "C", make_key(tmp_path, "other.key"))
    try:
        a.cli("vm", "create", "k1", "--program", "idle", "--mem", "4M")
        r = a.cli("migrate", "k1", "--to", stranger.control, check=False)
        assert r.returncode == 1 and "(auth-failed)" in r.stderr and stranger.control in r.stderr
        assert names(a) == ["k1"] and stranger.call("vm-list")["vms"] == []
    finally:
        assert stranger.stop() == 0


def test_cancel_leaves_the_vm_running_on_the_source(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.cli("vm", "create", "m1", "--program", "memstress", "--mem", "64M", "--arg", "ws=48M")
    wait_for(lambda: a.call("vm-info", name="m1")["instructions"] > 1_000_000, what="memstress warm-up")
    # A bandwidth cap of 8 MB/s makes the 48M working set take seconds: time to cancel.
    a.cli("migrate", "m1", "--to", b.control, "--bandwidth", "8M", "--compress", "none", "--detach")
    assert a.call("vm-info", name="m1")["state"] == "migrating"
    r = a.cli("vm", "pause", "m1", check=False)
    assert r.returncode == 1 and "(busy)" in r.stderr
    # without a name: the migrations in flight, a table or a JSON list
    table = a.cli("migrate-status").stdout.splitlines()
    assert table[0].split()[:4] == ["VM", "DIR", "PEER", "STATUS"] and table[1].split()[:2] == ["m1", "out"]
    assert [i["vm"] for i in a.cli("migrate-status", json=True).json] == ["m1"]  # the finished ones left out
    a.cli("migrate-cancel", "m1")
    status = a.cli("migrate-status", "m1", json=True).json
    assert status["status"] == "cancelled"
    assert a.cli("migrate-status").stdout.startswith("no migrations in flight")
    assert ("m1", "cancelled") in [(i["vm"], i["status"]) for i in a.cli("migrate-status", "--all", json=True).json]
    assert names(a) == ["m1"] and names(b) == []
    assert a.call("vm-info", name="m1")["state"] == "running"
    runs_on(a, "m1")


def test_sigterm_on_the_source_mid_migration(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    try:
        a.cli("vm", "create", "m1", "--program", "memstress", "--mem", "64M", "--arg", "ws=48M")
        a.cli("migrate", "m1", "--to", b.control, "--bandwidth", "8M", "--compress", "none", "--detach")
        assert a.stop() == 0
        assert a.leaked == []
        assert "agent stopped" in a.log()
        assert wait_for(lambda: _final_status(b, "m1"), what="the destination to discard its copy") == "failed"
        assert names(b) == []
        b.cli("vm", "create", "m1", "--program", "idle", "--mem", "64M")  # the name and memory are free again
    finally:
        a.stop()
        assert b.stop() == 0
    assert b.leaked == []


def test_sigterm_on_the_destination_mid_migration(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    a.cli_in_process = True
    try:
        a.cli("vm", "create", "m1", "--program", "memstress", "--mem", "64M", "--arg", "ws=48M")
        a.cli("migrate", "m1", "--to", b.control, "--bandwidth", "8M", "--compress", "none", "--detach")
        assert b.stop() == 0
        assert b.leaked == []  # the idle VM process of the incoming VM went with it
        final = wait_for(lambda: _final_status(a, "m1"), what="the source to notice")
        assert final == "failed"
        assert names(a) == ["m1"] and a.call("vm-info", name="m1")["state"] == "running"
        runs_on(a, "m1")
    finally:
        b.stop()
        assert a.stop() == 0
    assert a.leaked == []


def _final_status(agent: AgentProc, name: str) -> str | None:
    status = str(agent.call("migrate-status", name=name)["status"])
    return status if status in FINAL_STATUSES else None
