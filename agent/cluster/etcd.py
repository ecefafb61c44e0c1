"""etcd v3 through its JSON gateway (`/v3/...`, served by etcd 3.4 on its client URLs), over asyncio.

Why the gateway and not the gRPC client `aetcd`: aetcd 1.0 talks to one endpoint (no fail-over
across the members of a cluster) and opens only insecure channels (no TLS to etcd), and it brings
grpcio and protobuf along; the gateway needs nothing beyond the standard library's asyncio streams
and ssl, serves every RPC cluster mode uses, and any member answers it (docs/CLUSTER.md).

`EtcdGateway` implements agent/cluster/kv.py's `KV`: each request goes to the member that last
answered, then to the others in turn; a member that cannot be connected to is skipped. A read is
retried on the next member whatever failed; a write whose request went out and got no answer (the
member died, the request timed out in a quorum loss) raises `OutcomeUnknown`, never a guess.
Keys and values travel base64-encoded, as the gateway wants them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from agent.cluster.kv import Entry, OutcomeUnknown, StoreError, StoreUnavailable

REQUEST_TIMEOUT_S = 5.0  # one request to one member, connect included
CONNECT_TIMEOUT_S = 2.0
MAX_RESPONSE = 64 << 20
# gRPC codes in the gateway's error bodies that say the member could not serve it (try another).
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_NOT_FOUND = 5


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with ``prefix`` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64(b"\0")
    raw[-1] += 1
    return _b64(bytes(raw))


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(key=_unb64(kv.get("key", "")).decode(), value=_unb64(kv.get("value", "")),
                 mod_revision=int(kv.get("mod_revision", 0)), lease=int(kv.get("lease", 0)))


class _Endpoint:
    """One member's client URL and its idle keep-alive connections."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid etcd endpoint {url!r}: expected http(s)://HOST:PORT")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 2379
        self.tls = ssl_context if parts.scheme == "https" else None
        if parts.scheme == "https" and ssl_context is None:
            self.tls = ssl.create_default_context()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An idle connection (reused: True) or a new one; OSError/TimeoutError when none opens."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                    server_hostname=self.host if self.tls else None), CONNECT_TIMEOUT_S)
        return reader, writer, False

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class _Failed(Exception):
    """One member failed a request; ``sent``: the request may have reached it."""

    def __init__(self, why: str, sent: bool) -> None:
        super().__init__(why)
        self.sent = sent


