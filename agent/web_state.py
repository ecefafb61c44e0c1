"""What the web console shows of an agent: one snapshot of its state, and the peers it knows.

This module owns the console's snapshot (docs/CONTRACTS.md, "Web console"): this agent's
`agent-info`, the peers it knows, every VM's `vm info` and every migration's `migrate-status` object,
the same JSON the control API returns (agent/ops.py, agent/migration/info.py). It reads only
in-memory state: a snapshot never asks a VM process or another agent anything.

The peers of a two-agent setup are the agents this one asked for their agent-info (every outgoing
migration asks its destination: `PeerBook.remember` wraps that call) and the sources of incoming
migrations, known by the name they gave.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

PeerInfo = Callable[[str], Awaitable[dict[str, Any]]]
PEER_FIELDS = ("name", "instance", "version", "control", "migration", "free-mem", "max-mem", "vms")


class PeerBook:
    """The other agents this agent has talked to, by control address."""

    def __init__(self) -> None:
        self.known: dict[str, dict[str, Any]] = {}

    def remember(self, peer_info: PeerInfo) -> PeerInfo:
        """``peer_info`` that also notes each answer (the agent's destination look-up)."""

        async def asking(address: str) -> dict[str, Any]:
            info = await peer_info(address)
            self.note(address, info)
            return info

        return asking

    def note(self, address: str, info: dict[str, Any]) -> None:
        entry = {k: info[k] for k in PEER_FIELDS if k in info}
        entry["address"] = address
        entry["seen"] = round(time.time())
        self.known[address] = entry

    def listed(self, migrations: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Known peers, then the sources of incoming migrations not known otherwise (by name)."""
        peers = sorted(self.known.values(), key=lambda p: str(p.get("name", "")))
        names = {p.get("name") for p in peers}
        for mig in migrations:
            name = mig.get("peer")
            if mig.get("direction") == "in" and name and name not in names:
                names.add(name)
                peers.append({"name": name, "address": None, "seen": None, "via": "incoming migration"})
        return peers


class AgentState:
    """The snapshot source of one agent's console (the daemon wires its parts in)."""

    def __init__(self, *, agent_info: Callable[[], Awaitable[dict[str, Any]]], vms: Any, migrations: Any,
                 peers: PeerBook, actions: bool) -> None:
        self.agent_info = agent_info
        self.vms = vms
        self.migrations = migrations
        self.peers = peers
        self.actions = actions  # a token is configured: the page may offer actions

    def changes(self) -> list[asyncio.Event]:
        """The events set when a VM's state changes next (each VM's `changed`)."""
        return [vm.changed for vm in self.vms.list()]

    async def snapshot(self) -> dict[str, Any]:
        migrations = self.migrations.infos() if self.migrations is not None else []
        return {
            "agent": await self.agent_info(),
            "peers": self.peers.listed(migrations),
            "vms": [vm.info() for vm in self.vms.list()],
            "migrations": migrations,
            "actions": self.actions,
        }
