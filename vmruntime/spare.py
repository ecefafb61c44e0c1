"""A VM process started ahead of need: the agent's spare for the next incoming migration.

Starting a VM process takes a fresh interpreter importing the machine
(docs/PERFORMANCE.md section 11), and an incoming migration waits for it
before it accepts (it would be downtime at COMMIT otherwise). A spare pays
that before any migration asks: started with ``spare_argv``, it imports
vmruntime.vmproc (and through it the machine and dirty tracking), then
blocks on an inherited SOCK_SEQPACKET socket for one message that makes it a
VM process: ``{"ram-size": N, "on-eof": "exit"|"stay"}`` with the guest RAM
memfd and the control socket attached (SCM_RIGHTS). It then runs
``vmruntime.vmproc.main`` exactly as ``python -m vmruntime.vmproc`` would
over those fds; its pid stays the VM process's pid.

EOF on the socket before that message (the agent exited, or lets the spare
go) ends it with status 0; a malformed message ends it with status 2. Nothing
is mapped or run before the hand-over. Its process name (``ps -o comm``) is
``ferry-spare`` until then, ``ferry-vm`` after, as every VM process's.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

# What a spare is for: these imports (the machine, dirty tracking) are most of a VM process's
# start-up, paid here before anyone waits for it. vmproc.main would import them at its start.
import vmruntime.dirty  # noqa: F401
import vmruntime.machine  # noqa: F401
from vmruntime import control, vmproc

ADOPT_FDS = 2  # the guest RAM memfd, then the control socket
PROCESS_NAME = "ferry-spare"  # /proc/PID/comm until the hand-over (then vmproc's "ferry-vm")


def spare_argv(spare_fd: int) -> list[str]:
    """The command line of a spare over inherited socket ``spare_fd``."""
    return [sys.executable, "-m", "vmruntime.spare", "--spare-fd", str(spare_fd)]


def hand_over(sock: socket.socket, ram_fd: int, ram_size: int, ctl_fd: int, on_eof: str = "exit") -> None:
    """Make the spare at the other end of ``sock`` a VM process over these fds (they are
    duplicated into it: the caller still closes its own). OSError if the spare is gone."""
    control.send_msg(sock, {"ram-size": ram_size, "on-eof": on_eof}, [ram_fd, ctl_fd])


def wait_for_hand_over(sock: socket.socket) -> list[str] | None:
    """Block until the agent hands a VM over; vmproc's arguments, or None on EOF."""
    try:
        msg, fds = control.recv_msg(sock)
    except EOFError:
        return None
    size, on_eof = msg.get("ram-size"), msg.get("on-eof", "exit")
    if len(fds) != ADOPT_FDS or not isinstance(size, int) or on_eof not in control.ON_EOF_CHOICES:
        for fd in fds:
            os.close(fd)
        raise control.ControlError(f"bad hand-over: {msg!r} with {len(fds)} fd(s)")
    ram_fd, ctl_fd = fds
    return ["--ram-fd", str(ram_fd), "--ram-size", str(size), "--ctl-fd", str(ctl_fd), "--on-eof", on_eof]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmruntime.spare", description=__doc__.splitlines()[0])
    p.add_argument("--spare-fd", type=int, required=True, help="inherited SOCK_SEQPACKET socket to the agent")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as vmproc: the agent decides, not the keyboard
    vmproc.set_process_name(PROCESS_NAME)
    with socket.socket(fileno=args.spare_fd) as sock:
        try:
            vm_args = wait_for_hand_over(sock)
        except control.ControlError as e:
            print(f"vmruntime.spare: {e}", file=sys.stderr)
            return 2
    if vm_args is None:
        return 0
    return vmproc.main(vm_args)


if __name__ == "__main__":
    sys.exit(main())
