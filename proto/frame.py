"""The fixed binary frame header: layout, building and checking.

Every frame is ``header | body | payload``::

    offset size  field
    0      4     magic        b"FRRY"
    4      1     version      protocol version of this frame
    5      1     flags        reserved, must be 0
    6      2     type         message type code (0 is Invalid)
    8      4     body_len     length of the msgpack body
    12     8     payload_len  length of the raw payload after the body
    20     4     body_crc     CRC-32 of the body
    24     4     header_crc   CRC-32 of bytes 0..24 of this header

All integers are big-endian. The header checksum covers the lengths, so a
corrupted length is caught before it is trusted; the layout of these 28 bytes
is frozen across protocol versions so that any version can read any header.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from proto.errors import RemoteProtocolError
from proto.limits import MAGIC, MAX_BODY_SIZE, MAX_PAYLOAD_SIZE, SUPPORTED_VERSIONS

_LAYOUT = struct.Struct(">4sBBHIQI")
_CRC = struct.Struct(">I")

#: Size in bytes of the fixed frame header.
HEADER_SIZE = _LAYOUT.size + _CRC.size


@dataclass(frozen=True, slots=True)
class Header:
    """A checked frame header: what follows it and how long it is."""

    version: int
    type: int
    body_len: int
    payload_len: int
    body_crc: int

    @property
    def frame_len(self) -> int:
        """Total bytes of the frame, header included."""
        return HEADER_SIZE + self.body_len + self.payload_len


def build_header(version: int, type_code: int, body: bytes, payload_len: int) -> bytes:
    """Return the 28 header bytes for ``body`` followed by ``payload_len`` payload bytes."""
    fixed = _LAYOUT.pack(MAGIC, version, 0, type_code, len(body), payload_len, zlib.crc32(body))
    return fixed + _CRC.pack(zlib.crc32(fixed))


def parse_header(
    buf: bytes | bytearray | memoryview,
    versions: Collection[int] = SUPPORTED_VERSIONS,
    max_payload: int = MAX_PAYLOAD_SIZE,
    max_body: int = MAX_BODY_SIZE,
) -> Header:
    """Check the first ``HEADER_SIZE`` bytes of ``buf`` and return the header.

    Checks magic, checksum, version and lengths against the limits before the
    caller reads anything more. Whether the type is known, may carry a payload
    and fits its own body limit is checked by ``proto.codec.check_header``.
    Before authentication, pass ``max_body=MAX_HANDSHAKE_BODY``: an unknown
    peer then cannot make us buffer or decode more than a handshake needs.
    """
    if len(buf) < HEADER_SIZE:
        raise RemoteProtocolError(f"short frame header: {len(buf)} of {HEADER_SIZE} bytes")
    fixed = bytes(buf[: _LAYOUT.size])
    magic, version, flags, type_code, body_len, payload_len, body_crc = _LAYOUT.unpack(fixed)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    (header_crc,) = _CRC.unpack_from(buf, _LAYOUT.size)
    if header_crc != zlib.crc32(fixed):
        raise RemoteProtocolError("frame header checksum mismatch")
    _check_fields(version, flags, body_len, payload_len, versions, max_payload, max_body)
    return Header(version, type_code, body_len, payload_len, body_crc)


def _check_fields(
    version: int,
    flags: int,
    body_len: int,
    payload_len: int,
    versions: Collection[int],
    max_payload: int,
    max_body: int,
) -> None:
    if version not in versions:
        raise RemoteProtocolError(
            f"unsupported protocol version {version} (accepted: {sorted(versions)})",
            "unsupported-version",
        )
    if flags != 0:
        raise RemoteProtocolError(f"reserved header flags set: {flags:#x}")
    if body_len > min(max_body, MAX_BODY_SIZE):
        raise RemoteProtocolError(f"frame body of {body_len} bytes exceeds the limit of {min(max_body, MAX_BODY_SIZE)}")
    if payload_len > min(max_payload, MAX_PAYLOAD_SIZE):
        limit = min(max_payload, MAX_PAYLOAD_SIZE)
        raise RemoteProtocolError(f"frame payload of {payload_len} bytes exceeds the limit of {limit}")


def check_body_crc(header: Header, body: bytes | bytearray | memoryview) -> None:
    """Raise if ``body`` is not the body this header announced."""
    if len(body) != header.body_len:
        raise RemoteProtocolError(f"frame body is {len(body)} bytes, header says {header.body_len}")
    if zlib.crc32(body) != header.body_crc:
        raise RemoteProtocolError("frame body checksum mismatch")
