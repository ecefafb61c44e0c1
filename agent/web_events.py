"""Server-sent events of the web console: what changed in the agent's state, pushed to each page.

This module owns the event stream's shapes and its memory bounds. A page that connects gets one
`state` event (the whole snapshot, agent/web_state.py), then an event per object that changed:
`agent` (this agent's agent-info), `peers` (the list), `vm` (one VM's `vm info`), `vm-removed`
({name}), `migration` (one migration's migrate-status object) and `migration-removed` ({vm}).
Every event is a whole object, never a patch, so a page that missed one is right again at the next.

What it costs: with no page open nothing runs. While one is, a single watcher task takes a snapshot
of in-memory state (no I/O: no VM process is asked anything) every LIVE_TICK while a migration is
in progress and every IDLE_TICK otherwise, or at once when a VM's state changes (the `wake` events:
each VM's `changed`), and pushes only what differs from the previous snapshot;
an idle agent sends nothing but a comment line every KEEPALIVE_S (which also finds pages that went
away). Each page has a queue of at most `queue_events` events: one that cannot take an event because
its queue is full (a browser that stopped reading, a connection stuck in the network) is dropped
and its connection closed, so a slow page never grows the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

QUEUE_EVENTS = 64  # events queued for one page before it counts as stuck and is dropped
MAX_CLIENTS = 32  # event streams at once; more get 503
LIVE_TICK = 0.25  # seconds between snapshots while a migration is in progress
IDLE_TICK = 1.0  # and otherwise
KEEPALIVE_S = 15.0
RETRY_MS = 1000  # how soon a browser reconnects after the stream ends (an agent restart)
LIVE_STATUSES = ("setup", "active", "device")

Snapshot = dict[str, Any]


def encode(event: str, data: Any) -> bytes:
    """One SSE event: its name and a single-line JSON data field."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


def preamble() -> bytes:
    """The first bytes of every stream: the reconnect delay the browser is to use."""
    return f"retry: {RETRY_MS}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


def any_live(snapshot: Snapshot) -> bool:
    return any(m.get("status") in LIVE_STATUSES for m in snapshot.get("migrations", ()))


class Differ:
    """Turns successive snapshots into the events that tell what changed (pure: no I/O)."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def changes(self, snapshot: Snapshot) -> list[tuple[str, Any]]:
        current = _keyed(snapshot)
        events: list[tuple[str, Any]] = []
        texts = {key: json.dumps(value, sort_keys=True, default=str) for key, (_, value) in current.items()}
        for key, (event, value) in current.items():
            if self._last.get(key) != texts[key]:
                events.append((event, value))
        for key in self._last.keys() - current.keys():
            kind, _, name = key.partition(":")
            events.append((f"{kind}-removed", {"name": name} if kind == "vm" else {"vm": name}))
        self._last = texts
        return events


def _keyed(snapshot: Snapshot) -> dict[str, tuple[str, Any]]:
    out: dict[str, tuple[str, Any]] = {"agent": ("agent", snapshot.get("agent")),
                                       "peers": ("peers", snapshot.get("peers", []))}
    for vm in snapshot.get("vms", ()):
        out[f"vm:{vm['name']}"] = ("vm", vm)
    for mig in snapshot.get("migrations", ()):
        out[f"migration:{mig['vm']}"] = ("migration", mig)
    return out


class Subscriber:
    """One page's event stream: a bounded queue of encoded events."""

    def __init__(self, queue_events: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(queue_events)
        self.dropped = asyncio.Event()  # set when the queue overflowed: the connection is to close

    def offer(self, data: bytes) -> bool:
        """Queue one event; False (and dropped set) when the page is too far behind."""
        if self.dropped.is_set():
            return False
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped.set()
            return False
        return True


class EventHub:
    """The pages subscribed to this agent's events, and the watcher that feeds them."""

    def __init__(self, snapshot: Callable[[], Awaitable[Snapshot]], *, queue_events: int = QUEUE_EVENTS,
                 max_clients: int = MAX_CLIENTS, live_tick: float = LIVE_TICK, idle_tick: float = IDLE_TICK,
                 wake: Callable[[], list[asyncio.Event]] | None = None, log: Any = None) -> None:
        self.snapshot = snapshot
        self.wake = wake  # events that end the wait between snapshots early (a VM's state changed)
        self.queue_events = queue_events
        self.max_clients = max_clients
        self.live_tick = live_tick
        self.idle_tick = idle_tick
        self.log = log
        self.clients: set[Subscriber] = set()
        self.dropped = 0  # pages dropped for falling behind, since start
        self._differ = Differ()
        self._watcher: asyncio.Task[None] | None = None

    async def subscribe(self) -> Subscriber | None:
        """A new page's stream, its first event the whole state; None when MAX_CLIENTS are connected."""
        if len(self.clients) >= self.max_clients:
            return None
        sub = Subscriber(self.queue_events)
        snap = await self.snapshot()
        sub.offer(encode("state", snap))
        self.clients.add(sub)
        if self._watcher is None or self._watcher.done():
            self._differ = Differ()
            self._differ.changes(snap)  # the baseline: what this page was just sent
            self._watcher = asyncio.create_task(self._watch())
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.clients.discard(sub)

    def publish(self, event: str, data: Any) -> None:
        """Queue one event for every page; a page whose queue is full is dropped."""
        encoded = encode(event, data)
        for sub in list(self.clients):
            if not sub.offer(encoded):
                self.clients.discard(sub)
                self.dropped += 1
                if self.log is not None:
                    self.log.warning("web console: dropped an event stream that fell behind",
                                     queued=self.queue_events)

    async def _watch(self) -> None:
        """While any page is connected: snapshot, push what changed, sleep a tick."""
        while self.clients:
            live = False
            try:
                snap = await self.snapshot()
                live = any_live(snap)
                for event, data in self._differ.changes(snap):
                    self.publish(event, data)
            except Exception as e:  # a bug in a snapshot must not end the stream for good
                if self.log is not None:
                    self.log.error("web console: snapshot failed", error=repr(e))
            await self._until_next(self.live_tick if live else self.idle_tick)

    async def _until_next(self, tick: float) -> None:
        """Sleep a tick, or less if a wake event is set first."""
        events = self.wake() if self.wake is not None else []
        if not events:
            await asyncio.sleep(tick)
            return
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def close(self) -> None:
        for sub in list(self.clients):
            sub.dropped.set()
        self.clients.clear()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None


async def next_chunk(sub: Subscriber) -> bytes | None:
    """The next bytes to write to a page: an event, a keep-alive after KEEPALIVE_S of quiet, or None
    once the page was dropped."""
    if sub.dropped.is_set():
        return None
    get = asyncio.ensure_future(sub.queue.get())
    dropped = asyncio.ensure_future(sub.dropped.wait())
    try:
        done, _ = await asyncio.wait({get, dropped}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (get, dropped):
            if not fut.done():
                fut.cancel()
    if get in done:
        return get.result()
    if dropped in done:
        return None
    return KEEPALIVE
