"""A destination agent restarted in the middle of a post-copy phase takes it up again.

A destination agent killed after COMMIT of a post-copy leaves its VM process alive, running on
partial guest RAM until its vCPU touches a missing page, then blocked in the kernel (the process
keeps its own copy of the userfaultfd: vmruntime/postcopy.py); the source pauses and keeps
reconnecting (postcopy_recover). The VM process cannot answer ``attach`` while its only thread
is blocked, so the restarted agent, before it adopts any VM and before its migration listener
starts (the source's recovery must find the phase), for each VM with a post-copy record
(postcopy_record):

1. takes the userfaultfd and the guest-RAM memfd from the VM process's fd table (pidfd_getfd:
   :func:`vmruntime.postcopy.take_fd`), without its cooperation;
2. rebuilds the received map (``postcopy_record.rebuild``) and serves faults from it at once;
   every waiter is woken once, since a fault the dead agent read and never served is not
   reported again: the thread faults anew, and this agent hears it;
3. opens a recovery phase for the recorded migration id and peer, paused: the source's
   reconnect joins it (postcopy_recover.join), is told what this side lacks, and pushes it;
4. once every page is here, adopts the VM process normally (agent/vms/adopt.py: it is no longer
   blocked), tells it ``postcopy-end``, removes the record and tells the source PostcopyDone.

Until then the VM is not listed on this agent. If the phase fails (the source's RAM is lost),
the VM process is killed and its records go: it must never run on holes (docs/RELIABILITY.md,
"Post-copy"). A record that cannot be used safely (damaged, swap on in MINOR mode, the process
gone) is removed and the VM left to the ordinary adoption.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.migration import postcopy_record
from agent.migration.common import LoopBridge, describe
from agent.migration.info import MigrationInfo, MigrationParams, Status
from agent.migration.postcopy_dest import READAHEAD_PAGES, PostcopyIncoming
from agent.migration.postcopy_faults import FaultServer
from agent.records import process_start_time
from proto.errors import ErrorCode
from proto.messages import Message
from vmruntime import postcopy
from vmruntime.dirty import written_extents

if TYPE_CHECKING:
    from agent.vms.manager import VMManager

# How long the restarted agent waits for the phase to be open before it starts its listener.
OPEN_WAIT_S = 10.0


class _NoLink:
    """The lost link, until the source's recovery brings a new one."""

    received = 0

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, msg: Message) -> None:
        raise ConnectionError("no link to the source: the destination agent restarted")


class _Memfd:
    def __init__(self, memfd: int) -> None:
        self.memfd = memfd


class _Standin:
    """What PostcopyIncoming uses of its DestinationSession, for a phase no session runs."""

    def __init__(self, rec: postcopy_record.PostcopyRecord, memfd: int, manager: VMManager, bridge: LoopBridge,
                 lane: _AdoptLane) -> None:
        self.info = MigrationInfo(vm=rec.vm, direction="in", peer=rec.peer, mem=rec.mem, params=MigrationParams(),
                                  status=Status.POSTCOPY_PAUSED)
        self.info.summary = f"post-copy of migration {rec.migration_id} taken up again after an agent restart"
        self.conn: Any = _NoLink()
        self._inc = _Memfd(memfd)
        self._mid = rec.migration_id
        self._peer = rec.peer
        self._lane = lane
        self._vm = None
        self.vms: VMManager = manager
        self.bridge = bridge
        self.log = manager.log.bind(vm=rec.vm, migration_id=rec.migration_id)

    def _send(self, msg: Message) -> None:
        self.conn.send(msg)


class _AdoptLane:
    """The phase's ``postcopy-end`` (every page is here, the VM process runs again): adopt the VM
    process as any other (no thread of it is blocked: its attach is answered), then tell it to drop its userfaultfd."""

    def __init__(self, manager: VMManager, bridge: LoopBridge, vm_record: dict[str, Any]) -> None:
        self.manager = manager
        self.bridge = bridge
        self.vm_record = vm_record

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        assert op == "postcopy-end"

        async def adopt_and_end() -> dict[str, Any]:
            self.manager.hold_name(str(self.vm_record["name"]), 0, held=False)
            vm = await self.manager.adopter.adopt(self.vm_record)
            reply, fds = await vm.channel.request("postcopy-end")
            for fd in fds:
                os.close(fd)
            return dict(reply)

        return self.bridge.call(adopt_and_end())


