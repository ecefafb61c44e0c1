"""The control API server: TCP and a unix socket in the state dir, authenticated, Request -> Response.

This module owns the agent's control listeners and connections: it accepts a connection, runs the
handshake (mutual HMAC over the cluster key, proto.auth), then reads Requests one at a time, hands
each to ControlOps and writes its Response or ErrorResponse. It knows nothing of what operations
mean (agent/ops.py) and nothing of frames beyond agent/wire.py. With a server `ssl.SSLContext`
(agent/tls.py) the TCP listener speaks mutual TLS and the handshake runs inside it; the unix socket
never uses TLS (it is local and mode 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from pathlib import Path

from agent import tls as tlsdir
from agent import wire
from agent.logs import Log
from agent.ops import ControlOps, OpError
from proto.errors import ErrorCode, LocalProtocolError, ProtocolError
from proto.messages import ErrorResponse, Request, Response

IDLE_TIMEOUT = 600.0  # seconds a connection may sit between requests


class ControlServer:
    """The control listeners of one agent and their connections."""

    def __init__(self, *, ops: ControlOps, key: bytes, name: str, log: Log,
                 tls: ssl.SSLContext | None = None) -> None:
        self.ops = ops
        self._tls = tls
        self._key = key
        self._name = name
        self.log = log
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self.unix_path: Path | None = None

    async def start_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP; returns the bound address (port 0 picks a free one)."""
        if self._tls is None:
            server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        else:  # a failed TLS handshake never reaches _accept: the loop drops that connection
            server = await asyncio.start_server(self._accept, host, port, reuse_address=True, ssl=self._tls,
                                                ssl_handshake_timeout=tlsdir.HANDSHAKE_TIMEOUT)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start_unix(self, path: Path) -> None:
        """Listen on a unix socket, readable only by this user (it is as powerful as the key)."""
        await asyncio.to_thread(_remove_stale_socket, path)
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._accept, str(path))
        finally:
            os.umask(old_umask)
        self._servers.append(server)
        self.unix_path = path

    async def close(self) -> None:
        """Stop listening and end every connection."""
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = _peer_label(writer)
        try:
            await self._serve(reader, writer, peer)
        except (TimeoutError, OSError, ProtocolError) as e:
            self.log.debug("control connection ended", peer=peer, reason=str(e) or type(e).__name__)
        finally:
            self._conns.discard(task)
            await wire.close_writer(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        _nodelay(writer)
        try:
            version, client, role = await wire.server_handshake(reader, writer, key=self._key, name=self._name)
        except ProtocolError as e:
            self.log.warning("control handshake refused", peer=peer, code=e.code, reason=e.message)
            return
        self.log.debug("control connection", peer=peer, client=client, role=role)
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                msg = await wire.read_message(reader)
            if msg is None:
                return
            if not isinstance(msg, Request):
                await wire.write_message(writer, ErrorResponse(0, ErrorCode.PROTOCOL_ERROR,
                                                               f"expected a Request, got {type(msg).__name__}"), version)
                return
            await self._reply(writer, msg, await self._answer(msg), version)

    async def _reply(self, writer: asyncio.StreamWriter, req: Request, resp: Response | ErrorResponse,
                     version: int) -> None:
        try:
            await wire.write_message(writer, resp, version)
        except LocalProtocolError as e:  # an operation returned something msgpack cannot carry: a bug
            self.log.error("control result unencodable", op=req.op, error=e.message)
            await wire.write_message(writer, ErrorResponse(req.id, ErrorCode.INTERNAL,
                                                           f"{req.op}: unencodable result: {e.message}"), version)

    async def _answer(self, req: Request) -> Response | ErrorResponse:
        started = time.monotonic()
        try:
            result = await self.ops.handle(req.op, req.args)
        except OpError as e:
            self.log.debug("control request failed", op=req.op, code=e.code, reason=e.message)
            return ErrorResponse(req.id, e.code, e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in an operation must not kill the agent; the client learns of it
            self.log.error("control operation failed", op=req.op, error=repr(e))
            return ErrorResponse(req.id, ErrorCode.INTERNAL, f"{req.op} failed inside the agent: {e!r}")
        self.log.debug("control request", op=req.op, ms=round((time.monotonic() - started) * 1000, 3))
        return Response(req.id, result)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by an agent that did not exit cleanly (never a regular file)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()


def _peer_label(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix"


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
