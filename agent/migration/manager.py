"""MigrationManager: migrations in and out of this agent, as the daemon and control API see them.

This module owns the migration listener (a dedicated socket, accepting many
connections at once), the session threads, and the MigrationInfo of every
VM's current or last migration. Each outgoing migration is a
``SourceSession`` and each accepted connection a ``DestinationSession``,
each in its own thread; they reach the VM manager on the event loop through
a ``LoopBridge``. Several migrations run at once (A to B while B to A).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from agent.migration.common import LoopBridge, MigrationError
from agent.migration.destination import DestinationSession, Outcomes
from agent.migration.info import FINAL_STATUSES, MigrationInfo, MigrationParams, Status
from agent.migration.source import IN_DOUBT_TIMEOUT_S, SourceSession
from agent.migration.transport import Connection, prepare_socket
from proto.errors import ErrorCode

# How long migrate() waits for the destination's accept or refusal before
# returning (the CLI gets a clear refusal as an error, not a failed status).
SETUP_WAIT_S = 15.0
# How long cancel() waits for the session to put the VM back.
CANCEL_WAIT_S = 30.0
LISTEN_BACKLOG = 64


class MigrationManager:
    """Outgoing and incoming migrations of one agent (CONTRACTS.md)."""

    def __init__(self, *, agent_name: str, key: bytes, vms: Any, log: Any,
                 in_doubt_timeout: float = IN_DOUBT_TIMEOUT_S) -> None:
        self.agent_name = agent_name
        self.key = key
        self.vms = vms
        self.log = log
        self.in_doubt_timeout = in_doubt_timeout
        self.address: tuple[str, int] | None = None  # the listener's bound address, once serving
        self._infos: dict[str, MigrationInfo] = {}  # vm name -> current or last migration, in or out
        self._outgoing: dict[str, SourceSession] = {}
        self._outcomes = Outcomes()
        self._threads: set[threading.Thread] = set()
        self._serve_task: asyncio.Task[Any] | None = None
        self._accepting = True

    # -- the listener ----------------------------------------------------------------------------------
    async def serve(self, host: str, port: int) -> None:
        """Listen for migrations on (host, port) and accept until cancelled or shut down."""
        loop = asyncio.get_running_loop()
        lsock = socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=False)
        lsock.setblocking(False)
        self._serve_task = asyncio.current_task()
        self.address = lsock.getsockname()[:2]
        self.log.info("migration listener ready", address=f"{self.address[0]}:{self.address[1]}")
        bridge = LoopBridge(loop)
        try:
            while self._accepting:
                conn, peer = await loop.sock_accept(lsock)
                self._accept(conn, bridge)
        finally:
            self._serve_task = None
            lsock.close()

    def _accept(self, sock: socket.socket, bridge: LoopBridge) -> None:
        if not self._accepting:
            sock.close()
            return
        session = DestinationSession(conn=Connection(prepare_socket(sock)), vms=self.vms, key=self.key,
                                     agent_name=self.agent_name, bridge=bridge, outcomes=self._outcomes,
                                     infos=self._infos, log=self.log)
        self._start_thread(session.run, "ferry-migration-in")

    def _start_thread(self, target: Any, name: str) -> threading.Thread:
        t = threading.Thread(target=self._tracked(target), name=name, daemon=True)
        self._threads.add(t)
        t.start()
        return t

    def _tracked(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            finally:
                self._threads.discard(threading.current_thread())
        return run

    # -- outgoing --------------------------------------------------------------------------------------
    async def migrate(self, vm_name: str, dest_migration: tuple[str, int], params: MigrationParams) -> dict[str, Any]:
        """Start migrating ``vm_name``; returns once the destination accepted (or raises its refusal)."""
        vm = self.vms.get(vm_name)
        self._check_can_start(vm_name, vm)
        info = MigrationInfo(vm=vm_name, direction="out", peer=f"{dest_migration[0]}:{dest_migration[1]}",
                             params=params, dirty_tracker=vm.dirty_backend, mem=vm.mem)
        session = SourceSession(vm=vm, vms=self.vms, dest=dest_migration, params=params, key=self.key,
                                agent_name=self.agent_name, bridge=LoopBridge(asyncio.get_running_loop()),
                                info=info, log=self.log, in_doubt_timeout=self.in_doubt_timeout)
        self._infos[vm_name] = info
        self._outgoing[vm_name] = session
        self.log.info("migration starting", vm=vm_name, to=info.peer, params=params.to_dict())
        self._start_thread(lambda: self._run_outgoing(session), "ferry-migration-out")
        await asyncio.to_thread(session.setup_done.wait, SETUP_WAIT_S)
        if info.status in (Status.FAILED, Status.CANCELLED) and not info.rounds:
            raise MigrationError(_setup_code(info), info.error or f"migration of {vm_name} {info.status.value}")
        return info.to_dict()

    def _check_can_start(self, vm_name: str, vm: Any) -> None:
        if not self._accepting:
            raise MigrationError(ErrorCode.BUSY, f"agent {self.agent_name} is shutting down")
        if vm_name in self._outgoing:
            raise MigrationError(ErrorCode.BUSY, f"VM {vm_name!r} is already migrating")
        if vm.state == "migrating":
            raise MigrationError(ErrorCode.BUSY, f"VM {vm_name!r} is busy with a migration")

    def _run_outgoing(self, session: SourceSession) -> None:
        try:
            session.run()
        finally:
            self._outgoing.pop(session.vm.name, None)

    def info(self, vm_name: str) -> dict[str, Any] | None:
        """The current or last migration of ``vm_name`` on this agent (in or out), QEMU names."""
        info = self._infos.get(vm_name)
        return None if info is None else info.to_dict()

    async def cancel(self, vm_name: str) -> None:
        """Cancel the outgoing migration of ``vm_name``; returns when the VM runs here again.

        After COMMIT a cancel cannot apply (the destination may already run
        the VM); the migration then completes or resolves as in doubt.
        """
        session = self._outgoing.get(vm_name)
        if session is None:
            self._cancel_incoming(vm_name)
            return
        if not session.cancel():
            self.log.info("cancel ignored: COMMIT already sent", vm=vm_name)
        await asyncio.to_thread(session.done.wait, CANCEL_WAIT_S)

    def _cancel_incoming(self, vm_name: str) -> None:
        """Cancel on the destination: drop the incoming copy (before COMMIT); the source resumes the VM."""
        for incoming in self._outcomes.live():
            if incoming.info is not None and incoming.info.vm == vm_name and self._outcomes.fence(incoming):
                return
        info = self._infos.get(vm_name)
        if info is not None and info.status in FINAL_STATUSES:
            return  # already over: nothing to cancel
        raise MigrationError(ErrorCode.NOT_FOUND, f"no migration of VM {vm_name!r} to cancel on {self.agent_name}")

    # -- shutdown --------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, cancel outgoing migrations (before COMMIT), fence incoming ones, wait for all."""
        self._accepting = False
        if self._serve_task is not None:
            self._serve_task.cancel()
        for session in list(self._outgoing.values()):
            session.cancel()
        for incoming in self._outcomes.live():
            self._outcomes.fence(incoming)
        for t in list(self._threads):
            await asyncio.to_thread(t.join, CANCEL_WAIT_S)
        self.log.info("migration engine stopped")


def _setup_code(info: MigrationInfo) -> str:
    """The error code of a migration that failed during setup."""
    if info.status is Status.CANCELLED:
        return ErrorCode.CANCELLED
    return info.error_code or ErrorCode.MIGRATION_FAILED