class Readopted(PostcopyIncoming):
    """The post-copy phase of a VM process a restarted agent took over (see the module's docstring)."""

    def __init__(self, s: _Standin, rec: postcopy_record.PostcopyRecord, pid: int, pid_start: int,
                 records: Path) -> None:
        self._setup(s, rec.mem, rec.minor, records)  # type: ignore[arg-type]
        self.rec = rec
        self.pid = pid
        self.pid_start = pid_start
        self.stale = rec.stale_ranges()
        self.stale_map = bytearray(rec.stale)
        # _mapped stays False: map_present runs again, as a MINOR fault the dead agent read may
        # wait on a present page.
        self.manager = s.vms

    def take_over(self, memfd: int) -> None:
        """The uffd from the VM process; the received map rebuilt; faults served from here on."""
        rec = self.rec
        if os.readlink(f"/proc/{self.pid}/fd/{rec.vm_fd}") != "anon_inode:[userfaultfd]":
            raise postcopy_record.RecordError(f"fd {rec.vm_fd} of process {self.pid} is not its userfaultfd "
                                              "(its post-copy ended)")
        uffd = postcopy.take_fd(self.pid, rec.vm_fd)
        try:
            mapped = postcopy_record.mapped_pages(self.pid, rec.addr, rec.mem) if rec.minor else None
            built = postcopy_record.rebuild(rec, written_extents(memfd, rec.mem), mapped,
                                            swap=rec.minor and postcopy_record.swap_active())
        except BaseException:
            os.close(uffd)
            raise
        self._reg = reg = postcopy.Registered(uffd, rec.addr, rec.mem, rec.features, rec.vm_fd, rec.minor)
        self.present = built.present
        self.server = FaultServer(reg, memfd, self._requester, present=built.present, zero=built.zero,
                                  stale_map=built.stale_map, readahead=READAHEAD_PAGES)
        self._start_serving(None)
        self.server.pages.wake(0, rec.mem)  # faults read by the dead agent come again
        self.s.log.info("post-copy taken over after an agent restart", pid=self.pid, missing_pages=built.missing,
                        minor=rec.minor)

    def _fill(self) -> None:
        if isinstance(self.s.conn, _NoLink):
            raise ConnectionError("the destination agent restarted: waiting for the source's recovery")
        super()._fill()

    def _stop_vm(self, exc: BaseException) -> None:
        """The phase failed: the VM process (blocked, or running on partial RAM) is killed, its records go."""
        s = self.s
        why = f"post-copy failed, the VM was stopped on this host: {describe(exc)}"
        with contextlib.suppress(OSError):
            if process_start_time(self.pid) == self.pid_start:
                os.kill(self.pid, signal.SIGKILL)
        self._forget_record()
        with contextlib.suppress(Exception):
            s.bridge.run(self.manager.hold_name, self.rec.vm, 0, False)
            s.bridge.call(self.manager.recorder.forget(self.rec.vm))
        assert s.info is not None
        s.info.finish(Status.FAILED, why, ErrorCode.MIGRATION_FAILED)
        s.log.error("post-copy failed after an agent restart; the VM is stopped here", error=why)


def _ram_fd(pid: int, addr: int) -> int:
    """The number of the VM process's fd of guest RAM's memfd: the one whose inode backs its
    mapping at ``addr`` (a spare VM process got it handed over, not on its command line)."""
    inode = None
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if int(fields[0].split("-")[0], 16) == addr:
                inode = int(fields[4])
                break
    if not inode:
        raise postcopy_record.RecordError(f"process {pid} has no guest-RAM mapping at 0x{addr:x}")
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/fd/{name}").st_ino == inode:
                return int(name)
    raise postcopy_record.RecordError(f"process {pid} holds no fd of its guest RAM's memfd")


def _start_one(manager: VMManager, bridge: LoopBridge, rec: postcopy_record.PostcopyRecord,
               vm_record: dict[str, Any], records: Path) -> Readopted:
    """Blocking: take the VM process's post-copy over and start its phase in a thread."""
    pid, pid_start = int(vm_record["pid"]), int(vm_record["pid-start"])
    if process_start_time(pid) != pid_start:
        raise postcopy_record.RecordError(f"its VM process (pid {pid}) is gone")
    if vm_record.get("arrived-by") != rec.migration_id:
        raise postcopy_record.RecordError(f"its VM record names migration {vm_record.get('arrived-by')!r}, the "
                                          f"post-copy record {rec.migration_id}")
    memfd = postcopy.take_fd(pid, _ram_fd(pid, rec.addr))
    try:
        if os.fstat(memfd).st_size < rec.mem:
            raise postcopy_record.RecordError(f"guest RAM holds {os.fstat(memfd).st_size} bytes, the record says "
                                              f"{rec.mem}")
        s = _Standin(rec, memfd, manager, bridge, _AdoptLane(manager, bridge, vm_record))
        pc = Readopted(s, rec, pid, pid_start, records)
        pc.take_over(memfd)
    except BaseException:
        os.close(memfd)
        raise

    def run() -> None:
        try:
            pc.run()
        finally:
            os.close(memfd)

    threading.Thread(target=run, name=f"ferry-postcopy-readopt-{rec.vm}", daemon=True).start()
    deadline = time.monotonic() + OPEN_WAIT_S
    while pc.phase is None and time.monotonic() < deadline:  # registered before the listener starts
        time.sleep(0.01)
    return pc


async def take_up(manager: VMManager, bridge: LoopBridge) -> set[str]:
    """Agent start, before adoption: take up every post-copy a previous run left; the names of the
    VMs taken (the ordinary adoption leaves them to their phase)."""
    import asyncio

    records = postcopy_record.dir_for(manager)
    if records is None or not (names := postcopy_record.names(records)):
        return set()
    vm_records = {str(r.get("name")): r for r in await manager.recorder.read_all()}
    taken: set[str] = set()
    for name in names:
        try:
            rec = postcopy_record.read(records, name)
            if rec is None or name not in vm_records:
                raise postcopy_record.RecordError("no VM record names it")
            manager.hold_name(name, rec.mem)  # no VM of that name created meanwhile: the phase adopts it
            await asyncio.to_thread(_start_one, manager, bridge, rec, vm_records[name], records)
        except Exception as e:  # unusable: the ordinary adoption decides, as for any VM
            manager.hold_name(name, 0, held=False)
            manager.log.warning("post-copy not taken up after the restart", vm=name, error=describe(e))
            postcopy_record.remove(records, name)
            continue
        taken.add(name)
    return taken


__all__ = ["OPEN_WAIT_S", "Readopted", "take_up"]