class EtcdGateway:
    """etcd v3 over HTTP/1.1 and JSON, to any of ``endpoints`` (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], *, ssl_context: ssl.SSLContext | None = None,
                 user: str | None = None, password: str | None = None,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self._endpoints = [_Endpoint(u.strip(), ssl_context) for u in endpoints]
        self._user = user
        self._password = password
        self._token: str | None = None
        self.timeout = timeout
        self._first = 0  # the member that answered last
        self.requests = 0  # every request sent, for the per-migration cost (docs/CLUSTER.md)

    # -- KV --------------------------------------------------------------------------------------------
    async def get(self, key: str) -> Entry | None:
        got = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = got.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> list[Entry]:
        got = await self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                                 "sort_order": "ASCEND", "sort_target": "KEY"})
        return [_entry(kv) for kv in got.get("kvs") or []]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        got = await self._call("/v3/kv/put", body, write=True)
        return int(got.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)}, write=True)

    async def swap(self, key: str, mod_revision: int, value: bytes | None, lease: int = 0) -> bool:
        compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}
        if value is None:
            op: dict[str, Any] = {"request_delete_range": {"key": _b64(key)}}
        else:
            put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
            if lease:
                put["lease"] = str(lease)
            op = {"request_put": put}
        got = await self._call("/v3/kv/txn", {"compare": [compare], "success": [op]}, write=True)
        return bool(got.get("succeeded", False))

    async def grant(self, ttl: int) -> int:
        got = await self._call("/v3/lease/grant", {"TTL": str(ttl)}, write=True)
        return int(got["ID"])

    async def keepalive(self, lease: int) -> int:
        got = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, write=True)
        result = got.get("result", got)
        return int(result.get("TTL", 0))

    async def time_to_live(self, lease: int) -> int:
        got = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(got.get("TTL", -1))

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, write=True)
        except StoreError as e:
            if "not found" not in str(e):
                raise

    async def close(self) -> None:
        for ep in self._endpoints:
            ep.close()

    # -- requests --------------------------------------------------------------------------------------
    async def _call(self, path: str, body: dict[str, Any], *, write: bool = False) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first member that answers (see the module docstring)."""
        if self._user and self._token is None and path != "/v3/auth/authenticate":
            await self._authenticate()
        errors: list[str] = []
        n = len(self._endpoints)
        for step in range(n):
            i = (self._first + step) % n
            try:
                status, reply = await asyncio.wait_for(self._request(self._endpoints[i], path, body), self.timeout)
            except _Failed as f:
                errors.append(f"{self._endpoints[i].url}: {f}")
                if write and f.sent:
                    raise OutcomeUnknown(f"etcd {path}: no answer from {self._endpoints[i].url} ({f})") from None
                continue
            except TimeoutError:
                errors.append(f"{self._endpoints[i].url}: no answer within {self.timeout:g} s")
                if write:
                    raise OutcomeUnknown(f"etcd {path}: no answer within {self.timeout:g} s") from None
                continue
            if status == 200:
                self._first = i
                return reply
            why = str(reply.get("error") or reply.get("message") or f"HTTP {status}")
            code = int(reply.get("code", 0) or 0)
            if "auth token" in why and self._user:
                self._token = None
                await self._authenticate()
                return await self._call(path, body, write=write)
            if code == _NOT_FOUND:
                raise StoreError(f"etcd {path}: not found: {why}")
            if code in _UNAVAILABLE_CODES:
                errors.append(f"{self._endpoints[i].url}: {why}")
                if write:  # a timed-out proposal may still commit (after the quorum is back)
                    raise OutcomeUnknown(f"etcd {path}: {why}")
                continue
            raise StoreError(f"etcd {path}: {why}")
        raise StoreUnavailable(f"etcd unreachable: {'; '.join(errors)}")

    async def _authenticate(self) -> None:
        got = await self._call("/v3/auth/authenticate", {"name": self._user, "password": self._password or ""})
        self._token = str(got["token"])

    async def _request(self, ep: _Endpoint, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        headers = [f"POST {path} HTTP/1.1", f"Host: {ep.host}:{ep.port}", "Content-Type: application/json",
                   f"Content-Length: {len(data)}"]
        if self._token is not None:
            headers.append(f"Authorization: {self._token}")
        try:
            reader, writer, _ = await ep.connection()
        except (OSError, TimeoutError) as e:
            raise _Failed(f"cannot connect: {e}", sent=False) from None
        self.requests += 1
        try:
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + data)
            await writer.drain()
            status, reply, keep = await _read_response(reader)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            writer.close()
            raise _Failed(str(e) or type(e).__name__, sent=True) from None
        except BaseException:
            writer.close()
            raise
        if keep:
            ep.idle.append((reader, writer))
        else:
            writer.close()
        return status, reply


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any], bool]:
    """One HTTP/1.1 response: status, the first JSON object of its body, whether to reuse the connection.

    A streaming RPC (lease keep-alive) answers with a chunked stream of objects: its first one is
    the answer, and the connection is not reused.
    """
    line = await reader.readline()
    if not line:
        raise ValueError("connection closed before a response")
    parts = line.decode("latin-1").split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = headers.get("connection", "").lower() != "close"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = await _read_chunks(reader)
        keep = keep and complete
    else:
        length = int(headers.get("content-length", "0"))
        if length > MAX_RESPONSE:
            raise ValueError(f"response of {length} bytes")
        body = await reader.readexactly(length)
    text = body.decode().strip()
    if not text:
        return status, {}, keep
    obj, _ = json.JSONDecoder().raw_decode(text)
    return status, obj if isinstance(obj, dict) else {}, keep


async def _read_chunks(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body up to its end, or up to its first complete JSON object (a stream's first
    message); True when the body ended."""
    body = b""
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return body, True
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        try:
            json.loads(body)
        except ValueError:
            if len(body) > MAX_RESPONSE:
                raise ValueError("response too large") from None
            continue
        return body, False
