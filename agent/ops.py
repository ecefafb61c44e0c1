"""The control API operations: what each `op` of a control Request does on this agent.

This module owns the meaning of the control API, independent of sockets: `ControlOps.handle(op, args)`
returns the result of one Request or raises `OpError` with a stable code (proto.errors.ErrorCode).
The transport (agent/control.py) feeds it decoded Requests; the operations are

  agent-info                                   name, version, addresses, free memory, dirty backends
  vm-create  name program mem [args] [program-source] [dirty-tracker] [paused] [nic] [disk]
                                               `nic`: {bridge, [mac], [ip]} (agent/nics.py)
                                               `disk`: {path, [size]} (agent/disks.py)
  vm-list, vm-info name, vm-pause name, vm-resume name, vm-destroy name
  vm-console name [offset]                     buffered console bytes from an offset
  vm-wait    name state [timeout]              returns when the VM reaches the state
  migrate    name to [params] [migration] [in-doubt-timeout]
                                               `to` is the destination's control address; `migration`
                                               overrides the migration address it advertises; a VM
                                               with a NIC takes it along (params nic-map, announce-*)
  vm-announce name [params]                    re-send the VM's RARP/gratuitous ARP rounds (params:
                                               announce-rounds, -initial, -max, -step)
  migrate-status name, migrate-cancel name     routed to the migration engine
  migrate-resolve name action [force]          settle a migration that ended in doubt (action:
                                               resume-here | resumed-on-destination)
  migrate-recover name                         a post-copy paused by a lost link reconnects at once (source)
  vm-move-storage name to                      move a running VM's disk image to `to` (a directory or
                                               a file path) on this host (agent/storage_moves.py)
  vm-move-storage-status name, vm-move-storage-cancel name
                                               its current or last move's report; cancel it
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import ferry_version
from agent.config import format_hostport, parse_hostport, parse_size
from agent.logs import Log
from agent.migration.info import FINAL_STATUSES, MigrationParams, Status
from agent.storage_moves import StorageMoves
from agent.vms import VM, VMError, VMManager
from proto.errors import ErrorCode, ProtocolError
from proto.limits import SUPPORTED_VERSIONS
from vmruntime import dirty

VM_STATES = ("running", "paused", "halted", "faulted", "migrating")
MAX_WAIT = 3600.0  # seconds; vm-wait longer than this is refused, so a connection never hangs forever
DEFAULT_WAIT = 30.0
CONSOLE_CHUNK = 256 * 1024  # most console bytes returned by one vm-console call
_UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "")
RESOLVE_ACTIONS = ("resume-here", "resumed-on-destination")  # migrate-resolve: where the VM lives on
# What an agent still does after SIGTERM: answer queries, and let operators clean up.
WHILE_STOPPING = frozenset({"agent-info", "vm-list", "vm-info", "vm-console", "vm-wait", "migrate-status",
                            "migrate-list", "migrate-cancel", "vm-destroy", "vm-move-storage-status", "vm-move-storage-cancel"})


class OpError(Exception):
    """A control operation failed; `code` is a stable ErrorCode value, the message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


class Migrations(Protocol):
    """The part of agent.migration.MigrationManager the control API uses."""

    async def migrate(self, vm_name: str, dest_migration: tuple[str, int], params: Any,
                      in_doubt_timeout: float | None = None) -> dict[str, Any]: ...
    def info(self, vm_name: str) -> dict[str, Any] | None: ...
    def infos(self) -> list[dict[str, Any]]: ...
    async def cancel(self, vm_name: str) -> None: ...
    async def resolve(self, vm_name: str, resume_here: bool, force: bool = False) -> str: ...
    async def recover(self, vm_name: str) -> str: ...


# Asks another agent's control API for its agent-info (agent.client provides it; tests may fake it).
PeerInfo = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass
class AgentIdentity:
    """What agent-info reports about this agent itself."""

    name: str
    control: tuple[str, int]
    migration: tuple[str, int]
    state_dir: Path
    instance: str = field(default_factory=lambda: os.urandom(8).hex())  # tells this run from any other agent


