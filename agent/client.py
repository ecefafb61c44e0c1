"""A client of an agent's control API: connect, authenticate, call operations.

This module owns the client side of control connections, used by the `ferry` CLI and by agents
talking to agents (the source asking the destination for its agent-info). Addresses are
"HOST:PORT" for TCP or a path (optionally "unix:PATH") for the agent's unix socket; both speak
the same authenticated protocol. `call_sync` wraps one call for blocking callers. Given a client
`ssl.SSLContext` (agent/tls.py), TCP connections use mutual TLS, the cluster-key handshake running
inside it; the unix socket never does.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
from typing import Any

from agent import tls as tlsdir
from agent import wire
from agent.config import parse_hostport
from proto.errors import ErrorCode, ProtocolError, RemoteProtocolError
from proto.messages import ErrorResponse, Request, Response

CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 30.0


class ClientError(Exception):
    """The agent answered with an error (or the exchange broke); `code` is a stable ErrorCode value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = str(code)
        self.message = message


def split_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """("unix", path) or ("tcp", (host, port)) for an agent address."""
    if address.startswith("unix:"):
        return "unix", address[5:]
    if address.startswith(("/", ".")) or ":" not in address:
        return "unix", address
    return "tcp", parse_hostport(address)


class ControlClient:
    """One authenticated control connection; calls are sequential (one request in flight)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int,
                 peer_name: str) -> None:
        self._reader = reader
        self._writer = writer
        self.version = version
        self.peer_name = peer_name
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   reply_within: float = CALL_TIMEOUT) -> Any:
        """Run one operation on the agent and return its result; ClientError when it fails.

        ``reply_within`` (seconds) bounds the wait for the reply; an operation that waits on purpose
        (vm-wait, migrate) passes a longer one, which a caller's ``asyncio.timeout`` could not do.
        """
        async with self._lock:
            rid = next(self._ids)
            try:
                await wire.write_message(self._writer, Request(rid, op, dict(args or {})), self.version)
                async with asyncio.timeout(reply_within):
                    reply = await wire.expect(self._reader)
            except ProtocolError as e:
                raise ClientError(e.code, e.message) from e
            return _result(rid, reply)

    async def close(self) -> None:
        await wire.close_writer(self._writer)


def _result(rid: int, reply: object) -> Any:
    if isinstance(reply, Response) and reply.id == rid:
        return reply.result
    if isinstance(reply, ErrorResponse) and reply.id in (rid, 0):
        raise ClientError(reply.code, reply.message)
    raise ClientError(ErrorCode.PROTOCOL_ERROR, f"unexpected reply {type(reply).__name__} to request {rid}")


async def _open(address: str, tls: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, where = split_address(address)
    if kind == "unix":
        assert isinstance(where, str)
        return await asyncio.open_unix_connection(where)
    assert isinstance(where, tuple)
    if tls is None:
        reader, writer = await asyncio.open_connection(where[0], where[1])
    else:  # the agent's certificate must name the host we dial (a DNS or IP subjectAltName)
        reader, writer = await asyncio.open_connection(where[0], where[1], ssl=tls, server_hostname=where[0],
                                                       ssl_handshake_timeout=tlsdir.HANDSHAKE_TIMEOUT)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small request/response frames
    return reader, writer


async def connect(address: str, key: bytes | None, *, name: str = "ferry-cli", role: str = "cli",
                  tls: ssl.SSLContext | None = None) -> ControlClient:
    """Connect and authenticate with the cluster key; ClientError(auth-failed) on a wrong key,
    or on a TLS failure (either side's certificate refused, or no TLS on the agent).

    Opening the connection is bounded by CONNECT_TIMEOUT, each handshake message by
    wire.HANDSHAKE_TIMEOUT; a caller wanting less wraps the call in ``asyncio.timeout``.
    """
    if key is None:
        raise ClientError(ErrorCode.AUTH_FAILED, "no cluster key: pass --key-file or set FERRY_KEY_FILE")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await _open(address, tls)
    except ssl.SSLError as e:
        raise ClientError(ErrorCode.AUTH_FAILED, f"TLS with {address} failed: {tlsdir.describe_error(e)}") from e
    try:
        version, peer = await wire.client_handshake(reader, writer, key=key, name=name, role=role)
    except ProtocolError as e:
        await wire.close_writer(writer)
        code, hint = _closed_hint(e, address, tls)
        raise ClientError(code, f"handshake with {address} failed: {e.message}{hint}") from e
    except ssl.SSLError as e:  # TLS 1.3: the agent refuses our certificate after our side of the handshake
        await wire.close_writer(writer)
        raise ClientError(ErrorCode.AUTH_FAILED, f"TLS with {address} failed: {tlsdir.describe_error(e)}") from e
    except ConnectionResetError as e:  # the same refusal, or TLS meeting plaintext, may end in a reset
        await wire.close_writer(writer)
        closed = RemoteProtocolError("connection reset by the peer")
        code, hint = _closed_hint(closed, address, tls)
        raise ClientError(code, f"handshake with {address} failed: {closed.message}{hint}") from e
    except BaseException:
        await wire.close_writer(writer)
        raise
    return ControlClient(reader, writer, version, peer)


def _closed_hint(e: ProtocolError, address: str, tls: ssl.SSLContext | None) -> tuple[str, str]:
    """(code, hint) for a failed handshake. A TLS agent closes on a plaintext client without a word,
    and over TLS 1.3 an agent that refuses our certificate does so after our side of the TLS
    handshake, which the stream only shows as a close: say what is likely wrong."""
    if e.code != ErrorCode.PROTOCOL_ERROR or split_address(address)[0] != "tcp":
        return e.code, ""
    if tls is None:
        return e.code, " (if the agent uses TLS, pass --tls-dir or set FERRY_TLS_DIR)"
    return ErrorCode.AUTH_FAILED, " (the agent refused the TLS certificate: is it signed by the agent's CA?)"


async def call_once(address: str, key: bytes, op: str, args: dict[str, Any] | None = None, *,
                    name: str = "ferry-cli", role: str = "cli", tls: ssl.SSLContext | None = None,
                    reply_within: float = CALL_TIMEOUT) -> Any:
    """Connect, run one operation (its reply within ``reply_within`` seconds), close."""
    client = await connect(address, key, name=name, role=role, tls=tls)
    try:
        return await client.call(op, args, reply_within=reply_within)
    finally:
        await client.close()


def call_sync(address: str, key: bytes, op: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
    """Blocking form of call_once, for scripts and tests (not for use inside a running event loop)."""
    return asyncio.run(call_once(address, key, op, args, **kw))
