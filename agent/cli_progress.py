"""The live display of a long operation (a migration, a storage move) and the end of its summary.

Shared by `ferry migrate` (agent/cli_migrate.py) and `ferry vm move-storage` (agent/cli_storage.py):
each gives its own one-line rendering of a status report; this module rewrites that line on a
terminal (where the line starts with a bar), prints a line per round or status change elsewhere
(logs stay readable), and renders the lines a final summary ends with (downtime breakdown, summary,
error); `watch` polls the status until the operation is over.

The rate a line shows is measured here, from the polls: bytes moved over the last second. The
agent's own figure is per round, so it reads 0 through a long first round and lags a change of pace
by a whole round; the polls see every batch.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from agent.client import ClientError, ControlClient

Info = dict[str, Any]
FINAL = ("completed", "failed", "cancelled")  # statuses after which a report no longer changes
POLL_INTERVAL = 0.1  # seconds between two status polls
RATE_WINDOW_S = 1.0  # the live rate: bytes moved over this much of the latest polls
BAR_WIDTH = 24


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


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#####-----]`` filled to ``fraction`` (clamped to 0..1)."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    """A short human duration: 0.4 s, 12 s, 3 min 05 s, 2 h 04 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass(frozen=True)
class Live:
    """What the display measured itself: the current rate (bytes/s over the latest polls, None
    until two polls came), and whether it draws on a terminal."""

    rate: float | None = None
    tty: bool = False


NOT_MEASURED = Live()  # a line drawn without a display's own measurements (a status command)


class RateMeter:
    """Bytes per second of a growing counter, over the samples of the last ``window`` seconds."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, t: float, value: int) -> float | None:
        if self._samples and value < self._samples[-1][1]:  # a new counter (another operation): start over
            self._samples.clear()
        self._samples.append((t, value))
        # Keep one sample at least a window old, so the rate spans a whole window once it can.
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (value - v0) / (t - t0) if t > t0 else None


class Progress:
    """Rewrites one line on a terminal, prints a line per round or status change elsewhere.

    ``line`` renders a status report and what was measured of it (:class:`Live`); ``counter``
    picks the byte count whose rate is measured (default: the report's ``ram.transferred``).
    """

    def __init__(self, out: TextIO, line: Callable[[Info, Live], str],
                 counter: Callable[[Info], int] | None = None) -> None:
        self.out = out
        self.line = line
        self.counter = counter or (lambda info: int(info.get("ram", {}).get("transferred", 0)))
        self.tty = out.isatty()
        self.meter = RateMeter()
        self._last = ""
        self._key: tuple[str, int] | None = None

    def show(self, info: Info, now: float | None = None) -> None:
        rate = self.meter.add(time.monotonic() if now is None else now, self.counter(info))
        line = self.line(info, Live(rate, self.tty))
        if self.tty:
            # Cut to the terminal's width: a wrapped line would not be erased by the next rewrite.
            line = line[:max(20, shutil.get_terminal_size().columns - 1)]
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


async def follow(client: ControlClient, name: str, *, status_op: str, cancel_op: str, what: str,
                 progress: Progress | None, cancel_within: float) -> Info:
    """Watch an operation to its end (:func:`watch`); Ctrl-C cancels it (``cancel_op``), so the VM
    stays as it was, then lets the interrupt go on."""
    try:
        return await watch(client, status_op, name, progress)
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"\nferry: interrupted, cancelling the {what} of {name}", file=sys.stderr)
        try:
            await client.call(cancel_op, {"name": name}, reply_within=cancel_within)
        except (ClientError, OSError, TimeoutError):
            pass
        raise
    finally:
        if progress is not None:
            progress.end()
