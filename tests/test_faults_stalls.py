"""Stalls: a peer that stops sending (the proxy's STALL, or an agent frozen by SIGSTOP) fails the
migration within the stall timeout (4 s by default), not the 30 s a plain socket timeout would
take; the VM runs exactly once, and the frozen agent, once continued, migrates again.

The bound the tests check (STALL_BOUND_S) only tells seconds from half a minute: the detection
itself is measured in docs/RELIABILITY.md ("Stalls").
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.client import ClientError
from proto.messages import Commit, DeviceState, Digest, MigrateStart, PageBatch, Ready, SyncAck
from tests.agents import AgentProc, agent_trio, finished, names, runs_on, wait_for
from tests.faults import AFTER, BEFORE, C2S, CALL, S2C, STALL, FaultProxy, Rule, migration_target, wait_status
from tests.test_faults_cuts import busy, migrate_via, only_on

pytestmark = pytest.mark.timeout(150)

# Failed well before the 30 s socket timeout: the stall timeout, the rollback, and a loaded host's slack.
STALL_BOUND_S = 20.0


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    agents = agent_trio(tmp_path)
    trio = next(agents)
    try:
        yield trio
    finally:
        for agent in trio:  # never leave an agent frozen for the teardown
            cont(agent)
        with contextlib.suppress(StopIteration):
            next(agents)


def freeze(agent: AgentProc) -> Callable[[], None]:
    """A proxy callback that SIGSTOPs ``agent`` (its VM processes run on)."""
    return lambda: os.kill(agent.proc.pid, signal.SIGSTOP)


def cont(agent: AgentProc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(agent.proc.pid, signal.SIGCONT)


def failed_in_seconds(a: AgentProc, name: str, t0: float) -> dict:
    out = finished(a, name)
    assert out["status"] == "failed", out
    assert time.monotonic() - t0 < STALL_BOUND_S, out
    return out


@pytest.mark.parametrize("rule", [
    pytest.param(Rule(C2S, PageBatch, STALL, nth=3), id="source-to-destination"),
    pytest.param(Rule(S2C, SyncAck, STALL), id="destination-to-source"),
])
def test_a_stalled_stream_fails_in_seconds_and_the_vm_stays_on_the_source(
        trio: tuple[AgentProc, AgentProc, AgentProc], rule: Rule) -> None:
    a, b, _ = trio
    busy(a, "s")
    with FaultProxy(migration_target(b)) as proxy:
        stall = proxy.add(rule)
        t0 = time.monotonic()
        migrate_via(a, b, proxy, "s")
        out = failed_in_seconds(a, "s", t0)
        assert stall.fired.is_set()
        assert "stall" in out["error-desc"] and out["error-code"] == "timeout", out
        only_on(a, b, "s")
        proxy.release()
    a.call("migrate", name="s", to=b.control)
    assert finished(a, "s")["status"] == "completed"
    only_on(b, a, "s")


def test_progress_timeout_fails_a_migration_that_moves_no_byte(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    # The stall timeout raised out of the way: the progress timeout is what ends it.
    a, b, _ = trio
    busy(a, "p")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(C2S, PageBatch, STALL, nth=3))
        t0 = time.monotonic()
        migrate_via(a, b, proxy, "p", **{"stall-timeout": 60, "progress-timeout": 2})
        out = failed_in_seconds(a, "p", t0)
        assert "no progress" in out["error-desc"] and out["error-code"] == "timeout", out
        assert out["params"]["progress-timeout"] == 2
        only_on(a, b, "p")
        proxy.release()


PRE_COMMIT = [
    pytest.param(C2S, MigrateStart, BEFORE, id="setup"),
    pytest.param(C2S, PageBatch, BEFORE, id="pre-copy"),
    pytest.param(C2S, DeviceState, BEFORE, id="stop-and-copy"),
    pytest.param(C2S, Digest, BEFORE, id="before-Ready"),
]


def _slow_but(first: str) -> list:
    """PRE_COMMIT with every phase but ``first`` marked slow (one representative per feature)."""
    return [p if p.id == first else pytest.param(*p.values, id=p.id, marks=pytest.mark.slow) for p in PRE_COMMIT]


def _rule(direction: str, msg: type, when: str, callback: Callable[[], None]) -> Rule:
    return Rule(direction, msg, CALL, when=when, nth=2 if msg is PageBatch else 1, callback=callback)


@pytest.mark.parametrize("direction, msg, when", _slow_but("pre-copy"))
def test_destination_frozen_before_commit_fails_in_seconds_with_the_vm_on_the_source(
        trio: tuple[AgentProc, AgentProc, AgentProc], direction: str, msg: type, when: str) -> None:
    a, b, _ = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(_rule(direction, msg, when, freeze(b)))
        t0 = time.monotonic()
        migrate_via(a, b, proxy, "m")
        failed_in_seconds(a, "m", t0)
        assert rule.fired.is_set()
        runs_on(a, "m")
        cont(b)
        # Frozen at setup, B may also be continued past its handshake deadline (the source's wait for
        # MigrateAccept is longer: docs/RELIABILITY.md, "Stalls"): it then drops the connection unread.
        wait_for(lambda: _discarded(b, "m", unread_too=msg is MigrateStart), timeout=30,
                 what="the destination discards")
        time.sleep(1.0)  # a continued B reads a stale MigrateStart within ms: it must then fail there too
        assert _discarded(b, "m", unread_too=msg is MigrateStart)
    only_on(a, b, "m")
    a.call("migrate", name="m", to=b.control)  # the continued destination is healthy
    assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")


def _discarded(agent: AgentProc, vm: str, unread_too: bool) -> bool:
    """The incoming migration of ``vm`` failed there, or (``unread_too``) never got a report at all."""
    try:
        return bool(agent.call("migrate-status", name=vm)["status"] == "failed")
    except ClientError as e:
        return unread_too and e.code == "not-found" and vm not in names(agent)


@pytest.mark.slow
def test_destination_frozen_after_commit_leaves_the_vm_paused_in_doubt(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, Commit, CALL, when=BEFORE, callback=freeze(b)))  # COMMIT reaches B's socket
        t0 = time.monotonic()
        migrate_via(a, b, proxy, "m")  # in-doubt-timeout 2 s
        out = failed_in_seconds(a, "m", t0)
        assert rule.fired.is_set()
        assert "in doubt" in out["error-desc"], out
        assert a.call("vm-info", name="m")["state"] == "paused"  # never resumed blindly
        cont(b)  # B reads COMMIT and starts the VM
        wait_for(lambda: "m" in names(b), timeout=20, what="the VM on the continued destination")
        refused = a.cli("migrate-resolve", "m", "--resume-here", check=False)
        assert refused.returncode == 1 and "destination runs" in refused.stderr, refused
        a.cli("migrate-resolve", "m", "--resumed-on-destination")
    only_on(b, a, "m")
    b.call("migrate", name="m", to=a.control)
    assert finished(b, "m")["status"] == "completed"
    only_on(a, b, "m")


SOURCE_PHASES = [
    pytest.param(C2S, MigrateStart, BEFORE, id="setup"),
    pytest.param(C2S, PageBatch, BEFORE, id="pre-copy"),
    pytest.param(C2S, DeviceState, BEFORE, id="stop-and-copy"),
    pytest.param(S2C, Ready, BEFORE, id="before-Ready"),
]


@pytest.mark.parametrize("direction, msg, when", [
    p if p.id == "stop-and-copy" else pytest.param(*p.values, id=p.id, marks=pytest.mark.slow)
    for p in SOURCE_PHASES])
def test_source_frozen_before_commit_makes_the_destination_discard_in_seconds(
        trio: tuple[AgentProc, AgentProc, AgentProc], direction: str, msg: type, when: str) -> None:
    a, b, _ = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(_rule(direction, msg, when, freeze(a)))
        # In a thread: frozen in setup, the source answers the migrate call only once continued.
        starter = threading.Thread(target=migrate_via, args=(a, b, proxy, "m"), daemon=True)
        starter.start()
        wait_for(rule.fired.is_set, what="the freeze")
        t0 = time.monotonic()
        out = wait_status(b, "m", lambda s: s["status"] == "failed", what="the destination gives up")
        assert time.monotonic() - t0 < STALL_BOUND_S and "stall" in out["error-desc"], out
        assert "m" not in names(b)
        cont(a)
        starter.join(30)
        assert finished(a, "m")["status"] == "failed"
    only_on(a, b, "m")  # the VM runs on the source again, once
    a.call("migrate", name="m", to=b.control)  # the continued source is healthy
    assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")


@pytest.mark.slow
def test_source_frozen_after_commit_completes_once_continued(trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, _ = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(C2S, Commit, CALL, when=AFTER, callback=freeze(a)))
        migrate_via(a, b, proxy, "m")
        wait_for(lambda: "m" in names(b), timeout=20, what="the VM on the destination")
        runs_on(b, "m")
        cont(a)
        assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")
    b.call("migrate", name="m", to=a.control)
    assert finished(b, "m")["status"] == "completed"
    only_on(a, b, "m")
