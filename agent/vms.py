"""The VM manager: the VMs of this host, one VM process each, and guest memory reserved for incoming VMs.

This module owns the lifecycle of every VM on the host: creating guest RAM (a memfd shared with the
VM process), spawning `python -m vmruntime.vmproc`, talking to it over its SEQPACKET control socket
(an asyncio client over vmruntime.control's codec), buffering its console, following its state, and
tearing it down without leaking processes or memory, and re-adopting the VMs a previous run of the
agent left running (VM processes outlive their agent: each listens on `<state-dir>/vms/NAME.sock`;
see docs/RELIABILITY.md "Agent restarts"). The migration engine uses the surface fixed in
docs/CONTRACTS.md (`VM.pause/resume/throttle/track_start/track_stop`, `VMManager.get/free_memory/
reserve_incoming/start_incoming/discard_incoming/remove_migrated`) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.logs import Log
from agent.records import VMRecords, process_start_time
from proto.errors import ErrorCode
from vmruntime import control as vmctl
from vmruntime import dirty, guestram, spare
from vmruntime.asm import AsmError
from vmruntime.programs import load_program

PAGE_SIZE = 4096
CONSOLE_BUFFER = 1 << 20  # console bytes kept per VM; older output is dropped, the total keeps counting
REQUEST_TIMEOUT = 30.0  # seconds for one VM-process request; a VM that does not answer is broken
STOP_GRACE = 2.0  # seconds a VM process gets to exit after "stop" before it is killed
SPARE_DELAY_S = 0.5  # after an incoming VM settled, before the next spare VM process starts
RUN_STATES = ("running", "paused", "halted", "faulted")
# An incoming VM process waits idle while pages arrive, then restores inside the migration's downtime.
# vmproc imports the machine lazily on restore (~0.1 s); this entry imports it up front instead and
# then runs vmproc's main() with the same arguments as `python -m vmruntime.vmproc`.
_PRELOAD_VMPROC = "import sys, vmruntime.machine, vmruntime.vmproc; sys.exit(vmruntime.vmproc.main(sys.argv[1:]))"
MIGRATED_PROGRAM = "(migrated)"  # the program of a VM that arrived by migration: its image is not carried
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class VMError(Exception):
    """A VM operation refused or failed; `code` is a stable error code of proto.errors.ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


class NoSuchVM(VMError, KeyError):
    """No VM of that name on this host (a KeyError, as CONTRACTS.md promises for VMManager.get)."""

    def __init__(self, name: str, agent: str) -> None:
        super().__init__(ErrorCode.NO_SUCH_VM, f"no VM named {name!r} on agent {agent}")

    def __str__(self) -> str:
        return self.message


def check_name(name: str) -> None:
    """VM names are short tokens: they appear in logs, file names and command lines."""
    if not _NAME_RE.match(name):
        raise VMError(ErrorCode.BAD_REQUEST, f"invalid VM name {name!r}: use letters, digits, '.', '_', '-' (max 63)")


class ConsoleBuffer:
    """A bounded ring of console output with a running byte count, so readers can resume at an offset."""

    def __init__(self, limit: int = CONSOLE_BUFFER) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.total = 0  # bytes ever written; offsets handed to readers count from the VM's first byte

    def write(self, data: bytes) -> None:
        self._buf += data
        self.total += len(data)
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]

    def read(self, offset: int) -> tuple[bytes, int, int]:
        """Bytes from `offset` on, the offset to ask for next, and how many requested bytes were dropped."""
        first = self.total - len(self._buf)
        start = max(offset, first)
        if start >= self.total:
            return b"", self.total, 0
        return bytes(self._buf[start - first :]), self.total, max(0, first - offset)


