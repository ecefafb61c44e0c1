"""Re-adoption after an agent restart: taking over the VM processes a previous agent run left running.

VM processes outlive their agent (docs/RELIABILITY.md "Agent restarts"). On start, before it serves
anyone, the agent reads every record in `<state-dir>/vms/` and for each one:

- checks that the recorded process is still the one recorded (pid and start time), connects to its
  socket, checks the peer's pid (SO_PEERCRED), sends `attach` (reply: run state, instructions,
  throttle, NIC counters, the console's tail and byte count (vmruntime/console_tail.py: a reader's
  offsets go on), and the guest RAM memfd, which must hold the recorded size), and lists the VM
  again, with the spec (program, arguments), NIC and disk its record names (the VM process
  kept its TAP and its locked image open all along; when it holds another image than the record
  names, a storage move switched it before the record said so, and its image is the VM's). A record
  that fails any of this is logged "vm lost with the previous agent run" with the reason and removed.
- finishes a storage move the previous run was in the middle of (`settle_storage_move`): the image
  the VM process does not hold is removed, and a VM the move paused runs again.
- settles a migration the previous run was in the middle of, by the recorded phase
  (`settle_action`, the ownership rules of docs/RELIABILITY.md):

  | recorded phase              | VM found now                         | outcome                               |
  |-----------------------------|--------------------------------------|---------------------------------------|
  | none                        | any                                  | AS_FOUND: listed as its process says  |
  | precopy                     | paused, and it ran before migrating  | RESUME: it runs here again            |
  | stop-and-copy               | paused                               | RESUME                                |
  | precopy, stop-and-copy      | any other                            | LEAVE: it stays here as it was        |
  | commit-sent, or any other   | any                                  | IN_DOUBT: left as it is (paused)      |

  COMMIT is recorded as sent before it leaves, so any phase short of commit-sent proves the
  destination never started the VM (it discards its copy when the connection drops). After it,
  the destination may run the VM: never run it twice. The record names the migration and the
  destination (`migration-ref`), and the agent's migration engine asks the destination until it
  answers (agent/migration/in_doubt.py, AdoptedInDoubt): resumed there, the copy here is
  destroyed; not resumed, the VM runs here again. Without that reference the operator checks the
  destination and resumes or destroys it here. In every case but AS_FOUND a throttle left by
  auto-converge is lifted. ("stop-and-copy" is what older records say for the stop-and-copy
  pause.) The VM is then recorded afresh: with no migration phase, except in doubt, where the
  phase, the run state before the migration and the reference stay until it is settled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import mmap
import os
import signal
import socket
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from agent.disks import DiskConfig
from agent.nics import NicConfig
from agent.records import process_start_time
from agent.vms.errors import VMError, check_name
from agent.vms.ram import release_guest_ram
from agent.vms.vm import VM, written
from agent.vmspec import parse as parse_spec
from vmruntime import control as vmctl
from vmruntime import guestram
from vmruntime.diskimage import remove_created

if TYPE_CHECKING:
    from agent.vms.manager import VMManager

ATTACH_TIMEOUT = 5.0  # seconds for the `attach` exchange with a VM process left by the previous run


class AdoptError(Exception):
    """A recorded VM cannot be re-adopted: its process is gone, or is not the one recorded."""


class Settle(enum.Enum):
    """What becomes of a re-adopted VM, by its recorded migration phase (see the module's table)."""

    AS_FOUND = "as-found"
    RESUME = "resume"
    LEAVE = "leave"
    IN_DOUBT = "in-doubt"


def settle_action(phase: str | None, run_before: str | None, paused: bool) -> Settle:
    """The ownership rules for a VM whose agent died in the middle of a migration of it: `phase` and
    `run_before` as recorded, `paused` as its process says now."""
    if phase is None:
        return Settle.AS_FOUND
    if phase in ("precopy", "stop-and-copy"):
        # A VM that ran before and is paused now was paused by the migration's stop-and-copy.
        if paused and (run_before == "running" or phase == "stop-and-copy"):
            return Settle.RESUME
        return Settle.LEAVE
    return Settle.IN_DOUBT


class AdoptedProcess:
    """A VM process started by a previous run of the agent: not our child, so followed by a pidfd.

    Offers what the manager needs of a process (agent/vms/process.py, VMProcess). Its exit status is
    unknown to us (its parent reaps it), so `wait` returns -1.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def done() -> None:  # a pidfd polls readable once the process has exited (zombie or reaped)
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self._pidfd, done)
            try:
                await exited
            finally:
                loop.remove_reader(self._pidfd)
            self.returncode = -1
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


class Adopter:
    """Re-adopts the VMs of a VM manager's records (agent start)."""

    def __init__(self, manager: VMManager) -> None:
        self.manager = manager

    async def adopt_previous(self, skip: Collection[str] = ()) -> int:
        """Take over the VMs a previous run of this agent left running; report and forget the lost ones.
        ``skip``: VMs taken care of otherwise (a post-copy taken up: agent/migration/postcopy_readopt.py).

        Returns how many were re-adopted."""
        adopted = 0
        for rec in await self.manager.recorder.read_all():
            name = str(rec["name"])
            if name in skip:
                continue
            try:
                await self.adopt(rec)
            except (AdoptError, VMError, OSError, vmctl.ControlError, ValueError, KeyError, TypeError) as e:
                self.manager.log.warning("vm lost with the previous agent run", vm=name, mem=rec.get("mem"),
                                         program=rec.get("program"), pid=rec.get("pid"), origin=rec.get("origin"),
                                         reason=str(e))
                await self.manager.recorder.forget(name)
                continue
            adopted += 1
        return adopted

    async def adopt(self, rec: dict[str, Any]) -> VM:
        """Re-attach the VM process of one record: same process (pid + start time), its socket, its RAM."""
        m = self.manager
        name, pid, mem = str(rec["name"]), int(rec["pid"]), int(rec["mem"])
        check_name(name)
        if rec.get("socket") is None or rec.get("pid-start") is None:
            raise AdoptError("its VM process did not outlive the agent (no attach socket)")
        if process_start_time(pid) != int(rec["pid-start"]):
            raise AdoptError(f"its VM process (pid {pid}) is gone")
        sock = await asyncio.to_thread(vmctl.connect, str(rec["socket"]))
        try:
            if vmctl.peer_pid(sock) != pid:
                raise AdoptError(f"the process at {rec['socket']} is not pid {pid}")
            reply, fds, console = await asyncio.to_thread(_attach, sock)
        except BaseException:
            sock.close()
            raise
        memfd, ram = _map_attached(fds, mem)
        try:
            spec = parse_spec({"program": str(rec.get("program", "?")), "args": rec.get("args") or {}})
            vm = VM(name=name, mem=mem, memfd=memfd, ram=ram, pid=pid, program=str(rec.get("program", "?")),
                    args=dict(spec.args) if spec else {},
                    dirty_backend=m.backend(str(rec.get("dirty-tracker") or "auto")), host=m.agent_name,
                    process=AdoptedProcess(pid), log=m.log.bind(vm=name), socket_path=str(rec["socket"]),
                    pid_start=int(rec["pid-start"]), origin=str(rec.get("origin", "created")),
                    started=float(rec.get("started") or time.time()),
                    arrived_by=str(rec["arrived-by"]) if rec.get("arrived-by") else None,
                    nic=NicConfig.from_record(rec["nic"]) if rec.get("nic") else None,
                    disk=DiskConfig.from_record(rec["disk"]) if rec.get("disk") else None,
                    migration_ref=migration_ref(rec.get("migration-ref")))
            vm.disk = disk_held(vm.disk, (reply.get("disk") or {}).get("path"))
        except BaseException:
            sock.close()
            await release_guest_ram(memfd, ram)
            raise
        vm.console.seed(console, int(reply.get("console-total", len(console))))
        vm.connect(sock)
        m.listed[name] = vm
        await self.settle(vm, reply, rec.get("migration-phase"), rec.get("run-before-migration"))
        await settle_storage_move(vm, rec.get("storage-move"))
        await written(m.recorder.record(vm))
        vm.log.info("vm re-adopted", pid=pid, state=vm.state, instructions=vm.instructions,
                    console_dropped=reply.get("console-dropped", 0))
        return vm

    @staticmethod
    async def settle(vm: VM, reply: dict[str, Any], phase: Any, run_before: Any = None) -> None:
        """Take the run state from the attach reply, then apply settle_action's outcome."""
        vm.instructions = int(reply.get("instructions", 0))
        vm.fault_reason = reply.get("fault_reason")
        vm.note_device_status(reply)
        status = str(reply.get("status"))
        vm._set_run(status if status in ("halted", "faulted") else "paused" if reply.get("paused") else "running")
        action = settle_action(phase, run_before, vm.state == "paused")
        if action is Settle.IN_DOUBT:  # recorded again as it was: in doubt until it is settled
            vm.migration_phase, vm.run_before = str(phase), str(run_before) if run_before else None
        else:
            vm.migration_ref = None
        if action is Settle.AS_FOUND:
            return
        # The migration died with the agent: the destination discards its copy when the connection drops.
        if int(reply.get("throttle", 0)):
            await vm.throttle(0)
        if action is Settle.RESUME:
            await vm.resume()
            vm.log.warning("migration cut by an agent restart before COMMIT; the VM runs here", phase=phase)
        elif action is Settle.LEAVE:
            vm.log.warning("migration cut by an agent restart in pre-copy; the VM stays here as it was", phase=phase)
        elif vm.migration_ref is not None:
            vm.log.error("migration cut by an agent restart after COMMIT; VM kept paused (in doubt) while the "
                         "agent asks the destination", phase=phase, migration_id=vm.migration_ref["id"],
                         destination=vm.migration_ref["to"])
        else:
            vm.log.error("migration cut by an agent restart in stop-and-copy; VM kept paused (in doubt): "
                         "check the destination, then `ferry vm resume` or `ferry vm destroy` it here",
                         phase=phase)


def migration_ref(raw: object) -> dict[str, str] | None:
    """A record's `migration-ref` ({id, to}, and in cluster mode {owner-to, generation}: the
    ownership terms etcd settles it by); None when absent or malformed (then in doubt without a
    destination to ask: the operator settles it)."""
    if not isinstance(raw, dict):
        return None
    mid, to = raw.get("id"), raw.get("to")
    if not (isinstance(mid, str) and isinstance(to, str) and ":" in to):
        return None
    ref = {"id": mid, "to": to}
    owner_to, generation = raw.get("owner-to"), raw.get("generation")
    if isinstance(owner_to, str) and isinstance(generation, str) and owner_to and generation.isdigit():
        ref.update({"owner-to": owner_to, "generation": generation})
    ref.update({k: v for k in ("postcopy", "peer") if isinstance(v := raw.get(k), str)})  # a post-copy's
    return ref


def disk_held(recorded: DiskConfig | None, held: object) -> DiskConfig | None:
    """The VM's disk as its process holds it. When the record names another image, the process's
    is the truth: a storage move switched it to the copy and the agent stopped before it recorded
    that (agent/storage_move.py). A process without the recorded disk, or with one the record lacks,
    is not adopted."""
    if recorded is None or held is None:
        if recorded is None and held is None:
            return None
        raise AdoptError(f"its VM process holds disk image {held}, its record names "
                         f"{recorded.path if recorded is not None else 'none'}")
    if held == recorded.path:
        return recorded
    if not (isinstance(held, str) and os.path.isabs(held)):
        raise AdoptError(f"its VM process reports disk image {held!r}")
    return dataclasses.replace(recorded, path=held)


async def settle_storage_move(vm: VM, move: object) -> None:
    """Finish a storage move the previous agent run was in the middle of: the image the VM process
    does not hold is the move's leftover (the copy before the switch, the old image after it) and is
    removed; a VM the move paused runs again."""
    if not isinstance(move, dict) or vm.disk is None:
        return
    old, new = move.get("from"), move.get("to")
    held = vm.disk.path
    leftover = new if held == old else old if held == new else None
    if isinstance(leftover, str) and leftover != held:
        await asyncio.to_thread(remove_created, leftover)
    resumed = vm.state == "paused" and move.get("run-before") == "running"
    if resumed:
        await vm.resume()
    vm.log.warning("storage move cut by an agent restart", disk=held, removed=leftover, resumed=resumed)


def _attach(sock: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
    """The blocking `attach` exchange on a fresh connection: its reply, the memfd, and console output
    the VM process kept while nobody was attached (sent as events ahead of the reply)."""
    sock.settimeout(ATTACH_TIMEOUT)
    vmctl.send_msg(sock, {"op": "attach", "id": 0})
    console = bytearray()
    while True:
        msg, fds = vmctl.recv_msg(sock)
        if "ev" in msg:
            for fd in fds:
                os.close(fd)
            if msg["ev"] == "console":
                console += bytes(msg.get("data", b""))
            continue
        if not msg.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise AdoptError(f"attach refused: {msg.get('error', 'no guest RAM fd')}")
        return msg, fds, bytes(console)


def _map_attached(fds: list[int], mem: int) -> tuple[int, mmap.mmap]:
    """Map the guest RAM memfd an attached VM process handed over; it must hold the recorded size."""
    fd = fds[0]
    try:
        if os.fstat(fd).st_size < mem:
            raise AdoptError(f"guest RAM holds {os.fstat(fd).st_size} bytes, the record says {mem}")
        return fd, guestram.map_shared(fd, mem)
    except BaseException:
        os.close(fd)
        raise
