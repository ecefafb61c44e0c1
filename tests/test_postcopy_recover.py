"""Post-copy recovery end to end: real agents on loopback, real VM processes, the migration's
link cut by the fault proxy at three points of the post-copy phase
(agent/migration/postcopy_recover.py; docs/RELIABILITY.md, "Post-copy").

A lost link is not a failure once the destination runs the VM: both sides pause, the source
reconnects, the destination says which pages it still lacks, and the migration completes. The
oracle is the `verify` guest's digest: it matches an unmigrated run only if no page was lost,
stale or duplicated on the way; ownership: the VM runs on the destination, and the source's VM
process is gone.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.migration import postcopy_record
from proto.messages import PageBatch, Resumed
from proto.postcopy_messages import PostcopyDone, PostcopyRecover
from tests.agents import (
    AgentProc,
    agent_list,
    agent_pair,
    digest_line,
    finished,
    make_key,
    names,
    start_agent,
    wait_for,
)
from tests.faults import AFTER, BEFORE, C2S, CALL, CUT, S2C, FaultProxy, Frame, Rule, migration_target

pytestmark = pytest.mark.timeout(240)

VERIFY_ARGS = {"ws": "8M", "steps": "3000000"}
# Capped, so the post-copy phase lasts seconds: the push of the stale pages is several batches.
PARAMS = {"postcopy-after": "1", "bandwidth": 2 << 20}
RECOVERING = ("postcopy-paused", "postcopy-recover")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path_factory.mktemp("agents"))


def _pid_alive(pid: int) -> bool:
    """Running (a zombie is not: a re-adopted VM process is not the restarted agent's child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _after_resumed() -> tuple[Rule, Callable[[Frame], bool]]:
    """A rule that notes RESUMED passing, and a predicate true from then on."""
    seen = threading.Event()
    return Rule(S2C, Resumed, CALL, when=AFTER, callback=seen.set), lambda _f: seen.is_set()


def _cut_right_after_the_switch_over() -> list[Rule]:
    return [Rule(S2C, Resumed, CUT, when=AFTER)]


def _cut_mid_push() -> list[Rule]:
    note, after = _after_resumed()
    return [note, Rule(C2S, PageBatch, CUT, nth=2, where=after)]


def _cut_at_the_end() -> list[Rule]:
    """PostcopyDone lost: the destination has every page, the source never heard it."""
    return [Rule(S2C, PostcopyDone, CUT, when=BEFORE)]


def _verify_under_way(a: AgentProc, name: str) -> int:
    """A `verify` guest ``name`` on ``a``, running; the pid of its VM process."""
    a.call("vm-create", name=name, program="verify", mem="16M", args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name=name)["instructions"] > 100_000, what="verify under way")
    pid: int = a.recorded_vm_pids()[name]
    return pid


def _kill_mid_push(victim: AgentProc) -> list[Rule]:
    """Rules killing ``victim`` (kill -9, its VMs left running) at the push's second batch after RESUMED."""
    def kill() -> None:
        victim.stop(signal.SIGKILL, keep_vms=True)

    note, after = _after_resumed()
    return [note, Rule(C2S, PageBatch, CALL, nth=2, where=after, callback=kill)]


def _migrate_through_a_cut(pair: tuple[AgentProc, AgentProc], digest: Callable[[], bytes], name: str,
                           rules: list[Rule], meanwhile: Callable[[], None] | None = None) -> dict[str, Any]:
    a, b = pair
    source_pid = _verify_under_way(a, name)
    with FaultProxy(migration_target(b)) as proxy:
        for rule in rules:
            proxy.add(rule)
        a.call("migrate", name=name, to=b.control, migration=proxy.address_text, params=PARAMS)
        if meanwhile is not None:
            meanwhile()
        out = finished(a, name, timeout=120)
    assert all(r.fired.is_set() for r in rules), "the cut never happened"
    assert out["status"] == "completed", out
    assert out["postcopy-recoveries"] >= 1, out
    incoming = finished(b, name)
    assert incoming["status"] == "completed" and incoming["pages-unsettled"] == 0, incoming
    # Exactly once: gone here (its process too), on the destination only.
    assert name not in names(a) and not _pid_alive(source_pid)
    assert name in names(b)
    wait_for(lambda: b.call("vm-info", name=name)["state"] == "halted", timeout=120, what="verify to halt")
    assert digest_line(b.cli("vm", "console", name).stdout.encode()) == digest()
    b.call("vm-destroy", name=name)
    return out


class _EveryTime(Rule):
    """Fires on every matching frame (a Rule fires on its nth only)."""

    def matches(self, frame: Frame) -> bool:
        self.seen = 0
        return super().matches(frame)


