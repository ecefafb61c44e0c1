"""The VM process's clock: host monotonic time that stops while the VM is paused."""

from __future__ import annotations

import time


class PausableClock:
    """Host monotonic time that stands still while the VM is paused.

    The guest's clock device reads it, so time spent paused (a migration's
    downtime included) is not seen by the guest, as with QEMU's virtual clock.
    """

    def __init__(self) -> None:
        self._paused_total = 0
        self._paused_at: int | None = None

    def now_ns(self) -> int:
        if self._paused_at is not None:
            return self._paused_at - self._paused_total
        return time.monotonic_ns() - self._paused_total

    def set_paused(self, paused: bool) -> None:
        now = time.monotonic_ns()
        if paused and self._paused_at is None:
            self._paused_at = now
        elif not paused and self._paused_at is not None:
            self._paused_total += now - self._paused_at
            self._paused_at = None
