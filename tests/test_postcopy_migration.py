"""Post-copy over the wire, end to end: real agents on loopback, real VM processes, the VM
resumed on the destination on partial RAM and its missing pages fetched from the source
(agent/migration/postcopy_source.py, postcopy_dest.py).

The oracle is the toy VM's determinism: a `verify` guest migrated by post-copy mid-run prints
the digest of an unmigrated run. Ownership: the source's VM process is gone once the
destination has every page, and the VM ran on the destination only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.agents import (
    AgentProc,
    agent_pair,
    digest_line,
    finished,
    names,
    runs_on,
    wait_for,
)
from vmruntime.postcopy import minor_available

pytestmark = pytest.mark.timeout(180)

VERIFY_ARGS = {"ws": "8M", "steps": "3000000"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path_factory.mktemp("agents"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_verify_migrated_by_postcopy_ends_with_the_unmigrated_digest(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes]) -> None:
    a, b = pair
    a.call("vm-create", name="pc1", program="verify", mem="16M", args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name="pc1")["instructions"] > 100_000, what="verify under way")
    source_pid = a.recorded_vm_pids()["pc1"]
    out = a.cli("migrate", "pc1", "--to", b.control, "--postcopy", json=True).json
    assert out["status"] == "completed", out
    assert len(out["rounds"]) == 1 and "post-copy" in out["summary"]
    assert "postcopy-requests" in out
    incoming = b.call("migrate-status", name="pc1")
    assert incoming["status"] == "completed", incoming
    assert incoming["postcopy-requests"] >= 0 and incoming["pages-unsettled"] == 0
    assert "pc1" not in names(a) and not _pid_alive(source_pid)
    wait_for(lambda: b.call("vm-info", name="pc1")["state"] == "halted", timeout=120, what="verify to halt")
    console = b.cli("vm", "console", "pc1").stdout.encode()
    assert digest_line(console) == unmigrated_digest()
    b.call("vm-destroy", name="pc1")


def test_a_guest_pre_copy_cannot_catch_completes_in_hybrid_mode(pair: tuple[AgentProc, AgentProc]) -> None:
    """memstress flat out over a working set larger than the capped link carries in a round: the
    policy sees pre-copy will not converge and switches to post-copy (--postcopy-after auto);
    its stale pages are discarded there, then fetched or pushed."""
    a, b = pair
    a.call("vm-create", name="pc2", program="memstress", mem="64M",
           args={"ws": "32M", "rate": "0", "pattern": "random", "values": "random"})
    wait_for(lambda: a.call("vm-info", name="pc2")["instructions"] > 50_000, what="memstress under way")
    # Not compressed: memstress's pages (one word each) compress so well that zstd alone would catch up.
    out = a.cli("migrate", "pc2", "--to", b.control, "--postcopy-after", "auto", "--bandwidth", "40M",
                "--compress", "none", json=True).json
    assert out["status"] == "completed", out
    assert len(out["rounds"]) >= 2 and "post-copy after round" in out["summary"], out["summary"]
    assert "will not converge" in out["summary"] and out["postcopy-pages-pushed"] > 0
    incoming: dict[str, Any] = b.call("migrate-status", name="pc2")
    assert incoming["status"] == "completed" and incoming["pages-placed"] > 0, incoming
    assert incoming["postcopy-requests"] > 0 and incoming["postcopy-blocktime"] > 0, incoming
    # The stale pages stayed in the page cache (MINOR mode), the clean ones were mapped in bulk.
    assert incoming["postcopy-mode"] == ("minor" if minor_available() else "punch"), incoming
    assert incoming["pages-continued"] > 0 or not minor_available(), incoming
    assert "pc2" not in names(a)
    runs_on(b, "pc2")
    b.call("vm-destroy", name="pc2")


def test_postcopy_is_refused_by_the_cli_for_a_bad_round() -> None:
    from tests.agents import run_cli

    r = run_cli("migrate", "x", "--to", "127.0.0.1:1", "--postcopy-after", "0", check=False)
    assert r.returncode != 0 and "round number" in r.stderr


@pytest.mark.slow
def test_the_source_vm_process_killed_during_postcopy_loses_nothing(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes]) -> None:
    """Guest RAM is the memfd the source agent maps, not the VM process: with the source's VM
    process killed in the post-copy phase the agent still answers and pushes from it, and the
    guest ends with the unmigrated digest on the destination."""
    import signal

    a, b = pair
    a.call("vm-create", name="pk", program="verify", mem="16M", args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name="pk")["instructions"] > 100_000, what="verify under way")
    pid = a.recorded_vm_pids()["pk"]
    a.call("migrate", name="pk", to=b.control, params={"postcopy-after": "1", "bandwidth": 2 << 20})
    wait_for(lambda: a.call("migrate-status", name="pk")["status"] == "postcopy-active", timeout=60, interval=0.01,
             what="post-copy under way")
    os.kill(pid, signal.SIGKILL)
    out = finished(a, "pk")
    assert out["status"] == "completed", out
    assert b.call("migrate-status", name="pk")["status"] == "completed"
    wait_for(lambda: b.call("vm-info", name="pk")["state"] == "halted", timeout=120, what="verify to halt")
    assert digest_line(b.cli("vm", "console", "pk").stdout.encode()) == unmigrated_digest()
    assert "pk" not in names(a)
    b.call("vm-destroy", name="pk")
