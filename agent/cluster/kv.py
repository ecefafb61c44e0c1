"""The store cluster mode needs, as a Protocol: keys with revisions, compare-and-swap, leases.

agent/cluster/etcd.py implements it over etcd's JSON gateway; the unit tests use an in-memory fake
(tests/fake_kv.py) checked against the same Protocol. Every call is a coroutine on the agent's loop.

Failures: `StoreUnavailable` when no member answered (nothing was applied); `OutcomeUnknown` when a
write may or may not have been applied (its request went out, no answer came back): the caller must
read (linearizably) before it acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """The store refused or failed a request."""


class StoreUnavailable(StoreError):
    """No member could be reached: the request was not applied."""


class OutcomeUnknown(StoreError):
    """A write went out and no answer came back: it may or may not have been applied."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One key as read: its value, the revision that last wrote it, the lease it is attached to (0: none)."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


class KV(Protocol):
    """A linearizable key-value store with leases (etcd v3's model)."""

    async def get(self, key: str) -> Entry | None:
        """The key as of now (a linearizable read), or None when it does not exist."""

    async def get_prefix(self, prefix: str) -> list[Entry]:
        """Every key under ``prefix``, sorted by key (a linearizable read)."""

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key`` (attached to ``lease`` when not 0); returns the new revision."""

    async def delete(self, key: str) -> None: ...

    async def swap(self, key: str, mod_revision: int, value: bytes | None, lease: int = 0) -> bool:
        """Compare-and-swap: write ``value`` (delete it when None) only if the key's mod revision is
        still ``mod_revision`` (0: the key must not exist). True when it was written."""

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; returns its TTL, 0 when it has expired (its keys are gone)."""

    async def time_to_live(self, lease: int) -> int:
        """Seconds left on ``lease`` (-1 when it has expired)."""

    async def revoke(self, lease: int) -> None: ...

    async def close(self) -> None: ...
