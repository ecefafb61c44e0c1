"""This agent in the cluster: its host record held by a lease, its VMs' records, the cluster's hosts.

At start the agent takes a lease (TTL `etcd-ttl`) and creates `hosts/NAME` on it; a key already
there under another run's lease means another live agent has this name, and the start fails once
that lease has had its TTL to expire (a crashed previous run of this agent frees it so). Then a
task on the loop refreshes the lease and rewrites the record (load, memory, VMs) every
`update_s`; an agent that was frozen past its TTL (its key gone) takes a new lease and registers
again when it wakes. While etcd cannot be reached the VMs run on as they are; only COMMIT waits
for etcd (agent/cluster/owner.py). On a clean stop the lease is revoked: the host vanishes at once.

VM records: a VM created here is recorded (owner: this host, generation 1) before it boots, so a
name taken anywhere in the cluster is refused; destroyed here, its record goes. VMs re-adopted at
start that etcd does not know are recorded; one etcd says another host owns is logged as a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.cluster.kv import KV, StoreError
from agent.cluster.model import HostRecord, Keys, VMRecord
from agent.cluster.settings import ClusterSettings
from agent.migration.seams import LogLike

DEFAULT_SLOTS = 32  # VMs one host runs at most, for placement
START_WAIT_S = 30.0  # etcd unreachable at start: retry this long, then fail
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ClusterError(Exception):
    """Cluster mode cannot go on: etcd unreachable at start, this agent's name taken."""


