"""An in-memory `KV` (agent/cluster/kv.py) for the cluster logic's unit tests.

Revisions, compare-and-swap on them and leases behave as etcd's; `down` makes every call raise
StoreUnavailable, and `unknown_writes` makes the next N swaps apply and then raise OutcomeUnknown
(the answer lost, as when a member dies after the proposal went out).
"""

from __future__ import annotations

from agent.cluster.kv import KV, Entry, OutcomeUnknown, StoreUnavailable


class FakeKV:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.revision = 1
        self.leases: dict[int, int] = {}  # id -> ttl
        self.down = False
        self.unknown_writes = 0
        self.calls = 0
        self.next_lease = 100

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("etcd unreachable (fake)")

    def _write(self, key: str, value: bytes, lease: int) -> int:
        self.revision += 1
        self.data[key] = Entry(key, value, self.revision, lease)
        return self.revision

    async def get(self, key: str) -> Entry | None:
        self._check()
        return self.data.get(key)

    async def get_prefix(self, prefix: str) -> list[Entry]:
        self._check()
        return [self.data[k] for k in sorted(self.data) if k.startswith(prefix)]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check()
        return self._write(key, value, lease)

    async def delete(self, key: str) -> None:
        self._check()
        self.data.pop(key, None)

    async def swap(self, key: str, mod_revision: int, value: bytes | None, lease: int = 0) -> bool:
        self._check()
        current = self.data.get(key)
        ok = (current.mod_revision if current is not None else 0) == mod_revision
        if ok:
            if value is None:
                self.data.pop(key, None)
            else:
                self._write(key, value, lease)
        if self.unknown_writes:
            self.unknown_writes -= 1
            raise OutcomeUnknown("no answer (fake)")
        return ok

    async def grant(self, ttl: int) -> int:
        self._check()
        self.next_lease += 1  # never reused, as etcd's lease ids
        lease = self.next_lease
        self.leases[lease] = ttl
        return lease

    async def keepalive(self, lease: int) -> int:
        self._check()
        return self.leases.get(lease, 0)

    async def time_to_live(self, lease: int) -> int:
        self._check()
        return self.leases.get(lease, -1)

    async def revoke(self, lease: int) -> None:
        self._check()
        self.expire(lease)

    def expire(self, lease: int) -> None:
        """The lease runs out: its keys go."""
        self.leases.pop(lease, None)
        for key in [k for k, e in self.data.items() if e.lease == lease]:
            del self.data[key]

    async def close(self) -> None:
        return None


_checked: KV = FakeKV()  # mypy: the fake has the Protocol's surface
