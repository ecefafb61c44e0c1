"""VM records in the state dir: one JSON file per VM this agent runs, `<state-dir>/vms/<name>.json`.

This module owns those files and the attach socket paths next to them (`<name>.sock`, created by the
VM process itself, see vmruntime/vmproc.py `listen`). The VM manager writes a record when a VM starts
here (created or arrived by migration), rewrites it when its migration phase changes, and removes it
when the VM stops here (destroyed, migrated away). VM processes outlive their agent, so the records
survive an agent stop or crash: the next agent run reads them and re-adopts each VM whose process is
still the one recorded (pid and start time), or reports it lost and removes its record.
Records are written atomically (temp file + rename). The VM manager, on the event loop, never
touches the files itself: it hands each write or removal to `in_order`, which runs them one after
the other in one worker thread (a later record of a VM never lands before an earlier one, and the
loop does no file I/O; docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class VMRecords:
    """The record files of one agent's VMs."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "vms"
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-records")

    def in_order(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` (a write or removal of records) in the records' worker thread, after
        everything submitted before it; the future has its result or exception."""
        return self._worker.submit(fn, *args)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def socket_path(self, name: str) -> Path:
        """Where the VM process of `name` listens for a controller after its agent is gone."""
        return self.directory / f"{name}.sock"

    def write(self, record: dict[str, Any]) -> None:
        """Create or replace the record of record["name"]."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(str(record["name"]))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True, default=str))
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        """Forget a VM: its record, and its socket file if its process left one (it was killed)."""
        for path in (self._path(name), self.socket_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def read_all(self) -> list[dict[str, Any]]:
        """Every record left by a previous run; an unreadable one is removed (nothing can use it)."""
        found: list[dict[str, Any]] = []
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                    raise ValueError("not a VM record")
                found.append(record)
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    path.unlink()
        return found


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22); None if gone.

    A pid alone can be reused once its process is reaped; pid plus start time names one process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None  # exited, not yet reaped: gone for our purposes
    return int(fields[19])
