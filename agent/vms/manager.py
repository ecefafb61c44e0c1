"""The VM manager: the VMs of this host by name, their capacity, and their creation and end.

`VMManager` is the one object the agent daemon, the control API and the migration engine hold
(docs/CONTRACTS.md lists the surface the engine uses). It owns the table of VMs and the memory
accounting; the rest is done by helpers holding a reference to it: `Recorder` (agent/vms/recording.py:
attach sockets and records), `SpareKeeper` (agent/vms/spare.py), `IncomingVMs`
(agent/vms/incoming.py) and `Adopter` (agent/vms/adopt.py), whose public steps the manager offers
as thin delegates under the names the engine and the daemon call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent import disks, nics
from agent.announce import Schedule, announce_frames, send_rounds
from agent.logs import Log
from agent.records import VMRecords
from agent.vms.adopt import Adopter
from agent.vms.errors import NoSuchVM, VMError, check_name
from agent.vms.incoming import Incoming, IncomingVMs
from agent.vms.process import VMProcess, kill_quietly
from agent.vms.ram import PAGE_SIZE, create_guest_ram, release_guest_ram
from agent.vms.recording import Recorder
from agent.vms.spare import SpareKeeper
from agent.vms.vm import VM, written
from agent.vmspec import VMSpec
from proto.errors import ErrorCode
from vmruntime import control as vmctl
from vmruntime import dirty
from vmruntime.asm import AsmError
from vmruntime.diskimage import remove_created
from vmruntime.programs import load_program

# An incoming VM process waits idle while pages arrive, then restores inside the migration's downtime.
# vmproc imports the machine lazily on restore; this entry imports it up front instead and then runs
# vmproc's main() with the same arguments as `python -m vmruntime.vmproc`.
_PRELOAD_VMPROC = "import sys, vmruntime.machine, vmruntime.vmproc; sys.exit(vmruntime.vmproc.main(sys.argv[1:]))"


class VMManager:
    """The VMs of this host and the guest memory reserved for incoming migrations."""

    def __init__(self, *, agent_name: str, max_mem: int, dirty_tracker: str = "auto", log: Log | None = None,
                 records: VMRecords | None = None, spare: bool = False, disk_dirs: Sequence[Path] = ()) -> None:
        """``spare``: keep one VM process started ahead of need for incoming migrations
        (keep_spare(); the agent daemon does, library users and unit tests need not).
        ``disk_dirs``: where disk images may live, the first for relative paths (agent/disks.py)."""
        self.agent_name = agent_name
        self.records = records
        self.max_mem = max_mem
        self.dirty_tracker = dirty_tracker
        self.log = log or Log(agent=agent_name)
        self.listed: dict[str, VM] = {}  # the VMs of this host, by name
        self._creating: dict[str, int] = {}  # names being created -> mem, so two creates cannot race
        self._creating_nics: dict[str, nics.NicConfig] = {}  # the NICs of those, once checked
        self._creating_disks: dict[str, disks.DiskConfig] = {}  # and their disks
        self.disk_dirs = tuple(disk_dirs)
        self.accepting = True  # False once the agent is shutting down
        self.recorder = Recorder(records, lambda vm: self.listed.get(vm.name) is vm)
        self.spare = SpareKeeper(enabled=spare, accepting=lambda: self.accepting, log=self.log)
        self.incoming = IncomingVMs(self)
        self.adopter = Adopter(self)
        self._announcing: set[asyncio.Task[int]] = set()  # announces after a migration, running

    # -- lookup and capacity -----------------------------------------------------------------------
    def get(self, name: str) -> VM:
        vm = self.listed.get(name)
        if vm is None:
            raise NoSuchVM(name, self.agent_name)
        return vm

    def list(self) -> list[VM]:
        return sorted(self.listed.values(), key=lambda vm: vm.name)

    def free_memory(self) -> int:
        used = sum(vm.mem for vm in self.listed.values()) + sum(i.mem for i in self.incoming.reserved.values())
        return max(0, self.max_mem - used - sum(self._creating.values()))

    def claim(self, name: str, mem: int) -> None:
        """Check the name and capacity for a new VM (created or incoming); raises VMError."""
        if not self.accepting:
            raise VMError(ErrorCode.BUSY, f"agent {self.agent_name} is shutting down")
        check_name(name)
        if name in self.listed or name in self.incoming.reserved or name in self._creating:
            raise VMError(ErrorCode.VM_EXISTS, f"a VM named {name!r} already exists on agent {self.agent_name}")
        if mem <= 0 or mem % PAGE_SIZE:
            raise VMError(ErrorCode.BAD_REQUEST, f"guest memory must be a positive multiple of {PAGE_SIZE}, not {mem}")
        if mem > self.free_memory():
            raise VMError(ErrorCode.INSUFFICIENT_MEMORY, f"not enough memory on agent {self.agent_name}: "
                                                         f"{mem} bytes asked, {self.free_memory()} free")

    def hold_name(self, name: str, mem: int, held: bool = True) -> None:
        """Keep ``name`` and its memory taken for a VM not listed yet (a post-copy taken up after a
        restart: agent/migration/postcopy_readopt.py), or (``held`` False) let them go."""
        if held:
            self._creating[name] = mem
        else:
            self._creating.pop(name, None)

    def backend(self, preferred: str | None) -> str:
        """The dirty-tracking backend a VM gets: `preferred`, else the agent's, as this kernel allows."""
        try:
            return dirty.choose_backend(preferred or self.dirty_tracker)
        except ValueError as e:
            raise VMError(ErrorCode.BAD_REQUEST, str(e)) from e

    # -- create ------------------------------------------------------------------------------------
    async def create(self, name: str, program: str, mem: int, args: dict[str, str],
                     dirty_tracker: str | None = None, paused: bool = False,
                     nic: Mapping[str, Any] | None = None, disk: Mapping[str, Any] | None = None) -> VM:
        """Create guest RAM, spawn the VM process, boot the program; the VM runs when this returns.

        ``nic``: the control API's `nic` map (agent/nics.py), ``disk`` its `disk` map (agent/disks.py),
        both checked before any process starts. An image created here for a VM whose creation then
        fails is removed: a failed create leaves no file that was not there before."""
        self.claim(name, mem)
        self._creating[name] = mem
        created: str | None = None
        try:
            try:
                config = await self._nic_for(name, nic) if nic is not None else None
                try:
                    image, boot_args = load_program(program, nics.boot_args(program, args, config))
                except (ValueError, OSError, AsmError) as e:
                    raise VMError(ErrorCode.BAD_REQUEST, f"program {program!r}: {e}") from e
                backend = self.backend(dirty_tracker)
                disk_config, created = await self._disk_for(name, disk) if disk is not None else (None, None)
                fd, ram = create_guest_ram(name, mem)
                try:
                    vm = await self.spawn(name, mem, fd, ram, backend, program)
                except BaseException:
                    await release_guest_ram(fd, ram)
                    raise
                vm.nic, vm.disk, vm.args = config, disk_config, dict(args)
            finally:
                del self._creating[name]
                self._creating_nics.pop(name, None)
                self._creating_disks.pop(name, None)
            return await self._boot(vm, image, boot_args, paused)
        except BaseException:
            if created is not None:
                await asyncio.to_thread(remove_created, created)
            raise

    def disks_in_use(self) -> dict[str, disks.DiskConfig]:
        """VM name -> disk of every VM here: listed or being created."""
        used = {n: vm.disk for n, vm in self.listed.items() if vm.disk is not None}
        used.update(self._creating_disks)
        return used

    async def _disk_for(self, name: str, request: Mapping[str, Any]) -> tuple[disks.DiskConfig, str | None]:
        """The disk of a VM being created and the image's path if it was created now: allowed, not
        another VM's here (kept in `_creating_disks` until the VM is listed), the image created or
        checked off the loop (a file system). The VM process's lock refuses any other user."""
        try:
            config, made = await asyncio.to_thread(disks.prepare, request, self.disk_dirs, self.disks_in_use())
        except disks.DiskError as e:
            raise VMError(ErrorCode.BAD_REQUEST, f"cannot give VM {name!r} a disk: {e}") from e
        reason = disks.clash(config.path, self.disks_in_use())  # again: another create may have taken it meanwhile
        if reason is not None:
            # Even an image this create made is left alone: the VM that took it meanwhile uses it now.
            raise VMError(ErrorCode.BAD_REQUEST, f"cannot give VM {name!r} a disk: {reason}")
        self._creating_disks[name] = config
        return config, config.path if made else None

    def nics_in_use(self) -> dict[str, nics.NicConfig]:
        """VM name -> NIC of every VM here: listed, being created, or arriving by migration."""
        used = {n: vm.nic for n, vm in self.listed.items() if vm.nic is not None}
        used.update({n: inc.nic for n, inc in self.incoming.reserved.items() if inc.nic is not None})
        used.update(self._creating_nics)
        return used

    async def _nic_for(self, name: str, request: Mapping[str, Any]) -> nics.NicConfig:
        """The NIC of a VM being created: checked, unique among this agent's VMs (kept in
        `_creating_nics` until the VM is listed, so two creates cannot take one MAC), and its
        bridge there and its TAP name free on this host (asked off the loop: /sys is a file system)."""
        try:
            config = nics.make_config(self.agent_name, name, request)
        except nics.NicError as e:
            raise VMError(ErrorCode.BAD_REQUEST, str(e)) from e
        reason = nics.clash(config, self.nics_in_use())
        if reason is not None:
            raise VMError(ErrorCode.BAD_REQUEST, f"cannot give VM {name!r} a NIC: {reason} on agent {self.agent_name}")
        self._creating_nics[name] = config
        reason = await asyncio.to_thread(nics.host_refusal, config)
        if reason is not None:
            raise VMError(ErrorCode.BAD_REQUEST, f"cannot give VM {name!r} a NIC: {reason}")
        return config

    async def _boot(self, vm: VM, image: Any, boot_args: dict[str, int], paused: bool) -> VM:
        self.listed[vm.name] = vm
        fields: dict[str, Any] = {} if vm.nic is None else {"nic": vm.nic.boot_field()}
        if vm.disk is not None:
            fields["disk"] = vm.disk.boot_field()
        try:
            await vm.channel.request("boot", image=vmctl.image_fields(image), args=boot_args, paused=paused,
                                     **fields)
        except BaseException:
            await self.drop(vm)
            raise
        vm._set_run("paused" if paused else "running")
        await self.recorder.make_detachable(vm)
        await written(self.recorder.record(vm, "created"))
        vm.log.info("vm created", mem=vm.mem, program=vm.program, pid=vm.pid, dirty_tracker=vm.dirty_backend)
        return vm

    async def spawn(self, name: str, mem: int, fd: int, ram: mmap.mmap, backend: str, program: str,
                    preload: bool = False) -> VM:
        """A VM process over guest RAM `fd` (`preload`: an incoming VM's, the spare if there is one)."""
        parent, child = vmctl.socketpair()
        try:
            # on-eof "exit": a VM process whose agent died exits rather than running on unmanaged.
            proc: VMProcess | None = self.spare.take(fd, mem, child) if preload else None
            if proc is None:
                argv = vmctl.vmproc_argv(fd, mem, child.fileno(), on_eof="exit")
                if preload:
                    argv = [sys.executable, "-c", _PRELOAD_VMPROC, *argv[3:]]
                proc = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=(fd, child.fileno()), stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the child has its copy; ours would keep the socket open after the child dies
        vm = VM(name=name, mem=mem, memfd=fd, ram=ram, pid=proc.pid, dirty_backend=backend, program=program,
                host=self.agent_name, process=proc, log=self.log.bind(vm=name))
        vm.connect(parent)
        if preload:
            # An incoming VM's process is ready only once it answers: a fresh interpreter's start-up
            # and imports would otherwise be spent inside the downtime by the restore at COMMIT
            # (docs/PERFORMANCE.md section 11).
            try:
                await vm.channel.request("status")
            except BaseException:
                kill_quietly(proc)
                vm.channel.close()
                raise
        return vm

    def keep_spare(self) -> None:
        """Start a spare VM process unless one is there or starting (needs the running loop)."""
        self.spare.keep()

    # -- destroy -----------------------------------------------------------------------------------
    async def destroy(self, name: str) -> None:
        vm = self.get(name)
        if vm.migrating:
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is migrating; cancel the migration first")
        if vm.storage_move is not None:
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is moving its storage; cancel the move first "
                                          "(ferry vm move-storage-cancel)")
        await self.drop(vm)
        vm.log.info("vm destroyed")

    async def remove_migrated(self, name: str) -> None:
        """Source side after commit: the VM runs elsewhere now; stop its process and free its RAM."""
        vm = self.get(name)
        vm.migrating = False
        await self.drop(vm)
        vm.log.info("vm removed after migration")

    async def drop(self, vm: VM) -> None:
        """Stop the process and free the memory of a VM, and forget it (its record too)."""
        try:
            await vm.stop_process()
        finally:
            if self.listed.get(vm.name) is vm:
                del self.listed[vm.name]
                await self.recorder.forget(vm.name)
            await vm.release_ram()

    # -- re-adoption after an agent restart (agent/vms/adopt.py) ------------------------------------
    async def adopt_previous(self, skip: Collection[str] = ()) -> int:
        """Take over the VMs a previous run of this agent left running (but ``skip``); returns how many."""
        return await self.adopter.adopt_previous(skip)

    async def adopt(self, rec: dict[str, Any]) -> VM:
        """Re-attach the VM process of one record (AdoptError, VMError, OSError... if it cannot be)."""
        return await self.adopter.adopt(rec)

    # -- incoming migrations (agent/vms/incoming.py; docs/CONTRACTS.md) -------------------------------
    def reserve_incoming(self, name: str, mem: int, nic: nics.NicConfig | None = None,
                         disk: disks.DiskConfig | None = None, spec: VMSpec | None = None) -> Incoming:
        return self.incoming.reserve(name, mem, nic, disk, spec)

    def allowed_disk_dirs(self) -> tuple[Path, ...]:
        """Where this agent's disk images may live (agent/disks.py)."""
        return self.disk_dirs

    async def prepare_incoming(self, inc: Incoming) -> None:
        await self.incoming.prepare(inc)

    async def start_incoming(self, inc: Incoming, state: dict[str, Any], dirty_backend: str | None,
                             paused: bool = False, migration_id: str | None = None) -> VM:
        return await self.incoming.start(inc, state, dirty_backend, paused, migration_id)

    async def incoming_lane(self, inc: Incoming) -> vmctl.Lane:
        return await self.incoming.lane(inc)

    def incoming_socket_path(self, inc: Incoming) -> str | None:
        return self.incoming.socket_path(inc)

    def claim_incoming(self, inc: Incoming, state: dict[str, Any], paused: bool, socket_path: str | None,
                       migration_id: str | None = None,
                       dirty_backend: str | None = None) -> tuple[VM, concurrent.futures.Future[None]]:
        return self.incoming.claim(inc, state, paused, socket_path, migration_id, dirty_backend)

    def incoming_restored(self, vm: VM, reply: dict[str, Any]) -> None:
        self.incoming.restored(vm, reply)

    async def drop_claimed(self, vm: VM) -> None:
        await self.incoming.drop_claimed(vm)

    def arrived_by(self, name: str, migration_id: str) -> bool:
        return self.incoming.arrived_by(name, migration_id)

    def discard_incoming(self, inc: Incoming) -> None:
        self.incoming.discard(inc)

    # -- telling the network where a VM is (agent/announce.py) ---------------------------------------
    async def announce(self, vm: VM, schedule: Schedule) -> int:
        """Send the VM's RARP (and gratuitous ARP) rounds through its VM process onto its TAP;
        the rounds sent. Sleeps between rounds, never blocks the loop."""
        if vm.nic is None:
            return 0
        nic = vm.nic

        async def send(frames: list[bytes]) -> None:
            await vm.channel.request("nic-send", frames=frames)

        rounds = await send_rounds(send, announce_frames(nic.mac, nic.ip), schedule)
        vm.log.info("vm announced", mac=nic.mac, tap=nic.tap, rounds=rounds)
        return rounds

    def announce_incoming(self, vm: VM, schedule: Schedule) -> None:
        """Start announcing a VM that just arrived by migration; returns at once (RESUMED is sent)."""
        task = asyncio.get_running_loop().create_task(self._announce_quietly(vm, schedule))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce_quietly(self, vm: VM, schedule: Schedule) -> int:
        try:
            return await self.announce(vm, schedule)
        except Exception as e:  # the VM went meanwhile (destroyed, migrated on): nothing to announce
            vm.log.warning("vm announce failed", error=str(e))
            return 0

    # -- shutdown ----------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """The agent is exiting: VMs that can outlive it run on (the next agent run re-adopts them),
        any other VM process is stopped; all of this agent's guest RAM mappings are released."""
        self.accepting = False
        for task in list(self._announcing):
            task.cancel()
        for vm in list(self.listed.values()):
            if vm.socket_path is not None and vm.connected:
                await self._leave_running(vm)
                continue
            with contextlib.suppress(Exception):
                await self.drop(vm)
            vm.log.info("vm stopped at agent shutdown")
        await self.incoming.shutdown()
        await self.spare.shutdown()

    async def _leave_running(self, vm: VM) -> None:
        """Let go of a VM without stopping it: its process keeps running and listening; its record stays."""
        del self.listed[vm.name]  # first: nothing rewrites its record from here on
        await vm.let_go()
        vm.log.info("vm left running at agent shutdown", pid=vm.pid, state=vm.state)
