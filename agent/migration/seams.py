"""What the migration engine needs of the rest of the agent, stated as Protocols.

The sessions and the manager never import agent.vms's classes for their
seams: they name here exactly the surface they use (docs/CONTRACTS.md, "agent:
the VM manager and the migration engine"), so agent.vms may change behind it,
and the tests' fakes are checked against the same surface by mypy
(tests/test_migration_sessions.py assigns each fake to its Protocol).

Everything here is called on the event loop (through the session's
LoopBridge), except what a ``Lane`` and a ``DirtyTracker`` do: those belong to
the session thread that opened or started them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.announce import Schedule
from agent.disks import DiskConfig
from agent.nics import NicConfig
from agent.vmspec import VMSpec
from vmruntime.dirty import DirtyTracker


class LogLike(Protocol):
    """The structured log the engine writes to (agent.logs.Log)."""

    def info(self, msg: str, **fields: Any) -> None: ...

    def warning(self, msg: str, **fields: Any) -> None: ...

    def error(self, msg: str, **fields: Any) -> None: ...


class Lane(Protocol):
    """A session thread's own blocking socket to a VM process (vmruntime.control.Lane).

    ``request`` raises vmruntime.control's VMError or VMGone, or an OSError.
    """

    def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]: ...

    def close(self) -> None: ...


class MigratingVM(Protocol):
    """The VM an outgoing migration moves (agent.vms.VM), as the SourceSession uses it."""

    @property
    def name(self) -> str: ...

    @property
    def mem(self) -> int: ...

    @property
    def nic(self) -> NicConfig | None: ...

    @property
    def disk(self) -> DiskConfig | None: ...

    @property
    def memfd(self) -> int: ...

    @property
    def ram(self) -> mmap.mmap: ...

    @property
    def state(self) -> str: ...

    @property
    def dirty_backend(self) -> str: ...

    @property
    def program(self) -> str: ...

    @property
    def args(self) -> dict[str, str]: ...

    async def begin_migration(self) -> None:
        """The migration starts: state "migrating" (and its phase recorded for an agent restart)."""

    async def end_migration(self, run_state: str) -> None:
        """The migration is over and the VM stays here, ``run_state`` (running | paused)."""

    def mark_commit_sent(self, ref: dict[str, str]) -> concurrent.futures.Future[None]:
        """COMMIT of migration ``ref`` ({id, to}) is about to go: record it (in doubt after a
        restart, asking ``to`` about ``id``); the future is done once the record is on disk, and
        COMMIT leaves only after that."""

    async def track_start(self, hot_blocks: bool = False) -> DirtyTracker: ...

    async def track_stop(self) -> None: ...

    async def open_lane(self) -> Lane: ...

    def paused_by_lane(self, state: dict[str, Any]) -> None:
        """Bookkeeping of a pause the session sent on its lane."""

    async def resume(self) -> None: ...

    async def throttle(self, percent: int) -> None: ...


class ManagedVM(MigratingVM, Protocol):
    """A VM as the MigrationManager sees it: a MigratingVM with the lock of control-API operations."""

    @property
    def lock(self) -> asyncio.Lock: ...


class SourceHost(Protocol):
    """The VM manager's side of an outgoing migration: forget the VM once the destination runs it."""

    async def remove_migrated(self, name: str) -> None: ...


class IncomingRAM(Protocol):
    """Guest RAM reserved for an incoming VM (agent.vms.Incoming)."""

    @property
    def name(self) -> str: ...

    @property
    def memfd(self) -> int: ...

    @property
    def ram(self) -> mmap.mmap: ...

    @property
    def nic(self) -> NicConfig | None: ...

    def restore_fields(self) -> dict[str, Any]:
        """The extra fields of the restore request (the VM's `nic`)."""


InT = TypeVar("InT", bound=IncomingRAM)
ClaimT = TypeVar("ClaimT")  # the VM claim_incoming lists: opaque to the session, handed back as is


class IncomingHost(Protocol[InT, ClaimT]):
    """The VM manager's side of an incoming migration, all a DestinationSession calls.

    Generic in the reservation's type and the claimed VM's, which the session
    only hands back to the manager that made them.
    """

    def reserve_incoming(self, name: str, mem: int, nic: NicConfig | None = None,
                         disk: DiskConfig | None = None, spec: VMSpec | None = None) -> InT:
        """Take the name and RAM for an arriving VM (and its NIC: refused if its MAC is in use; its
        disk: refused if another VM here uses the image; its spec names it)."""

    def allowed_disk_dirs(self) -> tuple[Path, ...]:
        """Where this host's disk images may live (agent/disks.py)."""

    async def incoming_lane(self, inc: InT) -> Lane:
        """A lane to the VM process for the reservation (waits until that process is up)."""

    def incoming_socket_path(self, inc: InT) -> str | None: ...

    def claim_incoming(self, inc: InT, state: dict[str, Any], paused: bool, socket_path: str | None,
                       migration_id: str | None = None) -> tuple[ClaimT, concurrent.futures.Future[None]]:
        """List and record the incoming VM; the future is done once the record is on disk, and its
        process is restored only after that."""

    def incoming_restored(self, vm: ClaimT, reply: dict[str, Any]) -> None: ...

    def announce_incoming(self, vm: ClaimT, schedule: Schedule) -> None:
        """Start announcing a resumed VM's MAC on the network (a task; returns at once)."""

    async def drop_claimed(self, vm: ClaimT) -> None: ...

    def arrived_by(self, name: str, migration_id: str) -> bool:
        """Whether a VM re-adopted after a restart arrived by migration ``migration_id``."""

    def discard_incoming(self, inc: InT) -> None: ...


class VMHost(IncomingHost[InT, ClaimT], SourceHost, Protocol[InT, ClaimT]):
    """The whole VM manager (agent.vms.VMManager) as the MigrationManager uses it."""

    def get(self, name: str) -> ManagedVM:
        """The VM named ``name``; KeyError when there is none."""

    def list(self) -> Sequence[ManagedVM]: ...
