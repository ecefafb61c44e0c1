"""Maintenance mode: a host taken out of placement and emptied by live migration.

`ferry host maintenance HOST on` sets the host's `maintenance` flag in its etcd record (placement
skips it from then on) and starts an `Evacuation` on that host's agent: every VM there is
migrated to the host placement picks for it (agent/cluster/placement.py, this host left out, the
moves already started counted), at most `per_host` at once from this host (2, as KubeVirt's
default) and, cluster-wide, while fewer than `per_cluster` migrations are recorded in flight under
`migrations/` in etcd (5; a best-effort count: two hosts starting at the same moment may pass it by
one). A failed migration is tried again on another host (`retries` times); a VM no host has room
for, or that failed everywhere, stays here and is reported, never lost. `off` returns the host to
service (an evacuation under way starts no new migration).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.cluster import placement
from agent.cluster.kv import StoreError
from agent.cluster.model import HostRecord
from agent.cluster.registry import Registry

PER_HOST = 2
PER_CLUSTER = 5
RETRIES = 1
POLL_S = 0.2
FINAL = ("completed", "failed", "cancelled")

Migrate = Callable[[dict[str, Any]], Awaitable[Any]]  # the `migrate` op (args: name, to)
Status = Callable[[str], dict[str, Any] | None]  # the VM's current or last migration, or None


@dataclass
class Report:
    """An evacuation's progress and outcome (op `host-maintenance-status`)."""

    host: str
    state: str = "evacuating"  # evacuating | done | stopped
    moved: list[dict[str, str]] = field(default_factory=list)  # {vm, to}
    failed: list[dict[str, str]] = field(default_factory=list)  # {vm, error}: they stay on this host
    moving: dict[str, str] = field(default_factory=dict)  # vm -> destination
    waiting: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "state": self.state, "moved": list(self.moved), "failed": list(self.failed),
                "moving": dict(self.moving), "waiting": list(self.waiting)}


class Evacuation:
    """Empties this host (see the module docstring); `run` is its task on the loop."""

    def __init__(self, registry: Registry, migrate: Migrate, status: Status, *, per_host: int = PER_HOST,
                 per_cluster: int = PER_CLUSTER, retries: int = RETRIES) -> None:
        self.registry = registry
        self.migrate = migrate
        self.status = status
        self.per_host = per_host
        self.per_cluster = per_cluster
        self.retries = retries
        self.report = Report(registry.name)
        self.stopped = False
        self._planned: dict[str, tuple[int, int]] = {}  # destination -> (memory, VMs) on their way there

    async def run(self) -> None:
        vms = {vm.name: vm.mem for vm in self.registry.vms.list()}
        self.report.waiting = sorted(vms)
        gate = asyncio.Semaphore(self.per_host)
        await asyncio.gather(*(self._one(name, mem, gate) for name, mem in sorted(vms.items())))
        self.report.state = "stopped" if self.stopped else "done"
        self.registry.log.info("evacuation over", host=self.registry.name, moved=len(self.report.moved),
                               failed=len(self.report.failed))

    async def _one(self, name: str, mem: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.report.waiting.remove(name)
            tried: set[str] = set()
            error = "no other live host has room for it"
            for _ in range(self.retries + 1):
                if self.stopped:
                    error = "maintenance turned off before it moved"
                    break
                try:
                    dest = placement.place(await self._hosts(), mem, exclude={self.registry.name} | tried)
                except StoreError as e:
                    error = f"etcd unreachable: {e}"
                    break
                if dest is None:
                    break
                error = await self._move(name, mem, dest)
                if not error:
                    self.report.moved.append({"vm": name, "to": dest.name})
                    return
                tried.add(dest.name)
            self.report.failed.append({"vm": name, "error": error})
            self.registry.log.warning("evacuation: the VM stays here", vm=name, error=error)

    async def _hosts(self) -> list[HostRecord]:
        """The live hosts, with the moves under way counted on their destinations."""
        entries = await self.registry.kv.get_prefix(self.registry.keys.hosts)
        out = []
        for e in entries:
            h = HostRecord.decode(e.value)
            mem, n = self._planned.get(h.name, (0, 0))
            out.append(HostRecord(h.name, h.control, h.migration, h.mem_total, h.mem_used + mem, h.slots,
                                  h.vms + n, h.cpu, h.maintenance, h.instance))
        return out

    async def _cluster_slot(self) -> None:
        """Wait while the cluster has `per_cluster` migrations in flight (recorded in etcd)."""
        while True:
            if len(await self.registry.kv.get_prefix(self.registry.keys.migrations)) < self.per_cluster:
                return
            await asyncio.sleep(POLL_S * 5)

    async def _move(self, name: str, mem: int, dest: HostRecord) -> str:
        """Migrate ``name`` to ``dest`` and wait for the end; "" when it completed, else why not."""
        key = self.registry.keys.migration(name)
        mem0, n0 = self._planned.get(dest.name, (0, 0))
        self._planned[dest.name] = (mem0 + mem, n0 + 1)
        self.report.moving[name] = dest.name
        try:
            await self._cluster_slot()
            with contextlib.suppress(StoreError):
                await self.registry.kv.put(key, json.dumps({"vm": name, "from": self.registry.name,
                                                            "to": dest.name}).encode(), lease=self.registry.lease)
            try:
                await self.migrate({"name": name, "to": dest.control})
            except Exception as e:  # refused at setup: try elsewhere
                return str(e)
            while True:
                info = self.status(name) or {}
                if info.get("status") in FINAL:
                    break
                await asyncio.sleep(POLL_S)
            return "" if info["status"] == "completed" else str(info.get("error") or info["status"])
        finally:
            self.report.moving.pop(name, None)
            mem1, n1 = self._planned[dest.name]
            self._planned[dest.name] = (mem1 - mem, n1 - 1)
            with contextlib.suppress(StoreError):
                await self.registry.kv.delete(key)
