"""Frames over asyncio streams and the authenticated handshake, for control connections.

This module is the only place where the control API's bytes meet asyncio streams: it reads and
writes proto frames (header, msgpack body; control frames never carry a raw payload) and runs
proto.auth's handshake on either side. Both the control server (agent/control.py) and the client
(agent/client.py) use it; the protocol rules themselves live in proto/.
"""

from __future__ import annotations

import asyncio

from proto import auth
from proto.codec import check_header, decode_body, encode
from proto.errors import ErrorCode, ProtocolError, RemoteProtocolError
from proto.frame import HEADER_SIZE, parse_header
from proto.limits import CURRENT_VERSION, MAX_BODY_SIZE, MAX_HANDSHAKE_BODY, MIN_VERSION, SUPPORTED_VERSIONS
from proto.messages import ErrorResponse, Message

HANDSHAKE_TIMEOUT = 10.0  # seconds for each handshake message; a silent peer is dropped
WRITE_TIMEOUT = 30.0  # seconds a peer may leave our frames unread

async def read_message(reader: asyncio.StreamReader, max_body: int = MAX_BODY_SIZE) -> Message | None:
    """The next message, or None when the peer closed cleanly between frames.

    Before authentication the caller passes ``max_body=MAX_HANDSHAKE_BODY``, so an
    unauthenticated peer cannot make us buffer or decode more than a handshake needs.
    No deadline of its own: the caller bounds the wait with ``asyncio.timeout``.
    """
    try:
        head = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise RemoteProtocolError("connection closed inside a frame header") from e
    header = check_header(parse_header(head, SUPPORTED_VERSIONS, max_payload=0, max_body=max_body))
    try:
        body = await reader.readexactly(header.body_len)
    except asyncio.IncompleteReadError as e:
        raise RemoteProtocolError("connection closed inside a frame body") from e
    return decode_body(header, body)


async def expect(reader: asyncio.StreamReader, max_body: int = MAX_BODY_SIZE) -> Message:
    """The next message; a closed connection is a protocol error here."""
    msg = await read_message(reader, max_body)
    if msg is None:
        raise RemoteProtocolError("connection closed by the peer")
    return msg


async def _handshake_message(reader: asyncio.StreamReader) -> Message:
    """The peer's next handshake message, within HANDSHAKE_TIMEOUT and the handshake's size limit."""
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        return await expect(reader, MAX_HANDSHAKE_BODY)


async def write_message(writer: asyncio.StreamWriter, msg: Message, version: int = CURRENT_VERSION) -> None:
    """Send one frame; a peer that stops reading for WRITE_TIMEOUT seconds is a TimeoutError."""
    writer.write(encode(msg, version))
    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, key: bytes,
                           name: str, role: str) -> tuple[int, str]:
    """Authenticate to a server; returns (negotiated version, server name). ProtocolError on failure."""
    hs = auth.ClientHandshake(key, name, role)
    # The handshake goes in frames of the oldest version we speak, so an older peer can read it
    # (docs/protocol.md, "Versions"); the caller speaks the negotiated one after it.
    await write_message(writer, hs.hello(), MIN_VERSION)
    try:
        reply = hs.receive(await _handshake_message(reader))
    except ProtocolError as e:  # e.g. the server's MAC is wrong: say why, so its log shows it too
        await _tell(writer, auth.error_response(e))
        raise
    if reply is not None:
        await write_message(writer, reply, MIN_VERSION)
        hs.receive(await _handshake_message(reader))
    if not hs.done or hs.version is None:
        raise RemoteProtocolError("handshake did not complete", ErrorCode.AUTH_FAILED)
    return hs.version, hs.peer_name or "?"


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, key: bytes,
                           name: str) -> tuple[int, str, str]:
    """Authenticate a client; returns (version, client name, client role). Tells the peer why it failed."""
    hs = auth.ServerHandshake(key, name)
    try:
        await write_message(writer, hs.receive(await _handshake_message(reader)), MIN_VERSION)
        await write_message(writer, hs.receive(await _handshake_message(reader)), MIN_VERSION)
    except ProtocolError as e:
        await _tell(writer, auth.error_response(e))
        raise
    assert hs.version is not None  # DONE implies a negotiated version
    return hs.version, hs.peer_name or "?", hs.peer_role or "?"


async def _tell(writer: asyncio.StreamWriter, msg: ErrorResponse) -> None:
    """Best effort: the peer may already be gone."""
    try:
        await asyncio.wait_for(write_message(writer, msg, MIN_VERSION), 1.0)
    except (TimeoutError, OSError, ProtocolError):
        pass


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (TimeoutError, OSError):
        pass
