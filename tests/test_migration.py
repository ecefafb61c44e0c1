"""Live migration end to end: real agents as separate processes on loopback, real VM processes,
real memfds and kernel dirty tracking, the real `ferry` CLI.

The oracle is the toy VM's determinism: a `verify` guest migrated mid-run prints the same digest
as an unmigrated run. Everything else checks ownership: after a migration the VM exists only on
the destination and runs there; after a refusal, cancel or failure it runs on the source, untouched.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents import (
    AgentProc,
    agent_pair,
    digest_line,
    finished,
    free_port,
    make_key,
    names,
    runs_on,
    start_agent,
    wait_for,
)
from vmruntime import dirty

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def own_pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Two agents for a test that stops one of them (stop() again is a no-op)."""
    yield from agent_pair(tmp_path, check_exit=False)


def create(agent: AgentProc, name: str, program: str, mem: str = "32M", **args: str) -> dict[str, Any]:
    info: dict[str, Any] = agent.call("vm-create", name=name, program=program, mem=mem, args=args)
    return info


def start_migration(src: AgentProc, name: str, dst: AgentProc, **params: Any) -> dict[str, Any]:
    info: dict[str, Any] = src.call("migrate", name=name, to=dst.control, params=params)
    return info


def moved(src: AgentProc, dst: AgentProc, name: str) -> None:
    """Ownership after a completed migration: only on the destination, running there."""
    assert name not in names(src)
    assert name in names(dst)
    runs_on(dst, name)


def stayed(src: AgentProc, dst: AgentProc, name: str) -> None:
    """Ownership after a failed or cancelled migration: only on the source, running, not migrating."""
    assert name in names(src)
    assert name not in names(dst)
    runs_on(src, name)


