"""Framing and the message catalogue: round trips, header checks, field checks, page batch limits."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import given, settings

import proto
from proto.messages import Message
from tests.test_proto_support import GUEST, SAMPLES, any_message, sample_payload


def split(frame: bytes) -> tuple[proto.Header, bytes, bytes]:
    """Decode a frame the way the blocking transport does: header, then body, then payload."""
    header = proto.check_header(proto.parse_header(frame[: proto.HEADER_SIZE]))
    body_end = proto.HEADER_SIZE + header.body_len
    return header, frame[proto.HEADER_SIZE : body_end], frame[body_end:]


def frame_with(type_code: int, body: bytes, payload_len: int = 0, version: int = 1) -> bytes:
    from proto.frame import build_header

    return build_header(version, type_code, body, payload_len) + body


def test_every_message_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(proto.MESSAGE_TYPES.values())
    assert 0 not in proto.MESSAGE_TYPES


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_round_trip_zero_copy_path(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    header, body, rest = split(proto.encode(msg))
    assert header.type == cls.TYPE and header.version == proto.CURRENT_VERSION
    assert rest == b""
    assert proto.decode_body(header, body, guest_size=GUEST) == msg


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_round_trip_buffered_decoder_byte_by_byte(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    if isinstance(msg, proto.RangeBatch):
        msg = type(msg)(msg.ranges, msg.zeros, sample_payload(msg))
    dec = proto.Decoder(guest_size=GUEST)
    for i, byte in enumerate(proto.encode_full(msg)):
        assert dec.next_event() is proto.NEED_DATA, f"event before byte {i}"
        dec.receive_data(bytes([byte]))
    out = dec.next_event()
    assert out == msg
    assert getattr(out, "payload", b"") == getattr(msg, "payload", b"")
    assert dec.next_event() is proto.NEED_DATA


@settings(max_examples=150, deadline=None)
@given(any_message)
def test_round_trip_generated(msg: Message) -> None:
    dec = proto.Decoder()
    dec.receive_data(proto.encode_full(msg) * 2)
    first, second = dec.next_event(), dec.next_event()
    assert first == msg and second == msg
    assert dec.next_event() is proto.NEED_DATA and dec.buffered == 0


def test_page_batch_payload_targets_and_header_payload_len() -> None:
    batch = SAMPLES[proto.PageBatch]
    assert isinstance(batch, proto.PageBatch)
    header, body, _ = split(proto.encode(batch))
    decoded = proto.decode_body(header, body, guest_size=GUEST)
    assert isinstance(decoded, proto.PageBatch)
    assert decoded.payload_targets() == [(0, 8192), (12288, 4096)]
    assert header.payload_len == 12288 == sum(n for _, n in decoded.payload_targets())
    assert decoded.zeros == ((8192, 12288), (20480, 32768))


def test_decoder_stream_of_mixed_frames_and_clean_close() -> None:
    batch = proto.PageBatch(((0, 4096),), (), b"\xab" * 4096)
    stream = proto.encode(SAMPLES[proto.Request]) + proto.encode_full(batch) + proto.encode(proto.Ready())
    dec = proto.Decoder(guest_size=GUEST)
    dec.receive_data(stream)
    dec.receive_data(b"")
    events = [dec.next_event() for _ in range(4)]
    assert events[0] == SAMPLES[proto.Request]
    assert isinstance(events[1], proto.PageBatch) and events[1].payload == b"\xab" * 4096
    assert events[2] == proto.Ready() and events[3] is proto.CLOSED


def test_decoder_close_inside_frame_is_remote_error() -> None:
    dec = proto.Decoder()
    dec.receive_data(proto.encode(SAMPLES[proto.Request])[:-1])
    dec.receive_data(b"")
    with pytest.raises(proto.RemoteProtocolError, match="closed inside a frame"):
        dec.next_event()
    with pytest.raises(proto.LocalProtocolError):
        dec.receive_data(b"more")


def test_decoder_refuses_payload_on_control_connection_before_reading_it() -> None:
    batch = proto.PageBatch(((0, 4096),))
    dec = proto.Decoder(max_payload=0)
    dec.receive_data(proto.encode(batch))  # header and body only: the payload is never needed
    with pytest.raises(proto.RemoteProtocolError, match="payload"):
        dec.next_event()


def test_decoder_refuses_oversized_claims_from_the_header_alone() -> None:
    from proto.frame import build_header

    for body_len, payload_len in ((proto.MAX_BODY_SIZE + 1, 0), (10, proto.MAX_PAYLOAD_SIZE + 1)):
        head = bytearray(build_header(1, proto.PageBatch.TYPE, b"", payload_len))
        struct.pack_into(">I", head, 8, body_len)
        dec = proto.Decoder()
        dec.receive_data(_fix_crc(head))  # 28 bytes: nothing else has arrived
        with pytest.raises(proto.RemoteProtocolError, match="exceeds the limit"):
            dec.next_event()


def test_handshake_bodies_are_small_and_checked_from_the_header() -> None:
    from proto.frame import build_header

    big = msgpack.packb({"mac": b"x" * proto.MAX_HANDSHAKE_BODY})
    header = proto.parse_header(build_header(1, proto.Auth.TYPE, big, 0))
    with pytest.raises(proto.RemoteProtocolError, match="Auth body of .* exceeds its limit of 4096"):
        proto.check_header(header)
    with pytest.raises(proto.LocalProtocolError, match="exceeds 4096"):
        proto.encode(proto.Auth(b"x" * proto.MAX_HANDSHAKE_BODY))


def test_pre_auth_body_limit_applies_to_every_type() -> None:
    request = proto.encode(proto.Request(1, "x", {"pad": "y" * proto.MAX_HANDSHAKE_BODY}))
    dec = proto.Decoder(max_body=proto.MAX_HANDSHAKE_BODY)
    dec.receive_data(request[: proto.HEADER_SIZE])
    with pytest.raises(proto.RemoteProtocolError, match="exceeds the limit of 4096"):
        dec.next_event()
    with pytest.raises(proto.RemoteProtocolError, match="exceeds the limit of 4096"):
        proto.parse_header(request, max_body=proto.MAX_HANDSHAKE_BODY)


# --- header checks -------------------------------------------------------------------------


def _fix_crc(head: bytearray) -> bytes:
    head[24:28] = struct.pack(">I", zlib.crc32(bytes(head[:24])))
    return bytes(head)


def _mutated_header(offset: int, fmt: str, value: int, fix_crc: bool = True) -> bytes:
    head = bytearray(proto.encode(proto.Ready())[: proto.HEADER_SIZE])
    struct.pack_into(fmt, head, offset, value)
    return _fix_crc(head) if fix_crc else bytes(head)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (4, ">B", 0, "unsupported protocol version 0"),
        (4, ">B", proto.CURRENT_VERSION + 1, f"unsupported protocol version {proto.CURRENT_VERSION + 1}"),
        (5, ">B", 1, "reserved header flags"),
        (8, ">I", proto.MAX_BODY_SIZE + 1, "body of"),
        (12, ">Q", proto.MAX_PAYLOAD_SIZE + 1, "payload of"),
        (12, ">Q", 2**64 - 1, "payload of"),
    ],
)
def test_parse_header_rejects_bad_fields(offset: int, fmt: str, value: int, match: str) -> None:
    with pytest.raises(proto.RemoteProtocolError, match=match):
        proto.parse_header(_mutated_header(offset, fmt, value))


def test_unsupported_version_has_its_code() -> None:
    with pytest.raises(proto.RemoteProtocolError) as info:
        proto.parse_header(_mutated_header(4, ">B", 9))
    assert info.value.code == "unsupported-version"


def test_parse_header_rejects_magic_checksum_and_short_input() -> None:
    good = proto.encode(proto.Ready())[: proto.HEADER_SIZE]
    with pytest.raises(proto.RemoteProtocolError, match="magic"):
        proto.parse_header(b"XXXX" + good[4:])
    with pytest.raises(proto.RemoteProtocolError, match="header checksum"):
        proto.parse_header(_mutated_header(8, ">I", 5, fix_crc=False))
    with pytest.raises(proto.RemoteProtocolError, match="short frame header"):
        proto.parse_header(good[:-1])


def test_unknown_and_invalid_type_codes() -> None:
    for code in (0, 99, 65535):
        header = proto.parse_header(frame_with(code, msgpack.packb({})))
        with pytest.raises(proto.RemoteProtocolError, match=f"unknown message type {code}"):
            proto.check_header(header)


def test_payload_on_a_message_without_payload_is_refused() -> None:
    header = proto.parse_header(frame_with(proto.Ready.TYPE, msgpack.packb({}), payload_len=4096))
    with pytest.raises(proto.RemoteProtocolError, match="Ready frame carries a payload"):
        proto.check_header(header)


def test_body_checksum_and_length_checked() -> None:
    header, body, _ = split(proto.encode(SAMPLES[proto.Request]))
    with pytest.raises(proto.RemoteProtocolError, match="body checksum"):
        proto.decode_body(header, body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(proto.RemoteProtocolError, match="body is"):
        proto.decode_body(header, body + b"\x00")


def test_narrowed_versions_after_negotiation() -> None:
    frame = proto.encode(proto.Ready(), version=1)
    assert proto.parse_header(frame, versions={1}).version == 1
    with pytest.raises(proto.RemoteProtocolError):
        proto.parse_header(frame, versions={2})


def test_a_message_newer_than_the_connection_is_neither_sent_nor_accepted() -> None:
    hint = SAMPLES[proto.CodeHint]
    assert proto.CodeHint.SINCE == 2
    with pytest.raises(proto.LocalProtocolError, match="needs protocol version 2"):
        proto.encode(hint, version=1)
    frame = bytearray(proto.encode(hint, version=2))
    header, body, _ = split(bytes(frame))
    assert proto.decode_body(header, body, guest_size=GUEST) == hint
    frame[4] = 1  # the same frame claiming version 1
    head = proto.parse_header(_fix_crc(frame[: proto.HEADER_SIZE]))
    with pytest.raises(proto.RemoteProtocolError, match="CodeHint in a protocol version 1 frame"):
        proto.check_header(head)


@pytest.mark.parametrize(
    ("hint", "match"),
    [
        ((0x100, b"\0" * 0x80, [0x180]), "outside the code range"),
        ((0x100, b"\0" * 0x80, [0xFF]), "outside the code range"),
        ((GUEST - 0x10, b"\0" * 0x20, []), "not inside guest RAM"),
        ((0, b"\0" * (proto.MAX_HINT_CODE + 1), []), "exceed"),
        ((0, b"\0" * 0x400, list(range(proto.MAX_HINT_PCS + 1))), "at most"),
        ((0, "not bytes", []), "expected bytes"),
    ],
)
def test_code_hint_rules(hint: tuple[int, object, list[int]], match: str) -> None:
    body = msgpack.packb({"code_start": hint[0], "code": hint[1], "pcs": hint[2]}, use_bin_type=True)
    header, raw, _ = split(frame_with(proto.CodeHint.TYPE, body, version=2))
    with pytest.raises(proto.RemoteProtocolError, match=match):
        proto.decode_body(header, raw, guest_size=GUEST)


# --- field checks --------------------------------------------------------------------------


def _decode_raw(cls: type[Message], body_obj: object) -> Message:
    header, body, _ = split(frame_with(cls.TYPE, msgpack.packb(body_obj, use_bin_type=True)))
    return proto.decode_body(header, body, guest_size=GUEST)


@pytest.mark.parametrize(
    ("cls", "body", "match"),
    [
        (proto.Request, {"id": 1, "op": "x"}, "missing field 'args'"),
        (proto.Request, {"id": 1, "op": "x", "args": {}, "evil": 1}, "unexpected field"),
        (proto.Request, {"id": "1", "op": "x", "args": {}}, r"Request.id: expected an integer"),
        (proto.Request, {"id": True, "op": "x", "args": {}}, r"Request.id: expected an integer"),
        (proto.Request, {"id": 1, "op": "x", "args": []}, r"Request.args: expected a map"),
        (proto.Request, [1, "x", {}], "body must be a map"),
        (proto.InDoubtAnswer, {"migration_id": "m", "resumed": 1}, "expected a boolean"),
        (proto.RoundEnd, {"round": 1, "pages": 1, "zero_pages": 0, "bytes_sent": 1, "seconds": "1",
                          "dirty_pages": 0, "dirty_rate": 0.0}, "expected a number"),
        (proto.MigrateStart, {**proto.messages.to_fields(SAMPLES[proto.MigrateStart]), "isa_features": "base"},
         "array of strings"),
        (proto.MigrateStart, {**proto.messages.to_fields(SAMPLES[proto.MigrateStart]), "mem_size": 4095},
         "mem_size"),
        (proto.MigrateStart, {**proto.messages.to_fields(SAMPLES[proto.MigrateStart]), "vm_name": ""},
         "vm_name must be"),
        (proto.Hello, {"min_version": 2, "max_version": 1, "name": "a", "role": "r", "nonce": b"n" * 32},
         "version range"),
        (proto.Hello, {"min_version": 1, "max_version": 1, "name": "a", "role": "r", "nonce": b"n" * 31},
         "nonce must be 32"),
    ],
)  # fmt: skip
def test_bad_fields_are_remote_errors(cls: type[Message], body: object, match: str) -> None:
    with pytest.raises(proto.RemoteProtocolError, match=match):
        _decode_raw(cls, body)


def test_garbage_body_is_remote_error() -> None:
    header, _, _ = split(frame_with(proto.Request.TYPE, b"\xc1"))
    with pytest.raises(proto.RemoteProtocolError, match="undecodable body"):
        proto.decode_body(header, b"\xc1")


@pytest.mark.parametrize(
    "msg",
    [
        proto.Request(1, "x", {"f": object()}),
        proto.Request("1", "x", {}),  # type: ignore[arg-type]
        proto.MigrateStart("m", "vm", 100, 4096, 1, (), "hash", {}),
        proto.PageBatch(((0, 4097),)),
        proto.PageBatch(((4096, 8192), (0, 4096))),
        proto.PageBatch(((0, 8192),), ((4096, 12288),)),
        proto.PageBatch(((0, -4096),)),
        proto.PageBatch(((0, proto.MAX_PAYLOAD_SIZE + proto.PAGE_SIZE),)),
    ],
    ids=["unpackable", "ill-typed", "unaligned-mem", "unaligned", "unsorted", "data-zero-overlap", "negative",
         "payload-too-big"],
)  # fmt: skip
def test_encode_refuses_invalid_messages_locally(msg: Message) -> None:
    with pytest.raises(proto.LocalProtocolError):
        proto.encode(msg)


def test_encode_refuses_unsupported_versions() -> None:
    for version in (0, proto.CURRENT_VERSION + 1):
        with pytest.raises(proto.LocalProtocolError, match="cannot encode protocol version"):
            proto.encode(proto.Ready(), version=version)


def test_encode_full_checks_payload_length() -> None:
    with pytest.raises(proto.LocalProtocolError, match="payload is 1 bytes"):
        proto.encode_full(proto.PageBatch(((0, 4096),), (), b"x"))


# --- page batch range checks on decode ------------------------------------------------------


def raw_blob(pairs: list[tuple[int, int]]) -> bytes:
    """A range blob written by hand, bypassing the encoder's checks (as a hostile peer would)."""
    return b"".join(struct.pack("<QQ", s, e) for s, e in pairs)


