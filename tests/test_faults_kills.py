"""kill -9 an agent or a VM process at a chosen migration phase; the ownership rules must hold.

The proxy of tests/faults.py sits in the migration path and runs the kill when a given frame
passes, so each phase is hit deterministically. A killed agent's VM processes run on (a
restarted agent re-adopts them: tests/test_restart.py); these tests check what the other
side does and that no second copy ever runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.messages import Commit, DeviceState, Digest, MigrateStart, PageBatch, Ready, Resumed
from tests.agents import AgentProc, agent_trio, finished, names, runs_on, wait_for
from tests.faults import (
    AFTER,
    C2S,
    CALL,
    CUT,
    S2C,
    FaultProxy,
    Rule,
    incoming_vm_pids,
    kill9,
    kill_agent,
    migration_target,
    wait_status,
)
from tests.test_faults_cuts import busy, migrate_via, only_on

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, AgentProc]]:
    """Source A, destination B (the one killed), and C to prove the survivor takes the next migration."""
    yield from agent_trio(tmp_path)


PRE_COMMIT = [
    pytest.param(C2S, MigrateStart, "before", id="setup"),
    pytest.param(C2S, PageBatch, "before", id="round0"),
    pytest.param(C2S, DeviceState, "before", id="stop-and-copy"),
    pytest.param(C2S, Digest, "before", id="before-Digest"),
]


def kill_rule(direction: str, msg: type, when: str, victim: AgentProc) -> Rule:
    return Rule(direction, msg, CALL, when=when, nth=2 if msg is PageBatch else 1, callback=kill_agent(victim))


@pytest.mark.parametrize("direction, msg, when", PRE_COMMIT)
def test_destination_killed_before_commit_leaves_the_vm_running_on_the_source(
        trio: tuple[AgentProc, AgentProc, AgentProc], direction: str, msg: type, when: str) -> None:
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(kill_rule(direction, msg, when, b))
        migrate_via(a, b, proxy, "m")
        out = finished(a, "m")
        assert rule.fired.is_set()
    assert out["status"] == "failed" and out["error-desc"], out
    assert b.proc.poll() is not None
    assert names(a) == ["m"]
    runs_on(a, "m")
    a.call("migrate", name="m", to=c.control)  # the source is not wedged
    assert finished(a, "m")["status"] == "completed"
    only_on(c, a, "m")


@pytest.mark.parametrize("direction, msg, when", [
    pytest.param(S2C, Ready, "before", id="dead-after-sending-Ready"),
    pytest.param(C2S, Commit, AFTER, id="dead-after-receiving-Commit"),
])
def test_destination_killed_in_the_commit_window_leaves_the_vm_paused_until_the_operator_resolves(
        trio: tuple[AgentProc, AgentProc, AgentProc], direction: str, msg: type, when: str) -> None:
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(direction, msg, CALL, when=when, callback=kill_agent(b)))
        migrate_via(a, b, proxy, "m")  # in-doubt-timeout 2 s
        out = finished(a, "m")
        assert rule.fired.is_set()
    # In doubt: the destination may have started the VM before it died, so the source never resumes it
    # by itself; it stays paused here and the error says what to do.
    assert out["status"] == "failed" and "in doubt" in out["error-desc"], out
    assert "migrate-resolve" in out["error-desc"]
    assert a.call("vm-info", name="m")["state"] == "paused"
    # B is gone for good (its VM processes died with it); the source cannot know, the operator does.
    wrong = a.cli("migrate-resolve", "m", check=False)
    assert wrong.returncode == 2  # one of --resume-here / --resumed-on-destination is required
    with pytest.raises(Exception, match="action must be one of"):
        a.call("migrate-resolve", name="m", action="bogus")
    done = a.cli("migrate-resolve", "m", "--resume-here")
    assert "resumed here" in done.stdout and "could not be reached" in done.stdout, done
    runs_on(a, "m")
    assert "resolved by the operator" in a.call("migrate-status", name="m")["summary"]
    again = a.cli("migrate-resolve", "m", "--resume-here", check=False)
    assert again.returncode == 1 and "not-found" in again.stderr  # settled once, for good
    a.call("migrate", name="m", to=c.control)
    assert finished(a, "m")["status"] == "completed"
    only_on(c, a, "m")


def test_commit_ahead_destination_killed_at_the_digest_leaves_the_vm_paused_in_doubt(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    # The price of commit ahead: the same kill point as "before-Digest" above, where the source
    # resumes at once, leaves it in doubt (COMMIT went out behind the digest), never resumed blindly.
    a, b, _ = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(kill_rule(C2S, Digest, "before", b))
        migrate_via(a, b, proxy, "m", **{"commit-ahead": True})  # in-doubt-timeout 2 s
        out = finished(a, "m")
        assert rule.fired.is_set()
    assert out["status"] == "failed" and "in doubt" in out["error-desc"], out
    assert a.call("vm-info", name="m")["state"] == "paused"
    assert "resumed here" in a.cli("migrate-resolve", "m", "--resume-here").stdout
    runs_on(a, "m")


@pytest.mark.parametrize("direction, msg, when", PRE_COMMIT)
def test_source_killed_before_commit_makes_the_destination_discard(
        trio: tuple[AgentProc, AgentProc, AgentProc], direction: str, msg: type, when: str) -> None:
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(kill_rule(direction, msg, when, a))
        try:
            migrate_via(a, b, proxy, "m")
        except Exception:
            pass  # the source died under the call
        wait_for(rule.fired.is_set, what="the kill")
    # The VM died with its agent (no re-adoption yet); the destination never starts its copy.
    wait_for(lambda: b.call("agent-info")["free-mem"] == b.call("agent-info")["max-mem"],
             what="the destination to discard its copy")
    assert names(b) == []
    wait_for(lambda: b.group_processes() == [b.proc.pid], what="the incoming VM process to exit")
    busy(c, "n")
    c.call("migrate", name="n", to=b.control)  # the destination is not wedged
    assert finished(c, "n")["status"] == "completed"
    only_on(b, c, "n")


def test_source_killed_after_commit_leaves_the_vm_running_on_the_destination(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, Commit, CALL, when=AFTER, callback=kill_agent(a)))
        migrate_via(a, b, proxy, "m")
        wait_for(rule.fired.is_set, what="the kill")
    wait_for(lambda: "m" in names(b), what="the VM on the destination")
    runs_on(b, "m")
    assert b.call("migrate-status", name="m")["status"] == "completed"
    b.call("migrate", name="m", to=c.control)
    assert finished(b, "m")["status"] == "completed"
    only_on(c, b, "m")


def test_destination_killed_after_resumed_completes_on_the_source(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    """Past RESUMED the VM belongs to the destination; killing that agent there must not make the
    source resurrect a second copy."""
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(S2C, Resumed, CALL, when=AFTER, callback=kill_agent(b)))
        migrate_via(a, b, proxy, "m")
        assert finished(a, "m")["status"] == "completed"
    assert names(a) == []


def test_incoming_vm_process_killed_before_commit_gives_the_vm_back_to_the_source(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, c = trio
    busy(a, "m")

    def kill_incoming() -> None:
        for pid in incoming_vm_pids(b):
            kill9(pid)

    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(S2C, Ready, CALL, callback=kill_incoming))
        migrate_via(a, b, proxy, "m")
        out = finished(a, "m")
        assert rule.fired.is_set()
    # COMMIT reached B, starting the VM failed, B said "not resumed, never will": the source resumes.
    assert out["status"] == "failed", out
    only_on(a, b, "m")
    a.call("migrate", name="m", to=b.control)  # and B takes the next one
    assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")


def test_source_vm_process_killed_mid_migration_fails_cleanly(trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    a, b, c = trio
    busy(a, "m")
    pid = a.call("vm-info", name="m")["pid"]
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(Rule(C2S, PageBatch, CALL, nth=2, callback=lambda: kill9(pid)))
        migrate_via(a, b, proxy, "m")  # one stream: the second batch is round 0's, before the pause
        out = finished(a, "m")
    assert out["status"] == "failed", out
    assert "m" not in names(b)
    wait_for(lambda: b.call("agent-info")["free-mem"] == b.call("agent-info")["max-mem"],
             what="the destination to discard its copy")
    # Both agents carry on.
    busy(c, "n")
    c.call("migrate", name="n", to=b.control)
    assert finished(c, "n")["status"] == "completed"
    busy(a, "o")
    a.call("migrate", name="o", to=c.control)
    assert finished(a, "o")["status"] == "completed"


def test_destination_killed_when_migrate_status_reports_round_1(trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    """The polling trigger: kill when the source's MigrationInfo says pre-copy reached round 1."""
    a, b, c = trio
    busy(a, "m")
    a.call("migrate", name="m", to=b.control, params={"max-downtime": 1, "bandwidth": 16 << 20, "compress": "none"})
    wait_status(a, "m", lambda info: len(info["rounds"]) >= 1 and info["status"] == "active", what="round 1")
    kill_agent(b)()
    out = finished(a, "m")
    assert out["status"] == "failed" and out["error-desc"], out
    assert names(a) == ["m"]
    runs_on(a, "m")
    a.call("migrate", name="m", to=c.control)
    assert finished(a, "m")["status"] == "completed"
    only_on(c, a, "m")


