"""Cluster mode on a real etcd: a 3-member etcd on loopback (tests/etcd.py) and three agents.

Hosts register with a lease and vanish when frozen past it; placement puts VMs on the host with
most free capacity and never on a dead one; a migration moves the VM's ownership in etcd with one
transaction (generation + 1); losing one etcd member does not stop migrations; a source cut off
from etcd at COMMIT, or all of etcd gone at COMMIT, never leaves two running copies, and the VM
runs where etcd says once etcd answers again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proto.messages import Commit
from tests.agents import (
    AgentProc,
    digest_line,
    finished,
    make_key,
    runs_on,
    start_agent,
    unmigrated_verify_digest,
    wait_for,
)
from tests.etcd import EtcdCluster, EtcdLink, etcd_cluster
from tests.faults import BEFORE, C2S, CALL, FaultProxy, Rule, migration_target

TTL = 3
VERIFY_ARGS = {"ws": "2M", "steps": "3000000"}  # a few seconds of guest time


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from etcd_cluster(tmp_path)


def etcd_get(cluster: EtcdCluster, key: str) -> dict[str, Any] | None:
    """A key's JSON value, read from the first member that answers (a linearizable read)."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    for url in cluster.endpoints:
        try:
            req = urllib.request.Request(f"{url}/v3/kv/range", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                kvs = json.loads(r.read()).get("kvs") or []
        except OSError:
            continue
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
    raise AssertionError("no etcd member answered")


def start(tmp_path: Path, key: Path, name: str, etcd_urls: str, **flags: Any) -> AgentProc:
    return start_agent(tmp_path, name, key, etcd=etcd_urls, etcd_ttl=TTL, **flags)


def hosts(agent: AgentProc) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in agent.call("cluster-hosts")["hosts"]}


def vm_state(agent: AgentProc, name: str) -> str | None:
    vms = {v["name"]: v for v in agent.call("vm-list")["vms"]}
    return vms[name]["state"] if name in vms else None


@pytest.fixture
def trio(tmp_path: Path, etcd: EtcdCluster) -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    """A (768M), B (512M), C (256M) in cluster mode on ``etcd``."""
    key = make_key(tmp_path)
    agents: list[AgentProc] = []
    try:
        for name, mem in (("A", "768M"), ("B", "512M"), ("C", "256M")):
            agents.append(start(tmp_path, key, name, etcd.urls, max_mem=mem))
        yield agents[0], agents[1], agents[2]
    finally:
        for agent in agents:
            agent.stop()
        for agent in agents:
            assert agent.leaked == [], f"agent {agent.name} left processes behind: {agent.leaked}"


def test_hosts_placement_ownership_and_a_frozen_host(trio: tuple[AgentProc, AgentProc, AgentProc],
                                                      etcd: EtcdCluster) -> None:
    a, b, c = trio
    seen = wait_for(lambda: (h := hosts(c)) and len(h) == 3 and h, what="three hosts registered")
    assert {h["state"] for h in seen.values()} == {"alive"}
    assert all(0 < h["lease-ttl"] <= TTL for h in seen.values()), seen
    table = c.cli("hosts").stdout
    assert "LEASE TTL" in table and all(n in table for n in "ABC")

    # Placed on the host with most free memory (A), recorded with owner A at generation 1.
    info = c.call("vm-create", name="v1", program="counter", mem="64M")
    assert info["host"] == "A"
    runs_on(a, "v1")
    assert etcd_get(etcd, "/ferry/vms/v1") == {"name": "v1", "owner": "A", "generation": 1,
                                               "spec": {"program": "counter", "args": {}, "mem": 64 << 20}}

    # `migrate` without a destination: the most free other host (B); ownership moves in etcd.
    a.cli("migrate", "v1", "--json")
    assert finished(a, "v1")["status"] == "completed"
    runs_on(b, "v1")
    assert vm_state(a, "v1") is None
    record = etcd_get(etcd, "/ferry/vms/v1")
    assert record is not None and (record["owner"], record["generation"]) == ("B", 2)

    # The balancing plan (dry run): only the aggressive level moves the one VM, to the emptiest host.
    # It reads the hosts' records, which each agent rewrites every few seconds: once they show the move.
    wait_for(lambda: (h := hosts(c))["B"]["vms"] == 1 and h["A"]["vms"] == 0, what="the hosts' records updated")
    plan = json.loads(c.cli("balance", "--dry-run", "--threshold", "5", "--json").stdout)
    assert [(m["vm"], m["from"], m["to"]) for m in plan["moves"]] == [("v1", "B", "A")]
    assert json.loads(c.cli("balance", "--dry-run", "--json").stdout)["moves"] == []
    assert etcd_get(etcd, "/ferry/vms/v1")["owner"] == "B"  # type: ignore[index]

    # A frozen past its lease is dead, and gets no placement although it has the most room.
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: hosts(c)["A"]["state"] == "dead", timeout=TTL * 4, what="A shown dead")
        assert c.call("vm-create", name="v2", program="idle", mem="32M")["host"] == "B"
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    wait_for(lambda: hosts(c)["A"]["state"] == "alive", timeout=TTL * 4, what="A registered again")
    assert etcd_get(etcd, "/ferry/vms/v2") is not None
    b.call("vm-destroy", name="v2")
    assert etcd_get(etcd, "/ferry/vms/v2") is None

    # Asked of an agent that does not run it (C), `migrate` goes to the owner's agent (B), and so
    # does the status the CLI follows it by; C itself has no migration of it.
    out = json.loads(c.cli("migrate", "v1", "--to", a.control, "--json").stdout)
    assert out["status"] == "completed", out
    runs_on(a, "v1")
    assert vm_state(b, "v1") is None and vm_state(c, "v1") is None
    record = etcd_get(etcd, "/ferry/vms/v1")
    assert record is not None and (record["owner"], record["generation"]) == ("A", 3)
    assert c.call("migrate-status", name="v1")["status"] == "completed"  # from A, its owner after the move
    assert not [m for m in c.call("migrate-list")["migrations"] if m["vm"] == "v1"]
    a.call("vm-destroy", name="v1")
    gone = c.cli("migrate-status", "v1", check=False)
    assert gone.returncode != 0 and "no migration of VM 'v1'" in gone.stderr, gone


