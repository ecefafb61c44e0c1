"""The agent-side balancing loop's decisions on an in-memory store (tests/fake_kv.py): the balancer
key as a lock, the per-host and per-cluster limits, the hold that keeps a moved VM put; and the
settable evacuation and balancing limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.cluster.balance import PlacedVM
from agent.cluster.balancer import BalanceLoop, eligible, held_names
from agent.cluster.model import HostRecord, Keys, VMRecord
from agent.cluster.registry import Registry
from agent.cluster.settings import DEFAULT_PER_CLUSTER, DEFAULT_PER_HOST, ClusterSettings, resolve
from tests.fake_kv import FakeKV
from tests.test_cluster_unit import Log, VMs

MiB = 1 << 20
KEYS = Keys("/ferry")


def test_limits_are_settings_with_kubevirts_defaults() -> None:
    s = resolve({"etcd": "http://a:1"})
    assert s is not None and (s.per_host, s.per_cluster) == (DEFAULT_PER_HOST, DEFAULT_PER_CLUSTER) == (2, 5)
    assert s.balance_interval == 0 and s.balance_hold == 0
    s = resolve({"etcd": "http://a:1", "evacuate-per-host": "3", "evacuate-per-cluster": 9, "balance-interval": "2.5"})
    assert s is not None and (s.per_host, s.per_cluster, s.balance_interval, s.balance_hold) == (3, 9, 2.5, 25.0)
    s = resolve({"etcd": "http://a:1", "balance-interval": 5, "balance-hold": "7"})
    assert s is not None and s.balance_hold == 7.0
    assert s.describe()["evacuate-per-host"] == 2 and s.describe()["balance-interval"] == 5
    for bad, why in (({"evacuate-per-host": "0"}, "evacuate-per-host: must be 1..64"),
                     ({"evacuate-per-cluster": "x"}, "evacuate-per-cluster: not a whole number"),
                     ({"balance-interval": "-1"}, "balance-interval: must be"),
                     ({"balance-hold": "soon"}, "balance-hold: not a number")):
        with pytest.raises(ValueError, match=why):
            resolve({"etcd": "http://a:1", **bad})


def test_held_vms_are_left_out_of_the_plan() -> None:
    vms = [PlacedVM("a", 1, "X"), PlacedVM("b", 1, "X")]
    held = held_names(["/ferry/balanced/a", "/ferry/other/b"], KEYS.held)
    assert held == {"a"} and eligible(vms, held) == [vms[1]]


class Cluster:
    """Hosts and VM records in a FakeKV, and an `execute` that moves a VM's record and load."""

    def __init__(self, kv: FakeKV, load: dict[str, list[str]]) -> None:
        self.kv = kv
        self.owner = {vm: h for h, names in load.items() for vm in names}
        self.hosts = list(load)
        self.running: dict[str, int] = {}  # source -> moves out of it at once
        self.most: dict[str, int] = {}
        self.done: list[str] = []

    async def write(self) -> None:
        for h in self.hosts:
            mine = [vm for vm, o in self.owner.items() if o == h]
            rec = HostRecord(h, f"{h}:1", f"{h}:2", 512 * MiB, 64 * MiB * len(mine), 32, len(mine), 0.0)
            await self.kv.put(KEYS.host(h), rec.encode())
        for vm, h in self.owner.items():
            await self.kv.put(KEYS.vm(vm), VMRecord(vm, h, 1, {"mem": 64 * MiB}).encode())

    async def execute(self, source: str, vm: str, dest: str) -> str:
        src = source.split(":")[0]
        self.running[src] = self.running.get(src, 0) + 1
        self.most[src] = max(self.most.get(src, 0), self.running[src])
        await asyncio.sleep(0.05)
        self.running[src] -= 1
        self.owner[vm] = dest.split(":")[0]
        self.done.append(vm)
        await self.write()
        return "completed"


def loop(kv: FakeKV, cluster: Cluster, name: str = "A", **kw: Any) -> BalanceLoop:
    settings = ClusterSettings(endpoints=("http://x:1",), ttl_s=2)
    reg = Registry(settings, kv, name=name, control=f"{name}:1", migration=f"{name}:2", vms=VMs(), log=Log(),
                   instance=name + "-run")
    args: dict[str, Any] = {"interval": 1.0, "hold": 10.0, "per_host": 2, "per_cluster": 5, **kw}
    return BalanceLoop(reg, cluster.execute, **args)


async def test_a_pass_evens_a_skewed_cluster_within_the_limits_and_holds_what_it_moved() -> None:
    kv = FakeKV()
    cluster = Cluster(kv, {"A": [], "B": [], "C": [f"v{i}" for i in range(6)]})
    await cluster.write()
    first = loop(kv, cluster, per_host=1)
    moves = await first.once()
    assert moves and all(m["from"] == "C" and m["result"] == "completed" for m in moves)
    assert cluster.most == {"C": 1}  # one at a time out of C, as per_host says
    assert {m["to"] for m in moves} == {"A", "B"}
    assert held_names((e.key for e in await kv.get_prefix(KEYS.held)), KEYS.held) == {m["vm"] for m in moves}
    assert await kv.get_prefix(KEYS.migrations) == [] and await kv.get(KEYS.balancer) is None
    # A second pass moves nothing: the cluster is even, and the moved VMs are held.
    assert await first.once() == []
    # Skewed again the other way: the held VMs stay put, only the others may move.
    moved = {m["vm"] for m in moves}
    for vm in cluster.owner:
        cluster.owner[vm] = "A"
    await cluster.write()
    again = await first.once()
    assert again and not moved & {m["vm"] for m in again}


async def test_the_balancer_key_lets_one_agent_pass_at_a_time() -> None:
    kv = FakeKV()
    cluster = Cluster(kv, {"A": [], "B": [f"v{i}" for i in range(4)]})
    await cluster.write()
    other = await kv.grant(2)
    assert await kv.swap(KEYS.balancer, 0, b"B", lease=other)
    assert await loop(kv, cluster).once() is None and cluster.done == []
    kv.expire(other)  # the holder died: its lease runs out
    assert await loop(kv, cluster).once()


async def test_a_pass_waits_while_the_cluster_has_its_limit_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.cluster.balancer.CLUSTER_POLL_S", 0.05)
    kv = FakeKV()
    cluster = Cluster(kv, {"A": [], "B": [f"v{i}" for i in range(4)]})
    await cluster.write()
    await kv.put(KEYS.migration("elsewhere"), b"{}")
    task = asyncio.create_task(loop(kv, cluster, per_cluster=1).once())
    await asyncio.sleep(0.3)
    assert cluster.done == [] and not task.done()
    await kv.delete(KEYS.migration("elsewhere"))
    assert await asyncio.wait_for(task, 10)
