"""proto.channel: one end of a connection, codec and state machine stepped in the same call."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import proto
from proto import HEADER_SIZE, Channel, DestinationState, LocalProtocolError, RemoteProtocolError, SourceState
from proto.messages import Message
from tests.test_proto_support import GUEST, SAMPLES, sample_payload

S = SAMPLES


def pair() -> tuple[Channel, Channel]:
    """A source and a destination channel, both checking the order."""
    return (Channel(proto.SourceMachine(), guest_size=GUEST),
            Channel(proto.DestinationMachine(), guest_size=GUEST))  # fmt: skip


def deliver(sender: Channel, receiver: Channel, msg: Message) -> Message:
    """``msg`` from ``sender`` to ``receiver`` through the buffered path (a page batch with its payload)."""
    data = sender.send(msg)
    if isinstance(msg, proto.PageBatch):
        data += msg.payload
    receiver.receive_data(data)
    got = receiver.next_event()
    assert isinstance(got, Message)
    assert receiver.next_event() is proto.NEED_DATA
    return got


def deliver_zero_copy(sender: Channel, receiver: Channel, msg: Message) -> Message:
    """``msg`` through the data path's steps: header, then body (a page batch's payload left out)."""
    frame = sender.send(msg)
    header = receiver.receive_header(frame[:HEADER_SIZE])
    return receiver.receive_body(header, frame[HEADER_SIZE:])


def batch() -> proto.PageBatch:
    b = S[proto.PageBatch]
    assert isinstance(b, proto.PageBatch)
    return proto.PageBatch(b.ranges, b.zeros, sample_payload(b))


@pytest.mark.parametrize("step", [deliver, deliver_zero_copy])
def test_a_whole_migration_steps_both_machines(step: Callable[[Channel, Channel, Message], Message]) -> None:
    src, dst = pair()
    assert step(src, dst, S[proto.MigrateStart]) == S[proto.MigrateStart]
    assert dst.machine is not None and dst.machine.state is DestinationState.CHECKING
    step(dst, src, S[proto.MigrateAccept])
    got = step(src, dst, batch())
    assert isinstance(got, proto.PageBatch) and got.ranges == batch().ranges
    if step is deliver:
        assert got.payload == batch().payload
    for msg in (S[proto.RoundEnd], S[proto.Sync]):
        step(src, dst, msg)
    assert dst.machine.state is DestinationState.SYNC_ASKED
    step(dst, src, S[proto.SyncAck])
    for msg in (S[proto.DeviceState], S[proto.Digest]):
        step(src, dst, msg)
    step(dst, src, S[proto.Ready])
    step(src, dst, S[proto.Commit])
    step(dst, src, S[proto.Resumed])
    assert src.machine is not None and src.machine.state is SourceState.DONE
    assert dst.machine.state is DestinationState.DONE


def test_an_illegal_send_raises_local_error_and_sends_nothing() -> None:
    src, _ = pair()
    with pytest.raises(LocalProtocolError, match="source in state START cannot send Commit"):
        src.send(S[proto.Commit])
    assert src.machine is not None and src.machine.state is SourceState.START
    with pytest.raises(LocalProtocolError, match="cannot send PageBatch"):
        src.send(batch())  # no page data before the destination accepted


def test_an_illegal_message_received_buffered_raises_remote_error() -> None:
    src, dst = pair()
    unchecked = Channel()  # a peer that breaks the order on purpose
    dst.receive_data(unchecked.send(S[proto.Commit]))
    with pytest.raises(RemoteProtocolError, match="destination in state START cannot receive Commit"):
        dst.next_event()
    deliver(src, dst, S[proto.MigrateStart])
    src.receive_data(unchecked.send(S[proto.Resumed]))
    with pytest.raises(RemoteProtocolError, match="source in state PROPOSED cannot receive Resumed"):
        src.next_event()


def test_the_data_path_refuses_an_unexpected_page_batch_by_its_header() -> None:
    """Before the body (and the payload behind it) is read: nothing lands in guest RAM."""
    _, dst = pair()
    frame = Channel().send(batch())
    with pytest.raises(RemoteProtocolError, match="destination in state START cannot receive PageBatch"):
        dst.receive_header(frame[:HEADER_SIZE])
    assert dst.machine is not None and dst.machine.state is DestinationState.START


def test_the_data_path_lowers_the_payload_limit_per_frame() -> None:
    src, dst = pair()
    deliver(src, dst, S[proto.MigrateStart])
    deliver(dst, src, S[proto.MigrateAccept])
    frame = src.send(batch())
    with pytest.raises(RemoteProtocolError, match="payload"):
        dst.receive_header(frame[:HEADER_SIZE], max_payload=0)
    header = dst.receive_header(frame[:HEADER_SIZE])
    msg = dst.receive_body(header, frame[HEADER_SIZE:])
    assert isinstance(msg, proto.PageBatch) and header.payload_len == msg.payload_len
    assert msg.payload_targets()[0] == (0, 8192)


def test_page_ranges_are_checked_against_the_guest_size() -> None:
    src, dst = pair()
    deliver(src, dst, S[proto.MigrateStart])
    deliver(dst, src, S[proto.MigrateAccept])
    dst.guest_size = 2 * proto.PAGE_SIZE
    with pytest.raises(RemoteProtocolError):
        deliver_zero_copy(src, dst, batch())


def test_a_message_for_another_migration_is_refused() -> None:
    src, dst = pair()
    deliver(src, dst, S[proto.MigrateStart])
    with pytest.raises(LocalProtocolError, match="for migration 'other'"):
        dst.send(proto.MigrateAccept("other"))


def test_an_unstarted_channel_only_frames_until_started() -> None:
    a, b = Channel(), Channel()
    assert a.machine is None
    assert deliver(a, b, S[proto.Commit]) == S[proto.Commit]  # any order: nothing checks it yet
    a.start(proto.SourceMachine())
    with pytest.raises(LocalProtocolError):
        a.send(S[proto.Commit])
    with pytest.raises(LocalProtocolError, match="already"):
        a.start(proto.SourceMachine())


def test_the_end_of_stream_between_frames_is_closed() -> None:
    src, dst = pair()
    dst.receive_data(src.send(S[proto.MigrateStart]))
    assert isinstance(dst.next_event(), proto.MigrateStart)
    dst.receive_data(b"")
    assert dst.next_event() is proto.CLOSED


def test_an_error_response_goes_out_in_any_state_and_ends_the_channel() -> None:
    src, dst = pair()
    deliver(src, dst, S[proto.MigrateStart])
    frame = dst.send_error(proto.ErrorResponse(0, "protocol-error", "bad frame"))  # CHECKING has no such entry
    assert dst.machine is not None and dst.machine.state is DestinationState.CHECKING
    src.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match="cannot receive ErrorResponse"):
        src.next_event()  # a peer's ErrorResponse is no legal step either: the connection is over
    with pytest.raises(LocalProtocolError, match="after giving up"):
        dst.send(S[proto.MigrateAccept])


def test_frames_go_out_as_the_oldest_version_until_the_handshake_chose_one() -> None:
    a, b = Channel(), Channel()
    assert proto.parse_header(a.send(proto.Ready())).version == proto.MIN_VERSION  # an old peer can read it
    a.speak(2)
    b.speak(2)
    assert proto.parse_header(a.send(proto.Ready())).version == 2
    assert deliver(a, b, S[proto.CodeHint]) == S[proto.CodeHint]
    old = Channel()  # a peer that still sends version-1 frames: refused once we speak 2
    b.receive_data(old.send(proto.Ready()))
    with pytest.raises(RemoteProtocolError, match="unsupported protocol version 1"):
        b.next_event()


def test_a_message_newer_than_the_chosen_version_is_not_sent() -> None:
    a = Channel()
    a.speak(1)
    with pytest.raises(LocalProtocolError, match="needs protocol version 2"):
        a.send(S[proto.CodeHint])
    with pytest.raises(LocalProtocolError, match="not one this channel accepts"):
        Channel(versions={1}).speak(2)