class LocalVM(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def mem(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def program(self) -> str: ...

    @property
    def args(self) -> dict[str, str]: ...


class LocalVMs(Protocol):
    """What the registry reads of the VM manager (agent/vms/manager.py)."""

    max_mem: int

    def list(self) -> list[Any]: ...

    def free_memory(self) -> int: ...


def _cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime of each process, in clock ticks (a gone process is left out). Reads /proc."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return out


class Registry:
    """This agent's records in etcd and its view of the cluster's hosts."""

    def __init__(self, settings: ClusterSettings, kv: KV, *, name: str, control: str, migration: str,
                 vms: LocalVMs, log: LogLike, instance: str, slots: int = DEFAULT_SLOTS) -> None:
        self.settings = settings
        self.kv = kv
        self.keys = Keys(settings.prefix)
        self.name = name
        self.control = control
        self.migration = migration
        self.vms = vms
        self.log = log
        self.instance = instance
        self.slots = slots
        self.maintenance = False
        self.lease = 0
        self.seen: set[str] = set()  # hosts seen alive during this run: shown dead once gone
        self._ticks: dict[int, int] = {}
        self._ticks_at = time.monotonic()
        self._cpu = 0.0
        self._task: asyncio.Task[None] | None = None
        self.now: Callable[[], float] = time.monotonic

    # -- the host record ------------------------------------------------------------------------------
    def record(self) -> HostRecord:
        vms = self.vms.list()
        return HostRecord(name=self.name, control=self.control, migration=self.migration,
                          mem_total=self.vms.max_mem, mem_used=self.vms.max_mem - self.vms.free_memory(),
                          slots=self.slots, vms=len(vms), cpu=round(self._cpu, 3), maintenance=self.maintenance,
                          instance=self.instance)

    async def _sample_cpu(self) -> None:
        pids = [vm.pid for vm in self.vms.list() if getattr(vm, "pid", None)]
        ticks = await asyncio.to_thread(_cpu_ticks, pids)
        now = self.now()
        dt = now - self._ticks_at
        if dt > 0:
            used = sum(max(0, t - self._ticks.get(pid, t)) for pid, t in ticks.items())
            self._cpu = used / _CLK_TCK / dt
        self._ticks, self._ticks_at = ticks, now

    async def start(self) -> None:
        """Register (retrying while etcd is unreachable, up to START_WAIT_S); ClusterError when not."""
        deadline = self.now() + START_WAIT_S
        wait = 0.2
        while True:
            try:
                await self._register()
                break
            except ClusterError:
                raise
            except StoreError as e:
                if self.now() >= deadline:
                    raise ClusterError(f"etcd unreachable at {', '.join(self.settings.endpoints)}: {e}") from e
                self.log.warning("etcd: cannot register yet, retrying", error=str(e), retry_s=wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 2.0)
        await self._load_maintenance()
        await self._record_local_vms()
        self._task = asyncio.create_task(self._keep())

    async def _register(self) -> None:
        """Take a lease and create hosts/NAME on it; ClusterError when another live agent has the name
        (its key still there once a lease's TTL has passed)."""
        deadline = self.now() + self.settings.ttl_s + 1
        lease = await self.kv.grant(self.settings.ttl_s)
        key = self.keys.host(self.name)
        while not await self.kv.swap(key, 0, self.record().encode(), lease=lease):
            entry = await self.kv.get(key)
            if entry is None:
                continue
            if self.now() >= deadline:
                await self.kv.revoke(lease)
                other = HostRecord.decode(entry.value)
                raise ClusterError(f"another agent named {self.name!r} is registered in etcd "
                                   f"(control {other.control}); agent names must be unique")
            await asyncio.sleep(0.5)  # a previous run's lease (if it was ours) expires within its TTL
        self.lease = lease
        self.seen.add(self.name)
        self.log.info("etcd: host registered", key=key, lease=f"{lease:x}", ttl=self.settings.ttl_s)

    async def _load_maintenance(self) -> None:
        """Take up the maintenance flag an earlier run of this host set (it outlives the agent)."""
        try:
            self.maintenance = await self.kv.get(self.keys.maintenance(self.name)) is not None
        except StoreError as e:  # registered a moment ago: etcd answers; if not, the next start reads it
            self.log.warning("etcd: the maintenance flag could not be read", error=str(e))
        if self.maintenance:
            self.log.warning("this host is in maintenance (set before the agent started)")
            await self.refresh()

    async def set_maintenance(self, on: bool) -> None:
        """Set or clear this host's maintenance flag in etcd, then in its record; StoreError when
        etcd did not take it (the flag is then unchanged)."""
        key = self.keys.maintenance(self.name)
        if on:
            await self.kv.put(key, b"{}")
        else:
            await self.kv.delete(key)
        self.maintenance = on
        await self.refresh()

    async def _record_local_vms(self) -> None:
        for vm in self.vms.list():
            try:
                await self.vm_created(vm.name, {"program": vm.program, "args": dict(vm.args), "mem": vm.mem})
            except ValueError as e:
                self.log.error("etcd: a VM running here is owned by another host in etcd", vm=vm.name, error=str(e))

    async def _keep(self) -> None:
        """Refresh the lease and the record until stopped; register again after a lost lease."""
        while True:
            await asyncio.sleep(self.settings.update_s)
            try:
                await self._sample_cpu()
                if self.lease == 0 or await self.kv.keepalive(self.lease) <= 0:
                    self.log.warning("etcd: this host's lease expired; registering again")
                    self.lease = 0
                    await self._register()
                await self.kv.put(self.keys.host(self.name), self.record().encode(), lease=self.lease)
            except ClusterError as e:
                self.log.error("etcd: cannot register again", error=str(e))
            except StoreError as e:
                self.log.warning("etcd: host record not refreshed", error=str(e))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lease:
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self.kv.revoke(self.lease), 3.0)
        await self.kv.close()

    async def refresh(self) -> None:
        """Write the host record now (after a VM came or went, or maintenance changed)."""
        if self.lease:
            with contextlib.suppress(StoreError):
                await self.kv.put(self.keys.host(self.name), self.record().encode(), lease=self.lease)

    # -- VM records -----------------------------------------------------------------------------------
    async def vm_created(self, name: str, spec: dict[str, Any]) -> None:
        """Record a VM made here (owner this host, generation 1); ValueError when the cluster
        already has a VM of that name on another host."""
        key = self.keys.vm(name)
        record = VMRecord(name, self.name, 1, spec)
        if await self.kv.swap(key, 0, record.encode()):
            return
        entry = await self.kv.get(key)
        got = None if entry is None else VMRecord.decode(entry.value)
        if got is not None and got.owner == self.name:
            return  # ours already (a re-adopted VM, or a retried create)
        owner = "?" if got is None else got.owner
        raise ValueError(f"VM {name!r} exists in the cluster (owner {owner})")

    async def vm_destroyed(self, name: str) -> None:
        """Delete the VM's record if it still names this host."""
        entry = await self.kv.get(self.keys.vm(name))
        rec = None if entry is None else VMRecord.decode(entry.value)
        if entry is not None and rec is not None and rec.owner == self.name:
            await self.kv.swap(entry.key, entry.mod_revision, None)

    async def vm_owner(self, name: str) -> str | None:
        entry = await self.kv.get(self.keys.vm(name))
        rec = None if entry is None else VMRecord.decode(entry.value)
        return None if rec is None else rec.owner

    # -- the cluster's hosts --------------------------------------------------------------------------
    async def hosts(self) -> list[dict[str, Any]]:
        """Every host: the live ones (their records and lease TTL) and the dead ones (seen alive in
        this run, or named owner of a VM, with no record now)."""
        entries = await self.kv.get_prefix(self.keys.hosts)
        records = [(e, HostRecord.decode(e.value)) for e in entries]
        ttls = await asyncio.gather(*(self.kv.time_to_live(e.lease) for e, _ in records), return_exceptions=True)
        owners: dict[str, int] = {}
        for e in await self.kv.get_prefix(self.keys.vms):
            vm = VMRecord.decode(e.value)
            if vm is not None:
                owners[vm.owner] = owners.get(vm.owner, 0) + 1
        rows = []
        for (_, rec), ttl in zip(records, ttls, strict=True):
            self.seen.add(rec.name)
            rows.append({"name": rec.name, "state": "alive", "vms": rec.vms, "mem-used": rec.mem_used,
                         "mem-free": rec.mem_free, "mem-total": rec.mem_total, "slots": rec.slots,
                         "cpu": rec.cpu, "maintenance": rec.maintenance, "control": rec.control,
                         "migration": rec.migration, "lease-ttl": ttl if isinstance(ttl, int) else None})
        alive = {r["name"] for r in rows}
        for name in sorted((self.seen | set(owners)) - alive):
            rows.append({"name": name, "state": "dead", "vms": owners.get(name, 0), "mem-used": None,
                         "mem-free": None, "mem-total": None, "slots": None, "cpu": None, "maintenance": None,
                         "control": None, "migration": None, "lease-ttl": None})
        return sorted(rows, key=lambda r: r["name"])