def _batch_frame(data: list[tuple[int, int]], zeros: list[tuple[int, int]] = (), payload_len: int | None = None) -> bytes:  # type: ignore[assignment]
    body = msgpack.packb({"ranges": raw_blob(data), "zeros": raw_blob(zeros)}, use_bin_type=True)
    if payload_len is None:
        payload_len = sum(e - s for s, e in data)
    return frame_with(proto.PageBatch.TYPE, body, payload_len)


P = proto.PAGE_SIZE


@pytest.mark.parametrize(
    ("data", "zeros", "payload_len", "match"),
    [
        ([(0, P), (GUEST, GUEST + P)], [], None, "outside the guest"),
        ([(GUEST - P, GUEST + P)], [], None, "outside the guest"),
        ([], [(0, GUEST + P)], None, "outside the guest"),
        ([(2**64 - P, 2**64 - P)], [], 0, "empty"),
        ([(100, 4196)], [], None, "not page aligned"),
        ([(P, 2 * P), (0, P)], [], None, "unsorted"),
        ([(0, 2 * P), (P, 3 * P)], [], None, "overlaps"),
        ([(0, 2 * P)], [(P, 3 * P)], None, "overlaps a zero range"),
        ([(0, P)], [], 2 * P, "cover 4096 bytes, header says 8192"),
    ],
)
def test_page_batch_ranges_checked_against_guest(
    data: list[tuple[int, int]], zeros: list[tuple[int, int]], payload_len: int | None, match: str
) -> None:
    header, body, _ = split(_batch_frame(data, zeros, payload_len))
    with pytest.raises(proto.RemoteProtocolError, match=match):
        proto.decode_body(header, body, guest_size=GUEST)


