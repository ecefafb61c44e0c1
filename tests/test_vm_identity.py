"""The VM's identity and console move and survive with it.

The VM's spec (its program and the arguments given at `vm create`) is kept, recorded, shown by
`vm info` and carried by a migration; the console's tail and byte count are kept by the VM process
(vmruntime/console_tail.py), carried in the paused state and seeded on the destination, and handed
to a restarted agent, so `vm console` and `vm info` read the same wherever and whenever the VM is.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.logs import Log
from agent.migration import spec_move
from agent.vms import MIGRATED_PROGRAM, ConsoleBuffer, VMManager
from agent.vmspec import VMSpec, parse
from tests.agents import AgentProc, agent_pair, digest_line, finished, make_key, start_agent, wait_for
from vmruntime import console_tail
from vmruntime.console_tail import ConsoleKeeper

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
VERIFY_ARGS = {"ws": "1M", "steps": "20000"}  # halts within a second
COUNTER_ARGS = {"every": "4096"}  # a "count N" line (N in hex) every 4096 counts, N rising by 4096


# -- the pieces ------------------------------------------------------------------------------------
def test_the_keeper_keeps_the_newest_output_and_counts_all_of_it() -> None:
    k = ConsoleKeeper(limit=8)
    k.keep(b"hello ", attached=True)
    k.keep(b"world", attached=True)
    assert (bytes(k.tail), k.total) == (b"lo world", 11)
    assert k.attach() == (b"lo world", 0)  # everything was sent: nothing dropped
    k.keep(b"0123456789AB", attached=False)  # nobody attached: 12 bytes, 4 of them gone for good
    assert k.attach() == (b"456789AB", 4)
    assert k.snapshot() == {"data": b"456789AB", "total": 23}


def test_a_seeded_keeper_continues_the_count_and_ignores_malformed_snapshots() -> None:
    k = ConsoleKeeper(limit=8)
    k.seed({"data": b"0123456789", "total": 100})
    assert (bytes(k.tail), k.total, k.sent) == (b"23456789", 100, 100)
    k.keep(b"x", attached=True)
    assert k.snapshot() == {"data": b"3456789x", "total": 101}
    for bad in (None, {}, {"data": "text", "total": 5}, {"data": b"abc", "total": 2}, {"data": b"", "total": -1}):
        fresh = ConsoleKeeper()
        fresh.seed(bad)
        assert (fresh.total, bytes(fresh.tail)) == (0, b"")


def test_a_seeded_console_buffer_keeps_readers_offsets() -> None:
    buf = ConsoleBuffer(limit=1 << 20)
    buf.seed(b"tail", 1000)
    assert buf.read(996) == (b"tail", 1000, 0)
    assert buf.read(0) == (b"tail", 1000, 996)  # what came before the tail is gone: counted as dropped
    buf.write(b"more")
    assert buf.read(1000) == (b"more", 1004, 0) and buf.total == 1004


def test_the_spec_travels_in_migrate_start_params_and_a_malformed_one_is_none() -> None:
    class Vm:
        program, args = "verify", {"ws": "1M"}

    params = {"max-downtime": 300.0, **spec_move.proposal(Vm(), 3)}  # type: ignore[arg-type]
    assert spec_move.incoming(params) == VMSpec("verify", {"ws": "1M"})
    assert spec_move.proposal(Vm(), 2) == {}  # type: ignore[arg-type]  # a version-2 peer refuses unknown params
    assert spec_move.incoming({}) is None  # an older source
    for bad in ("verify", {"args": {}}, {"program": 7}, {"program": "p", "args": {"k": 1}},
                {"program": "p" * 5000}):
        assert parse(bad) is None


# -- the VM manager --------------------------------------------------------------------------------
@pytest.fixture
async def vms() -> AsyncIterator[VMManager]:
    manager = VMManager(agent_name="T", max_mem=256 * MiB, log=Log("debug", io.StringIO(), agent="T"))
    yield manager
    for vm in manager.list():
        await manager.drop(vm)
    await manager.shutdown()


async def _until(predicate: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_an_incoming_vm_takes_the_sources_spec_and_console(vms: VMManager) -> None:
    """The spec from MigrateStart names the arriving VM; the tail in the saved state continues its
    console, in the agent and in the VM process (which hands it to a later controller)."""
    src = await vms.create("src", "counter", 8 * MiB, dict(COUNTER_ARGS))
    assert src.info()["args"] == COUNTER_ARGS and src.info()["program"] == "counter"

    async def printed() -> bool:
        return src.console.total > 200

    await _until(printed)
    state = await src.pause()
    tail = state[console_tail.KEY]
    assert tail["total"] == src.console.total >= len(tail["data"]) > 0  # all output up to the pause
    inc = vms.reserve_incoming("dst", 8 * MiB, spec=VMSpec("counter", dict(COUNTER_ARGS)))
    inc.ram[:] = src.ram[:]
    dst = await vms.start_incoming(inc, state, None)
    assert (dst.program, dst.args) == ("counter", COUNTER_ARGS)
    assert dst.console.read(tail["total"] - len(tail["data"]))[0] == tail["data"]

    async def continued() -> bool:
        return dst.console.total > tail["total"] + 100

    await _until(continued)
    data, _, _ = dst.console.read(tail["total"] - 100)
    _check_counts(_whole_lines(data[data.index(b"\n") + 1:]), int(COUNTER_ARGS["every"]))  # no seam at the pause
    assert src.console.read(0)[0].endswith(tail["data"])


async def test_an_incoming_vm_from_a_source_without_spec_or_tail_reads_as_before(vms: VMManager) -> None:
    src = await vms.create("src", "idle", 4 * MiB, {})
    state = await src.pause()
    state.pop(console_tail.KEY)  # an older source's VM process saves no tail
    inc = vms.reserve_incoming("dst", 4 * MiB)  # and its MigrateStart carries no spec
    inc.ram[:] = src.ram[:]
    dst = await vms.start_incoming(inc, state, None)
    assert (dst.info()["program"], dst.info()["args"], dst.console.total) == (MIGRATED_PROGRAM, {}, 0)


# -- real agents -----------------------------------------------------------------------------------
@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path)


def _whole_lines(data: bytes | bytearray) -> bytes:
    """``data`` up to its last newline (a line still being printed left out)."""
    return bytes(data[:data.rindex(b"\n") + 1])


def _check_counts(data: bytes, every: int) -> int:
    """``data`` is whole "count N" lines with N rising by ``every``, none missing or repeated;
    returns the last N."""
    counts = [int(m, 16) for m in re.findall(rb"count ([0-9a-f]+)\n", data)]
    assert len(counts) >= 2 and data.count(b"\n") == len(counts), data[:200]
    steps = {b - a for a, b in zip(counts, counts[1:], strict=False)}
    assert steps == {every}, f"gaps or repeats in the console: steps {sorted(steps)[:10]}"
    return counts[-1]


def test_a_halted_verify_guest_migrated_keeps_its_console_and_spec(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.cli("vm", "create", "v1", "--program", "verify", "--mem", "16M",
          *[f"--arg={k}={v}" for k, v in VERIFY_ARGS.items()])
    wait_for(lambda: a.call("vm-info", name="v1")["state"] == "halted", timeout=60, what="verify to halt")
    on_a = a.cli("vm", "console", "v1").stdout
    info_a = a.call("vm-info", name="v1")
    digest = digest_line(on_a.encode())
    a.call("migrate", name="v1", to=b.control)
    assert finished(a, "v1")["status"] == "completed"
    assert digest_line(b.cli("vm", "console", "v1").stdout.encode()) == digest
    assert b.cli("vm", "console", "v1").stdout == on_a
    info = json.loads(b.cli("vm", "info", "v1", "--json").stdout)
    assert (info["program"], info["args"], info["state"]) == ("verify", VERIFY_ARGS, "halted")
    assert info["console-bytes"] == info_a["console-bytes"]
    text = b.cli("vm", "info", "v1").stdout
    assert re.search(r"^program: +verify$", text, re.M) and re.search(r"^args: +ws=1M steps=20000$", text, re.M)


def test_a_guest_migrated_mid_output_has_a_continuous_console(pair: tuple[AgentProc, AgentProc]) -> None:
    """A reader following the console on A, then on B from the offset it reached: every line once."""
    a, b = pair
    a.call("vm-create", name="c1", program="counter", mem="16M", args=COUNTER_ARGS)
    got = bytearray()
    offset = 0
    wait_for(lambda: a.call("vm-info", name="c1")["console-bytes"] > 2000, what="counter output")
    a.call("migrate", name="c1", to=b.control)
    while "c1" in [v["name"] for v in a.call("vm-list")["vms"]]:
        try:
            chunk = a.call("vm-console", name="c1", offset=offset)
        except Exception:  # gone between the listing and the read
            break
        assert chunk["dropped"] == 0
        got += bytes(chunk["data"])
        offset = int(chunk["offset"])
    assert finished(a, "c1")["status"] == "completed"
    wait_for(lambda: b.call("vm-info", name="c1")["console-bytes"] > offset + 2000, what="output on B")
    chunk = b.call("vm-console", name="c1", offset=offset)
    assert chunk["dropped"] == 0 and chunk["offset"] > offset
    got += bytes(chunk["data"])
    _check_counts(_whole_lines(got), int(COUNTER_ARGS["every"]))


def test_an_agent_restart_keeps_the_console_tail_offsets_and_spec(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    a = start_agent(tmp_path, "A", key)
    try:
        a.call("vm-create", name="v1", program="verify", mem="16M", args=VERIFY_ARGS)
        a.call("vm-create", name="c1", program="counter", mem="16M", args=COUNTER_ARGS)
        wait_for(lambda: a.call("vm-info", name="v1")["state"] == "halted", timeout=60, what="verify to halt")
        wait_for(lambda: a.call("vm-info", name="c1")["console-bytes"] > 2000, what="counter output")
        verify_console = a.call("vm-console", name="v1")
        counter = a.call("vm-console", name="c1")
        a.stop(signal.SIGKILL, keep_vms=True)
        a = start_agent(tmp_path, "A", key)
        # The halted guest's console reads the same: its digest line is still there.
        assert a.call("vm-console", name="v1") == verify_console
        info = a.call("vm-info", name="v1")
        assert (info["program"], info["args"], info["console-bytes"]) == ("verify", VERIFY_ARGS,
                                                                            verify_console["total"])
        # The counter's offsets go on: reading from where the reader was gives what followed, whole.
        after = a.call("vm-console", name="c1", offset=counter["offset"])
        assert after["dropped"] == 0 and after["offset"] >= counter["offset"]
        _check_counts(_whole_lines(bytes(counter["data"]) + bytes(after["data"])), int(COUNTER_ARGS["every"]))
        assert a.call("vm-info", name="c1")["args"] == COUNTER_ARGS
    finally:
        a.stop()
        assert a.leaked == []
