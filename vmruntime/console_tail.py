"""The VM process's keeper of the console's recent output: the newest bytes and the running count.

The VM process outlives its agent (vmruntime/vmproc.py, ``listen``), so it is the one place where
the console's recent output and its byte count survive an agent restart without the agent writing
every console byte to disk: a re-attaching controller gets the tail (as console events ahead of the
``attach`` reply) and the count (``console-total``), and a `vm console` reader's offsets go on from
where they were. The tail also travels with a migration: ``pause`` puts it into the saved state under
``KEY`` (beside the CPU and device state, so a migration carries it without a message of its own),
and ``restore`` seeds the destination's keeper from it, so the count continues there.
See docs/RELIABILITY.md "Agent restarts".
"""

from __future__ import annotations

from typing import Any

TAIL_BYTES = 64 << 10  # console bytes kept: what a restarted agent or a migration's destination gets back
KEY = "console-tail"  # the saved state's key for the tail: {"data": bytes, "total": int}


class ConsoleKeeper:
    """The newest TAIL_BYTES of console output, the count of every byte the guest wrote, and how many
    of them a controller has been sent (output while nobody is attached is held for the next one)."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.tail = bytearray()
        self.total = 0
        self.sent = 0  # bytes handed to a controller (as console events) so far
        self._limit = limit

    def keep(self, data: bytes, attached: bool) -> None:
        """Note output the guest wrote; ``attached``: it goes out to a controller now."""
        if data:
            self.tail += data
            self.total += len(data)
            excess = len(self.tail) - self._limit
            if excess > 0:
                del self.tail[:excess]
        if attached:
            self.sent = self.total

    def attach(self) -> tuple[bytes, int]:
        """A new controller attaches: the tail it gets, and how many bytes written while nobody was
        attached are no longer in it (dropped for good)."""
        dropped = max(0, self.total - self.sent - len(self.tail))
        self.sent = self.total
        return bytes(self.tail), dropped

    def snapshot(self) -> dict[str, Any]:
        """The tail and the count, as they travel in the saved state (``KEY``)."""
        return {"data": bytes(self.tail), "total": self.total}

    def seed(self, raw: object) -> None:
        """Continue from a snapshot (a migration's restore): the tail and count are the source's.
        Anything malformed, or absent (an older source), starts a fresh count as before."""
        tail_total = parse(raw)
        if tail_total is None:
            return
        data, total = tail_total
        self.tail = bytearray(data[-self._limit:])
        self.total = self.sent = total


def parse(raw: object) -> tuple[bytes, int] | None:
    """A snapshot's tail and count, or None when ``raw`` is not one (never more tail than count)."""
    if not isinstance(raw, dict):
        return None
    data, total = raw.get("data"), raw.get("total")
    if not isinstance(data, bytes | bytearray) or not isinstance(total, int) or total < len(data):
        return None
    return bytes(data), total
