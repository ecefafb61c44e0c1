"""A source agent restarted in the middle of a post-copy phase takes it up again.

A source agent killed after COMMIT of a post-copy leaves its VM process paused with guest RAM
in its memfd (VM processes outlive their agent), and the VM running on the destination on the
pages it got so far; the destination pauses its phase and waits (postcopy_recover). The record
written before COMMIT (``mark_commit_sent``) names the migration, its destination, its peer's
name, and that it is a post-copy; the restarted agent re-adopts the paused VM (agent/vms/adopt.py,
in doubt) and, instead of the in-doubt query, :func:`run` recovers the phase from that memfd: a
PostcopyRecover with the recorded id, the pages the destination lacks, the push, PostcopyDone,
and the copy here goes. Nothing of the dead agent's state is needed: the destination's lacking
set is the whole of what remains.

The destination may not know the migration (its VM never started, or was stopped, or its agent
restarted too): then it is an ordinary in-doubt migration and the in-doubt query settles it
(:func:`run` returns True, the manager asks).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from typing import Any

from agent.migration import source_end
from agent.migration.common import LoopBridge, MigrationError, describe
from agent.migration.info import PAGE_SIZE, MigrationInfo, MigrationParams, Status
from agent.migration.postcopy_recover import run_source
from agent.migration.postcopy_source import PostcopySource
from agent.migration.seams import LogLike, MigratingVM, SourceHost
from agent.migration.source import SourceSession
from proto.errors import ErrorCode

#: The record's keys (``migration-ref``) that say a post-copy: its mark, and the peer's name.
POSTCOPY_KEY = "postcopy"
PEER_KEY = "peer"


def session_for(vm: MigratingVM, ref: Mapping[str, str], run_before: str | None, *, vms: SourceHost, key: bytes,
                agent_name: str, bridge: LoopBridge, log: LogLike, tls: ssl.SSLContext | None,
                stall_timeout: float) -> SourceSession:
    """A source session standing for the dead agent's, paused after RESUMED, with no connection."""
    host, _, port = ref["to"].rpartition(":")
    params = MigrationParams(postcopy_after="1")
    info = MigrationInfo(vm=vm.name, direction="out", peer=ref[PEER_KEY], mem=vm.mem, params=params,
                         status=Status.POSTCOPY_PAUSED)
    info.summary = f"post-copy of migration {ref['id']} taken up again after an agent restart"
    s = SourceSession(vm=vm, vms=vms, dest=(host, int(port)), params=params, key=key, agent_name=agent_name,
                      bridge=bridge, info=info, log=log, tls=tls, stall_timeout=stall_timeout)
    s.migration_id = ref["id"]
    s._was_running = run_before != "paused"
    s._paused = True
    s._pause_t = time.monotonic()
    s._ram = memoryview(vm.ram)
    pc = s._postcopy = PostcopySource(s)
    pc._todo = bytearray(vm.mem // PAGE_SIZE)  # (the destination's lacking set fills it)
    return s


def run(s: SourceSession) -> bool:
    """Recover the phase and complete; True when the destination does not know the migration
    (the in-doubt query decides then). Another failure leaves the VM paused, in doubt."""
    try:
        run_source(s)
    except MigrationError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            s._release_ram()
            s.log.warning("the destination does not know this post-copy; asking it about the migration",
                          vm=s.vm.name, migration_id=s.migration_id, error=describe(exc))
            s.info.finish(Status.FAILED, f"in doubt: {describe(exc)}; asking the destination")
            return True
        _fail(s, exc)
        return False
    except Exception as exc:
        _fail(s, exc)
        return False
    s._close()
    source_end.complete(s, downtime_s=0.0)
    s.info.downtime_s = None  # (measured by the agent that died)
    return False


def _fail(s: SourceSession, exc: BaseException) -> None:
    s._close()
    s.in_doubt = True
    s._release_ram()
    why = describe(exc)
    s.info.finish(Status.FAILED, f"post-copy failed after an agent restart: {why}; the VM stays paused here "
                  "with its RAM (ferry migrate-resolve NAME)", ErrorCode.MIGRATION_FAILED)
    s.log.error("post-copy failed after an agent restart; VM kept paused", vm=s.vm.name, error=why)


def is_postcopy(ref: Mapping[str, Any]) -> bool:
    return bool(ref.get(POSTCOPY_KEY)) and bool(ref.get(PEER_KEY))


__all__ = ["PEER_KEY", "POSTCOPY_KEY", "is_postcopy", "run", "session_for"]
