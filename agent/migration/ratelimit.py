"""The bandwidth cap of a migration's sender (``--bandwidth``): a token bucket.

The cap applies to the bytes that go on the wire (agent/migration/compression.py's
Packer takes them after compression): what the operator caps is the link.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """A token bucket on the sender: ``take(n)`` sleeps until ``n`` more bytes fit the cap.

    The bucket holds at most ``burst_s`` seconds of credit, so an idle spell
    does not let a later burst exceed the cap by much. The sleep waits on
    ``stop``, so a cancel interrupts it.
    """

    def __init__(self, rate: float, stop: threading.Event, burst_s: float = 0.05) -> None:
        self.rate = rate
        self._stop = stop
        self._burst = burst_s
        self._t = time.monotonic()  # when the bucket is empty again (virtual clock)
        self._lock = threading.Lock()  # the streams of one migration share the cap (agent/migration/streams.py)

    def take(self, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            start = max(self._t, now - self._burst)
            self._t = start + nbytes / self.rate
            delay = self._t - now - self._burst
        if delay > 0:
            self._stop.wait(delay)