class VMChannel:
    """An asyncio client of one VM process's control socket: request/reply by id, events to a callback."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict[str, Any]], None],
                 on_close: Callable[[], None]) -> None:
        self._sock = sock
        self._on_event = on_event
        self._on_close = on_close
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._next_id = 1
        self._loop = asyncio.get_running_loop()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    async def request(self, op: str, fds: tuple[int, ...] = (), timeout: float = REQUEST_TIMEOUT,
                      **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send one request and wait for its reply; VMError when the process refuses, is gone or is silent."""
        if self.closed:
            raise VMError(ErrorCode.INTERNAL, "the VM process has exited")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[tuple[dict[str, Any], list[int]]] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            reply, got_fds = await asyncio.wait_for(self._exchange({"op": op, "id": rid, **fields}, fds, fut),
                                                    timeout)
        except TimeoutError as e:
            raise VMError(ErrorCode.TIMEOUT, f"the VM process did not answer {op!r} within {timeout:g} s") from e
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok", False):
            for fd in got_fds:
                os.close(fd)
            raise VMError(ErrorCode.INTERNAL, f"VM process refused {op!r}: {reply.get('error', 'no reason given')}")
        return reply, got_fds

    async def _exchange(self, msg: dict[str, Any], fds: tuple[int, ...],
                        reply: asyncio.Future[tuple[dict[str, Any], list[int]]]) -> tuple[dict[str, Any], list[int]]:
        await self._send(msg, fds)
        return await reply

    async def _send(self, msg: dict[str, Any], fds: tuple[int, ...]) -> None:
        # The socket is non-blocking (it shares the loop with the reader); a full buffer waits for writability.
        while True:
            try:
                vmctl.send_msg(self._sock, msg, fds)
                return
            except BlockingIOError:
                await self._writable()
            except OSError as e:
                raise VMError(ErrorCode.INTERNAL, f"the VM process control socket failed: {e}") from e

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fileno = self._sock.fileno()
        self._loop.add_writer(fileno, ready)
        try:
            await fut
        finally:
            with contextlib.suppress(Exception):  # the channel may have closed meanwhile
                self._loop.remove_writer(fileno)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                msg, fds = vmctl.recv_msg(self._sock)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError, vmctl.ControlError):
                self.close()  # EOF (the process exited) or a broken packet: the channel is unusable
                return
            self._dispatch(msg, list(fds))

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        if "ev" in msg:
            self._on_event(msg)
            return
        fut = self._pending.get(msg.get("id", -1))
        if fut is not None and not fut.done():
            fut.set_result((msg, fds))
        else:
            for fd in fds:
                os.close(fd)  # a reply nobody waits for any more (timed out): do not leak its fds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(VMError(ErrorCode.INTERNAL, "the VM process has exited"))
        self._on_close()


