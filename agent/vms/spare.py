"""The spare VM process: one started ahead of need, the next incoming VM's process (vmruntime/spare.py).

An incoming VM's process must be up before the migration's downtime; a fresh interpreter takes long
to start and import the machine (docs/PERFORMANCE.md section 11). The spare has done that already
and waits on its hand-over socket for guest RAM and a control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent.logs import Log
from agent.vms.process import reap
from vmruntime import control as vmctl
from vmruntime import spare

SPARE_DELAY_S = 0.5  # after an incoming VM settled, before the next spare VM process starts


@dataclass
class Spare:
    """A VM process started ahead of need (vmruntime/spare.py): the next incoming VM's process."""

    proc: asyncio.subprocess.Process
    sock: socket.socket  # our end of its hand-over socket; closing it lets the spare go

    def alive(self) -> bool:
        return self.proc.returncode is None


class SpareKeeper:
    """Keeps at most one spare VM process for a VM manager, hands it out, and lets it go at shutdown."""

    def __init__(self, *, enabled: bool, accepting: Callable[[], bool], log: Log) -> None:
        self.enabled = enabled
        self._accepting = accepting  # False once the manager shuts down: no new spare then
        self.log = log
        self._spare: Spare | None = None
        self._task: asyncio.Task[None] | None = None

    def keep(self) -> None:
        """Start a spare VM process unless one is there or starting (needs the running loop)."""
        if not self.enabled or not self._accepting():
            return
        if (self._spare is not None and self._spare.alive()) or (self._task is not None and not self._task.done()):
            return
        if self._spare is not None:  # it died on its own: its socket goes with it
            self._spare.sock.close()
            self._spare = None
        self._task = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        parent, child = vmctl.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *spare.spare_argv(child.fileno()), pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except Exception as e:  # no spare: incoming VM processes are spawned instead
            parent.close()
            self.log.warning("spare VM process not started", error=str(e))
            return
        finally:
            child.close()
        self._spare = Spare(proc, parent)
        if not self._accepting():  # shut down meanwhile
            await self.let_go()

    def take(self, fd: int, mem: int, child: socket.socket) -> asyncio.subprocess.Process | None:
        """Hand guest RAM and the control socket to the spare: its process, or None (no live
        spare; the caller spawns a process). The next spare starts once this VM settled (keep_later)."""
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

    def keep_later(self) -> None:
        """Start the next spare once the incoming VM that took the last one is settled: not at once,
        because a new interpreter's start-up would compete for the CPU with the migration's rounds
        and its downtime on a small host (docs/PERFORMANCE.md section 11)."""
        with contextlib.suppress(RuntimeError):  # no running loop: no spare
            asyncio.get_running_loop().call_later(SPARE_DELAY_S, self.keep)

    async def shutdown(self) -> None:
        """Wait for a spare being started, then let it go."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        await self.let_go()

    async def let_go(self) -> None:
        """The spare exits on EOF of its socket; reaped here (killed if it does not go)."""
        sp, self._spare = self._spare, None
        if sp is None:
            return
        sp.sock.close()
        await reap(sp.proc)
