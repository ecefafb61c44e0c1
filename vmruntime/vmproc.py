"""The VM process: one OS process per VM, running its vCPU over shared guest RAM.

Started as ``python -m vmruntime.vmproc --ram-fd F --ram-size N --ctl-fd C``
with the memfd of guest RAM and its end of the control socketpair inherited.
This module owns the process's main loop and the handling of every control
request (docs/CONTRACTS.md): boot, restore, pause, resume, throttle, status,
track-start, track-stop, listen, attach, lane, stop, blocks, warm, warm-status;
the devices' requests (nic-send, nic-drain, disk-reopen, disk-switch, disk-dirty,
disk-dirty-cap) and the opening of a VM's TAP and disk image are vmruntime/devices.py's,
post-copy's vmruntime/postcopy.py's.

``lane`` hands the controller one end of a private socketpair: requests sent
on it are answered on it, so a migration's session thread pauses or restores
the vCPU directly, without a round trip through the agent's event loop
(a hop that would sit inside the downtime; docs/PERFORMANCE.md section 8).

A VM process can outlive its parent (the agent restarting): ``listen`` makes
it listen on a unix SOCK_SEQPACKET socket (mode 0600) and keep the guest
running when the parent's end closes; it then accepts one new controller at a
time on that socket, which sends ``attach`` to get the run state and a copy of
the guest RAM memfd. The console's newest output and its byte count are kept
by vmruntime/console_tail.py: sent on attach (as console events ahead of the
reply, with ``console-total``; output written while nobody was attached that no
longer fits is counted in ``console-dropped``), saved by ``pause`` and seeded by
``restore`` so a migration carries them.

The loop is single-threaded, which keeps the guest deterministic and pause
simple: the machine runs in slices of about half a millisecond
(``Machine.run(budget)`` with the budget re-tuned after every slice), and
between slices the control socket is polled without waiting, so a pause
request is served at the next instruction boundary. While paused, halted or
faulted, the loop blocks on the socket (a process waiting for an incoming
migration's restore translates the guest blocks a `warm` named between polls,
vmruntime/warmup.py); while the guest WAITs (idle and paced
guests), it blocks on the socket until the deadline (Machine.wait_seconds()),
so such a guest does not spin a host core. A VM with a NIC has a TAP
(vmruntime/tap.py): received frames go into the machine before each slice and
queued ones out after it, and the wait after a slice also wakes on the TAP,
so a frame ends a guest's WAIT at once; paused, the TAP is not read and the
guest sees its link down. A VM with a disk holds its image open and locked
for as long as the process lives. Throttling sleeps after each slice
so the vCPU gets the asked share of wall time; the sleep is a wait on the
socket, so requests are still answered at once.

The module itself imports little; ``main`` imports the machine before
serving the first request (so a process spawned ahead of time restores
fast), and dirty tracking is imported on the first track-start.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import select
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from vmruntime import console_tail, control, guestram, postcopy
from vmruntime.clock import PausableClock
from vmruntime.devices import DEVICE_OPS, Build, HostDevices, start_machine

if TYPE_CHECKING:
    from vmruntime.machine import Machine
    from vmruntime.warmup import Warmup

# Wall time one slice should take: short enough that a pause waits little
# for the slice in progress, long enough that polling costs little.
SLICE_SECONDS = 0.0005
MIN_BUDGET = 16
MAX_BUDGET = 1 << 22
FIRST_BUDGET = 500
CONSOLE_CHUNK = 256 << 10  # console bytes per event, well under control.MAX_MSG
MAX_LANES = 8  # lanes open at once: one per migration session, and a migration at a time per VM

Reply = tuple[dict[str, Any], tuple[int, ...]]  # a handler's reply fields and fds to hand over


class VMProcess:
    """The state of one VM process: its machine, run state and control socket."""

    def __init__(self, ram: mmap.mmap, ctl: socket.socket, on_eof: str = "exit", ram_fd: int = -1) -> None:
        self.ram = ram
        self.ram_fd = ram_fd  # kept open so a controller attaching later can get a copy
        self.ctl: socket.socket | None = ctl
        self.on_eof = on_eof
        self.listener: socket.socket | None = None  # the attach socket, once `listen` asked for one
        self.lanes: list[socket.socket] = []  # private request/reply sockets (op lane), one per asking thread
        self.listen_path: str | None = None
        self.console = console_tail.ConsoleKeeper()  # the console's newest output and byte count
        self.machine: Machine | None = None
        self.devices = HostDevices()  # the TAP and disk image of the machine's devices, when it has them
        self.paused = False
        self.throttle = 0
        self.budget = FIRST_BUDGET
        self.next_run = 0.0            # monotonic time before which a throttled vCPU sleeps
        self.reported = "running"      # last machine status announced by an event
        self.exiting = False
        self.tracking: str | None = None  # dirty-tracking backend registered, if any
        self.clock = PausableClock()
        self.warmup: Warmup | None = None  # blocks translated ahead of an incoming restore

    # -- main loop --

    def serve(self) -> int:
        """Run until a stop request (or control EOF with on_eof="exit"); return the exit status."""
        while not self.exiting:
            if not self._vcpu_runnable():
                warm = self.warmup if self.warmup is not None and self.warmup.pending else None
                self._wait_control(0.0 if warm is not None else None)  # requests first: a restore ends it
                if warm is not None and warm is self.warmup:
                    warm.step()  # one block between two polls
                continue
            now = time.monotonic()
            if now < self.next_run:
                self._wait_control(self.next_run - now)
                continue
            self._run_slice()
            # A guest WAIT: sleep on the socket (requests still served at once) until its deadline
            # or, with a NIC, until a frame arrives.
            self._wait_control(self.machine.wait_seconds() if self.machine is not None else 0.0, nic=True)
        self._close_listener()
        self.devices.close()  # the TAP goes with it; the image is unlocked, never removed
        return 0

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        self.listener.close()
        self.listener = None
        if self.listen_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.listen_path)

    def _vcpu_runnable(self) -> bool:
        return (self.machine is not None and not self.paused and self.machine.status == "running"
                and not self.devices.holds_vcpu(self.machine))

    def _run_slice(self) -> None:
        machine = self.machine
        assert machine is not None
        before = machine.instructions
        nic = self.devices.nic
        if nic is not None:
            nic.receive(machine)
        t0 = time.perf_counter()
        machine.run(self.devices.slice_budget(machine, self.budget))  # a guest error faults the machine, never raises
        elapsed = time.perf_counter() - t0
        if nic is not None:
            nic.send(machine)
        self._tune_budget(machine.instructions - before, elapsed)
        if self.throttle:
            self.next_run = time.monotonic() + elapsed * self.throttle / (100 - self.throttle)
        self._flush_console()
        self._announce_status()

    def _tune_budget(self, executed: int, elapsed: float) -> None:
        # Only a full slice measures the speed: one cut short by halt, fault
        # or a blocking instruction says nothing about it.
        if executed < self.budget or elapsed <= 0:
            return
        target = executed * SLICE_SECONDS / elapsed
        # Move halfway to the target: one slow slice (preempted by another
        # process) must not shrink the budget to nothing.
        self.budget = int(min(MAX_BUDGET, max(MIN_BUDGET, (self.budget + target) / 2)))

    # -- control socket --

    def _wait_control(self, timeout: float | None, nic: bool = False) -> None:
        """Serve every waiting request; wait up to ``timeout`` seconds (None: forever) for the first.

        nic: a frame on the TAP ends the wait too (the next slice takes it in).
        """
        watched = self.ctl if self.ctl is not None else self.listener
        tap: list[Any] = [self.devices.nic] if nic and self.devices.nic is not None and self._vcpu_runnable() else []
        if watched is None and not self.lanes and not tap:
            self._sleep_detached(timeout)
            return
        socks = [*self.lanes, *tap] if watched is None else [watched, *self.lanes, *tap]
        ready, _, _ = select.select(socks, [], [], timeout)
        for lane in ready:
            if lane in self.lanes:
                self._serve_lane(lane)
        if watched is None or watched not in ready:
            return
        if self.ctl is None:
            self._accept()
        while self.ctl is not None and not self.exiting:
            try:
                msg, fds = control.recv_msg(self.ctl, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (EOFError, ConnectionResetError):
                # A parent that dies with requests of ours unread resets the
                # socket instead of closing it: the same loss of our parent.
                self._control_closed()
                return
            except control.ControlError as e:
                self._send({"ev": "error", "error": str(e)})
                continue
            for fd in fds:  # no request carries fds; never leak one a peer sends
                os.close(fd)
            self._handle(msg)

    def _serve_lane(self, lane: socket.socket) -> None:
        """Requests on a lane are answered on it; its end (the agent's thread or agent gone) just closes it."""
        while lane in self.lanes and not self.exiting:
            try:
                msg, fds = control.recv_msg(lane, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (EOFError, OSError, control.ControlError):
                self._close_lane(lane)
                return
            for fd in fds:
                os.close(fd)
            self._handle(msg, lane)

    def _close_lane(self, lane: socket.socket) -> None:
        if lane in self.lanes:
            self.lanes.remove(lane)
        lane.close()
        self.devices.lane_closed()

    def _accept(self) -> None:
        """A new controller (a restarted agent) connects: it is ours until it closes its end."""
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return  # it gave up meanwhile: keep listening
        self.ctl = conn

    def _send_console(self, data: bytes) -> None:
        # One `outs` may print any amount of guest RAM: split to stay under MAX_MSG.
        for at in range(0, len(data), CONSOLE_CHUNK):
            self._send({"ev": "console", "data": data[at:at + CONSOLE_CHUNK]})

    def _sleep_detached(self, timeout: float | None) -> None:
        if timeout is None:
            # Nobody can ever talk to us again and the vCPU is stopped: wait for a signal.
            while True:
                time.sleep(3600)
        time.sleep(timeout)

    def _control_closed(self) -> None:
        """The parent closed its end: exit, or (on_eof="stay") keep the guest running unattended."""
        assert self.ctl is not None
        self.ctl.close()
        self.ctl = None
        if self.on_eof == "exit":
            self.exiting = True

    def _send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        if self.ctl is None:
            return
        try:
            control.send_msg(self.ctl, msg, fds)
        except (BrokenPipeError, ConnectionResetError):
            self._control_closed()

    def _send_lane(self, lane: socket.socket, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        try:
            control.send_msg(lane, msg, fds)
        except OSError:
            self._close_lane(lane)

    def _handle(self, msg: dict[str, Any], lane: socket.socket | None = None) -> None:
        """Run one request; the reply goes back where the request came from (control socket or lane)."""
        def reply(fields: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
            if lane is None:
                self._send(fields, fds)
            else:
                self._send_lane(lane, fields, fds)

        rid = msg.get("id")
        op = msg.get("op")
        handler = _HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            reply({"id": rid, "ok": False, "error": f"unknown op {op!r}"})
            return
        try:
            fields, fds = handler(self, msg)
        except Exception as e:  # any failure of one request is that request's error reply
            reply({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        try:
            reply({"id": rid, "ok": True, **fields}, fds)
        finally:
            # Fds in a reply are handed over: once the peer has its copy ours
            # goes. For the uffd that matters: with the agent holding the only
            # reference, an agent that dies releases it, which unregisters
            # guest RAM and wakes a vCPU blocked in a synchronous WP fault.
            for fd in fds:
                os.close(fd)

    # -- events --

    def _flush_console(self) -> None:
        assert self.machine is not None
        data = self.machine.console_drain()
        self.console.keep(data, attached=self.ctl is not None)
        if self.ctl is not None:
            self._send_console(data)

    def _announce_status(self) -> None:
        """Send halted/faulted once, when the machine enters that status."""
        status = self.status_name()
        if status == self.reported:
            return
        self.reported = status
        if status == "halted":
            self._send({"ev": "halted"})
        elif status == "faulted":
            self._send({"ev": "faulted", "reason": self.fault_reason()})

    def status_name(self) -> str:
        return "created" if self.machine is None else self.machine.status

    def fault_reason(self) -> str | None:
        return None if self.machine is None else self.machine.fault_reason

    # -- request handlers: each returns the reply's fields and the fds to hand over with it --

    def op_boot(self, msg: dict[str, Any]) -> Reply:
        from vmruntime.asm import Image
        from vmruntime.machine import Machine

        self._require_fresh()
        image = Image(**msg["image"])
        args = {str(k): int(v) for k, v in dict(msg.get("args") or {}).items()}
        self._start_machine(msg, lambda mac, disk, block: Machine.boot(self.ram, image, args, self.clock.now_ns, mac,
                                                                       disk, block))
        self._started(bool(msg.get("paused", False)))
        return {}, ()

    def op_restore(self, msg: dict[str, Any]) -> Reply:
        from vmruntime.machine import Machine

        self._require_fresh()
        warm, self.warmup = self.warmup, None
        ready = {} if warm is None else warm.take(self.ram, msg.get("state"))
        self._start_machine(msg, lambda mac, disk, block: Machine.restore(self.ram, msg["state"], self.clock.now_ns,
                                                                          ready, disk, block))
        reply: dict[str, Any] = {} if warm is None else warm.counts()
        self.console.seed(msg["state"].get(console_tail.KEY))  # the source's tail and count continue here
        if msg.get("listen"):
            # The incoming VM becomes detachable in the same step (a migration's commit waits on this
            # reply: one exchange, not two). Restored is restored: a failure to listen is reported,
            # and the VM simply exits with its agent, as op_listen's caller would have logged.
            try:
                self.op_listen({"path": msg["listen"]})
                reply["listening"] = True
            except (OSError, ValueError, RuntimeError) as exc:
                reply["listen-error"] = str(exc)
        self._started(bool(msg.get("paused", False)))
        return reply, ()

    def op_blocks(self, msg: dict[str, Any]) -> Reply:
        """The compiled blocks: a migration's code hint (vmruntime/warmup.py, docs/CONTRACTS.md)."""
        from vmruntime.interp import COMPILER_TAG
        from vmruntime.warmup import MAX_HINT_BLOCKS, MAX_TRANSLATED_BYTES

        machine = self._require_machine()
        return {"code": list(machine.code_range), "pcs": machine.block_starts()[:MAX_HINT_BLOCKS],
                "tag": COMPILER_TAG, "translated": machine.marshalled_blocks(MAX_TRANSLATED_BYTES)}, ()

    def op_warm(self, msg: dict[str, Any]) -> Reply:
        """Translate (or load) the blocks named, between requests, until the restore comes; the reply
        comes at once. ``translated`` is used only with this process's ``tag`` (vmruntime/warmup.py)."""
        from vmruntime.interp import COMPILER_TAG
        from vmruntime.warmup import Warmup

        self._require_fresh()
        translated = msg.get("translated") if msg.get("tag") == COMPILER_TAG else None
        self.warmup = Warmup(msg.get("code-start"), msg.get("code"), len(self.ram), msg.get("pcs"), translated)
        return {"queued": self.warmup.pending}, ()

    def op_warm_status(self, msg: dict[str, Any]) -> Reply:
        """Blocks of the warm-up still to translate (0 without one, or once restored)."""
        return {"pending": 0 if self.warmup is None else self.warmup.pending}, ()

    def _start_machine(self, msg: dict[str, Any], build: Build) -> None:
        """The devices ``nic`` and ``disk`` ask for, then the machine over them: both or neither."""
        self.machine, self.devices = start_machine(msg, build)

    def _require_fresh(self) -> None:
        if self.machine is not None:
            raise RuntimeError("this VM process already runs a machine")

    def _started(self, paused: bool) -> None:
        self._set_paused(paused)
        self.reported = "running"
        self._announce_status()  # a restored machine may already be halted or faulted

    def op_pause(self, msg: dict[str, Any]) -> Reply:
        """``release-disk``: also flush and unlock the image (a VM leaving on shared storage)."""
        machine = self._require_machine()
        self._set_paused(True)
        # Console bytes produced before the pause point reach the parent before the reply.
        self._flush_console()
        state = {**machine.save_state(), console_tail.KEY: self.console.snapshot()}  # a migration carries it
        if msg.get("release-disk") and self.devices.disk is not None:
            try:
                self.devices.disk.release()
            except OSError:  # the flush failed: the pause fails whole, the guest runs on with its image
                self._set_paused(False)
                raise
        return {"state": state}, ()

    def op_resume(self, msg: dict[str, Any]) -> Reply:
        machine = self._require_machine()
        if self.devices.disk is not None:  # an image a pause released is taken back first, or no resume
            self.devices.disk.reopen(machine)
        self._set_paused(False)
        return {}, ()

    def _set_paused(self, paused: bool) -> None:
        if paused != self.paused:
            self.clock.set_paused(paused)
        self.paused = self.devices.paused = paused
        self.next_run = 0.0
        if self.machine is not None:  # paused, the TAP is not read: the guest sees its link down
            self.machine.nic_set_link(self.devices.nic is not None and not paused)

    def op_device(self, msg: dict[str, Any]) -> Reply:
        """A request for the devices' host side (vmruntime/devices.py, DEVICE_OPS)."""
        return DEVICE_OPS[msg["op"]](self.devices, self.machine, msg), ()

    def op_throttle(self, msg: dict[str, Any]) -> Reply:
        percent = msg.get("percent")
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 99:
            raise ValueError(f"throttle percent must be an integer 0-99, got {percent!r}")
        self.throttle = percent
        self.next_run = 0.0
        return {}, ()

    def op_status(self, msg: dict[str, Any]) -> Reply:
        return {
            **self.devices.status(self.machine),
            "status": self.status_name(),
            "instructions": self.machine.instructions if self.machine is not None else 0,
            "fault_reason": self.fault_reason(),
            "throttle": self.throttle,
            "paused": self.paused,
            "pid": os.getpid(),
        }, ()

    def op_track_start(self, msg: dict[str, Any]) -> Reply:
        from vmruntime import dirty

        backend = msg.get("backend")
        if not isinstance(backend, str):
            raise ValueError("track-start needs a backend name")
        if self.tracking is not None:
            raise RuntimeError(f"tracking already started ({self.tracking})")
        addr = guestram.mapping_address(self.ram)
        length = len(self.ram)
        uffd = dirty.vm_register(backend, addr, length)
        self.tracking = backend
        return {"backend": backend, "addr": addr, "length": length}, (() if uffd is None else (uffd,))

    def op_track_stop(self, msg: dict[str, Any]) -> Reply:
        # No copy of the uffd kept: the agent's tracker closing the only fd unregisters guest RAM.
        self.tracking = None
        return {}, ()

    def op_listen(self, msg: dict[str, Any]) -> Reply:
        """Listen for later controllers at msg["path"] and outlive this one (on-eof becomes "stay")."""
        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("listen needs a socket path")
        if self.listener is not None:
            raise RuntimeError(f"already listening at {self.listen_path}")
        if self.ram_fd < 0:
            raise RuntimeError("this VM process did not keep its guest RAM fd: nobody could attach")
        self.listener = control.listener(path)
        self.listen_path = path
        self.on_eof = "stay"
        return {}, ()

    def op_attach(self, msg: dict[str, Any]) -> Reply:
        """A new controller takes over: the run state, and a copy of the guest RAM memfd."""
        # A tracker of the previous controller died with it (its uffd closed, which
        # unregistered guest RAM): the new controller starts tracking afresh.
        self.tracking = None
        fields, _ = self.op_status(msg)
        tail, dropped = self.console.attach()
        fields.update({"ram-size": len(self.ram), "console-dropped": dropped,
                       "console-total": self.console.total})
        self._send_console(tail)  # ahead of the reply: the controller has the tail when attach returns
        return fields, (os.dup(self.ram_fd),)

    def op_lane(self, msg: dict[str, Any]) -> Reply:
        """A private request/reply socket for one thread of the controller (a migration's session).

        Requests on it skip the controller's event loop: a migration pauses and restores the
        vCPU through one, inside the downtime. Events (console, halted) still go to the control
        socket only. A lane's other end closing closes the lane, nothing else.
        """
        if len(self.lanes) >= MAX_LANES:
            raise RuntimeError(f"too many lanes open ({MAX_LANES})")
        mine, theirs = control.socketpair()
        self.lanes.append(mine)
        return {}, (theirs.detach(),)

    def op_stop(self, msg: dict[str, Any]) -> Reply:
        self.exiting = True
        return {}, ()

    def _require_machine(self) -> Machine:
        if self.machine is None:
            raise RuntimeError("no machine: boot or restore first")
        return self.machine


_HANDLERS = {
    "boot": VMProcess.op_boot,
    "restore": VMProcess.op_restore,
    "pause": VMProcess.op_pause,
    "resume": VMProcess.op_resume,
    "throttle": VMProcess.op_throttle,
    "status": VMProcess.op_status,
    "track-start": VMProcess.op_track_start,
    "track-stop": VMProcess.op_track_stop,
    "listen": VMProcess.op_listen,
    "attach": VMProcess.op_attach,
    "stop": VMProcess.op_stop,
    "lane": VMProcess.op_lane,
    **{op: VMProcess.op_device for op in DEVICE_OPS},
    **postcopy.POSTCOPY_OPS,
    "blocks": VMProcess.op_blocks,
    "warm": VMProcess.op_warm,
    "warm-status": VMProcess.op_warm_status,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vmruntime.vmproc", description=__doc__.splitlines()[0])
    p.add_argument("--ram-fd", type=int, required=True, help="inherited memfd of guest RAM")
    p.add_argument("--ram-size", type=int, required=True, help="guest RAM size in bytes")
    p.add_argument("--ctl-fd", type=int, required=True, help="inherited SOCK_SEQPACKET control socket")
    p.add_argument("--on-eof", choices=control.ON_EOF_CHOICES, default="exit",
                   help="when the parent closes the control socket: exit (default) or keep the guest running")  # fmt: skip
    return p.parse_args(argv)


PROCESS_NAME = "ferry-vm"  # /proc/PID/comm of a VM process (what ps and top show)


def set_process_name(name: str) -> None:
    """Set this process's name (/proc/PID/comm, at most 15 bytes); best effort."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_process_name(PROCESS_NAME)
    # Ctrl-C in a terminal signals the whole foreground group; the parent
    # (agent, `ferry run`) decides what happens to its VMs, not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    have = os.fstat(args.ram_fd).st_size
    if have < args.ram_size:  # pages past the end of the memfd would SIGBUS the vCPU
        sys.exit(f"vmproc: guest RAM fd holds {have} bytes, --ram-size asks for {args.ram_size}")
    ram = guestram.map_shared(args.ram_fd, args.ram_size)
    # The fd stays open (close-on-exec, as inherited fds are not): a controller that
    # attaches after our parent is gone gets a copy of it (op attach).
    os.set_inheritable(args.ram_fd, False)
    ctl = socket.socket(fileno=args.ctl_fd)
    # Import the machine now, before the first request: a destination agent spawns this process
    # ahead of time and its `restore` is inside the migration's downtime. The same for dirty
    # tracking, which a migration's track-start would otherwise import during its setup
    # (docs/PERFORMANCE.md section 11).
    import vmruntime.dirty  # noqa: F401
    import vmruntime.machine  # noqa: F401
    return VMProcess(ram, ctl, args.on_eof, args.ram_fd).serve()


if __name__ == "__main__":
    sys.exit(main())
