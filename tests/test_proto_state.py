"""The migration state machines: every legal path walked, every illegal message refused."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from enum import Enum

import pytest

import proto
from proto.messages import Message
from proto.state import RECV, SEND, Direction, Key
from tests.test_proto_support import SAMPLES

Step = tuple[Enum, type[Message], Direction]
MACHINES = {"source": (proto.SourceMachine, proto.SOURCE_TRANSITIONS),
            "destination": (proto.DestinationMachine, proto.DESTINATION_TRANSITIONS)}  # fmt: skip
TERMINAL = {"DONE", "RESOLVED", "REFUSED", "ABORTED", "URGENT"}  # an urgent connection ends by closing


def legal_paths(table: dict[Key, Enum], start: Enum) -> Iterator[list[Step]]:
    """Every path from ``start`` that uses each transition at most once, ending where none is left."""

    def walk(state: Enum, path: list[Step], used: frozenset[Key]) -> Iterator[list[Step]]:
        options = [k for k in table if k[0] is state and k not in used]
        if not options:
            yield path
        for key in options:
            yield from walk(table[key], [*path, key], used | {key})

    yield from walk(start, [], frozenset())


@functools.cache
def all_paths(role: str) -> list[list[Step]]:
    cls, table = MACHINES[role]
    return list(legal_paths(table, cls().state))


def apply(machine: proto.state._Machine, key: Step) -> Enum:
    msg = SAMPLES[key[1]]
    return machine.send(msg) if key[2] is SEND else machine.receive(msg)


@pytest.mark.parametrize("role", MACHINES)
def test_every_legal_path_ends_in_a_terminal_state(role: str) -> None:
    cls, table = MACHINES[role]
    paths = all_paths(role)
    assert len(paths) > 20
    covered = set()
    for path in paths:
        machine = cls()
        for key in path:
            assert machine.state is key[0]
            assert apply(machine, key) is table[key]
            covered.add(key)
        assert machine.state.name in TERMINAL, path
    assert covered == set(table), "some transitions are on no path"


def test_source_and_destination_agree_in_lock_step() -> None:
    """Each source path, mirrored onto the destination, ends in the matching state."""
    checked = 0
    for path in all_paths("source"):
        src, dst = proto.SourceMachine(), proto.DestinationMachine()
        mirrored = True
        for state, cls, direction in path:
            other = RECV if direction is SEND else SEND
            if (dst.state, cls, other) not in proto.DESTINATION_TRANSITIONS:
                mirrored = False  # a crossing (e.g. Abort vs Commit): no lock-step order exists
                break
            apply(src, (state, cls, direction))
            apply(dst, (dst.state, cls, other))
        if mirrored:
            assert src.state.name == dst.state.name, path
            checked += 1
    assert checked >= 10


def test_happy_path_with_rounds_in_order() -> None:
    src, dst = proto.SourceMachine(), proto.DestinationMachine()
    script: list[tuple[str, Message]] = [
        ("s", SAMPLES[proto.MigrateStart]), ("d", SAMPLES[proto.MigrateAccept]),
        ("s", SAMPLES[proto.PageBatch]), ("s", SAMPLES[proto.PageBatch]), ("s", SAMPLES[proto.Sync]),
        ("d", SAMPLES[proto.SyncAck]), ("s", SAMPLES[proto.RoundEnd]),
        ("s", SAMPLES[proto.PageBatch]), ("s", SAMPLES[proto.RoundEnd]),
        ("s", SAMPLES[proto.DeviceState]), ("s", SAMPLES[proto.Digest]), ("d", proto.Ready()),
        ("s", SAMPLES[proto.Commit]), ("d", proto.Resumed()),
    ]  # fmt: skip
    for who, msg in script:
        sender, receiver = (src, dst) if who == "s" else (dst, src)
        sender.send(msg)
        receiver.receive(msg)
        if isinstance(msg, proto.Commit):
            assert src.in_doubt and dst.may_start_vm
    assert src.state is proto.SourceState.DONE and dst.state is proto.DestinationState.DONE
    assert not src.in_doubt and not dst.may_start_vm


def _illegal(role: str) -> Iterator[Step]:
    cls, table = MACHINES[role]
    states = type(cls().state)
    for state in states:
        for msg_cls in SAMPLES:
            for direction in (SEND, RECV):
                if (state, msg_cls, direction) not in table:
                    yield (state, msg_cls, direction)


def _reach(role: str, target: Enum) -> proto.state._Machine:
    """A machine driven along a legal path into ``target``."""
    cls, _ = MACHINES[role]
    for path in _shortest_first(role):
        machine = cls()
        for key in path:
            if machine.state is target:
                return machine
            apply(machine, key)
        if machine.state is target:
            return machine
    raise AssertionError(f"{target} unreachable")


@functools.cache
def _shortest_first(role: str) -> list[list[Step]]:
    return sorted(all_paths(role), key=len)


@pytest.mark.parametrize("role", MACHINES)
def test_every_illegal_message_in_every_state_is_refused(role: str) -> None:
    count = 0
    for state, msg_cls, direction in _illegal(role):
        machine = _reach(role, state)
        error = proto.LocalProtocolError if direction is SEND else proto.RemoteProtocolError
        with pytest.raises(error) as info:
            apply(machine, (state, msg_cls, direction))
        text = str(info.value)
        assert role in text and state.name in text and msg_cls.__name__ in text
        assert machine.state is state, "a refused message must not move the machine"
        count += 1
    assert count > 300


@pytest.mark.parametrize("role", MACHINES)
def test_abort_legal_everywhere_before_commit_and_never_after(role: str) -> None:
    cls, table = MACHINES[role]
    pre_commit = {"START", "PROPOSED", "CHECKING", "PRECOPY", "SYNCING", "RECEIVING", "SYNC_ASKED", "STATE_SENT", "STATE_RECEIVED",
                  "AWAITING_READY", "VERIFYING", "READY",
                  "PC_STARTING", "PC_AWAITING_READY", "PC_VERIFYING", "PC_READY", "PC_SYNCING",
                  "PC_SYNC_ASKED", "STREAM"}  # fmt: skip
    for state in type(cls().state):
        if state.name in pre_commit:
            assert (state, proto.Abort, SEND) in table and (state, proto.Abort, RECV) in table
        else:
            assert (state, proto.Abort, SEND) not in table


def test_destination_never_starts_without_commit() -> None:
    for path in all_paths("destination"):
        machine = proto.DestinationMachine()
        for key in path:
            if machine.may_start_vm:
                break
            apply(machine, key)
        if machine.may_start_vm:
            assert path[path.index(key) - 1][1] is proto.Commit


def test_in_doubt_query_on_new_connection() -> None:
    src, dst = proto.SourceMachine(), proto.DestinationMachine()
    query = proto.InDoubtQuery("vm1", "mig-1")
    src.send(query)
    dst.receive(query)
    assert src.in_doubt
    answer = proto.InDoubtAnswer("mig-1", False)
    dst.send(answer)
    src.receive(answer)
    assert src.state is proto.SourceState.RESOLVED and not src.in_doubt


def test_migration_id_mismatch_refused() -> None:
    src = proto.SourceMachine()
    src.send(SAMPLES[proto.MigrateStart])
    with pytest.raises(proto.RemoteProtocolError, match="MigrateAccept for migration 'other'"):
        src.receive(proto.MigrateAccept("other"))
    dst = proto.DestinationMachine()
    dst.receive(proto.InDoubtQuery("vm1", "mig-1"))
    with pytest.raises(proto.LocalProtocolError, match="this connection is 'mig-1'"):
        dst.send(proto.InDoubtAnswer("mig-2", True))


def test_crossing_abort_after_commit_sent_means_source_may_resume() -> None:
    src = _reach("source", proto.SourceState.READY)
    src.send(SAMPLES[proto.Commit])
    assert src.receive(SAMPLES[proto.Abort]) is proto.SourceState.ABORTED


def test_commit_ahead_is_read_after_ready_and_ends_in_lock_step() -> None:
    """Commit right behind the Digest: the destination takes it from its buffer only once it sent
    READY; the source is in doubt from the Commit on and ends DONE with the destination."""
    src = _reach("source", proto.SourceState.STATE_SENT)
    dst = _reach("destination", proto.DestinationState.STATE_RECEIVED)
    src.send(SAMPLES[proto.Digest])
    src.send(SAMPLES[proto.Commit])
    assert src.state is proto.SourceState.COMMIT_AHEAD and src.in_doubt
    assert not src.can_send(proto.Abort), "no Abort once COMMIT left"
    dst.receive(SAMPLES[proto.Digest])
    with pytest.raises(proto.RemoteProtocolError):  # a destination still checking cannot take it
        dst.receive(SAMPLES[proto.Commit])
    dst.send(proto.Ready())
    dst.receive(SAMPLES[proto.Commit])
    assert dst.may_start_vm
    with pytest.raises(proto.RemoteProtocolError):  # RESUMED cannot overtake READY
        src.receive(proto.Resumed())
    src.receive(proto.Ready())
    assert src.state is proto.SourceState.COMMITTED and src.in_doubt
    dst.send(proto.Resumed())
    src.receive(proto.Resumed())
    assert src.state is proto.SourceState.DONE and dst.state is proto.DestinationState.DONE


def test_commit_ahead_answered_by_abort_means_source_may_resume() -> None:
    src = _reach("source", proto.SourceState.AWAITING_READY)
    src.send(SAMPLES[proto.Commit])
    assert src.receive(SAMPLES[proto.Abort]) is proto.SourceState.ABORTED and not src.in_doubt
