"""Unit tests of agent.ops: operation dispatch, argument checks and the routing of migrations.

The migration engine and the peer agent are fakes here (the end-to-end tests use real ones).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
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


Peer = dict[str, Any] | Exception
MakeOps = Callable[[Peer], tuple[ControlOps, FakeMigrations]]


@pytest.fixture
async def make_ops(tmp_path: Path) -> AsyncIterator[MakeOps]:
    """Factory: ``make_ops(peer)``: the control API over a real VM manager, a fake engine and a fake
    peer agent whose agent-info is ``peer`` (or raises it); every VM is stopped afterwards."""
    made: list[ControlOps] = []

    def make(peer: Peer) -> tuple[ControlOps, FakeMigrations]:
        async def peer_info(address: str) -> dict[str, Any]:
            if isinstance(peer, Exception):
                raise peer
            return peer

        log = Log("debug", io.StringIO(), agent="A")
        vms = VMManager(agent_name="A", max_mem=1 << 30, log=log)
        migrations = FakeMigrations()
        ident = AgentIdentity("A", ("127.0.0.1", 7700), ("127.0.0.1", 7701), tmp_path)
        ops = ControlOps(identity=ident, vms=vms, migrations=migrations, peer_info=peer_info, log=log)
        made.append(ops)
        return ops, migrations

    yield make
    for ops in made:
        await ops.vms.shutdown()


async def _error(call: Awaitable[Any]) -> OpError:
    with pytest.raises(OpError) as e:
        await call
    return e.value


async def _with_vm(ops: ControlOps) -> ControlOps:
    """The ops, with a real idle VM named c1 on their manager."""
    await ops.vms.create("c1", "idle", 4 << 20, {})
    return ops


async def test_unknown_ops_and_bad_arguments(make_ops: MakeOps) -> None:
    ops, _ = make_ops({})
    assert (await _error(ops.handle("vm-frobnicate", {}))).code == "not-found"
    assert (await _error(ops.handle("vm-info", {}))).code == "bad-request"
    assert (await _error(ops.handle("vm-info", {"name": 3}))).code == "bad-request"
    assert (await _error(ops.handle("vm-info", {"name": "x"}))).message == "no VM named 'x' on agent A"
    assert (await _error(ops.handle("vm-create", {"name": "x", "program": "idle", "mem": "huge"}))).code == "bad-request"
    assert (await _error(ops.handle("vm-wait", {"name": "x", "state": "asleep"}))).code == "bad-request"


async def test_shutting_down_refuses_new_work_but_answers_queries(make_ops: MakeOps) -> None:
    ops, _ = make_ops({})
    ops.accepting = False
    err = await _error(ops.handle("vm-create", {"name": "x", "program": "idle"}))
    assert err.code == "busy" and "shutting down" in err.message
    assert (await ops.handle("vm-list", {}))["vms"] == []
    assert (await ops.handle("agent-info", {}))["name"] == "A"


async def test_pause_and_resume_are_refused_while_migrating_and_logged_otherwise(make_ops: MakeOps) -> None:
    ops = await _with_vm(make_ops({})[0])
    log = io.StringIO()
    ops.vms.get("c1").log = Log("debug", log, vm="c1")
    assert (await ops.handle("vm-pause", {"name": "c1"}))["state"] == "paused"
    assert (await ops.handle("vm-resume", {"name": "c1"}))["state"] == "running"
    assert 'msg="vm paused"' in log.getvalue() and 'msg="vm resumed"' in log.getvalue()
    await ops.vms.get("c1").begin_migration()
    for op in ("vm-pause", "vm-resume"):
        err = await _error(ops.handle(op, {"name": "c1"}))
        assert err.code == "busy" and "migrating" in err.message
    await ops.vms.get("c1").end_migration("running")


async def test_migrate_asks_the_destination_for_its_migration_address(make_ops: MakeOps) -> None:
    ops, engine = make_ops({"name": "B", "migration": "0.0.0.0:9901"})
    await _with_vm(ops)
    args = {"name": "c1", "to": "10.1.2.3:9900", "params": {"max-downtime": 50, "auto-converge": True}}
    result = await ops.handle("migrate", args)
    assert result == {"vm": "c1", "status": "setup"}
    name, dest, params = engine.started[0]
    # A wildcard listener is reached at the host of the control address the operator gave.
    assert (name, dest) == ("c1", ("10.1.2.3", 9901))
    assert (params.max_downtime_ms, params.auto_converge) == (50, True)


async def test_migrate_keeps_an_explicit_migration_network_address(make_ops: MakeOps) -> None:
    ops, engine = make_ops({"name": "B", "migration": "192.168.100.2:7701"})
    await _with_vm(ops)
    await ops.handle("migrate", {"name": "c1", "to": "10.1.2.3:7700"})
    assert engine.started[0][1] == ("192.168.100.2", 7701)


async def _refusal(make_ops: MakeOps, peer: Peer, args: dict[str, Any]) -> OpError:
    ops, engine = make_ops(peer)
    await _with_vm(ops)
    err = await _error(ops.handle("migrate", args))
    assert engine.started == []
    return err


async def test_migrate_refusals(make_ops: MakeOps) -> None:
    err = await _refusal(make_ops, {"name": "A", "migration": "127.0.0.1:7701"}, {"name": "c1", "to": "127.0.0.1:7700"})
    assert err.code == "bad-request" and "also named 'A'" in err.message
    err = await _refusal(make_ops, {"name": "B", "migration": "b:2"}, {"name": "c1", "to": "b:1", "params": {"x": 1}})
    assert err.code == "bad-request" and "unknown migration parameter" in err.message
    err = await _refusal(make_ops, ConnectionRefusedError(111, "Connection refused"), {"name": "c1", "to": "b:1"})
    assert err.code == "migration-failed" and "cannot reach destination agent b:1" in err.message


async def test_status_and_cancel_route_to_the_engine(make_ops: MakeOps) -> None:
    ops, engine = make_ops({})
    assert (await _error(ops.handle("migrate-status", {"name": "c1"}))).code == "not-found"
    assert (await _error(ops.handle("migrate-cancel", {"name": "c1"}))).code == "not-found"
    engine.infos["c1"] = {"vm": "c1", "status": "active"}
    assert (await ops.handle("migrate-status", {"name": "c1"}))["status"] == "active"
    assert (await ops.handle("migrate-cancel", {"name": "c1"}))["status"] == "cancelled"
    assert engine.cancelled == ["c1"]


async def test_console_reads_from_an_offset(make_ops: MakeOps) -> None:
    ops = await _with_vm(make_ops({})[0])
    ops.vms.get("c1").console.write(b"hello world")
    first, middle, end = [await ops.handle("vm-console", {"name": "c1", "offset": off}) for off in (0, 6, 11)]
    assert (first["data"], first["offset"]) == (b"hello world", 11)
    assert middle["data"] == b"world"
    assert (end["data"], end["offset"]) == (b"", 11)
