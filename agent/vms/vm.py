"""One VM on this host: its VM process, its state, and the surface the migration engine drives.

A `VM` lives on the agent's event loop (docs/ARCHITECTURE.md): migration sessions reach it only
through the loop bridge. Requests go over its non-blocking channel; its record is written by the
records' worker thread (agent/records.py), in order, and the async methods that change it return
once it is on disk without holding up the loop. (The `state` setter, their synchronous form, waits
on the loop: it is for callers outside a migration's downtime.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.disks import DiskConfig
from agent.logs import Log
from agent.nics import NicConfig
from agent.vms.channel import ConsoleBuffer, VMChannel
from agent.vms.errors import VMError
from agent.vms.process import STOP_GRACE, VMProcess, kill_quietly, reap
from agent.vms.ram import release_guest_ram
from proto.errors import ErrorCode
from vmruntime import control as vmctl
from vmruntime import dirty

RUN_STATES = ("running", "paused", "halted", "faulted")

# Writes the VM's record (the manager's hook): the write runs in the records' worker thread, after
# every write asked before it; the future is done once it is on disk. None: the VM has no record.
RecordHook = Callable[["VM"], "concurrent.futures.Future[None] | None"]


@dataclass
class VM:
    """One VM on this host and its VM process."""

    name: str
    mem: int
    memfd: int
    ram: mmap.mmap
    pid: int
    dirty_backend: str
    program: str
    host: str
    process: VMProcess
    log: Log
    # The boot arguments given at `vm create` (with `program`, the VM's spec: shown by `vm info`,
    # recorded, and carried by a migration: agent/migration/spec_move.py).
    args: dict[str, str] = field(default_factory=dict)
    instructions: int = 0
    fault_reason: str | None = None
    throttle_percent: int = 0
    migrating: bool = False  # set by the migration engine (begin_migration) while a migration runs
    console: ConsoleBuffer = field(default_factory=ConsoleBuffer)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises control-API operations
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # pulsed on every state change
    _run: str = "paused"
    _channel: VMChannel | None = None
    _tracker: dirty.DirtyTracker | None = None
    _uffd: int | None = None
    _stopping: bool = False  # we asked the process to exit: its channel closing is no fault
    # Re-adoption after an agent restart (docs/RELIABILITY.md "Agent restarts"): where the process
    # listens, its start time (pid + start time name one process), the migration phase, and the
    # record's origin.
    socket_path: str | None = None
    pid_start: int | None = None
    migration_phase: str | None = None  # None | "precopy" | "commit-sent" (agent/vms/adopt.py reads it)
    run_before: str | None = None  # the run state when the migration began: what a restart puts back
    arrived_by: str | None = None  # the id of the migration that brought the VM here, if one did
    # The migration whose COMMIT went out ({id, to}: its id and the destination's migration address):
    # what a restarted agent asks the destination about while the VM is in doubt.
    migration_ref: dict[str, str] | None = None
    origin: str = "created"
    started: float = field(default_factory=time.time)
    on_record: RecordHook | None = field(default=None, repr=False)
    # The VM's NIC (agent/nics.py), None without one, and the `nic` field of the VM process's
    # last status or attach reply (its counters).
    nic: NicConfig | None = None
    nic_status: dict[str, Any] | None = None
    # The VM's disk (agent/disks.py), None without one, and the `disk` field of that last reply.
    disk: DiskConfig | None = None
    disk_status: dict[str, Any] | None = None
    # A storage move under way (agent/storage_move.py): {from, to, run-before}, recorded so a restarted
    # agent knows which of the two images is the move's leftover (agent/vms/adopt.py).
    storage_move: dict[str, Any] | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """running | paused | halted | faulted, or migrating while a migration of a live VM runs."""
        if self.migrating and self._run in ("running", "paused"):
            return "migrating"
        return self._run

    async def begin_migration(self) -> None:
        """A migration owns the VM now (operators' pause/resume/destroy are refused); recorded as
        phase "precopy" with the run state to restore, returning once that record is on disk."""
        self.migrating = True
        self.run_before = self._run
        saved = self._note_phase("precopy")
        self._pulse()
        await written(saved)

    async def end_migration(self, run_state: str) -> None:
        """The migration is over; the VM is `run_state` ("running" | "paused") again, unless it
        halted or faulted meanwhile. Returns once the record (no phase) is on disk."""
        self.migrating = False
        self.migration_ref = None
        saved = self._note_phase(None)
        if run_state in RUN_STATES:
            self._set_run(run_state)  # a guest that halted meanwhile stays halted
        self._pulse()
        await written(saved)

    def mark_commit_sent(self, ref: dict[str, str]) -> concurrent.futures.Future[None]:
        """The source is about to send COMMIT of migration ``ref`` ({id, to}): from here a restarted
        agent must treat the VM as in doubt, and asks ``to`` about ``id``. Called on the loop, which
        does not wait: the future is done once that record is on disk, and the session thread waits
        for it before COMMIT leaves (one hop fewer inside the downtime than the loop awaiting the
        write and then waking the thread)."""
        self.migration_ref = dict(ref)
        return on_disk(self._note_phase("commit-sent"))

    async def begin_storage_move(self, target: str) -> None:
        """A storage move of the disk to ``target`` (made already) starts; returns once recorded."""
        assert self.disk is not None
        self.storage_move = {"from": self.disk.path, "to": target, "run-before": self._run}
        await written(self._rewrite())

    async def storage_switched(self, disk: DiskConfig) -> None:
        """The VM process writes ``disk`` now (a storage move's switch); returns once recorded."""
        self.disk = disk
        await written(self._rewrite())

    async def end_storage_move(self) -> None:
        """The storage move is over (either image is the VM's); returns once recorded."""
        self.storage_move = None
        await written(self._rewrite())

    def _rewrite(self) -> concurrent.futures.Future[None] | None:
        return self.on_record(self) if self.on_record is not None else None

    def _set_run(self, value: str) -> None:
        if self._run in ("halted", "faulted") and value in ("running", "paused"):
            return  # a finished guest stays finished whatever the vCPU loop does next
        self._run = value
        self._pulse()

    def _note_phase(self, phase: str | None) -> concurrent.futures.Future[None] | None:
        """Record the migration phase, so an agent restarted mid-migration knows what to do with the VM."""
        if phase == self.migration_phase:
            return None
        self.migration_phase = phase
        return self.on_record(self) if self.on_record is not None else None

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def channel(self) -> VMChannel:
        if self._channel is None:
            raise VMError(ErrorCode.INTERNAL, f"VM {self.name!r} has no VM process")
        return self._channel

    @property
    def connected(self) -> bool:
        """True while the agent talks to the VM process (its channel is open)."""
        return self._channel is not None and not self._channel.closed

    def connect(self, sock: socket.socket) -> None:
        """Talk to the VM process over `sock` (its control socket, or an attach connection)."""
        self._channel = VMChannel(sock, self.on_event, self.on_channel_closed)

    # -- events from the VM process ----------------------------------------------------------------
    def on_event(self, msg: dict[str, Any]) -> None:
        ev = msg.get("ev")
        if ev == "console":
            self.console.write(bytes(msg.get("data", b"")))
        elif ev == "halted":
            self.log.info("vm halted")
            self._set_run("halted")
        elif ev == "faulted":
            self.fault_reason = str(msg.get("reason", "unknown"))
            self.log.warning("vm faulted", reason=self.fault_reason)
            self._set_run("faulted")

    def on_channel_closed(self) -> None:
        if self._run not in ("halted", "faulted") and not self._stopping:
            self.fault_reason = self.fault_reason or "the VM process exited unexpectedly"
            self.log.warning("vm process gone", pid=self.pid)
            self._run = "faulted"
        self._pulse()

    # -- the surface of CONTRACTS.md ---------------------------------------------------------------
    async def pause(self) -> dict[str, Any]:
        """Stop the vCPU at an instruction boundary; returns its CPU and device state."""
        # Nothing is recorded here: the record of a migrating VM already says how it ran before
        # (run_before), which is all a restart needs to undo a stop-and-copy pause; the pause itself
        # is inside the downtime and waits on no file.
        reply, _ = await self.channel.request("pause")
        self._set_run("paused")
        state: dict[str, Any] = reply.get("state", {})
        self.instructions = int(state.get("instructions", self.instructions))
        return state

    def paused_by_lane(self, state: dict[str, Any]) -> None:
        """What pause() notes, for a pause a migration sent on its own lane (the reply is its state)."""
        self._set_run("paused")
        self.instructions = int(state.get("instructions", self.instructions))

    async def open_lane(self) -> vmctl.Lane:
        """A private request/reply socket to the VM process, for a migration's session thread: it
        pauses (source) or restores (destination) the vCPU without a round trip through this loop."""
        _, fds = await self.channel.request("lane")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise VMError(ErrorCode.INTERNAL, f"the VM process sent {len(fds)} fds for a lane")
        return vmctl.Lane(socket.socket(fileno=fds[0]))

    async def resume(self) -> None:
        await self.channel.request("resume")
        self._set_run("running")

    async def throttle(self, percent: int) -> None:
        await self.channel.request("throttle", percent=int(percent))
        self.throttle_percent = int(percent)

    async def track_start(self, hot_blocks: bool = False) -> dirty.DirtyTracker:
        """Register guest RAM for dirty tracking in the VM process; returns the (not yet armed) tracker.

        ``hot_blocks``: let uffd-wp-async leave densely written 2 MiB blocks un-protected and report
        them whole (MigrationParams.hot_blocks; the other backends ignore it)."""
        if self._tracker is not None:
            await self.track_stop()
        reply, fds = await self.channel.request("track-start", backend=self.dirty_backend)
        uffd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        try:
            tracker = dirty.make_tracker(str(reply.get("backend", self.dirty_backend)), pid=self.pid, uffd=uffd,
                                         addr=int(reply["addr"]), length=int(reply["length"]), ram=self.ram,
                                         memfd=self.memfd, hot_blocks=hot_blocks)
        except BaseException:
            if uffd is not None:
                os.close(uffd)
            raise
        self._tracker, self._uffd = tracker, uffd
        return tracker

    async def track_stop(self) -> None:
        uffd = await self._untrack()
        try:
            if self.connected:
                await self.channel.request("track-stop")
        finally:
            _close_quietly(uffd)

    async def _untrack(self) -> int | None:
        """Forget the dirty tracker and disarm it (best effort) in a worker thread: un-protecting
        guest RAM and joining a tracker's thread must not hold up the loop. Returns the uffd, still
        open: closing it unregisters guest RAM from write-protect tracking."""
        tracker, uffd = self._tracker, self._uffd
        self._tracker = self._uffd = None
        if tracker is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(tracker.stop)
        return uffd

    # -- the rest, for the control API -------------------------------------------------------------
    async def refresh(self) -> None:
        """Update instructions, throttle and run state from the VM process (no-op once it is gone)."""
        if not self.connected:
            return
        reply, _ = await self.channel.request("status", timeout_s=5.0)
        self.instructions = int(reply.get("instructions", self.instructions))
        self.throttle_percent = int(reply.get("throttle", self.throttle_percent))
        self.fault_reason = reply.get("fault_reason") or self.fault_reason
        self.note_device_status(reply)
        status = str(reply.get("status", self._run))
        if status in ("halted", "faulted"):
            self._set_run(status)
        elif not self.migrating:
            self._set_run("paused" if reply.get("paused") else "running")

    def note_device_status(self, reply: dict[str, Any]) -> None:
        """Keep the device counters of a status or attach reply (its `nic` and `disk` fields, when there)."""
        if isinstance(reply.get("nic"), dict):
            self.nic_status = dict(reply["nic"])
        if isinstance(reply.get("disk"), dict):
            self.disk_status = dict(reply["disk"])

    def info(self) -> dict[str, Any]:
        """The VM's public description (the JSON of `ferry vm info`)."""
        return {
            "name": self.name,
            "state": self.state,
            "mem": self.mem,
            "instructions": self.instructions,
            "dirty-tracker": self.dirty_backend,
            "host": self.host,
            "program": self.program,
            "args": dict(self.args),
            "pid": self.pid,
            "throttle": self.throttle_percent,
            "fault-reason": self.fault_reason,
            "console-bytes": self.console.total,
            "nics": [] if self.nic is None else [self.nic.info(self.nic_status)],
            "disks": [] if self.disk is None else [self.disk.info(self.disk_status)],
        }

    # -- endings ------------------------------------------------------------------------------------
    async def stop_process(self) -> None:
        """Ask the VM process to exit, kill it if it does not, and reap it; never leaves a process behind."""
        self._stopping = True
        if self._tracker is not None:
            with contextlib.suppress(Exception):
                await self.track_stop()
        if self._channel is not None and not self._channel.closed:
            with contextlib.suppress(VMError, asyncio.TimeoutError, OSError, vmctl.ControlError):
                await self._channel.request("stop", timeout_s=STOP_GRACE)
        await reap(self.process)
        if self._channel is not None:
            self._channel.close()

    def kill(self) -> None:
        """Kill the VM process at once (nothing of it is worth keeping); the loop's child watcher reaps it."""
        self._stopping = True
        kill_quietly(self.process)
        if self._channel is not None:
            self._channel.close()

    async def let_go(self) -> None:
        """Leave the VM process running without us: tracking off, channel closed, our mapping released.
        A process listening on its socket runs on and waits for the next agent (agent/vms/adopt.py)."""
        self._stopping = True
        _close_quietly(await self._untrack())
        self.channel.close()
        await self.release_ram()

    async def release_ram(self) -> None:
        """Unmap and close guest RAM, off the loop."""
        await release_guest_ram(self.memfd, self.ram)


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def on_disk(saved: concurrent.futures.Future[None] | None) -> concurrent.futures.Future[None]:
    """A record write's future, or one already done when nothing is recorded (no state dir)."""
    if saved is not None:
        return saved
    done: concurrent.futures.Future[None] = concurrent.futures.Future()
    done.set_result(None)
    return done


async def written(saved: concurrent.futures.Future[None] | None) -> None:
    """Wait for a record write; shielded, so a caller that gives up does not cancel the write itself."""
    if saved is not None:
        await asyncio.shield(asyncio.wrap_future(saved))
