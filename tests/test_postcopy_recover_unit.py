"""Post-copy recovery's bad input, unit by unit (agent/migration/postcopy_recover.py): a recovery
for an unknown migration id, from a host that is not the migration's peer, for another VM, a
duplicate recovery, and a recovery after the destination finished. Fakes stand for the
connections; the end-to-end recoveries are in tests/test_postcopy_recover.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from agent.migration import postcopy_recover
from agent.migration.postcopy_recover import Phase, Refused
from proto.errors import ErrorCode
from proto.messages import Message, MigrateRefuse
from proto.postcopy_messages import PostcopyDone, PostcopyRecover, PostcopyRecovered


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def linger(self, seconds: float) -> None:
        pass


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, msg: str, **kw: Any) -> None:
        self.lines.append((msg, kw))

    warning = error = info


def _session(peer: str, conn: FakeConn) -> Any:
    return SimpleNamespace(conn=conn, _peer=peer, log=FakeLog(), _mid="m-1", info=SimpleNamespace(vm="vm-1"))


@pytest.fixture
def phase() -> Any:
    preempted = threading.Event()
    p = postcopy_recover.open_phase(_session("A", FakeConn()), preempted.set)
    p.preempted = preempted
    yield p
    p.close()


def _refusal(peer: str, msg: PostcopyRecover) -> MigrateRefuse:
    conn = FakeConn()
    postcopy_recover.join(_session(peer, conn), msg)
    assert len(conn.sent) == 1 and isinstance(conn.sent[0], MigrateRefuse), conn.sent
    return conn.sent[0]


def test_an_unknown_migration_id_is_refused(phase: Phase) -> None:
    r = _refusal("A", PostcopyRecover("m-2", "vm-1"))
    assert r.code == ErrorCode.NOT_FOUND and r.reason.startswith("unknown migration id m-2"), r


def test_a_recovery_from_another_host_is_refused(phase: Phase) -> None:
    r = _refusal("C", PostcopyRecover("m-1", "vm-1"))
    assert r.code == ErrorCode.AUTH_FAILED and "not this migration's peer" in r.reason, r
    assert "runs with A" in r.reason and "from C" in r.reason
    assert phase.state == "active" and not phase.preempted.is_set()  # nothing was touched


def test_a_recovery_naming_another_vm_is_refused(phase: Phase) -> None:
    r = _refusal("A", PostcopyRecover("m-1", "vm-2"))
    assert r.code == ErrorCode.BAD_REQUEST and "not 'vm-2'" in r.reason, r


def test_a_duplicate_recovery_is_refused(phase: Phase) -> None:
    first = phase.offer_main(FakeConn())  # type: ignore[arg-type]
    assert phase.preempted.is_set()  # this side still saw its link up: it is dropped for the recovery
    with pytest.raises(Refused) as e:
        phase.offer_main(FakeConn())  # type: ignore[arg-type]
    assert e.value.code == ErrorCode.BUSY and "under way already" in e.value.reason
    assert phase.wait_main() is first
    with pytest.raises(Refused, match="under way already"):  # taken, still recovering
        phase.offer_main(FakeConn())  # type: ignore[arg-type]


def test_an_urgent_connection_for_a_phase_not_recovering_is_refused(phase: Phase) -> None:
    with pytest.raises(Refused, match="not recovering here"):
        phase.offer_urgent(FakeConn())  # type: ignore[arg-type]


def test_a_recovery_after_the_end_hears_postcopy_done_again(phase: Phase) -> None:
    phase.done = PostcopyDone(10, 2)
    phase.close()
    conn = FakeConn()
    postcopy_recover.join(_session("A", conn), PostcopyRecover("m-1", "vm-1"))
    assert conn.sent == [PostcopyRecovered(0), PostcopyDone(10, 2)]


def test_a_phase_that_failed_is_forgotten(phase: Phase) -> None:
    phase.close()
    r = _refusal("A", PostcopyRecover("m-1", "vm-1"))
    assert r.reason.startswith("unknown migration id m-1"), r


def test_migrate_recover_where_nothing_is_paused_says_so() -> None:
    from agent.migration.common import MigrationError
    from agent.migration.info import MigrationInfo, Status

    with pytest.raises(MigrationError, match="no post-copy of VM 'v' is paused on A .migration status: none"):
        postcopy_recover.recover_op(None, None, "v", "A")
    info = MigrationInfo(vm="v", direction="in", peer="B", status=Status.POSTCOPY_PAUSED)
    with pytest.raises(MigrationError, match="run `ferry migrate-recover v` on the source's agent .B."):
        postcopy_recover.recover_op(None, info, "v", "A")
