"""Encoding and decoding of whole frames: message <-> bytes.

Two ways in, both checking every limit before anything is allocated:

(a) the blocking, zero-copy data path: read ``HEADER_SIZE`` bytes,
    ``parse_header`` them, ``check_header`` (type known, payload allowed),
    read ``header.body_len`` bytes, ``decode_body``; for a ``PageBatch``
    ``payload_targets()`` says where each payload piece goes in guest RAM,
    already checked against the guest size, so the transport can
    ``recv_into`` guest RAM directly.
(b) the buffered, h11-style ``Decoder``: ``receive_data(bytes)``, then
    ``next_event()`` until it returns ``NEED_DATA``; a page batch comes with
    its payload as bytes.

Encoding: ``encode(msg)`` gives header + body; for a page batch the caller
sends the payload (``wire_len(msg)`` bytes: the sum of the range lengths, or
the compressed size) right after it.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import Enum
from typing import Any, Final

import msgpack

from proto.errors import FieldError, LocalProtocolError, RemoteProtocolError
from proto.frame import HEADER_SIZE, Header, build_header, check_body_crc, parse_header
from proto.limits import (
    COMPRESSION_VERSION,
    CURRENT_VERSION,
    MAX_BODY_SIZE,
    MAX_PAYLOAD_SIZE,
    SUPPORTED_VERSIONS,
)
from proto.messages import MESSAGE_TYPES, Message, RangeBatch, from_fields, to_fields


class Sentinel(Enum):
    """Non-message results of ``Decoder.next_event``."""

    NEED_DATA = "need-data"  # feed more bytes with receive_data()
    CLOSED = "closed"  # the peer closed cleanly between frames


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


def encode(msg: Message, version: int = CURRENT_VERSION) -> bytes:
    """Header + msgpack body of ``msg``; a page batch's payload is NOT included."""
    if version not in SUPPORTED_VERSIONS:
        raise LocalProtocolError(f"cannot encode protocol version {version} (we speak {sorted(SUPPORTED_VERSIONS)})")
    if version < msg.SINCE:
        raise LocalProtocolError(f"{type(msg).__name__} needs protocol version {msg.SINCE}, this connection speaks {version}")
    try:
        fields = to_fields(msg, version)  # first: the wire conversion checks page range structure
        msg.check()
        body = msgpack.packb(fields, use_bin_type=True)
    except (FieldError, TypeError, ValueError, OverflowError) as exc:  # the last three: msgpack refused a value
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from None
    if isinstance(msg, RangeBatch) and msg.compressed and version < COMPRESSION_VERSION:  # it would lose the flag
        raise LocalProtocolError(f"compressed {type(msg).__name__} on a protocol version {version} connection")
    payload_len = wire_len(msg) if isinstance(msg, RangeBatch) else 0
    _check_encoded_sizes(msg, len(body), payload_len)
    return build_header(version, msg.TYPE, body, payload_len) + body


def wire_len(batch: RangeBatch) -> int:
    """Bytes of payload behind a batch's body on the wire: compressed, or the ranges' bytes."""
    return batch.compressed or batch.payload_len


def _check_encoded_sizes(msg: Message, body_len: int, payload_len: int) -> None:
    if body_len > type(msg).MAX_BODY:
        raise LocalProtocolError(f"{type(msg).__name__} body of {body_len} bytes exceeds {type(msg).MAX_BODY}")
    if payload_len > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{type(msg).__name__} payload of {payload_len} bytes exceeds {MAX_PAYLOAD_SIZE}")


def encode_full(msg: Message, version: int = CURRENT_VERSION) -> bytes:
    """The whole frame, payload included (a page batch's ``payload`` must match its ranges)."""
    frame = encode(msg, version)
    if not isinstance(msg, RangeBatch):
        return frame
    if len(msg.payload) != wire_len(msg):
        raise LocalProtocolError(f"{type(msg).__name__} payload is {len(msg.payload)} bytes, the frame says {wire_len(msg)}")
    return frame + msg.payload


