"""Agent restarts: VM processes outlive their agent, and a restarted agent re-adopts them.

Real agents, real VM processes: an agent is killed (kill -9) or stopped (SIGTERM) with VMs
running, a new agent starts on the same state dir and must list the same VM processes, running,
with a working console, and migrate them; a VM whose process died meanwhile is reported and its
record removed; a migration cut by the source agent's death resolves by the ownership rules
(docs/RELIABILITY.md "Agent restarts").
"""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proto.messages import Commit, DeviceState, Message, PageBatch, Resumed
from tests.agents import AgentProc, agent_list, digest_line, make_key, start_agent, wait_for
from tests.faults import C2S, CALL, CUT, S2C, FaultProxy, Rule, kill9, migration_target
from tests.test_faults_cuts import busy, finished, migrate_via, names, only_on, runs_on
from vmruntime.runlocal import run_local

pytestmark = pytest.mark.timeout(180)

VERIFY_ARGS = {"ws": "4M", "steps": "4000000"}


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return make_key(tmp_path)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProc]]:
    """Every agent a test starts (append to it); all stopped, their VMs killed, nothing leaked."""
    yield from agent_list()


def kill_agent(agent: AgentProc) -> None:
    """kill -9 the agent; its VM processes run on (tests/agents.py leaves them for the next agent)."""
    agent.stop(signal.SIGKILL, keep_vms=True)
    assert agent.leaked == []


def restart(tmp_path: Path, old: AgentProc, agents: list[AgentProc]) -> AgentProc:
    new = start_agent(tmp_path, old.name, old.key_path)
    agents.append(new)
    return new


def test_a_killed_agent_s_vms_are_re_adopted_keep_running_and_migrate(
        tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    a = start_agent(tmp_path, "A", key)
    agents.append(a)
    a.call("vm-create", name="c1", program="counter", mem="16M")
    a.call("vm-create", name="v1", program="verify", mem="16M", args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name="v1")["instructions"] > 100_000, what="verify under way")
    before = {v["name"]: v for v in a.call("vm-list")["vms"]}
    kill_agent(a)
    assert all(os.path.exists(f"/proc/{v['pid']}") for v in before.values())

    a2 = restart(tmp_path, a, agents)
    after = {v["name"]: v for v in a2.call("vm-list")["vms"]}
    assert sorted(after) == ["c1", "v1"]
    for name in after:  # the very same processes, taken over
        assert after[name]["pid"] == before[name]["pid"]
        assert after[name]["instructions"] >= before[name]["instructions"]
    runs_on(a2, "c1")
    # The console works: the counter's output reaches the new agent.
    seen = a2.call("vm-info", name="c1")["console-bytes"]
    wait_for(lambda: a2.call("vm-info", name="c1")["console-bytes"] > seen, what="console output after re-adoption")
    assert "count " in a2.cli("vm", "console", "c1").stdout
    # The verify guest, run across the agent's death, ends with the digest of an unmigrated run.
    wait_for(lambda: a2.call("vm-info", name="v1")["state"] == "halted", timeout=100, what="verify to halt")
    out = io.BytesIO()
    assert run_local("verify", 16 << 20, dict(VERIFY_ARGS), out, max_seconds=100) == 0
    assert digest_line(a2.cli("vm", "console", "v1").stdout.encode()) == digest_line(out.getvalue())
    # A re-adopted VM migrates like any other.
    b = start_agent(tmp_path, "B", key)
    agents.append(b)
    a2.call("migrate", name="c1", to=b.control)
    assert finished(a2, "c1")["status"] == "completed"
    only_on(b, a2, "c1")


