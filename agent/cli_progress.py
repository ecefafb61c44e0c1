"""The live display of a long operation (a migration, a storage move) and the end of its summary.

Shared by `ferry migrate` (agent/cli.py) and `ferry vm move-storage` (agent/cli_storage.py): each
gives its own one-line rendering of a status report; this module rewrites that line on a terminal,
prints a line per round or status change elsewhere (logs stay readable), and renders the lines a
final summary ends with (downtime breakdown, summary, error); `watch` polls the status until the
operation is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TextIO

from agent.client import ControlClient

Info = dict[str, Any]
FINAL = ("completed", "failed", "cancelled")  # statuses after which a report no longer changes
POLL_INTERVAL = 0.1  # seconds between two status polls


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def outcome_lines(info: Info) -> list[str]:
    """The last lines of a final summary: where the downtime went, the summary, the error."""
    lines = []
    breakdown = info.get("downtime-breakdown") or {}
    if breakdown:
        lines.append("  downtime breakdown: " + ", ".join(f"{k} {v} ms" for k, v in breakdown.items()))
    if info.get("summary"):
        lines.append(f"  {info['summary']}")
    if info.get("error-desc"):
        lines.append(f"  error: {info['error-desc']}")
    return lines


class Progress:
    """Rewrites one line on a terminal, prints a line per round or status change elsewhere."""

    def __init__(self, out: TextIO, line: Callable[[Info], str]) -> None:
        self.out = out
        self.line = line
        self.tty = out.isatty()
        self._last = ""
        self._key: tuple[str, int] | None = None

    def show(self, info: Info) -> None:
        line = self.line(info)
        if self.tty:
            if line != self._last:
                self.out.write("\r\x1b[K" + line)
        elif (key := (str(info.get("status")), len(info.get("rounds", [])))) != self._key:
            self.out.write(line + "\n")
            self._key = key
        self.out.flush()
        self._last = line

    def end(self) -> None:
        if self.tty and self._last:
            self.out.write("\n")
            self.out.flush()


async def watch(client: ControlClient, op: str, name: str, progress: Progress | None) -> Info:
    """Poll the status op ``op`` of VM ``name`` until its report is final; returns that report."""
    while True:
        info = await client.call(op, {"name": name})
        if progress is not None:
            progress.show(info)
        if info.get("status") in FINAL:
            return dict(info)
        await asyncio.sleep(POLL_INTERVAL)
