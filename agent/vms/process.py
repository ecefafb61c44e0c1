"""The VM processes' lifetimes as the manager sees them: what it needs of a process, and how one ends.

A VM process is our child (an asyncio subprocess) or, after an agent restart, a process a previous
run of the agent started (agent/vms/adopt.py, AdoptedProcess): both offer `VMProcess`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

STOP_GRACE = 2.0  # seconds a process gets to exit on its own (asked to, or its socket closed) before it is killed


class VMProcess(Protocol):
    """What the VM manager needs of a process: asyncio.subprocess.Process and AdoptedProcess."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


def kill_quietly(process: VMProcess) -> None:
    """SIGKILL, unless the process is already gone."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def reap(process: VMProcess, grace: float = STOP_GRACE) -> None:
    """Wait up to `grace` seconds for a process told to go, kill it if it has not, and wait for its end:
    never leaves a process behind."""
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        kill_quietly(process)
        await process.wait()