def test_in_doubt_with_a_live_destination_is_resolved_only_the_safe_way(
        trio: tuple[AgentProc, AgentProc, AgentProc]) -> None:
    """COMMIT reached B, which runs the VM, but neither RESUMED nor any in-doubt query gets through:
    the VM stays paused on A. Once B is reachable again, migrate-resolve refuses to resume it on A
    (B says it runs it) and destroys A's copy instead: one copy, never two."""
    a, b, c = trio
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:

        def partition() -> None:
            proxy.refuse_new = True

        proxy.add(Rule(C2S, Commit, CALL, when=AFTER, callback=partition))
        proxy.add(Rule(S2C, Resumed, CUT))
        migrate_via(a, b, proxy, "m")  # in-doubt-timeout 2 s
        out = finished(a, "m")
        assert out["status"] == "failed" and "in doubt" in out["error-desc"], out
        assert a.call("vm-info", name="m")["state"] == "paused"
        runs_on(b, "m")  # B did start it: resuming A now would run it twice
        proxy.refuse_new = False  # the partition heals
        refused = a.cli("migrate-resolve", "m", "--resume-here", check=False)
        assert refused.returncode == 1 and "destination runs" in refused.stderr, refused
        assert a.call("vm-info", name="m")["state"] == "paused"
        done = a.cli("migrate-resolve", "m", "--resumed-on-destination")
        assert "destroyed" in done.stdout and "confirmed" in done.stdout, done
    only_on(b, a, "m")