def test_counter_migrates_there_and_back_through_the_cli(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    create(a, "c1", "counter", every="4096")
    runs_on(a, "c1")
    before = a.call("vm-info", name="c1")["instructions"]
    out = a.cli("migrate", "c1", "--to", b.control, json=True).json
    assert out["status"] == "completed", out
    assert out["dirty-tracker"] in ("uffd-wp-async", "uffd-wp-sync", "hash")
    assert out["ram"]["total"] == 32 << 20
    assert out["ram"]["normal"] > 0 and out["ram"]["transferred"] >= out["ram"]["normal-bytes"]
    assert out["rounds"][-1]["final"] and out["downtime"] >= 0
    assert set(out["downtime-breakdown"]) >= {"pause", "final-copy", "state", "digest", "commit"}
    moved(a, b, "c1")
    # The guest continued where it stopped: its instruction counter never went back.
    assert b.call("vm-info", name="c1")["instructions"] >= before
    incoming = b.call("migrate-status", name="c1")
    assert incoming["direction"] == "in" and incoming["status"] == "completed"

    back = b.cli("migrate", "c1", "--to", a.control, json=True).json
    assert back["status"] == "completed", back
    moved(b, a, "c1")


def test_a_paused_vm_stays_paused_on_the_destination(pair: tuple[AgentProc, AgentProc]) -> None:
    """The run state migrates with the VM (QEMU's runstate): paused there, and it resumes on request."""
    a, b = pair
    create(a, "p1", "counter", every="4096")
    runs_on(a, "p1")
    a.call("vm-pause", name="p1")
    frozen = a.call("vm-info", name="p1")["instructions"]
    start_migration(a, "p1", b)
    assert finished(a, "p1")["status"] == "completed"
    assert "p1" not in names(a)
    info = b.call("vm-info", name="p1")
    assert info["state"] == "paused" and info["instructions"] == frozen, info
    b.call("vm-resume", name="p1")
    runs_on(b, "p1")
    b.call("vm-destroy", name="p1")


def test_idle_guest_sends_only_what_it_touched(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    create(a, "i1", "idle", mem="1G")
    runs_on(a, "i1")
    start_migration(a, "i1", b)
    out = finished(a, "i1")
    assert out["status"] == "completed", out
    # 1 GiB of guest RAM, of which the guest wrote its code and boot block: round 0 sent the
    # written extents only, and nothing else was ever dirty.
    assert out["ram"]["total"] == 1 << 30 and 0 < out["ram"]["normal"] < 64
    assert out["ram"]["transferred"] < 1 << 20 and sum(r["dirty-pages"] for r in out["rounds"]) < 16
    moved(a, b, "i1")


VERIFY_ARGS = {"ws": "4M", "steps": "4000000"}  # a few seconds of guest time: the migration lands mid-run


@pytest.mark.parametrize("backend", dirty.available_backends())
def test_verify_migrated_mid_run_ends_with_the_unmigrated_digest(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes], backend: str) -> None:
    a, b = pair
    info = a.call("vm-create", name="v1", program="verify", mem="16M", args=VERIFY_ARGS, **{"dirty-tracker": backend})
    assert info["dirty-tracker"] == backend
    wait_for(lambda: a.call("vm-info", name="v1")["instructions"] > 100_000, what="verify under way")
    start_migration(a, "v1", b)
    out = finished(a, "v1")
    assert out["status"] == "completed", out
    assert out["dirty-tracker"] == backend
    wait_for(lambda: b.call("vm-info", name="v1")["state"] == "halted", timeout=100, what="verify to halt")
    console = b.cli("vm", "console", "v1").stdout.encode()
    # The digest line was printed on B, so the run ended there: it was migrated mid-run.
    assert digest_line(console) == unmigrated_digest()


@pytest.mark.parametrize("rate, extra", [
    ("2000", {}),
    ("20000", {}),
    ("0", {"auto-converge": True, "max-downtime": 50}),
    ("20000", {"commit-ahead": True}),
])
def test_memstress_migrates_at_several_dirty_rates(pair: tuple[AgentProc, AgentProc], rate: str,
                                                   extra: dict[str, Any]) -> None:
    a, b = pair
    create(a, "m1", "memstress", mem="32M", ws="16M", rate=rate, pattern="random", values="random")
    wait_for(lambda: a.call("vm-info", name="m1")["instructions"] > 50_000, what="memstress under way")
    start_migration(a, "m1", b, **extra)
    out = finished(a, "m1")
    assert out["status"] == "completed", (out.get("error-desc"), out["rounds"])
    rounds = out["rounds"]
    assert len(rounds) >= 2 and rounds[-1]["final"] and not any(r["final"] for r in rounds[:-1])
    assert out["ram"]["dirty-sync-count"] == len(rounds)  # one harvest per round, the final one included
    assert sum(r["pages"] - r["zero-pages"] for r in rounds) == out["ram"]["normal"]
    if rate == "0":
        assert rounds[0]["dirty-pages"] > 0  # a guest dirtying at full speed was caught doing it
    assert out["summary"]
    moved(a, b, "m1")


def test_two_migrations_at_once_in_opposite_directions(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    create(a, "x", "memstress", mem="32M", ws="8M", rate="5000")
    create(b, "y", "memstress", mem="32M", ws="8M", rate="5000")
    start_migration(a, "x", b, bandwidth=64 << 20)
    start_migration(b, "y", a, bandwidth=64 << 20)
    assert a.call("migrate-status", name="x")["status"] in ("active", "device", "completed")
    assert finished(a, "x")["status"] == "completed"
    assert finished(b, "y")["status"] == "completed"
    moved(a, b, "x")
    moved(b, a, "y")


def slow_migration(a: AgentProc, b: AgentProc, name: str) -> None:
    """A migration that takes a few seconds: 24 MiB of random data at 8 MB/s."""
    create(a, name, "memstress", mem="32M", ws="24M", rate="0", values="random")
    wait_for(lambda: a.call("vm-info", name=name)["instructions"] > 200_000, what="memstress under way")
    start_migration(a, name, b, bandwidth=8 << 20, compress="none")  # raw: the cap is the brake
    wait_for(lambda: a.call("migrate-status", name=name)["ram"]["transferred"] > 1 << 20,
             what="pages on the wire")


def test_cancel_mid_migration_leaves_the_vm_running_on_the_source(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    slow_migration(a, b, "s1")
    assert a.call("vm-info", name="s1")["state"] == "migrating"
    a.cli("migrate-cancel", "s1")
    out = a.call("migrate-status", name="s1")
    assert out["status"] == "cancelled", out
    assert out["cpu-throttle-percentage"] == 0
    stayed(a, b, "s1")
    # The destination let go of its copy: the name is free there again.
    wait_for(lambda: b.call("migrate-status", name="s1")["status"] == "failed", what="destination discard")
    create(b, "s1", "idle", mem="32M")


def test_cancel_on_the_destination_also_leaves_the_vm_on_the_source(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    slow_migration(a, b, "s2")
    wait_for(lambda: b.call("migrate-status", name="s2")["status"] == "active", what="incoming under way")
    b.cli("migrate-cancel", "s2")
    assert b.call("migrate-status", name="s2")["status"] == "cancelled"
    out = finished(a, "s2")
    assert out["status"] == "failed" and out["error-desc"], out
    stayed(a, b, "s2")


def test_destination_killed_mid_migration_leaves_the_vm_on_the_source(own_pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = own_pair
    slow_migration(a, b, "k1")
    b.stop(signal.SIGKILL)  # (its own VM processes exit with it)
    out = finished(a, "k1")
    assert out["status"] == "failed", out
    assert out["error-desc"]
    assert "k1" in names(a)
    runs_on(a, "k1")


def test_destination_stopping_mid_migration_leaves_the_vm_on_the_source(
        own_pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = own_pair
    slow_migration(a, b, "t1")
    assert b.stop(signal.SIGTERM) == 0  # an orderly stop drops the incoming copy, and promptly
    out = finished(a, "t1")
    assert out["status"] == "failed", out
    assert names(a) == ["t1"]
    runs_on(a, "t1")


def test_source_stopping_mid_migration_discards_the_copy_on_the_destination(
        own_pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = own_pair
    slow_migration(a, b, "t2")
    assert a.stop(signal.SIGTERM) == 0  # cancels the migration first, then stops its VMs
    wait_for(lambda: b.call("migrate-status", name="t2")["status"] in ("failed", "cancelled"),
             what="the destination to give up")
    assert names(b) == []


def test_refusals_are_clear_and_leave_the_vm_untouched(pair: tuple[AgentProc, AgentProc], tmp_path: Path) -> None:
    a, b = pair
    with start_agent(tmp_path, "Small", a.key_path, max_mem="48M") as small, \
            start_agent(tmp_path, "Stranger", make_key(tmp_path, "other.key")) as stranger:
        create(a, "r1", "counter", mem="32M")
        create(a, "big", "idle", mem="64M")
        create(b, "r1", "idle", mem="16M")

        taken = a.cli("migrate", "r1", "--to", b.control, check=False)
        assert taken.returncode != 0 and "already exists" in taken.stderr, taken
        no_room = a.cli("migrate", "big", "--to", small.control, check=False)
        assert no_room.returncode != 0 and "memory" in no_room.stderr, no_room
        wrong_key = a.cli("migrate", "r1", "--to", stranger.control, check=False)
        assert wrong_key.returncode != 0 and "auth" in wrong_key.stderr.lower(), wrong_key
        nowhere = a.cli("migrate", "r1", "--to", f"127.0.0.1:{free_port()}", check=False)
        assert nowhere.returncode != 0 and "r1" in names(a)

        assert sorted(names(a)) == ["big", "r1"] and names(b) == ["r1"]
        assert names(small) == [] and names(stranger) == []
        runs_on(a, "r1")
        assert a.call("vm-info", name="big")["state"] == "running"
        assert b.call("vm-info", name="r1")["mem"] == 16 << 20
        assert a.call("migrate-status", name="r1")["status"] == "failed"
