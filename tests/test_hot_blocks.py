"""Hot blocks as a migration parameter: `hot-blocks` from the CLI to the source's dirty tracker.

What this module owns: that the operator's `--hot-blocks` reaches MigrationParams (and round-trips
through the control API's names), that a guest like the one the integration test migrates really
turns blocks hot, and that a migration with hot blocks on moves the guest intact. The oracle of the
latter is the toy VM's determinism, as in tests/test_migration.py: a `verify` guest migrated mid-run
prints the same RAM digest as an unmigrated run. The tracker's own no-lost-write tests are in
tests/test_dirty.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import cli, cli_migrate
from agent.migration.info import MigrationParams, Status
from tests.agents import AgentProc, agent_pair, digest_line, finished, wait_for
from tests.conftest import tracking
from tests.test_migration_sessions import (  # the source session's doubles and their fixtures
    FakeSourceVMs,
    FakeVM,
    LoopBridge,
    ScriptedDestination,
    bridge,  # noqa: F401 (a fixture)
    run_source,
    scripted,  # noqa: F401 (a fixture)
)
from vmruntime import dirty
from vmruntime.control import VMHandle
from vmruntime.dirty import uffd_async
from vmruntime.programs import load_program

needs_async = pytest.mark.skipif("uffd-wp-async" not in dirty.available_backends(),
                                 reason="uffd-wp-async unavailable")
# A few seconds of guest time over 8 MiB (4 hot-block candidates): the migration lands mid-run,
# and each round's random word updates cover every page of the working set (dense: hot).
VERIFY_ARGS = {"ws": "8M", "steps": "6000000"}
VERIFY_MEM = 16 << 20


# ---- the parameter --------------------------------------------------------------------------------

def test_hot_blocks_param_defaults_off_and_round_trips() -> None:
    assert MigrationParams().hot_blocks is False
    assert MigrationParams.from_dict({}).hot_blocks is False
    on = MigrationParams.from_dict({"hot-blocks": True, "max-downtime": 50})
    assert on.hot_blocks is True and on.max_downtime_ms == 50
    assert MigrationParams.from_dict({"hot_blocks": True}).hot_blocks is True  # underscores accepted too
    assert on.to_dict()["hot-blocks"] is True
    assert MigrationParams.from_dict(on.to_dict()) == on
    off = MigrationParams.from_dict(MigrationParams().to_dict())
    assert off == MigrationParams() and off.to_dict()["hot-blocks"] is False


def test_cli_hot_blocks_flag_reaches_the_params() -> None:
    p = cli.build_parser()
    assert "hot-blocks" not in cli_migrate.migrate_params(p.parse_args(["migrate", "c1", "--to", "b:1"]))
    ns = p.parse_args(["migrate", "c1", "--to", "b:1", "--hot-blocks"])
    assert cli_migrate.migrate_params(ns) == {"hot-blocks": True}
    assert MigrationParams.from_dict(cli_migrate.migrate_params(ns)).hot_blocks is True


@pytest.mark.parametrize("hot", [False, True])
def test_source_session_passes_hot_blocks_to_track_start(
        bridge: LoopBridge, scripted: Callable[..., ScriptedDestination], hot: bool) -> None:  # noqa: F811
    """The source starts its tracker with hot blocks exactly when the params ask for them."""

    vm = FakeVM(dirty=[[(0, 2 * 4096)], [(4096, 2 * 4096)]])
    _, info = run_source(bridge, scripted(), vm, FakeSourceVMs(), hot_blocks=hot)
    assert info.status is Status.COMPLETED, info.error
    assert (("track_start", True) if hot else "track_start") in vm.calls
    assert info.to_dict()["params"]["hot-blocks"] is hot


# ---- the guest turns blocks hot ---------------------------------------------------------------------

@needs_async
@pytest.mark.timeout(60)
def test_verify_guest_turns_blocks_hot() -> None:
    """The guest of the migration test below does exercise hot blocks (not only the page-exact path)."""
    image, args = load_program("verify", {**VERIFY_ARGS, "steps": "100000000"})
    with VMHandle.spawn(VERIFY_MEM, name="hot-verify") as vm:
        vm.boot(image, args)
        with tracking(vm, "uffd-wp-async", hot_blocks=True) as (_, tracker, _ram):
            assert isinstance(tracker, uffd_async.UffdAsyncTracker)
            hot = 0
            for _ in range(uffd_async.HOT_ROUNDS - 1):  # never reaching the re-checking harvest
                time.sleep(0.1)
                tracker.harvest()
                hot = max(hot, tracker.hot_bytes)
            assert hot >= 2 * uffd_async.HOT_BLOCK, hot
        vm.stop()


# ---- whole migrations, real agents --------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    tmp: Path = tmp_path_factory.mktemp("agents")
    yield from agent_pair(tmp)


@pytest.fixture(autouse=True)
def _empty(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pair" in request.fixturenames:
        for agent in request.getfixturevalue("pair"):
            agent.destroy_all_vms()


@needs_async
@pytest.mark.timeout(120)
def test_verify_migrated_with_hot_blocks_ends_with_the_unmigrated_digest(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes]) -> None:
    a, b = pair
    a.call("vm-create", name="hv", program="verify", mem=str(VERIFY_MEM), args=VERIFY_ARGS,
           **{"dirty-tracker": "uffd-wp-async"})
    wait_for(lambda: a.call("vm-info", name="hv")["instructions"] > 100_000, what="verify under way")
    # A low max-downtime keeps it iterating a few rounds, so hot blocks are sent whole in later rounds.
    a.call("migrate", name="hv", to=b.control, params={"hot-blocks": True, "max-downtime": 20, "force": True})
    out = finished(a, "hv")
    assert out["status"] == "completed", out
    assert out["params"]["hot-blocks"] is True
    wait_for(lambda: b.call("vm-info", name="hv")["state"] == "halted", timeout=100, what="verify to halt")
    console = b.cli("vm", "console", "hv").stdout.encode()
    # The digest line was printed on B, so the run ended there: migrated mid-run, RAM and registers intact.
    assert digest_line(console) == unmigrated_digest()


@needs_async
@pytest.mark.timeout(120)
def test_memstress_flat_out_migrates_with_hot_blocks(pair: tuple[AgentProc, AgentProc]) -> None:
    """A guest rewriting its working set flat out, there and back with hot blocks: both complete and
    the guest runs on at each end."""
    a, b = pair
    a.call("vm-create", name="hm", program="memstress", mem="64M",
           args={"ws": "32M", "rate": "0", "pattern": "random", "values": "random"},
           **{"dirty-tracker": "uffd-wp-async"})
    wait_for(lambda: a.call("vm-info", name="hm")["instructions"] > 100_000, what="memstress under way")
    for src, dst in ((a, b), (b, a)):
        src.call("migrate", name="hm", to=dst.control, params={"hot-blocks": True, "auto-converge": True})
        out = finished(src, "hm")
        assert out["status"] == "completed", out
        assert out["dirty-tracker"] == "uffd-wp-async"
        first = dst.call("vm-info", name="hm")["instructions"]
        wait_for(lambda d=dst, f=first: d.call("vm-info", name="hm")["instructions"] > f, what="runs on")  # type: ignore[misc]
