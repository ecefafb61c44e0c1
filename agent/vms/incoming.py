"""Incoming VMs: guest RAM reserved for a VM arriving by migration, its idle VM process, its start.

The destination's migration session (agent/migration/destination.py) drives these steps through
the loop bridge: reserve (name and memory taken, RAM created, the VM process spawned idle over it,
or the spare taken), prepare (wait until that process answers), lane (a socket the session
restores the VM on), claim at COMMIT (the VM is this host's: listed and recorded before its process
is restored), restored / drop_claimed after the restore, or discard if the migration fails first.
`start` does claim, restore and restored in one call, for callers without a session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.disks import DiskConfig, clash
from agent.nics import NicConfig
from agent.vms.errors import VMError
from agent.vms.ram import close_guest_ram, create_guest_ram, release_guest_ram
from agent.vms.vm import VM, on_disk, written
from agent.vmspec import VMSpec
from proto.errors import ErrorCode
from vmruntime import console_tail
from vmruntime import control as vmctl

if TYPE_CHECKING:
    from agent.vms.manager import VMManager

# The program of a VM that arrived by migration from a source that sent no spec
# (agent/migration/spec_move.py).
MIGRATED_PROGRAM = "(migrated)"


@dataclass
class Incoming:
    """Guest RAM reserved for a VM arriving by migration: the name is taken, nothing runs yet."""

    name: str
    mem: int
    memfd: int
    ram: mmap.mmap
    # The VM process, spawned while pages arrive: a Python process's start-up would otherwise land
    # in the migration's downtime (docs/PERFORMANCE.md section 11).
    spawning: asyncio.Task[VM] | None = field(default=None, repr=False)
    nic: NicConfig | None = None  # the arriving VM's NIC, on this host's bridge and TAP
    disk: DiskConfig | None = None  # the arriving VM's disk: its image on shared storage, as this host names it
    spec: VMSpec | None = None  # how the arriving VM was made (program, arguments), when the source says

    def restore_fields(self) -> dict[str, Any]:
        """The `nic` and `disk` fields of the restore request, for the devices the VM has."""
        fields: dict[str, Any] = {} if self.nic is None else {"nic": self.nic.boot_field()}
        if self.disk is not None:
            fields["disk"] = self.disk.boot_field()
        return fields


class IncomingVMs:
    """The incoming reservations of one VM manager, and the steps that make them VMs of this host."""

    def __init__(self, manager: VMManager) -> None:
        self.manager = manager
        self.reserved: dict[str, Incoming] = {}
        self._releasing: set[asyncio.Task[None]] = set()  # discarded reservations' RAM being unmapped

    def reserve(self, name: str, mem: int, nic: NicConfig | None = None, disk: DiskConfig | None = None,
                spec: VMSpec | None = None) -> Incoming:
        """Take the name and create guest RAM for an arriving VM; its VM process starts idle, nothing runs.
        A NIC whose MAC or TAP name another VM here uses is refused (incompatible), and a disk
        whose image another VM here uses."""
        m = self.manager
        if nic is not None:
            self._check_nic(nic)
        if disk is not None and (reason := clash(disk.path, m.disks_in_use())) is not None:
            raise VMError(ErrorCode.INCOMPATIBLE, f"{reason} on the destination")
        m.claim(name, mem)
        fd, ram = create_guest_ram(name, mem)
        inc = Incoming(name=name, mem=mem, memfd=fd, ram=ram, nic=nic, disk=disk, spec=spec)
        self.reserved[name] = inc
        with contextlib.suppress(RuntimeError):  # no running loop (a synchronous caller): spawn at start
            inc.spawning = asyncio.get_running_loop().create_task(self._spawn(inc))
        m.log.info("incoming reserved", vm=name, mem=mem)
        return inc

    def _check_nic(self, nic: NicConfig) -> None:
        for name, other in sorted(self.manager.nics_in_use().items()):
            if other.mac == nic.mac:
                raise VMError(ErrorCode.INCOMPATIBLE,
                              f"incompatible MAC address on the destination: VM {name} uses {nic.mac}")
            if other.tap == nic.tap:
                raise VMError(ErrorCode.INCOMPATIBLE, f"TAP name {nic.tap} is already used by VM {name}")

    def _spawn(self, inc: Incoming) -> Coroutine[Any, Any, VM]:
        m = self.manager
        program = MIGRATED_PROGRAM if inc.spec is None else inc.spec.program
        return m.spawn(inc.name, inc.mem, inc.memfd, inc.ram, m.backend(None), program, preload=True)

    async def prepare(self, inc: Incoming) -> None:
        """Wait until the incoming VM's process is up (optional: start waits for it anyway)."""
        if inc.spawning is None:
            inc.spawning = asyncio.ensure_future(self._spawn(inc))
        await asyncio.shield(inc.spawning)

    async def start(self, inc: Incoming, state: dict[str, Any], dirty_backend: str | None,
                    paused: bool = False, migration_id: str | None = None) -> VM:
        """Restore the CPU and device state in the VM process over the received RAM, and resume it
        (or leave it paused, as it was on the source): claim, the restore, restored."""
        if self.reserved.get(inc.name) is not inc:
            raise VMError(ErrorCode.BAD_REQUEST, f"no incoming reservation for {inc.name!r}")
        await self.prepare(inc)
        path = self.socket_path(inc)
        vm, saved = self.claim(inc, state, paused, path, migration_id, dirty_backend)
        await written(saved)
        try:
            reply, _ = await vm.channel.request("restore", state=state, paused=paused, listen=path,
                                                **inc.restore_fields())
        except BaseException:
            await self.manager.drop(vm)
            raise
        self.restored(vm, reply)
        return vm

    async def lane(self, inc: Incoming) -> vmctl.Lane:
        """A lane to the incoming VM's (spawned, idle) process, for the session that restores it."""
        await self.prepare(inc)
        assert inc.spawning is not None
        return await inc.spawning.result().open_lane()

    def socket_path(self, inc: Incoming) -> str | None:
        """Where the incoming VM's process will listen once restored (None: it cannot outlive us)."""
        assert inc.spawning is not None and inc.spawning.done()
        return self.manager.recorder.socket_path(inc.spawning.result())

    def claim(self, inc: Incoming, state: dict[str, Any], paused: bool, socket_path: str | None,
              migration_id: str | None = None,
              dirty_backend: str | None = None) -> tuple[VM, concurrent.futures.Future[None]]:
        """COMMIT arrived: the VM is this host's now. Listed and recorded (as listening at
        ``socket_path``, which the restore that goes with the claim asks for) before anyone is told
        it runs here; the caller restores the VM process once the returned future says the record
        is on disk, then calls restored, or drops the VM if the restore fails: a VM process that
        runs is always one a record names (agent/migration/destination.py, _start_vm)."""
        m = self.manager
        if self.reserved.get(inc.name) is not inc or inc.spawning is None or not inc.spawning.done():
            raise VMError(ErrorCode.BAD_REQUEST, f"no ready incoming reservation for {inc.name!r}")
        vm = inc.spawning.result()
        vm.dirty_backend = m.backend(dirty_backend)
        del self.reserved[inc.name]
        m.listed[vm.name] = vm
        vm.instructions = int(state.get("instructions", 0))
        vm._set_run("paused" if paused else "running")
        vm.arrived_by = migration_id
        vm.nic = inc.nic
        vm.disk = inc.disk
        if inc.spec is not None:
            vm.args = dict(inc.spec.args)
        tail = console_tail.parse(state.get(console_tail.KEY))  # the source's console tail and count
        if tail is not None:
            vm.console.seed(*tail)
        if socket_path is not None:
            m.recorder.listening(vm, socket_path)
        # Not waited for here: the loop runs on while the records' thread writes it, and the caller
        # (a session thread) waits for the future before it restores the process.
        saved = on_disk(m.recorder.record(vm, "migration"))
        vm.log.info("vm started from migration", mem=vm.mem, pid=vm.pid, dirty_tracker=vm.dirty_backend)
        return vm, saved

    def restored(self, vm: VM, reply: dict[str, Any]) -> None:
        """The restore's reply: a VM process that could not listen exits with this agent; say so."""
        self.manager.spare.keep_later()
        if vm.socket_path is not None and not reply.get("listening"):
            vm.log.warning("vm process cannot outlive the agent", error=str(reply.get("listen-error")))
            vm.socket_path = vm.pid_start = None
            self.manager.recorder.rewrite(vm)  # in order after the claim's record; nothing waits for it

    async def drop_claimed(self, vm: VM) -> None:
        """A claimed VM whose restore failed: its process goes, its record too."""
        self.manager.spare.keep_later()
        await self.manager.drop(vm)

    def arrived_by(self, name: str, migration_id: str) -> bool:
        """True if VM ``name`` runs here because migration ``migration_id`` committed (an agent
        restarted after that migration's COMMIT re-adopts it: an in-doubt source must hear so)."""
        vm = self.manager.listed.get(name)
        return vm is not None and vm.arrived_by == migration_id

    def discard(self, inc: Incoming) -> None:
        """Give up an incoming VM: its idle VM process is killed, its RAM freed (in a worker thread),
        its name released."""
        if self.reserved.get(inc.name) is inc:
            del self.reserved[inc.name]
        if inc.spawning is not None:
            inc.spawning.add_done_callback(_kill_spawned)  # runs at once if the spawn already finished
        self._release(inc)
        self.manager.log.info("incoming discarded", vm=inc.name)
        self.manager.spare.keep_later()

    def _release(self, inc: Incoming) -> None:
        try:
            task = asyncio.get_running_loop().create_task(release_guest_ram(inc.memfd, inc.ram))
        except RuntimeError:  # no running loop (a synchronous caller): nothing to hold up
            close_guest_ram(inc.memfd, inc.ram)
            return
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def shutdown(self) -> None:
        """Discard every reservation and wait until their RAM is released."""
        for inc in list(self.reserved.values()):
            self.discard(inc)
        await self.released()

    async def released(self) -> None:
        """Wait until the RAM of every discarded reservation is released."""
        await asyncio.gather(*self._releasing, return_exceptions=True)


def _kill_spawned(task: asyncio.Task[VM]) -> None:
    """A discarded incoming VM's process: kill it (the event loop's child watcher reaps it)."""
    if task.cancelled() or task.exception() is not None:
        return
    task.result().kill()