def test_page_batch_range_count_limit_checked_before_decoding() -> None:
    count = proto.MAX_RANGES + 1
    blob = b"\x00" * (16 * count)
    header, body, _ = split(frame_with(proto.PageBatch.TYPE, msgpack.packb({"ranges": blob, "zeros": b""})))
    with pytest.raises(proto.RemoteProtocolError, match="within the limit"):
        proto.decode_body(header, body, guest_size=GUEST)


def test_page_batch_odd_range_blob_refused() -> None:
    header, body, _ = split(frame_with(proto.PageBatch.TYPE, msgpack.packb({"ranges": b"\x00" * 15, "zeros": b""})))
    with pytest.raises(proto.RemoteProtocolError, match="whole number of pairs"):
        proto.decode_body(header, body)


def test_page_batch_at_the_limits_is_accepted() -> None:
    pages = proto.MAX_RANGES
    data = tuple((2 * i * P, (2 * i + 1) * P) for i in range(pages))
    zeros = tuple(((2 * i + 1) * P, (2 * i + 2) * P) for i in range(pages))
    batch = proto.PageBatch(data, zeros)
    header, body, _ = split(proto.encode(batch))
    assert header.payload_len == pages * P <= proto.MAX_PAYLOAD_SIZE
    decoded = proto.decode_body(header, body, guest_size=2 * pages * P)
    assert decoded == batch
    with pytest.raises(proto.LocalProtocolError, match="the limit is 16384"):
        proto.encode(proto.PageBatch(data + ((2 * pages * P, (2 * pages + 1) * P),)))