def message_class(header: Header) -> type[Message]:
    """The class a checked header announces; unknown types and stray payloads are refused."""
    cls = MESSAGE_TYPES.get(header.type)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {header.type}")
    if header.version < cls.SINCE:
        raise RemoteProtocolError(f"{cls.__name__} in a protocol version {header.version} frame (it came in {cls.SINCE})")
    if header.payload_len and not cls.HAS_PAYLOAD:
        raise RemoteProtocolError(f"{cls.__name__} frame carries a payload of {header.payload_len} bytes")
    if header.body_len > cls.MAX_BODY:
        raise RemoteProtocolError(f"{cls.__name__} body of {header.body_len} bytes exceeds its limit of {cls.MAX_BODY}")
    return cls


def check_header(header: Header) -> Header:
    """Raise unless the header names a known message that may carry its payload."""
    message_class(header)
    return header


def decode_body(header: Header, body: bytes | bytearray | memoryview, guest_size: int | None = None) -> Message:
    """Decode and check the body announced by ``header``.

    For a page batch, every range is checked against ``guest_size`` (the guest
    RAM size agreed in the compatibility step) and the data ranges must add up
    to ``header.payload_len`` (a compressed batch: its ``compressed`` size must).
    """
    cls = message_class(header)
    check_body_crc(header, body)
    msg = from_fields_checked(cls, _unpack(body, cls), guest_size, header.version)
    if isinstance(msg, RangeBatch) and wire_len(msg) != header.payload_len:
        what = f"is compressed to {msg.compressed}" if msg.compressed else f"ranges cover {msg.payload_len}"
        raise RemoteProtocolError(f"{cls.__name__} {what} bytes, header says {header.payload_len}")
    return msg


def _unpack(body: bytes | bytearray | memoryview, cls: type[Message]) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage; all mean a bad body
        raise RemoteProtocolError(f"{cls.__name__}: undecodable body: {exc}") from None


def from_fields_checked(
    cls: type[Message], wire: Any, guest_size: int | None, version: int = CURRENT_VERSION
) -> Message:
    """Build and rule-check a message from a decoded body; failures are remote errors."""
    try:
        msg = from_fields(cls, wire, version)
        msg.check(guest_size)
    except FieldError as exc:
        raise RemoteProtocolError(f"{cls.__name__}: {exc}") from None
    except TypeError as exc:  # constructor refused the fields (cannot happen with a valid schema)
        raise RemoteProtocolError(f"{cls.__name__}: {exc}") from None
    return msg


class Decoder:
    """Buffered frame decoder: bytes in, messages out (h11 style, no I/O).

    ``max_payload`` lets control connections refuse page data outright;
    ``guest_size`` checks page ranges of a migration; ``versions`` can be
    narrowed to the negotiated version after the handshake; ``max_body`` (and
    ``max_payload``) can be lowered until the peer is authenticated (both
    attributes may be changed between frames).
    """

    def __init__(
        self,
        guest_size: int | None = None,
        versions: Collection[int] = SUPPORTED_VERSIONS,
        max_payload: int = MAX_PAYLOAD_SIZE,
        max_body: int = MAX_BODY_SIZE,
    ) -> None:
        self.guest_size = guest_size
        self.versions = versions
        self.max_payload = max_payload
        self.max_body = max_body
        self._buf = bytearray()
        self._header: Header | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into messages."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection."""
        if self._eof:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
        self._buf += data

    def next_event(self) -> Message | Sentinel:
        """The next complete message, ``NEED_DATA``, or ``CLOSED`` at a clean end of stream."""
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return self._starved()
            self._header = self._parse_header()
        header = self._header
        if len(self._buf) < header.frame_len:
            return self._starved()
        return self._take_frame(header)

    def _parse_header(self) -> Header:
        header = parse_header(self._buf, self.versions, self.max_payload, self.max_body)
        return check_header(header)

    def _take_frame(self, header: Header) -> Message:
        body_end = HEADER_SIZE + header.body_len
        msg = decode_body(header, bytes(self._buf[HEADER_SIZE:body_end]), self.guest_size)
        if isinstance(msg, RangeBatch):
            msg = type(msg)(msg.ranges, msg.zeros, bytes(self._buf[body_end : header.frame_len]), msg.compressed)
        del self._buf[: header.frame_len]
        self._header = None
        return msg

    def _starved(self) -> Sentinel:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise RemoteProtocolError(f"connection closed inside a frame ({len(self._buf)} bytes pending)")
        return CLOSED