def leader(cluster: EtcdCluster) -> int:
    """Which member is the raft leader."""
    for i, url in enumerate(cluster.endpoints):
        if cluster.procs[i] is None:
            continue
        req = urllib.request.Request(f"{url}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            status = json.loads(r.read())
        if status["leader"] == status["header"]["member_id"]:
            return i
    raise AssertionError("no leader")


@pytest.mark.slow
def test_migrations_complete_when_an_etcd_member_dies(trio: tuple[AgentProc, AgentProc, AgentProc],
                                                      etcd: EtcdCluster) -> None:
    a, b, _ = trio
    names = [f"m{i}" for i in range(3)]
    for name in names:
        a.call("vm-create", name=name, program="counter", mem="32M", host="A")
    doomed = leader(etcd)
    with FaultProxy(migration_target(b)) as proxy:
        # The first migration's COMMIT finds etcd electing a new leader; the others run meanwhile.
        proxy.add(Rule(direction=C2S, msg=Commit, when=BEFORE, action=CALL, callback=lambda: etcd.stop(doomed)))
        a.call("migrate", name=names[0], to=b.control, migration=proxy.address_text)
        for name in names[1:]:
            a.call("migrate", name=name, to=b.control)
        for name in names:
            assert finished(a, name, timeout=90)["status"] == "completed"
    assert etcd.procs[doomed] is None
    for name in names:
        runs_on(b, name)
        record = etcd_get(etcd, f"/ferry/vms/{name}")
        assert record is not None and (record["owner"], record["generation"]) == ("B", 2)
    assert hosts(b)["A"]["state"] == "alive"


@pytest.fixture
def cut_pair(tmp_path: Path, etcd: EtcdCluster) -> Iterator[tuple[AgentProc, AgentProc, EtcdLink]]:
    """Source A reaches etcd through a link the test can cut; destination B directly."""
    key = make_key(tmp_path)
    link = EtcdLink(etcd)
    agents = [start(tmp_path, key, "A", link.urls), start(tmp_path, key, "B", etcd.urls)]
    try:
        yield agents[0], agents[1], link
    finally:
        link.restore()
        for agent in agents:
            agent.stop()
        link.close()
        for agent in agents:
            assert agent.leaked == [], f"agent {agent.name} left processes behind: {agent.leaked}"


def never_two_running(a: AgentProc, b: AgentProc, name: str, seconds: float) -> None:
    """For ``seconds``: the VM never runs on both agents at once."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        states = (vm_state(a, name), vm_state(b, name))
        assert states.count("running") <= 1, states
        time.sleep(0.1)


@pytest.mark.slow
def test_source_cut_from_etcd_at_commit(cut_pair: tuple[AgentProc, AgentProc, EtcdLink],
                                        etcd: EtcdCluster) -> None:
    a, b, link = cut_pair
    a.call("vm-create", name="v", program="counter", mem="32M", host="A")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(direction=C2S, msg=Commit, when=BEFORE, action=CALL, callback=link.cut))
        a.call("migrate", name="v", to=b.control, migration=proxy.address_text)
        wait_for(lambda: vm_state(b, "v") == "running", timeout=30, what="v running on B")
        # B won the transaction and runs it; A cannot see etcd, so it keeps its copy paused.
        never_two_running(a, b, "v", 3.0)
        assert vm_state(a, "v") in ("migrating", "paused")
        link.restore()
        assert finished(a, "v", timeout=30)["status"] == "completed"
    assert vm_state(a, "v") is None
    runs_on(b, "v")
    record = etcd_get(etcd, "/ferry/vms/v")
    assert record is not None and (record["owner"], record["generation"]) == ("B", 2)


@pytest.mark.slow
def test_etcd_gone_at_commit_runs_the_vm_where_etcd_says(trio: tuple[AgentProc, AgentProc, AgentProc],
                                                         etcd: EtcdCluster) -> None:
    a, b, _ = trio
    a.call("vm-create", name="v", program="counter", mem="32M", host="A")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(direction=C2S, msg=Commit, when=BEFORE, action=CALL, callback=etcd.stop_all))
        a.call("migrate", name="v", to=b.control, migration=proxy.address_text)
        wait_for(lambda: all(p is None for p in etcd.procs), timeout=30, what="etcd stopped at COMMIT")
        # Nobody can know who owns the VM: nobody runs it.
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            assert "running" not in (vm_state(a, "v"), vm_state(b, "v"))
            time.sleep(0.1)
        etcd.start_all()
        status = finished(a, "v", timeout=90)["status"]
    record = etcd_get(etcd, "/ferry/vms/v")
    assert record is not None
    owner, other = (b, a) if record["owner"] == "B" else (a, b)
    wait_for(lambda: vm_state(owner, "v") == "running", timeout=30, what=f"v running on {owner.name}")
    never_two_running(a, b, "v", 2.0)
    assert vm_state(other, "v") is None
    assert status == ("completed" if owner is b else "failed")


@pytest.mark.slow
def test_maintenance_empties_a_host_and_stops_placements(trio: tuple[AgentProc, AgentProc, AgentProc],
                                                         etcd: EtcdCluster) -> None:
    a, b, c = trio
    names = [f"e{i}" for i in range(6)]  # e0, e1: verify guests, their digests checked after the move
    with unmigrated_verify_digest(4 << 20, VERIFY_ARGS) as reference:
        for name in names:
            if name in ("e0", "e1"):
                a.call("vm-create", name=name, program="verify", mem="4M", args=VERIFY_ARGS, host="A")
            else:
                a.call("vm-create", name=name, program="counter", mem="32M", host="A")
        out = c.cli("host", "maintenance", "A", "on").stdout
        assert "6 moved" in out and "0 cannot move" in out
        assert vm_state(a, names[0]) is None and a.call("vm-list")["vms"] == []
        owners = {}
        for name in names:
            record = etcd_get(etcd, f"/ferry/vms/{name}")
            assert record is not None and record["owner"] in ("B", "C") and record["generation"] == 2
            owners[name] = b if record["owner"] == "B" else c
            if name not in ("e0", "e1"):
                runs_on(owners[name], name)
        for name in ("e0", "e1"):  # each ends with the digest of a run that never moved
            wait_for(lambda n=name: vm_state(owners[n], n) == "halted", timeout=120, what=f"{name} halted")
            console = bytes(owners[name].call("vm-console", name=name)["data"])
            assert digest_line(console) == reference()
    assert hosts(c)["A"]["maintenance"] is True
    assert c.call("vm-create", name="n1", program="idle", mem="32M")["host"] != "A"  # A has the most room
    c.cli("host", "maintenance", "A", "off")
    assert c.call("vm-create", name="n2", program="idle", mem="32M")["host"] == "A"
    assert etcd_get(etcd, "/ferry/migrations/e0") is None  # in flight no more


@pytest.mark.slow
def test_balance_evens_a_skewed_cluster(trio: tuple[AgentProc, AgentProc, AgentProc], etcd: EtcdCluster) -> None:
    a, b, c = trio
    for i in range(4):
        c.call("vm-create", name=f"s{i}", program="counter", mem="48M", host="C")
    plan = json.loads(a.cli("balance", "--json").stdout)
    assert plan["moves"] and plan["after"] < plan["before"]
    assert all(m["from"] == "C" and m["result"] == "completed" for m in plan["moves"])
    for m in plan["moves"]:
        record = etcd_get(etcd, f"/ferry/vms/{m['vm']}")
        assert record is not None and (record["owner"], record["generation"]) == (m["to"], 2)
        runs_on({"A": a, "B": b}[m["to"]], m["vm"])


@pytest.mark.slow
def test_bad_input_same_name_and_mixed_modes(tmp_path: Path, etcd: EtcdCluster) -> None:
    key = make_key(tmp_path)
    first = start(tmp_path, key, "A", etcd.urls)
    plain = start_agent(tmp_path, "P", key)
    try:
        twin = AgentProc(tmp_path / "twin", "A", key, {"etcd": etcd.urls, "etcd_ttl": TTL})
        assert twin.proc.wait(timeout=60) == 1
        assert "another agent named 'A' is registered in etcd" in twin.log()
        # A cluster-mode source and a two-agent destination: refused at setup, the VM runs on.
        first.call("vm-create", name="v", program="counter", mem="32M")
        r = first.cli("migrate", "v", "--to", plain.control, check=False)
        assert r.returncode == 1 and "the source is in cluster mode (--etcd) and this agent is not" in r.stderr
        runs_on(first, "v")
        # Two-agent mode needs a destination.
        plain.call("vm-create", name="w", program="idle", mem="16M")
        r = plain.cli("migrate", "w", check=False)
        assert r.returncode == 1 and "no destination" in r.stderr
    finally:
        for agent in (first, plain):
            agent.stop()