def test_error_codes_are_stable_strings() -> None:
    assert proto.ErrorCode.NO_SUCH_VM == "no-such-vm"
    assert {"no-such-vm", "vm-exists", "insufficient-memory", "bad-request", "auth-failed", "incompatible", "busy",
            "internal", "migration-failed", "cancelled", "not-found", "timeout"} <= proto.ERROR_CODES  # fmt: skip
    err = proto.RemoteProtocolError("x", proto.ErrorCode.TIMEOUT)
    assert isinstance(err, proto.ProtocolError) and err.code == "timeout" and type(err.code) is str


# --- versioned fields: how a later catalogue keeps speaking the previous version -----------


def test_field_added_in_a_later_version_is_neither_sent_to_nor_expected_from_older_peers() -> None:
    from dataclasses import dataclass

    from proto.messages import MESSAGE_TYPES, from_fields, register, since, to_fields

    @register(250)
    @dataclass(frozen=True, slots=True)
    class Probe(Message):
        name: str
        extra: int = since(2, default=-1)

    try:
        msg = Probe("x", 7)
        assert to_fields(msg, version=1) == {"name": "x"}
        assert to_fields(msg, version=2) == {"name": "x", "extra": 7}
        assert from_fields(Probe, {"name": "x"}, version=1) == Probe("x", -1)
        assert from_fields(Probe, {"name": "x", "extra": 7}, version=2) == msg
        with pytest.raises(proto.messages.FieldError, match="unexpected field"):
            from_fields(Probe, {"name": "x", "extra": 7}, version=1)
        with pytest.raises(proto.messages.FieldError, match="missing field 'extra'"):
            from_fields(Probe, {"name": "x"}, version=2)
        header, body, _ = split(proto.encode(msg, version=1))
        assert header.version == 1 and proto.decode_body(header, body) == Probe("x", -1)
    finally:
        del MESSAGE_TYPES[250]
        proto.messages._SCHEMAS.pop(Probe)


def test_page_batch_repr_is_a_summary_for_big_batches() -> None:
    small = proto.PageBatch(((0, 4096),))
    assert repr(small) == "PageBatch(ranges=((0, 4096),), zeros=())"
    big = proto.PageBatch(tuple((i * 8192, i * 8192 + 4096) for i in range(1000)))
    assert repr(big) == "PageBatch(ranges=<1000 ranges 0x0..0x7cf000>, zeros=())"
