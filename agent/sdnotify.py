"""systemd's notify protocol, spoken directly: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET.

This module owns the agent's side of a `Type=notify` service without libsystemd: one datagram per
notification to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an abstract name written with
a leading '@'). When $WATCHDOG_USEC is set (`WatchdogSec=`) the agent sends WATCHDOG=1 every half of
that period from a task on its event loop, so a loop that stops turning is what systemd notices; the
same task refreshes STATUS= (VM counts) for `systemctl status`.
Without $NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

# The environment variables of the protocol; removed once read so the VM processes the agent spawns
# never notify on its behalf (sd_notify's unset_environment, for the same reason).
_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_PERIOD = 5.0  # seconds between checks of the STATUS= text (`systemctl status` shows the latest)


def socket_address(value: str) -> str | None:
    """The sendto() address of a $NOTIFY_SOCKET value: '@name' is abstract ('\\0name'); None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:... addresses, which the agent has no use for


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 keep-alives: half of $WATCHDOG_USEC, None when there is no watchdog.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for; another process stays quiet.
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Sends notifications to systemd (or whoever set $NOTIFY_SOCKET); a no-op without one."""

    def __init__(self, address: str | None, watchdog: float | None = None, log: Any = None) -> None:
        self.address = address
        self.watchdog = watchdog  # keep-alive period in seconds, or None
        self.log = log
        self._sock: socket.socket | None = None
        self._warned = False
        self._stopping = False

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, *, log: Any = None, unset: bool = True) -> Notifier:
        """A notifier for $NOTIFY_SOCKET and $WATCHDOG_USEC of `env` (os.environ), which loses them if `unset`."""
        env = os.environ if env is None else env
        address = socket_address(env.get("NOTIFY_SOCKET", ""))
        watchdog = watchdog_interval(env, os.getpid()) if address is not None else None
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return cls(address, watchdog, log)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=value lines (ready=1 -> READY=1); True if it was sent."""
        if self.address is None:
            return False
        text = "".join(f"{k.upper()}={_one_line(v)}\n" for k, v in fields.items())
        try:
            self._socket().sendto(text.encode(), self.address)
        except OSError as e:  # systemd gone or the socket full: the agent runs on, said once
            self._warn(e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self, status: str = "stopping") -> bool:
        self._stopping = True  # from now on this status stays: run() no longer replaces it
        return self.notify(stopping=1, status=status)

    def keepalive(self) -> bool:
        return self.notify(watchdog=1)

    async def run(self, status: Callable[[], str] | None = None) -> None:
        """Until cancelled: WATCHDOG=1 every `watchdog` seconds when there is a watchdog, and STATUS=
        whenever `status()` says something new (checked as often, at least every STATUS_PERIOD)."""
        if self.address is None or (self.watchdog is None and status is None):
            return
        period = min(self.watchdog or STATUS_PERIOD, STATUS_PERIOD)
        last_status = status() if status is not None else None  # what ready() just said
        while True:
            if self.watchdog is not None:
                self.keepalive()
            if status is not None and not self._stopping and (text := status()) != last_status:
                self.status(text)
                last_status = text
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # never stall the event loop on a notification
        return self._sock

    def _warn(self, e: OSError) -> None:
        if self._warned or self.log is None:
            return
        self._warned = True
        with contextlib.suppress(Exception):
            where = (self.address or "").replace("\0", "@")
            self.log.warning("cannot notify systemd", socket=where, error=e.strerror or str(e))


def _one_line(value: str | int) -> str:
    """A field value on one line: the protocol separates fields by newlines."""
    return str(value).replace("\n", " ")