def create_guest_ram(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes and the agent's shared mapping of it; nothing is touched, so it costs nothing yet."""
    fd = guestram.create_memfd(size, f"ferry-{name}")
    try:
        # Huge pages make the destination's fill much faster (DESIGN.md); a no-op where the host has them off.
        return fd, guestram.map_shared(fd, size, hugepage=True)
    except BaseException:
        os.close(fd)
        raise


def close_guest_ram(fd: int, ram: mmap.mmap) -> None:
    with contextlib.suppress(BufferError, ValueError):
        ram.close()  # BufferError: a migration still holds a view; the fd close below still frees it later
    with contextlib.suppress(OSError):
        os.close(fd)


class AdoptedProcess:
    """A VM process started by a previous run of the agent: not our child, so followed by a pidfd.

    Offers what VM.stop_process needs of an asyncio Process (pid, wait, kill). Its exit status is
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
            # A pidfd polls readable once the process has exited (zombie or reaped).
            def done() -> None:
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


class AdoptError(Exception):
    """A recorded VM cannot be re-adopted: its process is gone, or is not the one recorded."""


@dataclass
class Spare:
    """A VM process started ahead of need (vmruntime/spare.py): the next incoming VM's process."""

    proc: asyncio.subprocess.Process
    sock: socket.socket  # our end of its hand-over socket; closing it lets the spare go

    def alive(self) -> bool:
        return self.proc.returncode is None


@dataclass
class Incoming:
    """Guest RAM reserved for a VM arriving by migration: the name is taken, nothing runs yet."""

    name: str
    mem: int
    memfd: int
    ram: mmap.mmap
    # The VM process, spawned while pages arrive: starting a Python process takes ~0.3 s, which
    # would otherwise land in the migration's downtime.
    spawning: asyncio.Task[VM] | None = field(default=None, repr=False)


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
    process: asyncio.subprocess.Process | AdoptedProcess
    log: Log
    instructions: int = 0
    fault_reason: str | None = None
    throttle_percent: int = 0
    migrating: bool = False  # set by the migration engine (through `state`) while a migration runs
    console: ConsoleBuffer = field(default_factory=ConsoleBuffer)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises control-API operations
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # pulsed on every state change
    _run: str = "paused"
    _channel: VMChannel | None = None
    _tracker: dirty.DirtyTracker | None = None
    _uffd: int | None = None
    _stopping: bool = False  # we asked the process to exit: its channel closing is no fault
    # Re-adoption after an agent restart (docs/RELIABILITY.md): where the process listens, its start
    # time (pid + start time name one process), the migration phase, and the record's origin.
    socket_path: str | None = None
    pid_start: int | None = None
    migration_phase: str | None = None  # None | "precopy" | "commit-sent" ("stop-and-copy": older records)
    run_before: str | None = None  # the run state when the migration began: what a restart puts back
    arrived_by: str | None = None  # the id of the migration that brought the VM here, if one did
    origin: str = "created"
    started: float = field(default_factory=time.time)
    on_record: Callable[[VM], None] | None = field(default=None, repr=False)  # rewrites the VM's record

    # -- state -----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """running | paused | halted | faulted, or migrating while a migration of a live VM runs."""
        if self.migrating and self._run in ("running", "paused"):
            return "migrating"
        return self._run

    @state.setter
    def state(self, value: str) -> None:
        # The migration engine sets "migrating" while it runs and any other state when it is done.
        if value == "migrating":
            self.migrating = True
            self.run_before = self._run
            self._note_phase("precopy")
            self._pulse()
            return
        self.migrating = False
        self._note_phase(None)
        if value in RUN_STATES:
            self._set_run(value)  # a guest that halted meanwhile stays halted
        self._pulse()

    def _set_run(self, value: str) -> None:
        if self._run in ("halted", "faulted") and value in ("running", "paused"):
            return  # a finished guest stays finished whatever the vCPU loop does next
        self._run = value
        self._pulse()

    def _note_phase(self, phase: str | None) -> None:
        """Record the migration phase, so an agent restarted mid-migration knows what to do with the VM."""
        if phase != self.migration_phase:
            self.migration_phase = phase
            if self.on_record is not None:
                self.on_record(self)

    async def begin_migration(self) -> None:
        """An outgoing migration of this VM starts (state "migrating", phase precopy recorded)."""
        self.state = "migrating"

    async def end_migration(self, run_state: str) -> None:
        """The migration is over and the VM stays here, ``run_state`` (running | paused)."""
        self.state = run_state

    async def mark_commit_sent(self) -> None:
        """The source is about to send COMMIT: from here a restarted agent must treat the VM as in doubt."""
        self._note_phase("commit-sent")

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def channel(self) -> VMChannel:
        if self._channel is None:
            raise VMError(ErrorCode.INTERNAL, f"VM {self.name!r} has no VM process")
        return self._channel

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
        tracker, uffd = self._tracker, self._uffd
        self._tracker = self._uffd = None
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.stop()
        try:
            if self._channel is not None and not self._channel.closed:
                await self.channel.request("track-stop")
        finally:
            if uffd is not None:
                with contextlib.suppress(OSError):
                    os.close(uffd)

    # -- the rest, for the control API -------------------------------------------------------------
    async def refresh(self) -> None:
        """Update instructions, throttle and run state from the VM process (no-op once it is gone)."""
        if self._channel is None or self._channel.closed:
            return
        reply, _ = await self.channel.request("status", timeout=5.0)
        self.instructions = int(reply.get("instructions", self.instructions))
        self.throttle_percent = int(reply.get("throttle", self.throttle_percent))
        self.fault_reason = reply.get("fault_reason") or self.fault_reason
        status = str(reply.get("status", self._run))
        if status in ("halted", "faulted"):
            self._set_run(status)
        elif not self.migrating:
            self._set_run("paused" if reply.get("paused") else "running")

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
            "pid": self.pid,
            "throttle": self.throttle_percent,
            "fault-reason": self.fault_reason,
            "console-bytes": self.console.total,
        }

    async def stop_process(self) -> None:
        """Ask the VM process to exit, kill it if it does not, and reap it; never leaves a process behind."""
        self._stopping = True
        if self._tracker is not None:
            with contextlib.suppress(Exception):
                await self.track_stop()
        if self._channel is not None and not self._channel.closed:
            with contextlib.suppress(VMError, asyncio.TimeoutError, OSError, vmctl.ControlError):
                await self._channel.request("stop", timeout=STOP_GRACE)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self._channel is not None:
            self._channel.close()

    def release_ram(self) -> None:
        close_guest_ram(self.memfd, self.ram)


