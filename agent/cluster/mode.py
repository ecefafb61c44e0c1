"""An agent's cluster mode, put together: the etcd client, the registry, ownership, the ops.

agent/daemon.py builds one `ClusterMode` when `--etcd` is set (on the running loop), hands its
`ownership` to the migration engine, `install`s its ops on the control API, `start`s it once the
listeners are up (registration: a ClusterError stops the agent) and `stop`s it last.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

from agent.client import ClientError, call_once
from agent.cluster.balancer import BalanceLoop
from agent.cluster.etcd import EtcdGateway
from agent.cluster.ops import ClusterOps
from agent.cluster.owner import EtcdOwnership
from agent.cluster.registry import LocalVMs, Registry
from agent.cluster.settings import ClusterSettings
from agent.config import format_hostport
from agent.migration.seams import LogLike
from agent.ops import ControlOps, OpError

PEER_TIMEOUT_S = 60.0  # a vm-create forwarded to the placed host: it boots the VM before answering


class ClusterMode:
    """Cluster mode of one agent (see the module docstring)."""

    def __init__(self, settings: ClusterSettings, *, name: str, control: tuple[str, int],
                 migration: tuple[str, int], vms: LocalVMs, log: LogLike, instance: str) -> None:
        self.kv = EtcdGateway(settings.endpoints, ssl_context=settings.ssl_context(), user=settings.user,
                              password=settings.password)
        self.registry = Registry(settings, self.kv, name=name, control=format_hostport(*control),
                                 migration=format_hostport(*migration), vms=vms, log=log, instance=instance)
        self.ownership = EtcdOwnership(self.kv, self.registry.keys, name, asyncio.get_running_loop(), log)
        self.balancer: BalanceLoop | None = None
        self.ops: ClusterOps | None = None
        self._balancing: asyncio.Task[None] | None = None

    def install(self, ops: ControlOps, key: bytes, tls: Callable[[], ssl.SSLContext | None]) -> None:
        """Serve cluster mode's ops; other agents are reached with ``key`` and ``tls()``'s client context."""
        name = self.registry.name

        async def call_peer(address: str, op: str, args: dict[str, Any]) -> Any:
            try:
                return await asyncio.wait_for(call_once(address, key, op, args, name=name, tls=tls(), role="agent"),
                                              PEER_TIMEOUT_S)
            except ClientError as e:
                raise OpError(e.code, f"agent {address}: {e.message}") from e

        cluster_ops = ClusterOps(self.registry, ops, call_peer)
        cluster_ops.install()
        self.ops = cluster_ops
        settings = self.registry.settings
        if settings.balance_interval > 0:
            self.balancer = BalanceLoop(self.registry, cluster_ops.execute, interval=settings.balance_interval,
                                        hold=settings.balance_hold, per_host=settings.per_host,
                                        per_cluster=settings.per_cluster)

    async def start(self) -> None:
        await self.registry.start()
        if self.registry.maintenance and self.ops is not None:
            self.ops.evacuate()  # in maintenance before this start: the host is emptied again
        if self.balancer is not None:
            self._balancing = asyncio.create_task(self.balancer.run())

    def stopping(self) -> None:
        """The agent stops: ownership waits for etcd end (an in-doubt VM stays paused)."""
        self.ownership.stopping.set()

    async def stop(self) -> None:
        if self._balancing is not None:
            self._balancing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._balancing
        await self.registry.stop()
