"""The control API in process: agent/control.py's server, agent/client.py's client and agent/wire.py's
frames over real loopback sockets, with a stand-in for the operations (agent/ops.py is tested on its own).

What must hold: a request gets its reply (TCP and the unix socket), an operation's failure reaches the
client with its code and the connection carries on, a wrong key is refused on both sides with
auth-failed, a peer that breaks the framing or sends something other than a Request is told why and
closed, and a reply that does not come in time is a TimeoutError for the caller.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent import wire
from agent.client import ClientError, call_once, connect
from agent.control import ControlServer
from agent.logs import Log
from agent.ops import ControlOps, OpError
from proto.codec import decode_body, encode
from proto.errors import ErrorCode, RemoteProtocolError
from proto.frame import HEADER_SIZE
from proto.limits import MAX_HANDSHAKE_BODY
from proto.messages import ErrorResponse, Request, Response

KEY = b"control-api-test-key-32-bytes!!!"


class StandInOps:
    """What ControlServer needs of ControlOps: ``handle(op, args)``, answering a few made-up operations."""

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "echo":
            return {"op": op, "args": args}
        if op == "refuse":
            raise OpError(ErrorCode.NO_SUCH_VM, f"no VM named {args.get('name')!r}")
        if op == "crash":
            raise RuntimeError("disk on fire")
        if op == "unencodable":
            return {"value": object()}
        if op == "sleep":
            await asyncio.sleep(float(args["s"]))
            return {}
        raise OpError(ErrorCode.NOT_FOUND, f"unknown operation {op!r}")


class LogBuffer(io.StringIO):
    """The server's log stream; ``written`` is set at each line (the server logs from the loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


class Served:
    """A running ControlServer, its TCP address and what it logged."""

    def __init__(self, server: ControlServer, address: str, log: LogBuffer) -> None:
        self.server = server
        self.address = address
        self._log = log

    def log(self) -> str:
        return self._log.getvalue()

    async def logged(self, *needles: str) -> None:
        """Wait until the log holds every needle: the server logs a refusal after telling the peer."""
        async with asyncio.timeout(10):
            while not all(n in self.log() for n in needles):
                self._log.written.clear()
                await self._log.written.wait()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    out = LogBuffer()
    server = ControlServer(ops=cast(ControlOps, StandInOps()), key=KEY, name="T", log=Log("debug", out))
    host, port = await server.start_tcp("127.0.0.1", 0)
    try:
        yield Served(server, f"{host}:{port}", out)
    finally:
        await server.close()


async def test_requests_get_their_replies_in_order_on_one_connection(served: Served) -> None:
    client = await connect(served.address, KEY, name="tester")
    try:
        assert client.peer_name == "T"
        for n in range(3):
            assert await client.call("echo", {"n": n}) == {"op": "echo", "args": {"n": n}}
    finally:
        await client.close()
    assert await call_once(served.address, KEY, "echo", {"once": True}) == {"op": "echo", "args": {"once": True}}
    assert 'client=tester' in served.log() and "role=cli" in served.log()