def _attach(sock: socket.socket) -> tuple[dict[str, Any], list[int], bytes]:
    """The blocking `attach` exchange on a fresh connection: its reply, the memfd, and console output
    the VM process kept while nobody was attached (sent as events ahead of the reply)."""
    sock.settimeout(5.0)
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


def _kill_spawned(task: asyncio.Task[VM]) -> None:
    """A discarded incoming VM's process: kill it (the event loop's child watcher reaps it)."""
    if task.cancelled() or task.exception() is not None:
        return
    vm = task.result()
    vm._stopping = True
    with contextlib.suppress(ProcessLookupError):
        vm.process.kill()
    if vm._channel is not None:
        vm._channel.close()


class VMManager:
    """The VMs of this host and the guest memory reserved for incoming migrations."""

    def __init__(self, *, agent_name: str, max_mem: int, dirty_tracker: str = "auto", log: Log | None = None,
                 records: VMRecords | None = None, spare: bool = False) -> None:
        """``spare``: keep one VM process started ahead of need for incoming migrations
        (keep_spare(); the agent daemon does, library users and unit tests need not)."""
        self.agent_name = agent_name
        self.records = records
        self.max_mem = max_mem
        self.dirty_tracker = dirty_tracker
        self.log = log or Log(agent=agent_name)
        self._vms: dict[str, VM] = {}
        self._incoming: dict[str, Incoming] = {}
        self._creating: dict[str, int] = {}  # names being created -> mem, so two creates cannot race
        self.accepting = True  # False once the agent is shutting down
        self.keeps_spare = spare
        self._spare: Spare | None = None
        self._spare_task: asyncio.Task[None] | None = None

    # -- lookup and capacity -----------------------------------------------------------------------
    def get(self, name: str) -> VM:
        vm = self._vms.get(name)
        if vm is None:
            raise NoSuchVM(name, self.agent_name)
        return vm

    def list(self) -> list[VM]:
        return sorted(self._vms.values(), key=lambda vm: vm.name)

    def free_memory(self) -> int:
        used = sum(vm.mem for vm in self._vms.values()) + sum(i.mem for i in self._incoming.values())
        return max(0, self.max_mem - used - sum(self._creating.values()))

    def _claim(self, name: str, mem: int) -> None:
        """Check the name and capacity for a new VM (created or incoming); raises VMError."""
        if not self.accepting:
            raise VMError(ErrorCode.BUSY, f"agent {self.agent_name} is shutting down")
        check_name(name)
        if name in self._vms or name in self._incoming or name in self._creating:
            raise VMError(ErrorCode.VM_EXISTS, f"a VM named {name!r} already exists on agent {self.agent_name}")
        if mem <= 0 or mem % PAGE_SIZE:
            raise VMError(ErrorCode.BAD_REQUEST, f"guest memory must be a positive multiple of {PAGE_SIZE}, not {mem}")
        if mem > self.free_memory():
            raise VMError(ErrorCode.INSUFFICIENT_MEMORY, f"not enough memory on agent {self.agent_name}: "
                                       f"{mem} bytes asked, {self.free_memory()} free")

    def _backend(self, preferred: str | None) -> str:
        try:
            return dirty.choose_backend(preferred or self.dirty_tracker)
        except ValueError as e:
            raise VMError(ErrorCode.BAD_REQUEST, str(e)) from e

    # -- create and destroy ------------------------------------------------------------------------
    async def create(self, name: str, program: str, mem: int, args: dict[str, str],
                     dirty_tracker: str | None = None, paused: bool = False) -> VM:
        """Create guest RAM, spawn the VM process, boot the program; the VM runs when this returns."""
        self._claim(name, mem)
        self._creating[name] = mem
        try:
            try:
                image, boot_args = load_program(program, args)
            except (ValueError, OSError, AsmError) as e:
                raise VMError(ErrorCode.BAD_REQUEST, f"program {program!r}: {e}") from e
            backend = self._backend(dirty_tracker)
            fd, ram = create_guest_ram(name, mem)
            try:
                vm = await self._spawn(name, mem, fd, ram, backend, program)
            except BaseException:
                close_guest_ram(fd, ram)
                raise
        finally:
            del self._creating[name]
        return await self._boot(vm, image, boot_args, paused)

    async def _boot(self, vm: VM, image: Any, boot_args: dict[str, int], paused: bool) -> VM:
        self._vms[vm.name] = vm
        try:
            await vm.channel.request("boot", image=vmctl.image_fields(image), args=boot_args, paused=paused)
        except BaseException:
            await self._drop(vm)
            raise
        vm._set_run("paused" if paused else "running")
        await self._make_detachable(vm)
        self._record(vm, "created")
        vm.log.info("vm created", mem=vm.mem, program=vm.program, pid=vm.pid, dirty_tracker=vm.dirty_backend)
        return vm

    async def _spawn(self, name: str, mem: int, fd: int, ram: mmap.mmap, backend: str, program: str,
                     preload: bool = False) -> VM:
        parent, child = vmctl.socketpair()
        try:
            # on-eof "exit": a VM process whose agent died exits rather than running on unmanaged.
            proc = self._adopt_spare(fd, mem, child) if preload else None
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
        vm._channel = VMChannel(parent, vm.on_event, vm.on_channel_closed)
        if preload:
            # An incoming VM's process is ready only once it answers: a fresh interpreter needs
            # 0.1-0.25 s to start and import the machine, which would otherwise be spent inside the
            # downtime by the restore at COMMIT (docs/PERFORMANCE.md, section 1).
            try:
                await vm.channel.request("status")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                vm.channel.close()
                raise
        return vm

    # -- the spare VM process (vmruntime/spare.py) --------------------------------------------------
    def keep_spare(self) -> None:
        """Start a spare VM process unless one is there or starting (needs the running loop)."""
        if not self.keeps_spare or not self.accepting:
            return
        if (self._spare is not None and self._spare.alive()) or (
                self._spare_task is not None and not self._spare_task.done()):
            return
        if self._spare is not None:  # it died on its own: its socket goes with it
            self._spare.sock.close()
            self._spare = None
        self._spare_task = asyncio.get_running_loop().create_task(self._start_spare())

    async def _start_spare(self) -> None:
        parent, child = vmctl.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *spare.spare_argv(child.fileno()), pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except Exception as e:  # no spare: incoming VM processes start as before
            parent.close()
            self.log.warning("spare VM process not started", error=str(e))
            return
        finally:
            child.close()
        self._spare = Spare(proc, parent)
        if not self.accepting:  # shut down meanwhile
            await self._let_spare_go()

    def _adopt_spare(self, fd: int, mem: int, child: socket.socket) -> asyncio.subprocess.Process | None:
        """Hand guest RAM and the control socket to the spare: its process, or None (no live
        spare; the caller spawns a process). The next spare starts once this VM settled."""
        sp, self._spare = self._spare, None
        if sp is None:
            return None
        try:
            if not sp.alive():
                return None
            spare.hand_over(sp.sock, fd, mem, child.fileno(), on_eof="exit")
            return sp.proc
        except OSError as e:  # it died between the check and the hand-over: spawn instead
            self.log.warning("spare VM process lost", pid=sp.proc.pid, error=str(e))
            return None
        finally:
            sp.sock.close()

    def _keep_spare_later(self) -> None:
        """Start the next spare once the incoming VM that took the last one is settled: not at once,
        because a new interpreter's start-up (0.1 s of CPU) would compete with the migration's
        rounds and its downtime on a small host."""
        with contextlib.suppress(RuntimeError):  # no running loop: no spare
            asyncio.get_running_loop().call_later(SPARE_DELAY_S, self.keep_spare)

    async def _let_spare_go(self) -> None:
        """The spare exits on EOF of its socket; reaped here (killed if it does not go)."""
        sp, self._spare = self._spare, None
        if sp is None:
            return
        sp.sock.close()
        try:
            await asyncio.wait_for(sp.proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                sp.proc.kill()
            await sp.proc.wait()

    async def destroy(self, name: str) -> None:
        vm = self.get(name)
        if vm.migrating:
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is migrating; cancel the migration first")
        await self._drop(vm)
        vm.log.info("vm destroyed")

    async def _drop(self, vm: VM) -> None:
        """Stop the process and free the memory of a VM, and forget it."""
        try:
            await vm.stop_process()
        finally:
            if self._vms.get(vm.name) is vm:
                del self._vms[vm.name]
                if self.records is not None:
                    self.records.remove(vm.name)
            # Freeing guest RAM costs 0.1-0.3 s per GiB in the kernel: not on the event loop.
            await asyncio.to_thread(vm.release_ram)

    async def _make_detachable(self, vm: VM) -> None:
        """Let the VM process outlive this agent: it listens on its socket in the state dir.

        Asked only once the VM runs here for good (booted, or restored by a migration): an incoming VM
        process whose agent dies before that still exits with it, leaving nothing behind. Without a
        state dir, or if listening fails, the VM process exits with the agent as before (logged)."""
        path = self._detach_path(vm)
        if path is None:
            return
        try:
            await vm.channel.request("listen", path=path)
        except VMError as e:
            vm.log.warning("vm process cannot outlive the agent", error=str(e))
            return
        self._detached(vm, path)

    def _detach_path(self, vm: VM) -> str | None:
        """Where the VM process of ``vm`` should listen, or None (no state dir, or it cannot be made)."""
        if self.records is None:
            return None
        try:
            self.records.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            vm.log.warning("vm process cannot outlive the agent", error=str(e))
            return None
        return str(self.records.socket_path(vm.name))

    def _detached(self, vm: VM, path: str) -> None:
        vm.socket_path = path
        vm.pid_start = process_start_time(vm.pid)

    def _record(self, vm: VM, origin: str | None = None) -> None:
        """The VM runs here now: note it in the state dir (failing that is logged, not an error)."""
        if self.records is None:
            return
        if origin is not None:
            vm.origin, vm.started = origin, time.time()
        vm.on_record = self._rewrite
        self._rewrite(vm)

    def _rewrite(self, vm: VM) -> None:
        if self.records is None or self._vms.get(vm.name) is not vm:
            return
        try:
            self.records.write({**vm.info(), "origin": vm.origin, "started": vm.started, "socket": vm.socket_path,
                                "pid-start": vm.pid_start, "migration-phase": vm.migration_phase,
                                "run-before-migration": vm.run_before, "arrived-by": vm.arrived_by})
        except OSError as e:
            vm.log.warning("cannot write vm record", error=e.strerror or str(e))

    # -- re-adoption after an agent restart (docs/RELIABILITY.md) -----------------------------------
    async def adopt_previous(self) -> int:
        """Take over the VMs a previous run of this agent left running; report and forget the lost ones.

        Returns how many were re-adopted."""
        adopted = 0
        if self.records is None:
            return adopted
        for rec in self.records.read_all():
            name = str(rec["name"])
            try:
                await self.adopt(rec)
            except (AdoptError, VMError, OSError, vmctl.ControlError, ValueError, KeyError, TypeError) as e:
                self.log.warning("vm lost with the previous agent run", vm=name, mem=rec.get("mem"),
                                 program=rec.get("program"), pid=rec.get("pid"), origin=rec.get("origin"),
                                 reason=str(e))
                self.records.remove(name)
                continue
            adopted += 1
        return adopted

    async def adopt(self, rec: dict[str, Any]) -> VM:
        """Re-attach the VM process of one record: same process (pid + start time), its socket, its RAM."""
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
            vm = VM(name=name, mem=mem, memfd=memfd, ram=ram, pid=pid, program=str(rec.get("program", "?")),
                    dirty_backend=self._backend(str(rec.get("dirty-tracker") or "auto")), host=self.agent_name,
                    process=AdoptedProcess(pid), log=self.log.bind(vm=name), socket_path=str(rec["socket"]),
                    pid_start=int(rec["pid-start"]), origin=str(rec.get("origin", "created")),
                    started=float(rec.get("started") or time.time()),
                    arrived_by=str(rec["arrived-by"]) if rec.get("arrived-by") else None)
        except BaseException:
            sock.close()
            close_guest_ram(memfd, ram)
            raise
        vm.console.write(console)
        vm._channel = VMChannel(sock, vm.on_event, vm.on_channel_closed)
        self._vms[name] = vm
        await self._settle_adopted(vm, reply, rec.get("migration-phase"), rec.get("run-before-migration"))
        self._record(vm)
        vm.log.info("vm re-adopted", pid=pid, state=vm.state, instructions=vm.instructions,
                    console_dropped=reply.get("console-dropped", 0))
        return vm

    async def _settle_adopted(self, vm: VM, reply: dict[str, Any], phase: Any, run_before: Any = None) -> None:
        """Apply the ownership rules to a VM whose agent died in the middle of a migration of it."""
        vm.instructions = int(reply.get("instructions", 0))
        vm.fault_reason = reply.get("fault_reason")
        status = str(reply.get("status"))
        vm._set_run(status if status in ("halted", "faulted") else "paused" if reply.get("paused") else "running")
        if phase is None:
            return
        # The migration died with the agent: the destination discards its copy when the connection drops.
        if int(reply.get("throttle", 0)):
            await vm.throttle(0)
        if phase in ("precopy", "stop-and-copy"):
            # COMMIT never went out (it is recorded before it is sent): the destination never starts a
            # VM without COMMIT and discards its copy, so the VM runs here again, as it ran before. A VM
            # that ran before and is paused now was paused by stop-and-copy. ("stop-and-copy" is what
            # records written by earlier versions say for that pause.)
            if vm.state == "paused" and (run_before == "running" or phase == "stop-and-copy"):
                await vm.resume()
                vm.log.warning("migration cut by an agent restart before COMMIT; the VM runs here", phase=phase)
            else:
                vm.log.warning("migration cut by an agent restart in pre-copy; the VM stays here as it was", phase=phase)
        else:
            # COMMIT may have gone out before the agent died, and the destination may run the VM.
            # Never run it twice: it stays paused until the operator checks the destination.
            vm.log.error("migration cut by an agent restart in stop-and-copy; VM kept paused (in doubt): "
                         "check the destination, then `ferry vm resume` or `ferry vm destroy` it here",
                         phase=phase)

    # -- incoming migrations (CONTRACTS.md) ---------------------------------------------------------
    def reserve_incoming(self, name: str, mem: int) -> Incoming:
        """Take the name and create guest RAM for an arriving VM; its VM process starts idle, nothing runs."""
        self._claim(name, mem)
        fd, ram = create_guest_ram(name, mem)
        inc = Incoming(name=name, mem=mem, memfd=fd, ram=ram)
        self._incoming[name] = inc
        with contextlib.suppress(RuntimeError):  # no running loop (a synchronous caller): spawn at start
            inc.spawning = asyncio.get_running_loop().create_task(
                self._spawn(name, mem, fd, ram, self._backend(None), MIGRATED_PROGRAM, preload=True))
        self.log.info("incoming reserved", vm=name, mem=mem)
        return inc

    async def prepare_incoming(self, inc: Incoming) -> None:
        """Wait until the incoming VM's process is up (optional: start_incoming waits for it anyway).

        Awaiting this before accepting a migration keeps the process start-up (~0.3 s) out of the
        downtime of migrations shorter than that, at the cost of as much setup time."""
        if inc.spawning is None:
            inc.spawning = asyncio.ensure_future(
                self._spawn(inc.name, inc.mem, inc.memfd, inc.ram, self._backend(None), MIGRATED_PROGRAM,
                            preload=True))
        await asyncio.shield(inc.spawning)

    async def start_incoming(self, inc: Incoming, state: dict[str, Any], dirty_backend: str | None,
                             paused: bool = False, migration_id: str | None = None) -> VM:
        """Restore the CPU and device state in the VM process over the received RAM, and resume it
        (or leave it paused, as it was on the source): claim_incoming, the restore, incoming_restored.

        A migration's session does the same with the restore on its own lane (see claim_incoming)."""
        if self._incoming.get(inc.name) is not inc:
            raise VMError(ErrorCode.BAD_REQUEST, f"no incoming reservation for {inc.name!r}")
        await self.prepare_incoming(inc)
        path = self.incoming_socket_path(inc)
        vm = self.claim_incoming(inc, state, paused, path, migration_id, dirty_backend)
        try:
            reply, _ = await vm.channel.request("restore", state=state, paused=paused, listen=path)
        except BaseException:
            await self._drop(vm)
            raise
        self.incoming_restored(vm, reply)
        return vm

    async def incoming_lane(self, inc: Incoming) -> vmctl.Lane:
        """A lane to the incoming VM's (spawned, idle) process, for the session that restores it."""
        await self.prepare_incoming(inc)
        assert inc.spawning is not None
        return await inc.spawning.result().open_lane()

    def incoming_socket_path(self, inc: Incoming) -> str | None:
        """Where the incoming VM's process will listen once restored (None: it cannot outlive us)."""
        assert inc.spawning is not None and inc.spawning.done()
        return self._detach_path(inc.spawning.result())

    def claim_incoming(self, inc: Incoming, state: dict[str, Any], paused: bool, socket_path: str | None,
                       migration_id: str | None = None, dirty_backend: str | None = None) -> VM:
        """COMMIT arrived: the VM is this host's now. Listed and recorded (as listening at
        ``socket_path``, which the restore that goes with the claim asks for) before anyone is told
        it runs here; the caller restores the VM process, then calls incoming_restored, or drops
        the VM if the restore fails. The restore waits for this: a VM process that runs is always
        one a record names (agent/migration/destination.py, _start_vm)."""
        if self._incoming.get(inc.name) is not inc or inc.spawning is None or not inc.spawning.done():
            raise VMError(ErrorCode.BAD_REQUEST, f"no ready incoming reservation for {inc.name!r}")
        vm = inc.spawning.result()
        vm.dirty_backend = self._backend(dirty_backend)
        del self._incoming[inc.name]
        self._vms[vm.name] = vm
        vm.instructions = int(state.get("instructions", 0))
        vm._set_run("paused" if paused else "running")
        vm.arrived_by = migration_id
        if socket_path is not None:
            self._detached(vm, socket_path)
        self._record(vm, "migration")
        vm.log.info("vm started from migration", mem=vm.mem, pid=vm.pid, dirty_tracker=vm.dirty_backend)
        return vm

    def incoming_restored(self, vm: VM, reply: dict[str, Any]) -> None:
        """The restore's reply: a VM process that could not listen exits with this agent; say so."""
        self._keep_spare_later()
        if vm.socket_path is not None and not reply.get("listening"):
            vm.log.warning("vm process cannot outlive the agent", error=str(reply.get("listen-error")))
            vm.socket_path = vm.pid_start = None
            self._rewrite(vm)

    async def drop_claimed(self, vm: VM) -> None:
        """A claimed VM whose restore failed: its process goes, its record too."""
        self._keep_spare_later()
        await self._drop(vm)

    def arrived_by(self, name: str, migration_id: str) -> bool:
        """True if VM ``name`` runs here because migration ``migration_id`` committed (an agent
        restarted after that migration's COMMIT re-adopts it: an in-doubt source must hear so)."""
        vm = self._vms.get(name)
        return vm is not None and vm.arrived_by == migration_id

    def discard_incoming(self, inc: Incoming) -> None:
        """Give up an incoming VM: its idle VM process is killed, its RAM freed, its name released."""
        if self._incoming.get(inc.name) is inc:
            del self._incoming[inc.name]
        if inc.spawning is not None:
            inc.spawning.add_done_callback(_kill_spawned)  # runs at once if the spawn already finished
        close_guest_ram(inc.memfd, inc.ram)
        self.log.info("incoming discarded", vm=inc.name)
        self._keep_spare_later()

    async def remove_migrated(self, name: str) -> None:
        """Source side after commit: the VM runs elsewhere now; stop its process and free its RAM."""
        vm = self.get(name)
        vm.migrating = False
        await self._drop(vm)
        vm.log.info("vm removed after migration")

    # -- shutdown ----------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """The agent is exiting: VMs that can outlive it run on (the next agent run re-adopts them),
        any other VM process is stopped; all of this agent's guest RAM mappings are released."""
        self.accepting = False
        for vm in list(self._vms.values()):
            if vm.socket_path is not None and vm._channel is not None and not vm._channel.closed:
                self._leave_running(vm)
                continue
            with contextlib.suppress(Exception):
                await self._drop(vm)
            vm.log.info("vm stopped at agent shutdown")
        for inc in list(self._incoming.values()):
            self.discard_incoming(inc)
        if self._spare_task is not None:
            with contextlib.suppress(Exception):
                await self._spare_task
        await self._let_spare_go()

    def _leave_running(self, vm: VM) -> None:
        """Let go of a VM without stopping it: its process keeps running and listening; its record stays."""
        vm._stopping = True
        if vm._tracker is not None:
            with contextlib.suppress(Exception):
                vm._tracker.stop()
        if vm._uffd is not None:
            with contextlib.suppress(OSError):
                os.close(vm._uffd)  # unregisters guest RAM from the migration's write-protect tracking
        vm._tracker = vm._uffd = None
        vm.channel.close()
        vm.release_ram()
        del self._vms[vm.name]
        vm.log.info("vm left running at agent shutdown", pid=vm.pid, state=vm.state)
