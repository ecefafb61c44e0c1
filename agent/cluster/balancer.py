"""The agent-side balancing loop (`--balance-interval S`): a balancing plan every S seconds, executed.

One agent of the cluster runs a pass at a time: a pass starts by creating `balancer` in etcd on a
lease of its own (compare-and-swap on "the key does not exist"), kept alive while the pass runs and
revoked at its end; an agent that finds the key taken skips this round, and a holder that dies
frees it when its lease expires. A pass computes the plan of agent/cluster/balance.py over the
VMs not held, and runs its moves at most `per_host` at once out of any one host and while the
cluster has fewer than `per_cluster` migrations in flight (the same limits as an evacuation, the
same `migrations/` records). Hysteresis: a VM the loop moved is written under `balanced/` on a
lease of `hold` seconds, and left out of every plan until that lease has expired, so a VM is not
moved back and forth however the load swings; and a plan only moves while it lowers the load's
deviation by balance.py's MIN_GAIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from agent.cluster import balance
from agent.cluster.kv import StoreError
from agent.cluster.model import HostRecord, VMRecord
from agent.cluster.registry import Registry

# Runs one move (source control address, VM, destination control address); its final status.
Execute = Callable[[str, str, str], Awaitable[str]]
CLUSTER_POLL_S = 1.0


def eligible(vms: Iterable[balance.PlacedVM], held: set[str]) -> list[balance.PlacedVM]:
    """The VMs a plan may move: those the loop has not moved within the hold."""
    return [vm for vm in vms if vm.name not in held]


def held_names(keys: Iterable[str], prefix: str) -> set[str]:
    """The VM names of the `balanced/` keys read under ``prefix``."""
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


class BalanceLoop:
    """See the module docstring; `run` is its task on the loop, `once` one pass."""

    def __init__(self, registry: Registry, execute: Execute, *, interval: float, hold: float, per_host: int,
                 per_cluster: int, threshold: int = 3) -> None:
        self.registry = registry
        self.execute = execute
        self.interval = interval
        self.hold = hold
        self.per_host = per_host
        self.per_cluster = per_cluster
        self.threshold = threshold
        self.passes = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.registry.maintenance:
                continue  # a host being emptied leaves balancing to the others
            try:
                await self.once()
            except StoreError as e:
                self.registry.log.warning("balancing pass skipped: etcd unreachable", error=str(e))

    async def once(self) -> list[dict[str, Any]] | None:
        """One pass; its moves with their results, None when another agent holds the balancer key."""
        kv, keys = self.registry.kv, self.registry.keys
        lease = await kv.grant(self.registry.settings.ttl_s)
        try:
            if not await kv.swap(keys.balancer, 0, self.registry.name.encode(), lease=lease):
                return None
            keeper = asyncio.create_task(self._keep(lease))
            try:
                return await self._pass()
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
        finally:
            with contextlib.suppress(StoreError):
                await kv.revoke(lease)

    async def _keep(self, lease: int) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.registry.settings.ttl_s / 3))
            with contextlib.suppress(StoreError):
                await self.registry.kv.keepalive(lease)

    async def _pass(self) -> list[dict[str, Any]]:
        kv, keys = self.registry.kv, self.registry.keys
        hosts = [HostRecord.decode(e.value) for e in await kv.get_prefix(keys.hosts)]
        records = [VMRecord.decode(e.value) for e in await kv.get_prefix(keys.vms)]
        held = held_names((e.key for e in await kv.get_prefix(keys.held)), keys.held)
        vms = [balance.PlacedVM(r.name, int(r.spec.get("mem", 0)), r.owner) for r in records if r is not None]
        # Off the loop: a plan for a large cluster takes a fraction of a second (docs/PERFORMANCE.md).
        plan = await asyncio.to_thread(balance.plan, hosts, eligible(vms, held), self.threshold)
        self.passes += 1
        if not plan.moves:
            return []
        self.registry.log.info("balancing", moves=len(plan.moves), before=round(plan.before, 4),
                               after=round(plan.after, 4))
        controls = {h.name: h.control for h in hosts}
        gates = {m.source: asyncio.Semaphore(self.per_host) for m in plan.moves}
        results = await asyncio.gather(*(self._move(m, controls, gates[m.source]) for m in plan.moves))
        return [{"vm": m.vm, "from": m.source, "to": m.destination, "result": r} for m, r in zip(plan.moves, results, strict=True)]

    async def _cluster_slot(self) -> None:
        """Wait while the cluster has `per_cluster` migrations in flight (recorded in etcd)."""
        while True:
            if len(await self.registry.kv.get_prefix(self.registry.keys.migrations)) < self.per_cluster:
                return
            await asyncio.sleep(CLUSTER_POLL_S)

    async def _move(self, move: balance.Move, controls: dict[str, str], gate: asyncio.Semaphore) -> str:
        kv, keys = self.registry.kv, self.registry.keys
        async with gate:
            await self._cluster_slot()
            await kv.put(keys.migration(move.vm), json.dumps({"vm": move.vm, "from": move.source,
                                                              "to": move.destination}).encode(),
                         lease=self.registry.lease)
            try:
                result = await self.execute(controls[move.source], move.vm, controls[move.destination])
            finally:
                with contextlib.suppress(StoreError):
                    await kv.delete(keys.migration(move.vm))
        if result == "completed" and self.hold > 0:
            with contextlib.suppress(StoreError):
                await kv.put(keys.held + move.vm, move.destination.encode(),
                             lease=await kv.grant(max(1, math.ceil(self.hold))))
        return result
