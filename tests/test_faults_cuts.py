"""Cut the migration connection at every protocol point; the ownership rules must hold.

Real agents, real VM processes, the real migration listener, with tests/faults.py's proxy
in the path (``migrate ... migration=PROXY``). After each cut: exactly one copy of the VM
runs (before COMMIT on the source, after it on the destination), neither agent is wedged
(the next migration through a clean path completes), and no VM process is left over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proto.messages import (
    Commit,
    DeviceState,
    Digest,
    MigrateAccept,
    MigrateStart,
    PageBatch,
    Ready,
    Response,
    Resumed,
    RoundEnd,
    Sync,
    SyncAck,
)
from tests.agents import (
    AgentProc,
    agent_pair,
    digest_line,
    finished,
    names,
    runs_on,
    wait_for,
)
from tests.faults import (
    AFTER,
    C2S,
    CUT,
    CUT_AFTER_BYTES,
    S2C,
    STALL,
    FaultProxy,
    Rule,
    fd_count,
    migration_target,
    round_is,
)

pytestmark = pytest.mark.timeout(120)

VERIFY_ARGS = {"ws": "2M", "steps": "1500000"}
VERIFY_MEM = 8 << 20  # the verify guests here (tests/conftest.py's unmigrated run)


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def pair(agents: tuple[AgentProc, AgentProc]) -> Iterator[tuple[AgentProc, AgentProc]]:
    a, b = agents
    for agent in agents:
        agent.wait_spare()  # counted in the descriptors; replaced after each incoming migration
    fds = (fd_count(a.proc.pid), fd_count(b.proc.pid))
    yield a, b
    for agent in (a, b):
        agent.destroy_all_vms()  # also checks no VM process is left
    # Nothing leaks: the agents' descriptors come back to where they were (sessions close theirs).
    wait_for(lambda: (fd_count(a.proc.pid), fd_count(b.proc.pid)) <= fds, timeout=10,
             what=f"agent descriptors back to {fds}")


def only_on(owner: AgentProc, other: AgentProc, name: str) -> None:
    """Exactly one copy: on ``owner``, running; none on ``other``."""
    assert name in names(owner)
    assert name not in names(other)
    runs_on(owner, name)


def migrate_via(src: AgentProc, dst: AgentProc, proxy: FaultProxy, name: str, **params: Any) -> None:
    """Start a migration whose memory stream goes through ``proxy``; a refusal in setup is fine.

    One stream unless ``params`` says otherwise: the rules count the frames of one connection
    (the main one), and over several streams its n-th PageBatch may come rounds later, or never
    (tests/test_streams.py cuts the extra streams)."""
    params = {"streams": 1, **params}
    try:
        src.call("migrate", name=name, to=dst.control, migration=proxy.address_text, params=params,
                 **{"in-doubt-timeout": 2})
    except Exception as e:  # a cut during setup fails the call itself: the status says the rest
        assert src.call("migrate-status", name=name)["status"] == "failed", e


def next_migration_works(a: AgentProc, b: AgentProc, name: str) -> None:
    """Neither agent is wedged: the VM goes there and back on a clean path."""
    owner, other = (a, b) if name in names(a) else (b, a)
    owner.call("migrate", name=name, to=other.control)
    assert finished(owner, name)["status"] == "completed"
    only_on(other, owner, name)
    other.call("migrate", name=name, to=owner.control)
    assert finished(other, name)["status"] == "completed"
    only_on(owner, other, name)


def counter(agent: AgentProc, name: str) -> None:
    agent.call("vm-create", name=name, program="counter", mem="16M", args={"every": "4096"})


def busy(agent: AgentProc, name: str) -> None:
    """A guest that keeps dirtying memory: pre-copy needs several rounds."""
    agent.call("vm-create", name=name, program="memstress", mem="16M",
               args={"ws": "8M", "rate": "0", "values": "random"})
    wait_for(lambda: agent.call("vm-info", name=name)["instructions"] > 50_000, what="memstress under way")


# Where to cut, and who owns the VM afterwards ("src" or "dst").
CUTS = [
    pytest.param(Rule(C2S, MigrateStart, CUT), "src", id="setup-before-MigrateStart"),
    pytest.param(Rule(S2C, MigrateAccept, CUT), "src", id="setup-before-MigrateAccept"),
    pytest.param(Rule(C2S, PageBatch, CUT_AFTER_BYTES, nth=2, nbytes=5000), "src", id="round0-mid-PageBatch"),
    pytest.param(Rule(C2S, Sync, CUT), "src", id="round0-before-Sync"),
    pytest.param(Rule(S2C, SyncAck, CUT), "src", id="round0-before-SyncAck"),
    pytest.param(Rule(C2S, RoundEnd, CUT, where=round_is(0)), "src", id="round0-before-RoundEnd"),
    pytest.param(Rule(C2S, RoundEnd, CUT, where=round_is(1)), "src", id="round1-before-RoundEnd"),
    pytest.param(Rule(C2S, DeviceState, CUT), "src", id="stop-and-copy-before-DeviceState"),
    pytest.param(Rule(C2S, Digest, CUT), "src", id="stop-and-copy-before-Digest"),
    pytest.param(Rule(S2C, Ready, CUT), "src", id="before-Ready"),
    pytest.param(Rule(C2S, Commit, CUT), "src", id="after-Ready-before-Commit"),
    pytest.param(Rule(C2S, Commit, CUT, when=AFTER), "dst", id="after-Commit-before-Resumed"),
    pytest.param(Rule(S2C, Resumed, CUT), "dst", id="Resumed-lost"),
    pytest.param(Rule(S2C, Resumed, CUT, when=AFTER), "dst", id="after-Resumed"),
]


# With commit ahead (COMMIT right behind the digest) the points where it differs. A cut before
# Ready is left out: whether COMMIT reached the destination before the cut is a race there.
CUTS_AHEAD = [
    pytest.param(Rule(C2S, Digest, CUT), "src", id="ahead-before-Digest"),
    pytest.param(Rule(C2S, Commit, CUT), "src", id="ahead-before-Commit"),  # in doubt: the query says no
    pytest.param(Rule(S2C, Resumed, CUT), "dst", id="ahead-Resumed-lost"),
]


@pytest.mark.parametrize("rule, owner, ahead", [pytest.param(*p.values, False, id=p.id) for p in CUTS]
                         + [pytest.param(*p.values, True, id=p.id) for p in CUTS_AHEAD])
def test_a_cut_at_every_point_leaves_exactly_one_running_copy(pair: tuple[AgentProc, AgentProc], rule: Rule,
                                                              owner: str, ahead: bool) -> None:
    a, b = pair
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(rule)
        # max-downtime 1 ms: a memstress guest does not converge, so round 1 is a pre-copy round;
        # force switches over after 3 rounds.
        migrate_via(a, b, proxy, "m", **{"max-downtime": 1, "max-rounds": 3, "force": True, "commit-ahead": ahead})
        out = finished(a, "m")
        assert rule.fired.is_set(), f"the cut never happened; frames seen: {proxy.types(C2S)} / {proxy.types(S2C)}"
    if owner == "src":
        assert out["status"] == "failed" and out["error-desc"], out
        only_on(a, b, "m")
        wait_for(lambda: b.call("agent-info")["free-mem"] == b.call("agent-info")["max-mem"],
                 what="the destination to free its reservation")
    else:
        assert out["status"] == "completed", out
        only_on(b, a, "m")
    next_migration_works(a, b, "m")


@pytest.mark.parametrize("rule, owner", [
    pytest.param(Rule(C2S, DeviceState, CUT), "src", id="paused-then-resumed-on-the-source"),
    pytest.param(Rule(S2C, Resumed, CUT), "dst", id="resumed-on-the-destination-in-doubt"),
])
def test_verify_guest_cut_mid_migration_ends_with_the_unmigrated_digest(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes], rule: Rule, owner: str) -> None:
    a, b = pair
    a.call("vm-create", name="v", program="verify", mem="8M", args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name="v")["instructions"] > 100_000, what="verify under way")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(rule)
        migrate_via(a, b, proxy, "v")
        out = finished(a, "v")
        assert rule.fired.is_set()
    where = a if owner == "src" else b
    assert out["status"] == ("failed" if owner == "src" else "completed"), out
    wait_for(lambda: where.call("vm-info", name="v")["state"] == "halted", timeout=100, what="verify to halt")
    assert digest_line(where.cli("vm", "console", "v").stdout.encode()) == unmigrated_digest()


def test_a_stalled_link_is_cancelled_and_the_vm_runs_on(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    busy(a, "s")
    with FaultProxy(migration_target(b)) as proxy:
        stall = proxy.add(Rule(C2S, PageBatch, STALL, nth=3))
        migrate_via(a, b, proxy, "s")
        wait_for(stall.fired.is_set, what="the stall")
        a.cli("migrate-cancel", "s")
        assert a.call("migrate-status", name="s")["status"] == "cancelled"
        only_on(a, b, "s")
    next_migration_works(a, b, "s")


def test_a_slow_throttled_link_still_completes_through_the_cli(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    counter(a, "t")
    with FaultProxy(migration_target(b), delay_s=0.002, throttle=8 << 20) as proxy:
        out = a.cli("migrate", "t", "--to", b.control, "--migration-address", proxy.address_text,
                    "--in-doubt-timeout", "2", json=True).json
        assert out["status"] == "completed", out
        assert out["peer"] == "B" and proxy.connections == out["streams"]  # every stream went through the proxy
    only_on(b, a, "t")
    bad = b.cli("migrate", "t", "--to", a.control, "--in-doubt-timeout", "0", check=False)
    assert bad.returncode == 2  # a usage error, caught by the CLI
    with pytest.raises(Exception, match="in-doubt-timeout"):
        b.call("migrate", name="t", to=a.control, **{"in-doubt-timeout": -1})
    with pytest.raises(Exception, match="invalid address"):
        b.call("migrate", name="t", to=a.control, migration="nowhere")
    only_on(b, a, "t")


@pytest.mark.parametrize("direction, nbytes", [(C2S, 3 << 20), (S2C, 100)])
def test_a_cut_after_a_byte_count_leaves_the_vm_on_the_source(pair: tuple[AgentProc, AgentProc], direction: str,
                                                               nbytes: int) -> None:
    """Cut the stream at a byte count, wherever frames fall: 3 MiB into the source's stream
    (round 0), or 100 bytes into the destination's answers (inside its handshake replies)."""
    a, b = pair
    busy(a, "n")
    with FaultProxy(migration_target(b)) as proxy:
        proxy.cut_after_bytes(direction, nbytes)
        migrate_via(a, b, proxy, "n")
        out = finished(a, "n")
    assert out["status"] == "failed", out
    only_on(a, b, "n")
    next_migration_works(a, b, "n")


def test_a_cut_on_the_control_connection_between_agents_refuses_cleanly(pair: tuple[AgentProc, AgentProc]) -> None:
    """The source asks the destination's control API for its migration address first: cut that
    answer and the migrate call fails with a clear error, before anything is touched."""
    a, b = pair
    counter(a, "c")
    control = b.control.rpartition(":")
    with FaultProxy((control[0], int(control[2]))) as proxy:
        rule = proxy.add(Rule(S2C, Response, CUT))
        failed = a.cli("migrate", "c", "--to", proxy.address_text, check=False)
        assert rule.fired.is_set()
        assert failed.returncode == 1 and "destination" in failed.stderr, failed
        only_on(a, b, "c")
        # The same path, untouched, works: the control API through the proxy, memory direct.
        out = a.cli("migrate", "c", "--to", proxy.address_text, json=True).json
        assert out["status"] == "completed", out
    only_on(b, a, "c")
