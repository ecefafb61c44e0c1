"""A destination agent killed (kill -9) in the post-copy phase: restarted on the same state dir,
it takes the VM process's post-copy over (agent/migration/postcopy_readopt.py) and the source's
recovery completes the migration (docs/RELIABILITY.md, "Post-copy")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.migration import postcopy_record
from tests.agents import (
    AgentProc,
    agent_list,
    digest_line,
    finished,
    make_key,
    names,
    start_agent,
    wait_for,
)
from tests.faults import FaultProxy, migration_target
from tests.test_postcopy_recover import (  # noqa: F401 (conftest reads VERIFY_ARGS)
    PARAMS,
    RECOVERING,
    VERIFY_ARGS,
    _kill_mid_push,
    _pid_alive,
    _verify_under_way,
)
from vmruntime import postcopy

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    yield from agent_list()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["minor", "missing"])
def test_a_destination_agent_killed_in_postcopy_takes_it_up_again_after_its_restart(
        tmp_path: Path, agents: list[AgentProc], unmigrated_digest: Callable[[], bytes], mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the destination agent mid-push: its VM process survives (running, or blocked on
    a missing page), the source pauses; the restarted agent takes the userfaultfd over, the
    source's recovery joins the phase it opened, and the migration completes: the guest's digest
    is the unmigrated one, the VM runs on the destination only, the source's VM process is gone.
    In both modes: MINOR (stale copies kept in the page cache) and MISSING (punched)."""
    if mode == "missing":
        monkeypatch.setenv(postcopy.MINOR_ENV, "0")  # the agents inherit it
    elif not postcopy.minor_available():
        pytest.skip("userfaultfd MINOR mode on shmem is not available here")
    key = make_key(tmp_path)
    a, b = start_agent(tmp_path, "A", key), start_agent(tmp_path, "B", key)
    agents += [a, b]
    source_pid = _verify_under_way(a, "rd")
    note, killed = _kill_mid_push(b)
    with FaultProxy(migration_target(b)) as proxy:
        proxy.add(note)
        proxy.add(killed)
        a.call("migrate", name="rd", to=b.control, migration=proxy.address_text, params=PARAMS)
        wait_for(killed.fired.is_set, timeout=60, what="the kill")
        wait_for(lambda: a.call("migrate-status", name="rd")["status"] in RECOVERING, timeout=30,
                 what="the source to pause")
        assert postcopy_record.names(postcopy_record.directory(b.state_dir)) == ["rd"]
        dest_pid = b.recorded_vm_pids()["rd"]
        assert _pid_alive(dest_pid) and _pid_alive(source_pid)
        b2 = start_agent(tmp_path, "B", key)
        agents.append(b2)
        proxy.target = migration_target(b2)  # the source's reconnects go through the proxy
        out = finished(a, "rd", timeout=120)
    assert out["status"] == "completed", (out, b2.log()[-4000:])
    assert out["postcopy-recoveries"] >= 1, out
    assert f"minor={mode == 'minor'}" in b2.log().split("post-copy taken over after an agent restart", 1)[1]
    assert "rd" not in names(a) and "rd" in names(b2)
    assert b2.recorded_vm_pids()["rd"] == dest_pid  # the same VM process, re-adopted
    wait_for(lambda: not _pid_alive(source_pid), what="the source's VM process to end")
    assert postcopy_record.names(postcopy_record.directory(b2.state_dir)) == []
    wait_for(lambda: b2.call("vm-info", name="rd")["state"] == "halted", timeout=120, what="verify to halt")
    assert digest_line(b2.cli("vm", "console", "rd").stdout.encode()) == unmigrated_digest()
    b2.call("vm-destroy", name="rd")