def test_a_vm_whose_process_died_while_the_agent_was_down_is_reported_and_forgotten(
        tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    a = start_agent(tmp_path, "A", key)
    agents.append(a)
    a.call("vm-create", name="keep", program="idle", mem="4M")
    a.call("vm-create", name="gone", program="idle", mem="4M")
    gone_pid = a.call("vm-info", name="gone")["pid"]
    kill_agent(a)
    kill9(gone_pid)
    wait_for(lambda: "gone" not in a.recorded_vm_pids(), what="the VM process to die")
    a2 = restart(tmp_path, a, agents)
    assert names(a2) == ["keep"]
    log = a2.log()
    assert 'msg="vm lost with the previous agent run" vm=gone' in log and "is gone" in log
    records = a2.state_dir / "vms"
    assert not (records / "gone.json").exists() and not (records / "gone.sock").exists()
    assert (records / "keep.json").exists()
    # Its name and memory are free again.
    a2.call("vm-create", name="gone", program="idle", mem="4M")
    assert names(a2) == ["gone", "keep"]


def test_sigterm_then_restart_re_adopts_the_vms(tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    a = start_agent(tmp_path, "A", key)
    agents.append(a)
    a.call("vm-create", name="c1", program="counter", mem="16M")
    a.call("vm-create", name="p1", program="counter", mem="16M", paused=True)
    pids = {v["name"]: v["pid"] for v in a.call("vm-list")["vms"]}
    assert a.stop(keep_vms=True) == 0 and a.leaked == []
    a2 = restart(tmp_path, a, agents)
    listed = {v["name"]: v for v in a2.call("vm-list")["vms"]}
    assert {n: v["pid"] for n, v in listed.items()} == pids
    assert listed["p1"]["state"] == "paused"  # a VM paused by the operator stays paused
    runs_on(a2, "c1")
    a2.call("vm-resume", name="p1")
    runs_on(a2, "p1")
    # And `vm destroy` of a re-adopted VM stops its process (not our child: followed by pidfd).
    a2.call("vm-destroy", name="c1")
    wait_for(lambda: not os.path.exists(f"/proc/{pids['c1']}/stat")
             or open(f"/proc/{pids['c1']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
             what="the destroyed VM's process to exit")
    assert names(a2) == ["p1"]


def test_a_source_agent_killed_in_pre_copy_and_restarted_runs_the_vm_and_migrates_again(
        tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    agents += [a, b]
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, PageBatch, CALL, nth=2, callback=lambda: kill_agent(a)))
        try:
            migrate_via(a, b, proxy, "m")
        except Exception:
            pass  # the source died under the call
        wait_for(rule.fired.is_set, what="the kill")
    # The destination discards its copy when the connection drops.
    wait_for(lambda: discarded(b), what="the destination to discard its copy")
    a2 = restart(tmp_path, a, agents)
    info = a2.call("vm-info", name="m")
    assert info["state"] == "running" and info["throttle"] == 0, info
    only_on(a2, b, "m")
    assert "migration cut by an agent restart in pre-copy" in a2.log()
    a2.call("migrate", name="m", to=b.control)
    assert finished(a2, "m")["status"] == "completed"
    only_on(b, a2, "m")


def discarded(agent: AgentProc) -> bool:
    """The agent holds no guest RAM: an incoming copy it had is discarded."""
    info = agent.call("agent-info")
    return bool(info["free-mem"] == info["max-mem"])


def kill_source_when(tmp_path: Path, key: Path, agents: list[AgentProc], msg: type[Message],
                     then: Callable[[AgentProc], bool]) -> tuple[AgentProc, AgentProc]:
    """Migrate a busy VM "m" from a new agent A to a new agent B and kill -9 A when the first ``msg``
    frame reaches the proxy between them (before the proxy passes it on); returns (A, B) once
    ``then(B)`` holds. The proxy stays up until then: closing it right after the kill could drop
    the frame it was about to pass on."""
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    agents += [a, b]
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, msg, CALL, callback=lambda: kill_agent(a)))
        try:
            migrate_via(a, b, proxy, "m")
        except Exception:
            pass  # the source died under the call
        wait_for(rule.fired.is_set, what="the kill")
        wait_for(lambda: then(b), timeout=20, what=f"the destination to settle after the kill at {msg.__name__}")
    return a, b


