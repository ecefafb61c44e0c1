"""Fuzzing the decoder: random and mutated frames yield messages or protocol errors, nothing else.

Properties checked on every input:
- only ``ProtocolError`` ever escapes the decoder (no KeyError, struct.error, MemoryError ...);
- a page batch that is accepted lies entirely inside the guest, page aligned, sorted and
  disjoint, and its data ranges add up to the header's payload length;
- memory used while decoding stays proportional to the bytes actually received, whatever
  lengths the header claims.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import msgpack
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import proto
from proto.frame import build_header
from proto.messages import Message
from tests.test_proto_support import GUEST, any_message, near_valid_ranges, page_batches

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drain(data: bytes, guest_size: int = GUEST) -> list[Message]:
    """Feed ``data`` then EOF; collect messages until the decoder stops or raises ProtocolError."""
    dec = proto.Decoder(guest_size=guest_size)
    if data:
        dec.receive_data(data)
    dec.receive_data(b"")
    out: list[Message] = []
    try:
        while isinstance(event := dec.next_event(), Message):
            out.append(event)
    except proto.ProtocolError:
        pass
    return out


def assert_batch_inside_guest(msg: Message, guest_size: int = GUEST) -> None:
    if not isinstance(msg, proto.PageBatch):
        return
    for ranges in (msg.ranges, msg.zeros):  # each list in the order received
        prev = 0
        for start, end in ranges:
            assert start % proto.PAGE_SIZE == 0 and end % proto.PAGE_SIZE == 0
            assert prev <= start < end <= guest_size
            prev = end
    prev = 0
    for start, end in sorted(msg.ranges + msg.zeros):  # and no page both data and zero
        assert prev <= start
        prev = end
    assert len(msg.payload) == sum(n for _, n in msg.payload_targets())
    assert all(0 <= off and off + n <= guest_size for off, n in msg.payload_targets())


def fix_header_crc(frame: bytearray) -> None:
    """Recompute both checksums so mutations reach the body and range checks."""
    if len(frame) < proto.HEADER_SIZE:
        return
    body_len = struct.unpack_from(">I", frame, 8)[0]
    body = bytes(frame[proto.HEADER_SIZE : proto.HEADER_SIZE + body_len])
    struct.pack_into(">I", frame, 20, zlib.crc32(body))
    struct.pack_into(">I", frame, 24, zlib.crc32(bytes(frame[:24])))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    for msg in drain(data):
        assert_batch_inside_guest(msg)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_behind_a_valid_header_prefix(data: bytes) -> None:
    frame = bytearray(b"FRRY\x01\x00") + data
    fix_header_crc(frame)
    for msg in drain(bytes(frame)):
        assert_batch_inside_guest(msg)


_mutation = st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]), st.integers(0, 10**6),
                      st.integers(0, 255))  # fmt: skip


def mutate(frame: bytes, mutations: list[tuple[str, int, int]], fix: bool) -> bytes:
    buf = bytearray(frame)
    for kind, pos, value in mutations:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "set":
            buf[i] = value
        elif kind == "truncate":
            del buf[i:]
        elif kind == "insert":
            buf.insert(i, value)
        else:
            del buf[i]
    if fix:
        fix_header_crc(buf)
    return bytes(buf)


@FUZZ
@given(any_message, st.lists(_mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_frames(msg: Message, mutations: list[tuple[str, int, int]], fix: bool) -> None:
    frame = mutate(proto.encode_full(msg), mutations, fix)
    for out in drain(frame):
        assert_batch_inside_guest(out)


@FUZZ
@given(page_batches(guest_pages=64), st.lists(_mutation, min_size=1, max_size=3), st.integers(1, 64))
def test_mutated_page_batches_never_escape_a_smaller_guest(
    batch: proto.PageBatch, mutations: list[tuple[str, int, int]], guest_pages: int
) -> None:
    """Mutate only the body (checksums fixed), decode against guests smaller than the batch was made for."""
    guest = guest_pages * proto.PAGE_SIZE
    frame = proto.encode_full(batch)
    head, rest = frame[: proto.HEADER_SIZE], frame[proto.HEADER_SIZE :]
    mutated = bytearray(head + mutate(rest, mutations, False))
    fix_header_crc(mutated)
    for out in drain(bytes(mutated), guest_size=guest):
        assert_batch_inside_guest(out, guest)


_u64 = st.integers(0, 2**64 - 1)
_near_pages = st.integers(0, 80).map(lambda p: p * proto.PAGE_SIZE)
_page_pairs = st.lists(st.tuples(_near_pages, _near_pages), max_size=12)


@FUZZ
@given(st.one_of(st.lists(st.tuples(st.one_of(_u64, _near_pages), st.one_of(_u64, _near_pages)), max_size=12),
                 _page_pairs, near_valid_ranges()),
       st.one_of(_page_pairs, near_valid_ranges()), st.integers(0, 2**64 - 1))  # fmt: skip
def test_arbitrary_range_blobs(data: list[tuple[int, int]], zeros: list[tuple[int, int]], payload_len: int) -> None:
    """Any ranges a hostile source could write: accepted only when all inside the guest."""
    blob = b"".join(struct.pack("<QQ", s, e) for s, e in data)
    zblob = b"".join(struct.pack("<QQ", s, e) for s, e in zeros)
    body = msgpack.packb({"ranges": blob, "zeros": zblob}, use_bin_type=True)
    claimed = min(payload_len, proto.MAX_PAYLOAD_SIZE)
    header = proto.parse_header(build_header(1, proto.PageBatch.TYPE, body, claimed))
    try:
        msg = proto.decode_body(header, body, guest_size=GUEST)
    except proto.ProtocolError:
        return
    assert isinstance(msg, proto.PageBatch)
    assert_batch_inside_guest(proto.PageBatch(msg.ranges, msg.zeros, b"\x00" * msg.payload_len))
    assert msg.payload_len == claimed


@FUZZ
@given(st.sampled_from(sorted(proto.MESSAGE_TYPES)),
       st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                              st.text(max_size=10), st.binary(max_size=40)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                    max_leaves=12))  # fmt: skip
def test_random_bodies_for_every_type(type_code: int, body_obj: object) -> None:
    body = msgpack.packb(body_obj, use_bin_type=True)
    header = proto.parse_header(build_header(1, type_code, body, 0))
    try:
        msg = proto.decode_body(header, body, guest_size=GUEST)
    except proto.ProtocolError:
        return
    assert type(msg).TYPE == type_code
    assert_batch_inside_guest(proto.PageBatch(msg.ranges, msg.zeros) if isinstance(msg, proto.PageBatch) else msg)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, proto.MAX_BODY_SIZE * 4), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_claimed_lengths_never_allocate_beyond_what_arrived(body_len: int, payload_len: int, tail: bytes) -> None:
    """A header claiming huge lengths costs memory only for the bytes actually received."""
    fixed = struct.pack(">4sBBHIQI", b"FRRY", 1, 0, proto.PageBatch.TYPE, min(body_len, 2**32 - 1),
                        payload_len, 0)  # fmt: skip
    data = fixed + struct.pack(">I", zlib.crc32(fixed)) + tail
    tracemalloc.start()
    try:
        drain(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@settings(max_examples=40, deadline=None)
@given(any_message)
def test_truncated_valid_frames_wait_or_fail_cleanly(msg: Message) -> None:
    frame = proto.encode_full(msg)
    assume(len(frame) > proto.HEADER_SIZE)
    for cut in (proto.HEADER_SIZE - 1, proto.HEADER_SIZE, len(frame) - 1):
        dec = proto.Decoder(guest_size=GUEST)
        dec.receive_data(frame[:cut])
        assert dec.next_event() is proto.NEED_DATA
