"""Unit tests of agent.ops: operation dispatch, argument checks and the routing of migrations.

The migration engine and the peer agent are fakes here (the end-to-end tests use real ones).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from agent.logs import Log
from agent.ops import AgentIdentity, ControlOps, OpError
from agent.vms import VMManager


class FakeMigrations:
    def __init__(self) -> None:
        self.started: list[tuple[str, tuple[str, int], Any]] = []
        self.cancelled: list[str] = []
        self.infos: dict[str, dict[str, Any]] = {}

    async def migrate(self, vm_name: str, dest_migration: tuple[str, int], params: Any) -> dict[str, Any]:
        self.started.append((vm_name, dest_migration, params))
        self.infos[vm_name] = {"vm": vm_name, "status": "setup"}
        return self.infos[vm_name]

    def info(self, vm_name: str) -> dict[str, Any] | None:
        return self.infos.get(vm_name)

    async def cancel(self, vm_name: str) -> None:
        self.cancelled.append(vm_name)
        self.infos[vm_name]["status"] = "cancelled"


def _ops(tmp_path: Path, peer: dict[str, Any] | Exception) -> tuple[ControlOps, FakeMigrations]:
    async def peer_info(address: str) -> dict[str, Any]:
        if isinstance(peer, Exception):
            raise peer
        return peer

    log = Log("debug", io.StringIO(), agent="A")
    vms = VMManager(agent_name="A", max_mem=1 << 30, log=log)
    migrations = FakeMigrations()
    ident = AgentIdentity("A", ("127.0.0.1", 7700), ("127.0.0.1", 7701), tmp_path)
    return ControlOps(identity=ident, vms=vms, migrations=migrations, peer_info=peer_info, log=log), migrations


def _error(coro: Any) -> OpError:
    with pytest.raises(OpError) as e:
        asyncio.run(coro)
    return e.value


def test_unknown_ops_and_bad_arguments(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path, {})
    assert _error(ops.handle("vm-frobnicate", {})).code == "not-found"
    assert _error(ops.handle("vm-info", {})).code == "bad-request"
    assert _error(ops.handle("vm-info", {"name": 3})).code == "bad-request"
    assert _error(ops.handle("vm-info", {"name": "x"})).message == "no VM named 'x' on agent A"
    assert _error(ops.handle("vm-create", {"name": "x", "program": "idle", "mem": "huge"})).code == "bad-request"
    assert _error(ops.handle("vm-wait", {"name": "x", "state": "asleep"})).code == "bad-request"


def test_shutting_down_refuses_new_work_but_answers_queries(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path, {})
    ops.accepting = False
    err = _error(ops.handle("vm-create", {"name": "x", "program": "idle"}))
    assert err.code == "busy" and "shutting down" in err.message
    assert asyncio.run(ops.handle("vm-list", {}))["vms"] == []
    assert asyncio.run(ops.handle("agent-info", {}))["name"] == "A"


def _with_vm(ops: ControlOps, body: Any) -> Any:
    """Run body() with a real idle VM named c1 on the ops' manager."""

    async def main() -> Any:
        await ops.vms.create("c1", "idle", 4 << 20, {})
        try:
            return await body()
        finally:
            await ops.vms.shutdown()

    return asyncio.run(main())


def test_migrate_asks_the_destination_for_its_migration_address(tmp_path: Path) -> None:
    ops, engine = _ops(tmp_path, {"name": "B", "migration": "0.0.0.0:9901"})
    args = {"name": "c1", "to": "10.1.2.3:9900", "params": {"max-downtime": 50, "auto-converge": True}}
    result = _with_vm(ops, lambda: ops.handle("migrate", args))
    assert result == {"vm": "c1", "status": "setup"}
    name, dest, params = engine.started[0]
    # A wildcard listener is reached at the host of the control address the operator gave.
    assert (name, dest) == ("c1", ("10.1.2.3", 9901))
    assert (params.max_downtime_ms, params.auto_converge) == (50, True)


def test_migrate_keeps_an_explicit_migration_network_address(tmp_path: Path) -> None:
    ops, engine = _ops(tmp_path, {"name": "B", "migration": "192.168.100.2:7701"})
    _with_vm(ops, lambda: ops.handle("migrate", {"name": "c1", "to": "10.1.2.3:7700"}))
    assert engine.started[0][1] == ("192.168.100.2", 7701)


def _refusal(tmp_path: Path, peer: dict[str, Any] | Exception, args: dict[str, Any]) -> OpError:
    ops, engine = _ops(tmp_path, peer)
    err: OpError = _with_vm(ops, lambda: _caught(ops.handle("migrate", args)))
    assert engine.started == []
    return err


def test_migrate_refusals(tmp_path: Path) -> None:
    err = _refusal(tmp_path, {"name": "A", "migration": "127.0.0.1:7701"}, {"name": "c1", "to": "127.0.0.1:7700"})
    assert err.code == "bad-request" and "also named 'A'" in err.message
    err = _refusal(tmp_path, {"name": "B", "migration": "b:2"}, {"name": "c1", "to": "b:1", "params": {"x": 1}})
    assert err.code == "bad-request" and "unknown migration parameter" in err.message
    err = _refusal(tmp_path, ConnectionRefusedError(111, "Connection refused"), {"name": "c1", "to": "b:1"})
    assert err.code == "migration-failed" and "cannot reach destination agent b:1" in err.message


async def _caught(coro: Any) -> OpError:
    try:
        await coro
    except OpError as e:
        return e
    raise AssertionError("no OpError raised")


def test_status_and_cancel_route_to_the_engine(tmp_path: Path) -> None:
    ops, engine = _ops(tmp_path, {})
    assert _error(ops.handle("migrate-status", {"name": "c1"})).code == "not-found"
    assert _error(ops.handle("migrate-cancel", {"name": "c1"})).code == "not-found"
    engine.infos["c1"] = {"vm": "c1", "status": "active"}
    assert asyncio.run(ops.handle("migrate-status", {"name": "c1"}))["status"] == "active"
    assert asyncio.run(ops.handle("migrate-cancel", {"name": "c1"}))["status"] == "cancelled"
    assert engine.cancelled == ["c1"]


def test_console_reads_from_an_offset(tmp_path: Path) -> None:
    ops, _ = _ops(tmp_path, {})

    async def body() -> list[dict[str, Any]]:
        ops.vms.get("c1").console.write(b"hello world")
        return [await ops.handle("vm-console", {"name": "c1", "offset": off}) for off in (0, 6, 11)]

    first, middle, end = _with_vm(ops, body)
    assert (first["data"], first["offset"]) == (b"hello world", 11)
    assert middle["data"] == b"world"
    assert (end["data"], end["offset"]) == (b"", 11)
