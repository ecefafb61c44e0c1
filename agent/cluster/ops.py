"""Cluster mode's control API: the ops it adds and the ones it wraps (agent/ops.py serves them).

* `cluster-hosts`: every host of the cluster (agent/cluster/registry.py `hosts`), asked of any agent;
* `vm-create` without `host`: placed on the host with the most free capacity that fits it
  (agent/cluster/placement.py) and created there (forwarded to that agent when it is another);
  with `host`, created there. The VM's etcd record is written before it boots, and removed again
  when the create fails;
* `vm-destroy`: the VM's etcd record goes with it;
* `migrate` without `to`: the destination is placed the same way (this host left out). A VM
  another live host owns is forwarded to that host's agent, as are `migrate-status` and
  `migrate-cancel` for a VM this agent neither runs nor has a migration of, so the operator may ask
  any agent of the cluster (one hop: a forwarded call is never forwarded again);
* `host-maintenance` (`host`, `on`) and `host-maintenance-status` (`host`): maintenance mode and
  the evacuation it starts (agent/cluster/evacuate.py), forwarded to that host's agent. The flag is
  kept in etcd: an agent that starts in maintenance empties its host again (`ClusterMode.start`);
* `cluster-balance` (`threshold`, `dry-run`): a balancing plan (agent/cluster/balance.py), and
  unless `dry-run` its moves, one at a time, each asked of the VM's owner.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from agent.cluster import balance, placement
from agent.cluster.evacuate import FINAL, POLL_S, Evacuation
from agent.cluster.kv import StoreError
from agent.cluster.model import HostRecord, VMRecord
from agent.cluster.registry import Registry
from agent.config import parse_size
from agent.ops import ControlOps, OpError
from proto.errors import ErrorCode

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
FORWARDED = "forwarded-by"  # the args entry naming the agent that forwarded a call (never forwarded again)
# Calls op on the agent at a control address (agent.client through the daemon, with its key and TLS).
CallPeer = Callable[[str, str, dict[str, Any]], Awaitable[Any]]


class ClusterOps:
    """The control ops of an agent in cluster mode, over its `Registry`."""

    def __init__(self, registry: Registry, ops: ControlOps, call_peer: CallPeer) -> None:
        self.registry = registry
        self.ops = ops
        self.call_peer = call_peer
        self._create: Handler | None = None
        self._destroy: Handler | None = None
        self._migrate: Handler | None = None
        self._status: Handler | None = None
        self._cancel: Handler | None = None
        self._evacuation: Evacuation | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        self._create = self.ops.register("vm-create", self.vm_create)
        self._destroy = self.ops.register("vm-destroy", self.vm_destroy)
        self._migrate = self.ops.register("migrate", self.migrate)
        self._status = self.ops.register("migrate-status", self.migrate_status)
        self._cancel = self.ops.register("migrate-cancel", self.migrate_cancel)
        self.ops.register("cluster-hosts", self.hosts)
        self.ops.register("host-maintenance", self.host_maintenance)
        self.ops.register("host-maintenance-status", self.host_maintenance_status)
        self.ops.register("cluster-balance", self.balance)

    async def _live_hosts(self) -> list[HostRecord]:
        try:
            entries = await self.registry.kv.get_prefix(self.registry.keys.hosts)
        except StoreError as e:
            raise OpError(ErrorCode.INTERNAL, f"etcd unreachable: {e}") from e
        return [HostRecord.decode(e.value) for e in entries]

    async def hosts(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            rows = await self.registry.hosts()
        except StoreError as e:
            raise OpError(ErrorCode.INTERNAL, f"etcd unreachable: {e}") from e
        return {"via": self.registry.name, "hosts": rows}

    async def vm_create(self, args: dict[str, Any]) -> Any:
        assert self._create is not None
        name, mem = str(args.get("name") or ""), _mem(args)
        hosts = await self._live_hosts()
        host = args.get("host")
        if not host:
            chosen = placement.place(hosts, mem)
            if chosen is None:
                raise OpError(ErrorCode.INSUFFICIENT_MEMORY,
                              f"no live host has {mem} bytes of guest memory and a VM slot free (ferry hosts)")
            host = chosen.name
        if host != self.registry.name:
            target = next((h for h in hosts if h.name == host), None)
            if target is None:
                raise OpError(ErrorCode.NOT_FOUND, f"no live host named {host!r} (ferry hosts)")
            return await self.call_peer(target.control, "vm-create", {**args, "host": host})
        spec = {"program": str(args.get("program", "")), "args": dict(args.get("args") or {}), "mem": mem}
        try:
            await self.registry.vm_created(name, spec)
        except ValueError as e:
            raise OpError(ErrorCode.VM_EXISTS, str(e)) from e
        except StoreError as e:
            raise OpError(ErrorCode.INTERNAL, f"etcd unreachable: the VM is not created: {e}") from e
        try:
            info = await self._create(args)
        except BaseException:
            with contextlib.suppress(StoreError):
                await self.registry.vm_destroyed(name)
            raise
        await self.registry.refresh()
        return info

    async def vm_destroy(self, args: dict[str, Any]) -> Any:
        assert self._destroy is not None
        result = await self._destroy(args)
        try:
            await self.registry.vm_destroyed(str(args.get("name")))
        except StoreError as e:  # the VM is gone here; its record names this host until etcd is back
            self.registry.log.warning("etcd: the destroyed VM's record stays", vm=args.get("name"), error=str(e))
        await self.registry.refresh()
        return result

    async def _owner_elsewhere(self, name: str) -> tuple[str, str | None] | None:
        """The host etcd names the owner of VM ``name`` and its control address (None: dead), when
        that is another host; None when it is this one, nobody, or etcd cannot say."""
        with contextlib.suppress(StoreError):
            owner = await self.registry.vm_owner(name)
            if owner is not None and owner != self.registry.name:
                return owner, next((h.control for h in await self._live_hosts() if h.name == owner), None)
        return None

    async def _forwarded(self, op: str, args: dict[str, Any]) -> Any:
        """``op`` for a VM not on this host, asked of its owner's agent; NO_SUCH_VM when its owner is
        dead, None when no other host owns it (or this call was forwarded already)."""
        name = str(args.get("name") or "")
        if args.get(FORWARDED) or name in {vm.name for vm in self.ops.vms.list()}:
            return None
        found = await self._owner_elsewhere(name)
        if found is None:
            return None
        owner, control = found
        if control is None:
            raise OpError(ErrorCode.NO_SUCH_VM, f"VM {name!r} runs on host {owner!r}, which is dead (ferry hosts)")
        return await self.call_peer(control, op, {**args, FORWARDED: self.registry.name})

    async def migrate(self, args: dict[str, Any]) -> Any:
        assert self._migrate is not None
        name = str(args.get("name") or "")
        local = {vm.name: vm for vm in self.ops.vms.list()}
        if name not in local:
            forwarded = await self._forwarded("migrate", args)
            return forwarded if forwarded is not None else await self._migrate(args)
        if not args.get("to"):
            chosen = placement.place(await self._live_hosts(), local[name].mem, exclude={self.registry.name})
            if chosen is None:
                raise OpError(ErrorCode.INSUFFICIENT_MEMORY,
                              f"no other live host has room for VM {name!r} (ferry hosts)")
            args = {**args, "to": chosen.control}
        return await self._migrate(args)

    async def migrate_status(self, args: dict[str, Any]) -> Any:
        return await self._here_or_owner("migrate-status", self._status, args)

    async def migrate_cancel(self, args: dict[str, Any]) -> Any:
        return await self._here_or_owner("migrate-cancel", self._cancel, args)

    async def _here_or_owner(self, op: str, here: Handler | None, args: dict[str, Any]) -> Any:
        """This agent's answer; for a migration it has no record of, the VM's owner's."""
        assert here is not None
        try:
            return await here(args)
        except OpError as e:
            if e.code != ErrorCode.NOT_FOUND:
                raise
            forwarded = await self._forwarded(op, args)
            if forwarded is None:
                raise
            return forwarded

    # -- maintenance and balancing ------------------------------------------------------------------------
    async def _forward(self, host: str, op: str, args: dict[str, Any]) -> Any:
        target = next((h for h in await self._live_hosts() if h.name == host), None)
        if target is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no live host named {host!r} (ferry hosts)")
        return await self.call_peer(target.control, op, args)

    def _maintenance(self) -> dict[str, Any]:
        ev = self._evacuation
        return {"host": self.registry.name, "maintenance": self.registry.maintenance,
                "vms": [vm.name for vm in self.ops.vms.list()], "evacuation": None if ev is None else ev.report.to_dict()}

    async def host_maintenance(self, args: dict[str, Any]) -> dict[str, Any]:
        host, on = str(args.get("host") or ""), bool(args.get("on"))
        if host != self.registry.name:
            return dict(await self._forward(host, "host-maintenance", {"host": host, "on": on}))
        try:
            await self.registry.set_maintenance(on)
        except StoreError as e:
            raise OpError(ErrorCode.INTERNAL, f"etcd unreachable: maintenance not changed: {e}") from e
        if on:
            self.evacuate()
        elif self._evacuation is not None:
            self._evacuation.stopped = True
        self.registry.log.info("maintenance", on=on)
        return self._maintenance()

    def evacuate(self) -> None:
        """Start emptying this host, unless an evacuation is under way already."""
        if self._evacuation is not None and self._evacuation.report.state == "evacuating":
            return
        assert self._migrate is not None and self.ops.migrations is not None
        limits = self.registry.settings
        self._evacuation = Evacuation(self.registry, self._migrate, self.ops.migrations.info,
                                      per_host=limits.per_host, per_cluster=limits.per_cluster)
        task = asyncio.create_task(self._evacuation.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def host_maintenance_status(self, args: dict[str, Any]) -> dict[str, Any]:
        host = str(args.get("host") or self.registry.name)
        if host != self.registry.name:
            return dict(await self._forward(host, "host-maintenance-status", {"host": host}))
        return self._maintenance()

    async def balance(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            threshold = int(args.get("threshold", 3))
            hosts = await self._live_hosts()
            records = [VMRecord.decode(e.value) for e in await self.registry.kv.get_prefix(self.registry.keys.vms)]
            vms = [balance.PlacedVM(r.name, int(r.spec.get("mem", 0)), r.owner) for r in records if r is not None]
            got = await asyncio.to_thread(balance.plan, hosts, vms, threshold)  # off the loop: see balancer.py
        except ValueError as e:
            raise OpError(ErrorCode.BAD_REQUEST, str(e)) from e
        except StoreError as e:
            raise OpError(ErrorCode.INTERNAL, f"etcd unreachable: {e}") from e
        moves: list[dict[str, Any]] = [{"vm": m.vm, "mem": m.mem, "from": m.source, "to": m.destination}
                                       for m in got.moves]
        result: dict[str, Any] = {"threshold": threshold, "before": round(got.before, 4), "after": round(got.after, 4),
                                  "load-before": got.load_before, "load-after": got.load_after, "moves": moves,
                                  "dry-run": bool(args.get("dry-run"))}
        if not args.get("dry-run"):
            controls = {h.name: h.control for h in hosts}
            for move in moves:  # one at a time: within every host's and the cluster's limits
                move["result"] = await self.execute(controls[str(move["from"])], str(move["vm"]),
                                                     controls[str(move["to"])])
        return result

    async def execute(self, source: str, vm: str, dest: str) -> str:
        """One move of a plan, asked of the VM's owner; its final status (or why it did not start)."""
        try:
            await self.call_peer(source, "migrate", {"name": vm, "to": dest})
            while True:
                info = await self.call_peer(source, "migrate-status", {"name": vm})
                if info["status"] in FINAL:
                    break
                await asyncio.sleep(POLL_S)
        except OpError as e:
            return f"failed: {e.message}"
        return str(info["status"]) + (f": {info['error']}" if info.get("error") else "")


def _mem(args: dict[str, Any]) -> int:
    try:
        return parse_size(args.get("mem", "64M"))
    except ValueError as e:
        raise OpError(ErrorCode.BAD_REQUEST, f"mem: {e}") from e
