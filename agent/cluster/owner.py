"""Ownership at COMMIT decided in etcd: agent/migration/ownership.py's seam for cluster mode.

The VM's record (`vms/NAME`: owner, generation; agent/cluster/model.py) moves only by
compare-and-swap on its revision, after the record read at that revision was checked, which is
the transaction "owner == source and generation == N: owner = destination, generation = N + 1":

* the source, at setup, reads the record: it must name this host (generation N); the terms go to
  the destination in MigrateStart (`owner`: host, generation, to);
* the destination, on COMMIT, moves the record to itself and starts the VM only once etcd says so;
  when the transaction's outcome is unknown (timeout, the member died) it reads until it knows:
  the record at N + 1 naming it means its transaction went through;
* the source, after COMMIT, acts only on a linearizable read: destination at N + 1 and the
  destination said it resumed: the copy here goes; the record still at (this host, N) and the
  destination did not resume: the source fences the record (generation N + 1, still this host), so
  the destination's transaction can never succeed later, and resumes the VM; destination at N + 1
  but the destination said it never will resume (its start failed, or it was fenced): the source
  takes the record back (N + 2) and resumes. Anything else (a record it cannot read, another owner,
  a destination that answered nothing) leaves the VM paused for the operator.

While etcd cannot be reached, both sides wait and neither runs the VM. These methods block: they
run in session threads and reach the loop's etcd client through `run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from agent.cluster.kv import KV, Entry, StoreError
from agent.cluster.model import Keys, VMRecord
from agent.migration.common import MigrationError
from agent.migration.ownership import PARAMS_KEY, OwnershipLost
from agent.migration.seams import LogLike
from proto.errors import ErrorCode

T = TypeVar("T")
CALL_TIMEOUT_S = 20.0  # one etcd call through the loop: longer than the client trying each member in turn
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0


class EtcdOwnership:
    """Cluster mode's `Ownership` (agent/migration/ownership.py), for agent ``host``."""

    def __init__(self, kv: KV, keys: Keys, host: str, loop: asyncio.AbstractEventLoop, log: LogLike) -> None:
        self.kv = kv
        self.keys = keys
        self.host = host
        self.loop = loop
        self.log = log
        self.stopping = threading.Event()  # the agent stops: waits for etcd end (the VM stays as it is)

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(CALL_TIMEOUT_S)

    def _read(self, vm_name: str) -> tuple[Entry | None, VMRecord | None]:
        entry = self._run(lambda: self.kv.get(self.keys.vm(vm_name)))
        return entry, None if entry is None else VMRecord.decode(entry.value)

    def _swap(self, entry: Entry, record: VMRecord) -> bool:
        """Write ``record`` over ``entry`` if nothing wrote it since it was read."""
        return self._run(lambda: self.kv.swap(entry.key, entry.mod_revision, record.encode()))

    def _until_settled(self, what: str, vm_name: str, step: Callable[[], T | None]) -> T | None:
        """Run ``step`` until it returns something, retrying while etcd cannot answer; None when
        the agent stops first."""
        wait = RETRY_FIRST_S
        while True:
            try:
                return step()
            except (StoreError, TimeoutError, OSError) as e:
                self.log.warning(f"etcd: {what}: no answer, retrying", vm=vm_name, error=str(e), retry_s=wait)
            if self.stopping.wait(wait):
                return None
            wait = min(wait * 2, RETRY_MAX_S)

    # -- the source, at setup ----------------------------------------------------------------------
    def proposal(self, vm_name: str, to: str) -> dict[str, Any]:
        try:
            entry, rec = self._read(vm_name)
        except (StoreError, TimeoutError) as e:
            raise MigrationError(ErrorCode.MIGRATION_FAILED, f"etcd cannot say who owns {vm_name}: {e}") from e
        if entry is None or rec is None:
            raise MigrationError(ErrorCode.MIGRATION_FAILED, f"etcd has no record of VM {vm_name}")
        if rec.owner != self.host:
            raise MigrationError(ErrorCode.MIGRATION_FAILED,
                                 f"etcd names {rec.owner!r} the owner of VM {vm_name}, not this host {self.host!r}")
        # The record's revision and spec let the destination try its transaction without a read first.
        return {PARAMS_KEY: {"host": self.host, "generation": rec.generation, "to": to,
                             "revision": entry.mod_revision, "spec": rec.spec}}

    # -- the destination ---------------------------------------------------------------------------
    def refusal(self, vm_name: str, params: Mapping[str, Any]) -> str | None:
        terms = params.get(PARAMS_KEY)
        if not isinstance(terms, dict):
            return "this agent is in cluster mode (--etcd) and the source is not"
        if terms.get("to") != self.host:
            return f"the source migrates to {terms.get('to')!r}, this agent is {self.host!r}"
        return None

    def claim(self, vm_name: str, params: Mapping[str, Any]) -> None:
        terms = dict(params.get(PARAMS_KEY) or {})
        source, generation = str(terms.get("host", "")), int(terms.get("generation", -1))
        first = [int(terms.get("revision", 0))]  # the record as the source read it: one round trip

        def step() -> bool | None:
            if first[0]:
                revision, first[0] = first[0], 0
                mine = VMRecord(vm_name, self.host, generation + 1, dict(terms.get("spec") or {}))
                if self._run(lambda: self.kv.swap(self.keys.vm(vm_name), revision, mine.encode())):
                    return True
            entry, rec = self._read(vm_name)
            if rec is not None and rec.owner == self.host and rec.generation == generation + 1:
                return True  # ours: this transaction (or its earlier try, outcome unknown) went through
            if entry is None or rec is None or rec.owner != source or rec.generation != generation:
                got = "no record" if rec is None else f"owner {rec.owner!r} generation {rec.generation}"
                raise OwnershipLost(f"etcd has {got}, not {source!r} at generation {generation}")
            if self._swap(entry, rec.moved_to(self.host)):
                return True
            return None  # written meanwhile: read again

        if self._until_settled("ownership at COMMIT", vm_name, lambda: _loop_none(step)) is None:
            raise OwnershipLost("the agent is stopping before etcd could be reached")
        self.log.info("etcd: this host owns the VM", vm=vm_name, generation=generation + 1)

    def owner(self, vm_name: str) -> str | None:
        try:
            rec = self._read(vm_name)[1]
        except (StoreError, TimeoutError) as e:
            raise MigrationError(ErrorCode.MIGRATION_FAILED, f"etcd cannot say who owns {vm_name}: {e}") from e
        return None if rec is None else rec.owner

    # -- the source, after COMMIT ------------------------------------------------------------------
    def settle(self, vm_name: str, params: Mapping[str, Any], dest_says: bool | None) -> bool | None:
        terms = dict(params.get(PARAMS_KEY) or {})
        dest, generation = str(terms.get("to", "")), int(terms.get("generation", -1))

        def step() -> tuple[bool | None] | None:
            entry, rec = self._read(vm_name)
            if entry is not None and rec is not None and rec.owner == dest and rec.generation == generation + 1:
                if dest_says:
                    return (True,)
                if dest_says is None:
                    return (None,)  # etcd names it, and it cannot be asked whether it runs the VM
                # It will never run the VM (its start failed, or an in-doubt answer fenced it): take it back.
                return (False,) if self._swap(entry, rec.moved_to(self.host)) else None
            if entry is not None and rec is not None and rec.owner == self.host and rec.generation >= generation:
                if dest_says:
                    self.log.error("the destination says it resumed but etcd never named it", vm=vm_name)
                    return (None,)
                if rec.generation > generation:
                    return (False,)  # fenced already (by an earlier run of this agent, before it stopped)
                # Fence: generation N + 1 here, so the destination's transaction can never succeed.
                return (False,) if self._swap(entry, rec.moved_to(self.host)) else None
            got = "no record" if rec is None else f"owner {rec.owner!r} generation {rec.generation}"
            self.log.error("etcd names neither end of the migration", vm=vm_name, record=got)
            return (None,)

        got = self._until_settled("owner after COMMIT", vm_name, lambda: _loop_none(step))
        return None if got is None else got[0]


def _loop_none(step: Callable[[], T | None]) -> T:
    """Call ``step`` until it returns something (None: the record moved between read and write)."""
    while True:
        got = step()
        if got is not None:
            return got