async def test_the_unix_socket_replaces_a_stale_socket_file_and_removes_its_own(served: Served,
                                                                                  tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:  # left by an agent that was killed
        stale.bind(str(path))
    await served.server.start_unix(path)
    assert (path.stat().st_mode & 0o777) == 0o600  # as powerful as the key: this user only
    assert await call_once(f"unix:{path}", KEY, "echo", {}) == {"op": "echo", "args": {}}
    await served.server.close()
    assert not path.exists()


async def test_a_regular_file_in_the_socket_path_is_left_alone(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError):
        await served.server.start_unix(path)
    assert path.read_text() == "not a socket"


async def test_failed_operations_reach_the_client_with_their_code_and_the_connection_goes_on(
        served: Served) -> None:
    client = await connect(served.address, KEY)
    try:
        with pytest.raises(ClientError) as refused:
            await client.call("refuse", {"name": "c9"})
        assert refused.value.code == ErrorCode.NO_SUCH_VM and "'c9'" in refused.value.message
        with pytest.raises(ClientError) as crashed:
            await client.call("crash")
        assert crashed.value.code == ErrorCode.INTERNAL and "disk on fire" in crashed.value.message
        with pytest.raises(ClientError) as unencodable:
            await client.call("unencodable")
        assert unencodable.value.code == ErrorCode.INTERNAL and "unencodable" in unencodable.value.message
        assert await client.call("echo", {"after": "errors"}) == {"op": "echo", "args": {"after": "errors"}}
    finally:
        await client.close()
    assert 'msg="control operation failed" op=crash' in served.log()


async def test_a_wrong_key_is_refused_with_auth_failed_and_logged(served: Served) -> None:
    with pytest.raises(ClientError) as refused:
        await connect(served.address, b"another-cluster-key-of-32-bytes!")
    assert refused.value.code == ErrorCode.AUTH_FAILED
    await served.logged('msg="control handshake refused"', "code=auth-failed")
    with pytest.raises(ClientError) as no_key:
        await connect(served.address, None)
    assert no_key.value.code == ErrorCode.AUTH_FAILED and "FERRY_KEY_FILE" in no_key.value.message


async def test_a_server_with_another_key_is_refused_by_the_client() -> None:
    """The client checks the server's proof too: an agent without the cluster key gets no request."""
    out = io.StringIO()
    impostor = ControlServer(ops=cast(ControlOps, StandInOps()), key=b"impostor-key-of-thirty-two-bytes",
                             name="X", log=Log("debug", out))
    host, port = await impostor.start_tcp("127.0.0.1", 0)
    try:
        with pytest.raises(ClientError) as refused:
            await connect(f"{host}:{port}", KEY)
        assert refused.value.code == ErrorCode.AUTH_FAILED
    finally:
        await impostor.close()
    assert "control request" not in out.getvalue()


async def test_garbage_before_the_handshake_is_answered_with_a_protocol_error_then_closed(
        served: Served) -> None:
    host, port = served.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: ferry.example\r\nAccept: */*\r\n\r\n")  # no magic
        async with asyncio.timeout(10):
            answer = await wire.read_message(reader, MAX_HANDSHAKE_BODY)
            assert isinstance(answer, ErrorResponse) and answer.code == ErrorCode.PROTOCOL_ERROR
            assert await wire.read_message(reader) is None  # then the server closed
    finally:
        await wire.close_writer(writer)
    await served.logged('msg="control handshake refused"')


async def test_a_message_other_than_a_request_is_refused_and_the_connection_closed(served: Served) -> None:
    host, port = served.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        version, peer = await wire.client_handshake(reader, writer, key=KEY, name="raw", role="cli")
        assert peer == "T"
        await wire.write_message(writer, Response(1, {"not": "a request"}), version)
        async with asyncio.timeout(10):
            answer = await wire.expect(reader)
            assert isinstance(answer, ErrorResponse) and answer.id == 0
            assert answer.code == ErrorCode.PROTOCOL_ERROR and "expected a Request, got Response" in answer.message
            assert await wire.read_message(reader) is None
    finally:
        await wire.close_writer(writer)


async def test_a_reply_that_does_not_come_in_time_is_a_timeout_for_the_caller(served: Served) -> None:
    client = await connect(served.address, KEY)
    try:
        with pytest.raises(TimeoutError):
            await client.call("sleep", {"s": 30}, reply_within=0.05)
    finally:
        await client.close()


# -- agent/wire.py on a stream fed by hand ------------------------------------------------------------

def _stream(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_read_message_tells_a_clean_close_from_a_cut_frame() -> None:
    frame = encode(Request(7, "vm-list", {}))
    assert await wire.read_message(_stream(frame)) == Request(7, "vm-list", {})
    assert await wire.read_message(_stream(b"")) is None  # closed between frames
    with pytest.raises(RemoteProtocolError, match="inside a frame header"):
        await wire.read_message(_stream(frame[:10]))
    with pytest.raises(RemoteProtocolError, match="inside a frame body"):
        await wire.read_message(_stream(frame[:-1]))
    with pytest.raises(RemoteProtocolError, match="closed by the peer"):
        await wire.expect(_stream(b""))


async def test_read_message_refuses_a_body_over_the_limit_before_reading_it() -> None:
    big = encode(Request(1, "echo", {"blob": b"x" * (2 * MAX_HANDSHAKE_BODY)}))
    reader = _stream(big[:HEADER_SIZE], eof=False)  # the header only: the refusal must not wait for the body
    async with asyncio.timeout(10):
        with pytest.raises(RemoteProtocolError):
            await wire.read_message(reader, MAX_HANDSHAKE_BODY)


async def test_the_handshake_goes_in_oldest_version_frames_and_the_rest_in_the_negotiated_one() -> None:
    from proto.auth import ServerHandshake
    from proto.frame import parse_header
    from proto.limits import CURRENT_VERSION, MIN_VERSION

    key = b"k" * 32
    versions: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = ServerHandshake(key, "srv")
        for _ in range(2):
            raw = await reader.readexactly(HEADER_SIZE)
            header = parse_header(raw)
            versions.append(header.version)
            body = await reader.readexactly(header.body_len)
            writer.write(encode(hs.receive(decode_body(header, body)), MIN_VERSION))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    reader, writer = await asyncio.open_connection(host, port)
    version, name = await wire.client_handshake(reader, writer, key=key, name="cli", role="control")
    assert versions == [MIN_VERSION, MIN_VERSION] and (version, name) == (CURRENT_VERSION, "srv")
    writer.close()
    server.close()
    await server.wait_closed()