def test_a_source_agent_killed_in_stop_and_copy_before_commit_resumes_the_vm_on_restart(
        tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    a, b = kill_source_when(tmp_path, key, agents, DeviceState, then=discarded)
    a2 = restart(tmp_path, a, agents)
    # Paused for stop-and-copy, but COMMIT was never recorded as sent: the destination cannot run
    # the VM, so the restarted agent runs it here again by itself.
    runs_on(a2, "m")
    assert "migration cut by an agent restart before COMMIT" in a2.log()
    assert names(b) == []
    a2.call("migrate", name="m", to=b.control)
    assert finished(a2, "m")["status"] == "completed"
    only_on(b, a2, "m")


@pytest.mark.parametrize("delivered", [True, False], ids=["commit-delivered", "commit-lost"])
def test_a_source_agent_killed_as_commit_goes_out_asks_the_destination_after_its_restart(
        tmp_path: Path, key: Path, agents: list[AgentProc], delivered: bool) -> None:
    """The source dies with its COMMIT in flight, recorded as sent. Delivered (the proxy holds the
    frame, then passes it on), the destination starts the VM; lost (the link dies with the
    source), the destination discards its copy. The restarted source never runs the VM on a
    guess: it asks the destination its record names (through the same proxy, whose rules apply to
    the first connection only) and destroys its paused copy, or runs the VM here again."""
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    agents += [a, b]
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, Commit, CALL, callback=lambda: kill_agent(a)))
        if not delivered:
            proxy.add(Rule(C2S, Commit, CUT))
        try:
            migrate_via(a, b, proxy, "m")
        except Exception:
            pass  # the source died under the call
        wait_for(rule.fired.is_set, what="the kill")
        wait_for(lambda: ("m" in names(b)) if delivered else discarded(b), timeout=20,
                 what="the destination to settle after the kill")
        a2 = restart(tmp_path, a, agents)
        if delivered:
            wait_for(lambda: names(a2) == [], timeout=30, what="the restarted source to destroy its copy")
            only_on(b, a2, "m")
        else:
            wait_for(lambda: a2.call("vm-info", name="m")["state"] == "running", timeout=30,
                     what="the restarted source to run the VM again")
            only_on(a2, b, "m")
    assert "asking the destination about a migration left in doubt" in a2.log()
    status = a2.call("migrate-status", name="m")
    done = "the copy here is destroyed" if delivered else "the destination did not resume the VM"
    assert done in status["summary"], status
    assert status["status"] == ("completed" if delivered else "failed"), status
    if not delivered:  # settled for good: the next start finds nothing in doubt
        a2.stop(keep_vms=True)
        seen = len(a2.log())  # one log file for every run of agent A
        a3 = restart(tmp_path, a2, agents)
        assert a3.call("vm-info", name="m")["state"] == "running"
        assert "in doubt" not in a3.log()[seen:]


def test_a_destination_agent_killed_before_resumed_arrives_says_resumed_after_its_restart(
        tmp_path: Path, key: Path, agents: list[AgentProc]) -> None:
    # B started the VM and recorded it, then died before RESUMED reached A (the proxy drops it). A,
    # in doubt, keeps asking; B restarts on the same migration address, re-adopts the VM, and must
    # answer "resumed": it knows nothing of the migration, but the VM's record names it. Answering
    # "not resumed" would make A run the VM too: two copies.
    a = start_agent(tmp_path, "A", key)
    b = start_agent(tmp_path, "B", key)
    agents += [a, b]
    busy(a, "m")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(S2C, Resumed, CALL, callback=lambda: kill_agent(b)))
        proxy.add(Rule(S2C, Resumed, CUT))
        a.call("migrate", name="m", to=b.control, migration=proxy.address_text, **{"in-doubt-timeout": 60})
        wait_for(rule.fired.is_set, timeout=30, what="the kill")
        wait_for(lambda: b.proc.poll() is not None, what="B to die")
        b2 = start_agent(tmp_path, "B", key, migration=b.migration)
        agents.append(b2)
        info = finished(a, "m", timeout=90)
    assert info["status"] == "completed", info
    only_on(b2, a, "m")
    assert "in-doubt query answered" in b2.log()
