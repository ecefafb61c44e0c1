"""Several data streams per migration (agent/migration/streams.py, stream_recv.py): real agents
on loopback, real VM processes, tests/faults.py's proxy to see and cut each connection.

The oracle is the toy VM's determinism, as in tests/test_migration.py: a `verify` guest migrated
mid-run over N streams prints the digest of an unmigrated run, which it cannot if a page's older
copy ever overtook a newer one on another stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.migration import stream_recv, streams
from agent.migration.info import MigrationParams
from agent.migration.tls import dial
from agent.migration.transport import Connection
from proto.errors import FieldError, RemoteProtocolError
from proto.limits import STREAMS_VERSION
from proto.messages import MigrateRefuse, PageBatch
from proto.state import SourceMachine
from proto.stream_messages import StreamAttach
from tests.agents import (
    AgentProc,
    digest_line,
    finished,
    names,
    runs_on,
    wait_for,
)
from tests.faults import C2S, CUT, FaultProxy, Rule, migration_target

pytestmark = pytest.mark.timeout(180)

MEM = "32M"
VERIFY_ARGS = {"ws": "12M", "steps": "4000000"}  # a few seconds of guest time, several batches a round
VERIFY_MEM = 32 << 20  # MEM, for the unmigrated run (tests/conftest.py)


def _migrate_through(a: AgentProc, b: AgentProc, proxy: FaultProxy, name: str, **params: Any) -> dict[str, Any]:
    try:
        a.call("migrate", name=name, to=b.control, migration=proxy.address_text, params=params,
               **{"in-doubt-timeout": 2})
    except Exception as e:  # a failure in setup fails the call itself: the status says the rest
        assert a.call("migrate-status", name=name)["status"] == "failed", e
    return finished(a, name)


def _batches_per_stream(proxy: FaultProxy, n: int) -> list[int]:
    return [proxy.types(C2S, conn=i).count(PageBatch.TYPE) for i in range(n)]


@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_verify_over_n_streams_ends_with_the_unmigrated_digest(
        pair: tuple[AgentProc, AgentProc], unmigrated_digest: Callable[[], bytes], n: int) -> None:
    a, b = pair
    a.call("vm-create", name="v", program="verify", mem=MEM, args=VERIFY_ARGS)
    wait_for(lambda: a.call("vm-info", name="v")["instructions"] > 100_000, what="verify under way")
    with FaultProxy(migration_target(b)) as proxy:
        out = _migrate_through(a, b, proxy, "v", streams=n)
        assert out["status"] == "completed", out
        assert out["streams"] == n and proxy.connections == n
        per_stream = _batches_per_stream(proxy, n)
    assert sum(per_stream[1:]) > 0, per_stream  # the extra streams carried pages
    assert b.call("migrate-status", name="v")["streams"] == n
    wait_for(lambda: b.call("vm-info", name="v")["state"] == "halted", timeout=100, what="verify to halt")
    assert digest_line(b.cli("vm", "console", "v").stdout.encode()) == unmigrated_digest()


@pytest.mark.slow
def test_a_dirtying_guest_over_two_streams_converges(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.call("vm-create", name="m", program="memstress", mem=MEM, args={"ws": "16M", "rate": "20000"})
    wait_for(lambda: a.call("vm-info", name="m")["instructions"] > 50_000, what="memstress under way")
    out = a.cli("migrate", "m", "--to", b.control, "--streams", "2", json=True).json
    assert out["status"] == "completed" and out["streams"] == 2, out
    assert len(out["rounds"]) >= 2, out["rounds"]  # later rounds went over the streams too
    assert "m" not in names(a)
    runs_on(b, "m")


@pytest.mark.slow
def test_one_stream_cut_fails_the_migration_and_the_vm_runs_on(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    a.call("vm-create", name="c", program="memstress", mem=MEM, args={"ws": "16M", "rate": "0", "values": "random"})
    wait_for(lambda: a.call("vm-info", name="c")["instructions"] > 50_000, what="memstress under way")
    with FaultProxy(migration_target(b)) as proxy:
        rule = proxy.add(Rule(C2S, PageBatch, CUT, nth=2, conn=1))  # stream 1, the main one lives on
        out = _migrate_through(a, b, proxy, "c", streams=2, **{"max-downtime": 1, "max-rounds": 4, "force": True})
        assert rule.fired.is_set(), _batches_per_stream(proxy, 2)
    assert out["status"] == "failed" and "stream" in out["error-desc"], out
    assert "c" in names(a) and "c" not in names(b)
    runs_on(a, "c")
    wait_for(lambda: b.call("agent-info")["free-mem"] == b.call("agent-info")["max-mem"],
             what="the destination to free its reservation")
    out = a.cli("migrate", "c", "--to", b.control, "--streams", "2", json=True).json  # nothing is wedged
    assert out["status"] == "completed", out


def _raw_stream(b: AgentProc, mid: str, index: int = 1, key: bytes = bytes(32)) -> Any:
    """An extra stream's attach sent by hand to ``b``'s listener; the reply."""
    from agent.migration.common import client_handshake

    conn: Connection = dial(migration_target(b), None)
    try:
        client_handshake(conn, b.key_path.read_bytes().strip(), "A")
        conn.start(SourceMachine())
        conn.send(StreamAttach(mid, index, key))
        return conn.recv()
    finally:
        conn.close()


def test_a_stream_for_an_unknown_migration_is_refused(shared_pair: tuple[AgentProc, AgentProc]) -> None:
    _, b = shared_pair
    reply = _raw_stream(b, "0123456789abcdef")
    assert isinstance(reply, MigrateRefuse) and "no migration 0123456789abcdef under way" in reply.reason, reply


def test_streams_out_of_range_are_refused_by_the_cli(shared_pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = shared_pair
    bad = a.cli("migrate", "nothing", "--to", b.control, "--streams", "9", check=False)
    assert bad.returncode == 2 and "--streams: must be a whole number 1..8" in bad.stderr, bad.stderr
    with pytest.raises(ValueError, match="streams must be 1..8"):
        MigrationParams(streams=0)


# -- the parts alone ----------------------------------------------------------------------------------


def test_the_plan_is_one_stream_for_an_older_peer_or_post_copy() -> None:
    four = MigrationParams(streams=4)
    assert streams.plan(four, STREAMS_VERSION).count == 4
    assert streams.plan(four, STREAMS_VERSION - 1).count == 1
    assert streams.plan(MigrationParams(streams=4, postcopy_after="auto"), STREAMS_VERSION).count == 1
    assert streams.plan(four, STREAMS_VERSION).params()["streams"] == 4
    assert streams.plan(MigrationParams(streams=1), STREAMS_VERSION).params() == {}
    assert "streams" not in four.for_peer(STREAMS_VERSION - 1) and four.for_peer(STREAMS_VERSION)["streams"] == 4


def test_stream_attach_fields_are_checked() -> None:
    StreamAttach("m1", 1, bytes(32)).check()
    for bad in (StreamAttach("m1", 0, bytes(32)), StreamAttach("m1", 8, bytes(32)), StreamAttach("m1", 1, b"k"),
                StreamAttach("", 1, bytes(32))):
        with pytest.raises(FieldError):
            bad.check()


class _Conn:
    received = 0

    def shutdown(self) -> None:
        pass


def test_a_wrong_key_a_taken_index_or_one_too_many_is_refused() -> None:
    s = stream_recv.IncomingStreams(3, b"k" * 32)
    assert s.attach(1, b"x" * 32, _Conn()) == "wrong stream key"  # type: ignore[arg-type]
    assert s.attach(3, b"k" * 32, _Conn()) == "stream 3 of a migration with 3 streams"  # type: ignore[arg-type]
    assert s.attach(1, b"k" * 32, _Conn()) is None  # type: ignore[arg-type]
    assert s.attach(1, b"k" * 32, _Conn()) == "stream 1 is attached already"  # type: ignore[arg-type]


def test_the_barrier_waits_for_every_stream_and_raises_a_streams_failure() -> None:
    s = stream_recv.IncomingStreams(3, b"k" * 32)
    for i in (1, 2):
        assert s.attach(i, b"k" * 32, _Conn()) is None  # type: ignore[arg-type]
    s.mark(1)
    t = threading.Timer(0.05, s.mark, (2,))
    t.start()
    s.barrier(30.0)  # returns once stream 2 marked too
    s.mark(1)
    s.fail(2, ConnectionResetError("reset by peer"))
    with pytest.raises(RemoteProtocolError, match="data stream 2 failed: reset by peer"):
        s.barrier(30.0)


def test_the_barrier_names_a_stream_that_never_attached() -> None:
    s = stream_recv.IncomingStreams(3, b"k" * 32)
    assert s.attach(1, b"k" * 32, _Conn()) is None  # type: ignore[arg-type]
    s.mark(1)
    with pytest.raises(TimeoutError, match=r"streams \[2\] never attached"):
        s.barrier(0.2)


def test_a_bad_stream_key_in_migrate_start_is_a_protocol_error(tmp_path: Path) -> None:
    from proto.messages import MigrateStart

    start = MigrateStart("m1", "vm", 1 << 20, 4096, 1, (), "hash", {"streams": 2, "stream-key": "zz"})
    with pytest.raises(RemoteProtocolError, match="without a stream key"):
        stream_recv.incoming(start, 2)
    assert stream_recv.incoming(start, 1) is None
