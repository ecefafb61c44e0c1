"""The ownership rules of re-adoption after an agent restart (agent/vms/adopt.py).

First the decision alone: `settle_action` for every recorded phase, run state before the migration
and run state found, against the table of docs/RELIABILITY.md "Agent restarts", written out here
case by case. Then the same rules applied to real VM processes, in-process: a VM manager records a
VM mid-migration and lets go of it at shutdown (its process runs on, listening); a second manager
over the same state dir re-adopts it and must leave it in the state the rules say.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.logs import Log
from agent.records import VMRecords
from agent.vms import Settle, VMManager, settle_action

MiB = 1 << 20

# (phase, run state when the migration began, paused now) -> outcome, every case written out.
RULES: dict[tuple[str | None, str | None, bool], Settle] = {
    (None, None, False): Settle.AS_FOUND,
    (None, None, True): Settle.AS_FOUND,
    (None, "running", True): Settle.AS_FOUND,
    ("precopy", "running", True): Settle.RESUME,  # paused by the stop-and-copy: COMMIT never went out
    ("precopy", "running", False): Settle.LEAVE,  # still running: cut in pre-copy
    ("precopy", "paused", True): Settle.LEAVE,  # the operator had paused it: it stays paused
    ("precopy", "paused", False): Settle.LEAVE,
    ("precopy", None, True): Settle.LEAVE,
    ("stop-and-copy", None, True): Settle.RESUME,  # older records: the phase says who paused it
    ("stop-and-copy", "paused", True): Settle.RESUME,
    ("stop-and-copy", "running", False): Settle.LEAVE,
    ("commit-sent", "running", True): Settle.IN_DOUBT,  # COMMIT may have reached the destination
    ("commit-sent", "running", False): Settle.IN_DOUBT,
    ("commit-sent", "paused", True): Settle.IN_DOUBT,
    ("something-new", "running", True): Settle.IN_DOUBT,  # a phase not understood is never run twice
}


@pytest.mark.parametrize(("phase", "run_before", "paused"), list(RULES))
def test_settle_action(phase: str | None, run_before: str | None, paused: bool) -> None:
    assert settle_action(phase, run_before, paused) is RULES[(phase, run_before, paused)]


# -- the rules applied to real VM processes ---------------------------------------------------------------
class Runs:
    """Successive VM managers over one state dir, as successive runs of an agent; with their logs."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.managers: list[VMManager] = []
        self.logs: list[io.StringIO] = []

    def start(self) -> VMManager:
        self.logs.append(io.StringIO())
        vms = VMManager(agent_name="A", max_mem=256 * MiB, records=VMRecords(self.state_dir),
                        log=Log("debug", self.logs[-1], agent="A"))
        self.managers.append(vms)
        return vms


@pytest.fixture
async def runs() -> AsyncIterator[Runs]:
    # A short state dir: a VM process's attach socket path must fit in 107 bytes.
    r = Runs(Path(tempfile.mkdtemp(prefix="ferry-adopt-", dir="/tmp")))
    yield r
    for vms in r.managers:  # the last run's VMs are stopped, not left running
        for vm in vms.list():
            await vms.drop(vm)
        await vms.shutdown()
    shutil.rmtree(r.state_dir, ignore_errors=True)


async def _cut(runs: Runs, *, ran: bool, paused: bool, commit_sent: bool = False, throttle: int = 0) -> VMManager:
    """A VM "m" in the middle of a migration when its agent run ends; the next run, after re-adoption."""
    first = runs.start()
    vm = await first.create("m", "counter", 4 * MiB, {}, paused=not ran)
    await vm.begin_migration()
    if throttle:
        await vm.throttle(throttle)
    if paused and ran:
        await vm.pause()  # the stop-and-copy pause
    if commit_sent:
        await asyncio.wrap_future(vm.mark_commit_sent({"id": "0123456789abcdef", "to": "127.0.0.1:1"}))
    await first.shutdown()  # the VM process runs on, listening; its record stays
    second = runs.start()
    assert await second.adopt_previous() == 1
    await second.get("m").refresh()  # run state and throttle as the VM process has them
    return second


async def test_cut_in_pre_copy_the_vm_runs_on_as_it_was(runs: Runs) -> None:
    vms = await _cut(runs, ran=True, paused=False, throttle=30)
    vm = vms.get("m")
    assert (vm.state, vm.throttle_percent, vm.migration_phase) == ("running", 0, None)
    assert "in pre-copy; the VM stays here as it was" in runs.logs[-1].getvalue()


async def test_cut_in_stop_and_copy_the_vm_runs_here_again(runs: Runs) -> None:
    vms = await _cut(runs, ran=True, paused=True)
    assert vms.get("m").state == "running"
    assert "before COMMIT; the VM runs here" in runs.logs[-1].getvalue()


async def test_a_vm_the_operator_had_paused_stays_paused(runs: Runs) -> None:
    vms = await _cut(runs, ran=False, paused=True)
    assert vms.get("m").state == "paused"
    assert "in pre-copy; the VM stays here as it was" in runs.logs[-1].getvalue()


async def test_after_commit_sent_the_vm_stays_paused_in_doubt(runs: Runs) -> None:
    vms = await _cut(runs, ran=True, paused=True, commit_sent=True, throttle=30)
    vm = vms.get("m")
    assert (vm.state, vm.throttle_percent) == ("paused", 0)
    assert "VM kept paused (in doubt) while the agent asks the destination" in runs.logs[-1].getvalue()
    # Still in doubt, and recorded so: a third run would find it the same way, and the migration
    # engine asks the destination the record names.
    assert (vm.migration_phase, vm.migration_ref, vm.run_before) == (
        "commit-sent", {"id": "0123456789abcdef", "to": "127.0.0.1:1"}, "running")
    rec = json.loads((runs.state_dir / "vms" / "m.json").read_text())
    assert (rec["migration-phase"], rec["migration-ref"]["id"]) == ("commit-sent", "0123456789abcdef")


async def test_a_vm_with_no_migration_is_listed_as_its_process_says(runs: Runs) -> None:
    first = runs.start()
    await first.create("m", "counter", 4 * MiB, {})
    pid = first.get("m").pid
    await first.shutdown()
    second = runs.start()
    assert await second.adopt_previous() == 1
    vm = second.get("m")
    assert (vm.pid, vm.state, vm.origin) == (pid, "running", "created")
    assert "migration cut" not in runs.logs[-1].getvalue()