class ControlOps:
    """The control API of one agent: op name -> coroutine over the VM manager and the migration engine."""

    def __init__(self, *, identity: AgentIdentity, vms: VMManager, migrations: Migrations | None,
                 peer_info: PeerInfo, log: Log) -> None:
        self.identity = identity
        self.vms = vms
        self.migrations = migrations
        self.peer_info = peer_info
        self.log = log
        self.accepting = True  # False after SIGTERM: only read-only ops are served
        self.moves = StorageMoves(vms, log)  # storage moves on this host (`vm-move-storage`)
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "agent-info": self.agent_info,
            "vm-create": self.vm_create,
            "vm-list": self.vm_list,
            "vm-info": self.vm_info,
            "vm-pause": self.vm_pause,
            "vm-resume": self.vm_resume,
            "vm-destroy": self.vm_destroy,
            "vm-console": self.vm_console,
            "vm-wait": self.vm_wait,
            "vm-announce": self.vm_announce,
            "migrate": self.migrate,
            "migrate-status": self.migrate_status,
            "migrate-list": self.migrate_list,
            "migrate-cancel": self.migrate_cancel,
            "migrate-resolve": self.migrate_resolve,
            "migrate-recover": self.migrate_recover,
            "vm-move-storage": self.vm_move_storage,
            "vm-move-storage-status": self.vm_move_storage_status,
            "vm-move-storage-cancel": self.vm_move_storage_cancel,
        }

    def register(self, op: str, handler: Callable[[dict[str, Any]], Awaitable[Any]]) -> Callable[[dict[str, Any]], Awaitable[Any]] | None:
        """Serve ``op`` with ``handler`` (cluster mode's ops, agent/cluster/ops.py); returns the handler it
        replaces, which the new one may call."""
        previous = self._handlers.get(op)
        self._handlers[op] = handler
        return previous

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        """Run one operation; every failure comes out as OpError with a stable code."""
        handler = self._handlers.get(op)
        if handler is None:
            raise OpError(ErrorCode.NOT_FOUND, f"unknown operation {op!r}")
        if not self.accepting and op not in WHILE_STOPPING:
            raise OpError(ErrorCode.BUSY, f"agent {self.identity.name} is shutting down")
        try:
            return await handler(args)
        except OpError:
            raise
        except VMError as e:
            raise OpError(e.code, e.message) from e
        except ProtocolError as e:
            raise OpError(e.code, e.message) from e
        except (KeyError, ValueError, TypeError) as e:
            raise OpError(ErrorCode.BAD_REQUEST, f"{op}: {_reason(e)}") from e

    # -- agent -------------------------------------------------------------------------------------
    async def agent_info(self, args: dict[str, Any]) -> dict[str, Any]:
        ident = self.identity
        return {
            "name": ident.name,
            "instance": ident.instance,
            "version": ferry_version(),
            "protocol-versions": sorted(SUPPORTED_VERSIONS),
            "control": format_hostport(*ident.control),
            "migration": format_hostport(*ident.migration),
            "state-dir": str(ident.state_dir),
            "free-mem": self.vms.free_memory(),
            "max-mem": self.vms.max_mem,
            "dirty-backends": dirty.available_backends(),
            "vms": len(self.vms.list()),
            "pid": os.getpid(),
        }

    # -- VMs ---------------------------------------------------------------------------------------
    async def vm_create(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        program = _str(args, "program")
        mem = parse_size(args.get("mem", "64M"))
        boot_args = {str(k): str(v) for k, v in dict(args.get("args") or {}).items()}
        source = args.get("program-source")
        # The program file is read and written in a worker thread: nothing that blocks runs on the loop.
        path = await asyncio.to_thread(self._store_program, name, program, source) if source is not None else program
        nic = args.get("nic")
        if nic is not None and not isinstance(nic, dict):
            raise OpError(ErrorCode.BAD_REQUEST, "nic must be a map: bridge, and optionally mac and ip")
        disk = args.get("disk")
        if disk is not None and not isinstance(disk, dict):
            raise OpError(ErrorCode.BAD_REQUEST, "disk must be a map: path, and optionally size")
        vm = await self.vms.create(name, path, mem, boot_args, dirty_tracker=args.get("dirty-tracker"),
                                   paused=bool(args.get("paused", False)), nic=nic, disk=disk)
        vm.program = program
        return vm.info()

    def _store_program(self, vm_name: str, program: str, source: Any) -> str:
        """An assembly file sent by the CLI: the file itself if this host has it unchanged (so its
        .include lines resolve), else a copy kept in the state dir (the CLI may be on another host)."""
        if not isinstance(source, str):
            raise OpError(ErrorCode.BAD_REQUEST, "program-source must be text")
        if _same_file(program, source):
            return program
        directory = self.identity.state_dir / "programs"
        directory.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(program).name) or "program"
        path = directory / f"{vm_name}-{stem}"
        path.write_text(source)
        return str(path)

    async def vm_list(self, args: dict[str, Any]) -> dict[str, Any]:
        vms = self.vms.list()
        await asyncio.gather(*(_refresh_quietly(vm) for vm in vms))
        return {"host": self.identity.name, "vms": [vm.info() for vm in vms]}

    async def vm_info(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(_str(args, "name"))
        await _refresh_quietly(vm)
        return vm.info()

    async def vm_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._pause_or_resume(args, "pause", "vm paused")

    async def vm_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._pause_or_resume(args, "resume", "vm resumed")

    async def _pause_or_resume(self, args: dict[str, Any], verb: str, done: str) -> dict[str, Any]:
        vm = self._idle_vm(_str(args, "name"), verb)
        async with vm.lock:
            await (vm.pause() if verb == "pause" else vm.resume())
        vm.log.info(done)
        return vm.info()

    def _idle_vm(self, name: str, verb: str) -> VM:
        """The VM, if an operator may pause or resume it now (not while a migration owns it)."""
        vm = self.vms.get(name)
        if vm.migrating:
            raise OpError(ErrorCode.BUSY, f"cannot {verb} VM {name!r}: it is migrating")
        if vm.storage_move is not None:
            raise OpError(ErrorCode.BUSY, f"cannot {verb} VM {name!r}: it is moving its storage")
        if vm.state in ("halted", "faulted"):
            raise OpError(ErrorCode.BAD_REQUEST, f"cannot {verb} VM {name!r}: it is {vm.state}")
        return vm

    async def vm_destroy(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        vm = self.vms.get(name)
        async with vm.lock:
            await self.vms.destroy(name)
        return {"name": name, "destroyed": True}

    async def vm_console(self, args: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(_str(args, "name"))
        offset = int(args.get("offset", 0))
        data, next_offset, dropped = vm.console.read(max(0, offset))
        if len(data) > CONSOLE_CHUNK:
            data, next_offset = data[:CONSOLE_CHUNK], next_offset - (len(data) - CONSOLE_CHUNK)
        return {"data": data, "offset": next_offset, "dropped": dropped, "total": vm.console.total, "state": vm.state}

    async def vm_wait(self, args: dict[str, Any]) -> dict[str, Any]:
        name, wanted = _str(args, "name"), _str(args, "state")
        if wanted not in VM_STATES:
            raise OpError(ErrorCode.BAD_REQUEST, f"unknown state {wanted!r}: one of {', '.join(VM_STATES)}")
        timeout = min(float(args.get("timeout", DEFAULT_WAIT)), MAX_WAIT)
        deadline = time.monotonic() + timeout
        while True:
            vm = self.vms.get(name)
            await _refresh_quietly(vm)
            if vm.state == wanted:
                return vm.info()
            left = deadline - time.monotonic()
            if left <= 0:
                raise OpError(ErrorCode.TIMEOUT, f"VM {name!r} is {vm.state}, not {wanted}, after {timeout:g} s")
            await _wait_changed(vm, min(left, 0.2))  # also polls: the instruction-driven states need status

    async def vm_announce(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        vm = self.vms.get(name)
        if vm.nic is None:
            raise OpError(ErrorCode.BAD_REQUEST, f"VM {name!r} has no NIC to announce")
        try:
            schedule = MigrationParams.from_dict(dict(args.get("params") or {})).announce()
        except (ValueError, TypeError) as e:
            raise OpError(ErrorCode.BAD_REQUEST, str(e)) from None
        rounds = await self.vms.announce(vm, schedule)
        return {"name": name, "mac": vm.nic.mac, "rounds": rounds}

    # -- migrations ----------------------------------------------------------------------------------
    async def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        vm = self.vms.get(name)  # a clear no-such-vm, busy or incompatible before any network traffic
        if vm.lock.locked():
            raise OpError(ErrorCode.BUSY, f"VM {name!r} is busy (being paused, resumed or destroyed)")
        params = MigrationParams.from_dict(dict(args.get("params") or {}))
        in_doubt = _in_doubt_timeout(args)
        if not args.get("to"):
            raise OpError(ErrorCode.BAD_REQUEST, "no destination: give --to HOST:PORT (only cluster mode picks one)")
        dest = await self._destination(_str(args, "to"))
        if args.get("migration") is not None:
            # Like QEMU's migrate URI: the operator names the path (another network, a relay, or
            # the fault-injection proxy of the tests); `to` still identifies the destination agent.
            dest = parse_hostport(_str(args, "migration"))
        if self.moves.running(name):  # checked after the awaits above: nothing runs between it and the start
            raise OpError(ErrorCode.BUSY, f"VM {name!r} is moving its storage: migrate it once the move is over "
                                          "(or cancel it: ferry vm move-storage-cancel)")
        self.log.info("migration requested", vm=name, to=args["to"], migration=format_hostport(*dest))
        if in_doubt is None:
            return await self._engine().migrate(name, dest, params)
        return await self._engine().migrate(name, dest, params, in_doubt_timeout=in_doubt)

    async def _destination(self, to: str) -> tuple[str, int]:
        """Ask the destination's control API where its migration listener is."""
        host, _ = parse_hostport(to)
        try:
            peer = await self.peer_info(to)
        except OpError:
            raise
        except (TimeoutError, OSError) as e:
            raise OpError(ErrorCode.MIGRATION_FAILED, f"cannot reach destination agent {to}: {_reason(e)}") from e
        if peer.get("instance") == self.identity.instance:
            raise OpError(ErrorCode.BAD_REQUEST, f"{to} is this agent ({self.identity.name}); pick another host")
        if peer.get("name") == self.identity.name:
            raise OpError(ErrorCode.BAD_REQUEST, f"the agent at {to} is also named {self.identity.name!r}; "
                                                 "agent names must be unique")
        mig_host, mig_port = parse_hostport(str(peer["migration"]))
        # A listener on the wildcard address is reachable where its control API was.
        return (host if mig_host in _UNSPECIFIED_HOSTS else mig_host), mig_port

    async def migrate_status(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        info = self._engine().info(name)
        if info is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no migration of VM {name!r} on agent {self.identity.name}")
        return info

    async def migrate_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every VM's current or last migration on this agent (the reports migrate-status gives one by one)."""
        return {"migrations": self._engine().infos()}

    async def migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        engine = self._engine()
        if engine.info(name) is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no migration of VM {name!r} on agent {self.identity.name}")
        await engine.cancel(name)
        self.log.info("migration cancel requested", vm=name)
        return engine.info(name) or {"vm": name}

    async def migrate_resolve(self, args: dict[str, Any]) -> dict[str, Any]:
        name, action = _str(args, "name"), _str(args, "action")
        if action not in RESOLVE_ACTIONS:
            raise OpError(ErrorCode.BAD_REQUEST, f"action must be one of {', '.join(RESOLVE_ACTIONS)}")
        done = await self._engine().resolve(name, action == "resume-here", force=bool(args.get("force")))
        return {"name": name, "resolved": done}

    async def migrate_recover(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        return {"name": name, "recover": await self._engine().recover(name)}

    # -- storage moves (agent/storage_moves.py) ------------------------------------------------------
    async def vm_move_storage(self, args: dict[str, Any]) -> dict[str, Any]:
        name, to = _str(args, "name"), _str(args, "to")
        self.vms.get(name)
        if self.migrations is not None:
            info = self.migrations.info(name)
            if info is not None and Status(info.get("status")) not in FINAL_STATUSES:
                raise OpError(ErrorCode.BUSY, f"VM {name!r} is migrating: move its storage once the migration is over")
        self.log.info("storage move requested", vm=name, to=to)
        return await self.moves.start(name, to)

    async def vm_move_storage_status(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        info = self.moves.info(name)
        if info is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no storage move of VM {name!r} on agent {self.identity.name}")
        return info

    async def vm_move_storage_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _str(args, "name")
        info = await self.moves.cancel(name)
        self.log.info("storage move cancel requested", vm=name)
        return info

    def _engine(self) -> Migrations:
        if self.migrations is None:
            raise OpError(ErrorCode.INTERNAL, f"agent {self.identity.name} has no migration engine")
        return self.migrations


def _in_doubt_timeout(args: dict[str, Any]) -> float | None:
    """How long the source keeps asking a silent destination after COMMIT (seconds), if given."""
    value = args.get("in-doubt-timeout")
    if value is None:
        return None
    seconds = float(value)
    if not 0 < seconds <= MAX_WAIT:
        raise OpError(ErrorCode.BAD_REQUEST, f"in-doubt-timeout must be in (0, {MAX_WAIT:g}] seconds")
    return seconds


def _same_file(path: str, source: str) -> bool:
    try:
        return os.path.isabs(path) and Path(path).read_text() == source
    except (OSError, UnicodeDecodeError):
        return False


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise OpError(ErrorCode.BAD_REQUEST, f"argument {key!r} must be a non-empty string")
    return value


def _reason(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing {e.args[0]!r}" if e.args else "missing key"
    return str(e) or type(e).__name__


async def _refresh_quietly(vm: VM) -> None:
    """Refresh from the VM process; a VM that does not answer keeps its last known figures."""
    try:
        await vm.refresh()
    except (TimeoutError, VMError):
        pass


async def _wait_changed(vm: VM, seconds: float) -> None:
    """Until the VM's state changes, or `seconds` have passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await vm.changed.wait()
