"""What lets a VM outlive its agent: its process listening in the state dir, and its record there.

Once a VM runs here for good (booted, or restored by a migration) its process is asked to `listen`
on `<state-dir>/vms/NAME.sock`, and the VM is recorded in `<state-dir>/vms/NAME.json`
(agent/records.py); the record is rewritten when the VM's migration phase changes and removed when
the VM stops here. Every write and removal runs in the records' worker thread, in the order asked
(`VMRecords.in_order`): off the loop, and a later record never overtaken by an earlier one.
See docs/RELIABILITY.md "Agent restarts".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from agent.records import VMRecords, process_start_time
from agent.vms.errors import VMError
from agent.vms.vm import VM


class Recorder:
    """The records and attach sockets of one VM manager's VMs (all no-ops without a state dir)."""

    def __init__(self, records: VMRecords | None, listed: Callable[[VM], bool]) -> None:
        self.records = records
        self._listed = listed  # is this VM the one listed under its name (not dropped, not replaced)?

    def socket_path(self, vm: VM) -> str | None:
        """Where the VM process of ``vm`` should listen, or None (no state dir, or it cannot be made)."""
        if self.records is None:
            return None
        try:
            self.records.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            vm.log.warning("vm process cannot outlive the agent", error=str(e))
            return None
        return str(self.records.socket_path(vm.name))

    @staticmethod
    def listening(vm: VM, path: str) -> None:
        """The VM process listens (or will, once restored) at ``path``: note what names it for a restart."""
        vm.socket_path = path
        vm.pid_start = process_start_time(vm.pid)

    async def make_detachable(self, vm: VM) -> None:
        """Let the VM process outlive this agent: it listens on its socket in the state dir.

        Asked only once the VM runs here for good (booted, or restored by a migration): an incoming VM
        process whose agent dies before that still exits with it, leaving nothing behind. Without a
        state dir, or if listening fails, the VM process exits with the agent (logged)."""
        path = self.socket_path(vm)
        if path is None:
            return
        try:
            await vm.channel.request("listen", path=path)
        except VMError as e:
            vm.log.warning("vm process cannot outlive the agent", error=str(e))
            return
        self.listening(vm, path)

    def record(self, vm: VM, origin: str | None = None) -> concurrent.futures.Future[None] | None:
        """The VM runs here now: note it in the state dir, and again whenever its migration phase
        changes. The future is done once the record is on disk (failing that is logged, not an error)."""
        if self.records is None:
            return None
        if origin is not None:
            vm.origin, vm.started = origin, time.time()
        vm.on_record = self.rewrite
        return self.rewrite(vm)

    def rewrite(self, vm: VM) -> concurrent.futures.Future[None] | None:
        """Write the VM's record as it is now (the record hook of every recorded VM)."""
        if self.records is None or not self._listed(vm):
            return None
        record: dict[str, Any] = {
            **vm.info(), "origin": vm.origin, "started": vm.started, "socket": vm.socket_path,
            "pid-start": vm.pid_start, "migration-phase": vm.migration_phase,
            "run-before-migration": vm.run_before, "arrived-by": vm.arrived_by,
            "nic": None if vm.nic is None else vm.nic.to_record(),
            "disk": None if vm.disk is None else vm.disk.to_record(),
            "storage-move": vm.storage_move, "migration-ref": vm.migration_ref,
        }
        return self.records.in_order(self._write, vm, record)

    def _write(self, vm: VM, record: dict[str, Any]) -> None:
        assert self.records is not None
        try:
            self.records.write(record)
        except OSError as e:
            vm.log.warning("cannot write vm record", error=e.strerror or str(e))

    async def forget(self, name: str) -> None:
        """Remove a VM's record and socket file, after any write of it still under way."""
        if self.records is not None:
            await asyncio.wrap_future(self.records.in_order(self.records.remove, name))

    async def read_all(self) -> list[dict[str, Any]]:
        """The records a previous run of the agent left."""
        if self.records is None:
            return []
        return await asyncio.wrap_future(self.records.in_order(self.records.read_all))