def test_a_link_cut_right_after_the_switch_over_is_recovered(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes]) -> None:
    """Cut right after RESUMED, and every recovery cut too while ``blocked``: both sides stay
    postcopy-paused (the VM runs on there), migrate-resolve is refused on the source and
    migrate-recover on the destination; migrate-recover on the source forces an attempt; once
    unblocked, the recovery completes the migration."""
    a, b = pair
    blocked = threading.Event()
    blocked.set()
    hold = _EveryTime(C2S, PostcopyRecover, CUT, conn=None, where=lambda _f: blocked.is_set())

    def paused_on_both() -> None:
        assert wait_for(lambda: a.call("migrate-status", name="rc1")["status"] in RECOVERING and
                        b.call("migrate-status", name="rc1")["status"] == "postcopy-paused" and hold.fired.is_set(),
                        timeout=60, what="both sides postcopy-paused")
        assert b.call("vm-info", name="rc1")["state"] in ("running", "halted")
        # Paused, its RAM kept ("halted" when the guest ended its run before the switch-over).
        assert a.call("vm-info", name="rc1")["state"] in ("migrating", "halted")
        # what a restarted destination agent would take the phase up from (postcopy_record)
        rec = postcopy_record.read(postcopy_record.directory(b.state_dir), "rc1")
        assert rec is not None and rec.peer == "A" and rec.mem == 16 << 20 and rec.vm_fd >= 0, rec
        assert rec.migration_id == json.loads((b.state_dir / "vms" / "rc1.json").read_text())["arrived-by"]
        r = a.cli("migrate-resolve", "rc1", "--resume-here", check=False)
        assert r.returncode != 0 and "the destination owns it since COMMIT" in r.stderr, r.stderr
        r = b.cli("migrate-recover", "rc1", check=False)
        assert r.returncode != 0 and "on the source's agent (A)" in r.stderr, r.stderr
        assert a.cli("migrate-recover", "rc1").stdout.startswith("rc1: reconnecting to B at once")
        wait_for(lambda: "post-copy recovery forced by the operator" in a.log(), what="the forced attempt")
        blocked.clear()
        a.cli("migrate-recover", "rc1", check=False)  # (the backoff's next attempt may have won the race)

    _migrate_through_a_cut(pair, unmigrated_digest, "rc1", [*_cut_right_after_the_switch_over(), hold],
                           meanwhile=paused_on_both)
    assert postcopy_record.names(postcopy_record.directory(b.state_dir)) == []  # gone with postcopy-end


def test_migrate_recover_without_a_paused_postcopy_fails(pair: tuple[AgentProc, AgentProc]) -> None:
    r = pair[0].cli("migrate-recover", "nosuchvm", check=False)
    assert r.returncode != 0 and "no post-copy of VM 'nosuchvm' is paused on A" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_link_cut_mid_push_is_recovered(pair: tuple[AgentProc, AgentProc],
                                          unmigrated_digest: Callable[[], bytes]) -> None:
    out = _migrate_through_a_cut(pair, unmigrated_digest, "rc2", _cut_mid_push())
    assert out["postcopy-pages-pushed"] > 0, out


@pytest.mark.slow
def test_a_lost_postcopy_done_is_recovered(pair: tuple[AgentProc, AgentProc],
                                           unmigrated_digest: Callable[[], bytes]) -> None:
    _migrate_through_a_cut(pair, unmigrated_digest, "rc3", _cut_at_the_end())



@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    """Every agent a test starts (append to it); all stopped, their VMs killed, nothing leaked."""
    yield from agent_list()


@pytest.mark.slow
def test_a_source_agent_killed_in_postcopy_takes_it_up_again_after_its_restart(
        tmp_path: Path, agents: list[AgentProc], unmigrated_digest: Callable[[], bytes]) -> None:
    """kill -9 of the source agent mid-push: its paused VM process and memfd survive, the
    destination pauses (the VM runs on there); the restarted agent re-adopts the VM, reconnects
    with the recorded migration id and completes the post-copy from the memfd."""
    key = make_key(tmp_path)
    a, b = start_agent(tmp_path, "A", key), start_agent(tmp_path, "B", key)
    agents += [a, b]
    source_pid = _verify_under_way(a, "rk")
    note, killed = _kill_mid_push(a)
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(note)
        proxy.add(killed)
        a.call("migrate", name="rk", to=b.control, migration=proxy.address_text, params=PARAMS)
        wait_for(killed.fired.is_set, timeout=60, what="the kill")
        wait_for(lambda: b.call("migrate-status", name="rk")["status"] == "postcopy-paused", timeout=30,
                 what="the destination to pause")
        assert _pid_alive(source_pid)  # (the guest there may have finished its work already: halted)
        assert b.call("vm-info", name="rk")["state"] in ("running", "halted")
        a2 = start_agent(tmp_path, "A", key)
        agents.append(a2)
        out = finished(a2, "rk", timeout=120)
    assert out["status"] == "completed", out
    assert "taken up again after an agent restart" in out["summary"], out
    incoming = finished(b, "rk")
    assert incoming["status"] == "completed" and incoming["postcopy-recoveries"] == 1, incoming
    assert "rk" not in names(a2)
    wait_for(lambda: not _pid_alive(source_pid), what="the source's VM process to end")
    wait_for(lambda: b.call("vm-info", name="rk")["state"] == "halted", timeout=120, what="verify to halt")
    assert digest_line(b.cli("vm", "console", "rk").stdout.encode()) == unmigrated_digest()
    b.call("vm-destroy", name="rk")


def test_a_recovery_for_an_unknown_migration_is_refused_by_a_real_listener(
        pair: tuple[AgentProc, AgentProc]) -> None:
    """Over a real connection to the destination's migration listener, authenticated: the
    refusal arrives as MigrateRefuse with the reason, and the agent carries on."""
    from agent.migration.common import client_handshake
    from agent.migration.transport import Connection, connect
    from proto.messages import MigrateRefuse
    from proto.state import SourceMachine

    a, b = pair
    conn = Connection(connect(migration_target(b)))
    try:
        assert client_handshake(conn, a.key_path.read_bytes().strip(), "A") == "B"
        conn.start(SourceMachine())
        conn.send(PostcopyRecover("0123456789abcdef", "nosuchvm"))
        reply = conn.recv()
    finally:
        conn.close()
    assert isinstance(reply, MigrateRefuse) and reply.code == "not-found", reply
    assert reply.reason.startswith("unknown migration id 0123456789abcdef"), reply
    wait_for(lambda: "post-copy recovery refused" in b.log(), what="the refusal logged")
    b.call("agent-info")
