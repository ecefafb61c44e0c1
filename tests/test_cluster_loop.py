"""Cluster mode on a real etcd (tests/etcd.py), the long runs: the agent-side balancing loop evens a
skewed cluster and then leaves it be; an agent killed (kill -9) while its host is evacuated comes
back on its state dir with its VMs, still in maintenance (the flag is kept in etcd), no VM runs twice,
and it goes on emptying its host."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cluster.evacuate import FINAL
from tests.agents import AgentProc, make_key, wait_for
from tests.etcd import EtcdCluster, etcd_cluster
from tests.test_cluster import etcd_get, start, vm_state

MEMS = (("A", "768M"), ("B", "512M"), ("C", "256M"))


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from etcd_cluster(tmp_path)


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()
        for agent in started:
            assert agent.leaked == [], f"agent {agent.name} left processes behind: {agent.leaked}"


def running_on(agents: list[AgentProc], name: str) -> list[str]:
    """The agents where VM ``name`` is running."""
    return [a.name for a in agents if a.returncode is None and vm_state(a, name) == "running"]


def generations(cluster: EtcdCluster, names: list[str]) -> dict[str, tuple[str, int]]:
    out = {}
    for name in names:
        record = etcd_get(cluster, f"/ferry/vms/{name}")
        assert record is not None
        out[name] = (record["owner"], record["generation"])
    return out


@pytest.mark.slow
def test_the_balancing_loop_evens_a_skewed_cluster_then_moves_nothing(
        tmp_path: Path, etcd: EtcdCluster, agents: list[AgentProc]) -> None:
    key = make_key(tmp_path)
    for name, mem in MEMS:
        agents.append(start(tmp_path, key, name, etcd.urls, max_mem=mem, balance_interval=1, balance_hold=2))
    a, b, c = agents
    names = [f"s{i}" for i in range(4)]
    for name in names:
        c.call("vm-create", name=name, program="counter", mem="48M", host="C")

    def even() -> bool:
        owners = {o for o, _ in generations(etcd, names).values()}
        return len(owners) > 1 and a.call("cluster-balance", **{"dry-run": True})["moves"] == []
    wait_for(even, timeout=120, interval=0.5, what="the loop evened the cluster")
    wait_for(lambda: etcd_get(etcd, "/ferry/migrations/s0") is None and all(
        etcd_get(etcd, f"/ferry/migrations/{n}") is None for n in names), timeout=60, what="no move in flight")
    before = generations(etcd, names)
    assert any(g == 2 for _, g in before.values())
    for name, (owner, _) in before.items():
        assert running_on(agents, name) == [owner]
    # Passes go on (the hold of 2 s runs out meanwhile): an even cluster sees no move.
    time.sleep(6)
    assert generations(etcd, names) == before
    logs = "".join(x.log() for x in agents)
    assert "balancing" in logs


@pytest.mark.slow
def test_an_agent_killed_during_evacuation_readopts_and_maintenance_finishes(
        tmp_path: Path, etcd: EtcdCluster, agents: list[AgentProc]) -> None:
    key = make_key(tmp_path)
    for name, mem in MEMS:
        agents.append(start(tmp_path, key, name, etcd.urls, max_mem=mem))
    a, b, c = agents
    names = [f"k{i}" for i in range(6)]
    for name in names:
        a.call("vm-create", name=name, program="counter", mem="32M", host="A")
    a.cli("host", "maintenance", "A", "on", "--no-wait")

    def mid_evacuation() -> bool:
        moving = [m for m in a.call("migrate-list")["migrations"] if m["status"] not in FINAL]
        return bool(moving) and any(running_on([b, c], n) for n in names)
    # Killed with one VM moved and another on its way out.
    wait_for(mid_evacuation, timeout=60, interval=0.02, what="a VM moved and another moving")
    a.stop(signal.SIGKILL, keep_vms=True)
    assert a.leaked == []

    again = start(tmp_path, key, "A", etcd.urls, max_mem="768M")  # same state dir: it re-adopts
    agents.append(again)
    live = [again, b, c]
    # The flag is kept in etcd: the restarted agent is in maintenance and goes on emptying its host.
    assert etcd_get(etcd, "/ferry/maintenance/A") is not None
    wait_for(lambda: again.call("host-maintenance-status", host="A")["maintenance"], timeout=30,
             what="the restarted agent in maintenance (once registered in etcd)")

    def settled() -> dict[str, Any] | None:
        owners = generations(etcd, names)
        where = {n: running_on(live, n) for n in names}
        return where if all(where[n] == [owners[n][0]] for n in names) else None
    wait_for(settled, timeout=90, interval=0.5, what="every VM running once, where etcd says")

    def over() -> bool:
        return again.call("host-maintenance-status", host="A")["evacuation"]["state"] != "evacuating"
    wait_for(over, timeout=120, interval=0.5, what="the evacuation the restart resumed is over")
    if again.call("vm-list")["vms"]:  # a VM still in doubt when it started could not move then
        out = again.cli("host", "maintenance", "A", "on").stdout
        assert "0 cannot move" in out, out
    assert again.call("vm-list")["vms"] == []
    for name in names:
        owner = generations(etcd, names)[name][0]
        assert owner in ("B", "C") and running_on(live, name) == [owner]
    again.cli("host", "maintenance", "A", "off")
    assert etcd_get(etcd, "/ferry/maintenance/A") is None
    assert again.call("host-maintenance-status", host="A")["maintenance"] is False
