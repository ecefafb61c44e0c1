"""VM records in the state dir: one JSON file per VM this agent runs, `<state-dir>/vms/<name>.json`.

This module owns those files. The VM manager writes a record when a VM starts here (created or
arrived by migration) and removes it when the VM stops here (destroyed, migrated away, stopped at
shutdown). A record still present when an agent starts means the previous agent run ended without
stopping that VM (it was killed): its VM processes exited with it, and the new agent reports each
such VM as lost, then clears the record. Records are written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


class VMRecords:
    """The record files of one agent's VMs."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "vms"

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def write(self, record: dict[str, Any]) -> None:
        """Create or replace the record of record["name"]."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(str(record["name"]))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True, default=str))
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def take_stale(self) -> list[dict[str, Any]]:
        """Every record left by a previous run, removed as it is read (unreadable ones too)."""
        stale: list[dict[str, Any]] = []
        if not self.directory.is_dir():
            return stale
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                stale.append(dict(json.loads(path.read_text())))
            with contextlib.suppress(OSError):
                path.unlink()
        return stale
