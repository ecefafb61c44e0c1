"""The web console's HTTP server: the page, its state, its event stream and its actions.

This module owns `ferry-agent --http HOST:PORT` (docs/CONTRACTS.md, "Web console"): a small asyncio
HTTP/1.1 server, one request per connection, bounded head and body sizes and read time.

  GET  /                      the page (agent/webui: index.html, app.js, style.css; no build step)
  GET  /api/state             the snapshot (agent/web_state.py) as JSON
  GET  /api/events            server-sent events (agent/web_events.py)
  POST /api/actions/ACTION    ACTION is migrate, cancel, pause or resume; a JSON body {name, to,
                              params}; runs the control API op of that name (agent/ops.py)

Actions need the operator token (`--http-token FILE`) in the X-Ferry-Token header: without a
configured token, or with a missing or wrong one, the answer is 403 and nothing runs. A header
(not a cookie) carries it, so another site's page cannot send it: a cross-origin request with a
custom header needs a CORS pre-flight this server never grants. Served plain on loopback, a request
whose Host is not a loopback name is refused (421), so a DNS-rebound name cannot read the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from agent.web_config import is_loopback
from agent.web_events import EventHub, Subscriber, next_chunk, preamble

MAX_HEAD = 8192
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 5.0
STREAM_SNDBUF = 64 * 1024  # kernel send buffer of an event stream: what a stuck page may hold there
STREAM_HIGH_WATER = 64 * 1024  # and the transport's, before writing waits for the page
TOKEN_HEADER = "x-ferry-token"
ACTIONS = {"migrate": "migrate", "cancel": "migrate-cancel", "pause": "vm-pause", "resume": "vm-resume"}
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# Control API error codes -> HTTP status of a refused action (anything else: 500).
STATUS_OF_CODE = {"bad-request": 400, "no-such-vm": 404, "not-found": 404, "busy": 409, "vm-exists": 409,
                  "insufficient-memory": 409, "incompatible": 409, "migration-failed": 502, "timeout": 504,
                  "auth-failed": 502, "cancelled": 409}
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 421: "Misdirected Request",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}

Handle = Callable[[str, dict[str, Any]], Awaitable[Any]]
Response = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed HTTP request (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def https_context(tls_dir: Path) -> ssl.SSLContext:
    """A server context with the agent's certificate and key; browsers send no client certificate
    (the token authorises actions), so none is asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls_dir / "cert.pem"), keyfile=str(tls_dir / "key.pem"))
    return ctx


def load_assets() -> dict[str, bytes]:
    """The page's files, from the package (blocking: call it in a worker thread)."""
    root = resources.files("agent") / "webui"
    return {name: (root / name).read_bytes() for name, _ in ASSETS.values()}


class WebServer:
    """The console of one agent."""

    def __init__(self, *, hub: EventHub, snapshot: Callable[[], Awaitable[dict[str, Any]]], handle: Handle,
                 token: bytes | None, log: Any = None, tls: ssl.SSLContext | None = None) -> None:
        self.hub = hub
        self.snapshot = snapshot
        self.handle = handle  # ControlOps.handle: the control API's operations, in this process
        self.token = token
        self.log = log
        self.tls = tls  # the context new handshakes get (reload_tls replaces it)
        if tls is not None:
            tls.sni_callback = self._hand_over  # the listener's context: every handshake starts there
        self.address: tuple[str, int] | None = None
        self.loopback_only = False  # plain HTTP on a loopback address: Host must be a loopback name
        self._assets: dict[str, bytes] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._assets = await asyncio.to_thread(load_assets)
        tls_args: dict[str, Any] = {} if self.tls is None else {"ssl": self.tls,
                                                                "ssl_handshake_timeout": REQUEST_TIMEOUT}
        self._server = await asyncio.start_server(self._accept, host, port, limit=MAX_HEAD, **tls_args)
        self.address = self._server.sockets[0].getsockname()[:2]
        self.loopback_only = self.tls is None and is_loopback(host)
        return self.address

    def _hand_over(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                   ctx: ssl.SSLContext) -> None:
        if self.tls is not None and ctx is not self.tls:
            conn.context = self.tls

    async def reload_tls(self, tls_dir: Path) -> None:
        """New handshakes use the certificate and key found in ``tls_dir`` at this call (the agent's SIGHUP);
        an ssl.SSLError or OSError leaves the current ones in use."""
        if self.tls is None:
            return
        try:
            self.tls = await asyncio.to_thread(https_context, tls_dir)
        except (ssl.SSLError, OSError) as e:
            if self.log is not None:
                self.log.error("web console: tls reload failed; its certificate in use stays", error=str(e))

    async def close(self) -> None:
        await self.hub.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (TimeoutError, OSError, ssl.SSLError):
            pass  # the browser went away; nothing to tell it
        except Exception as e:  # a bug here must not reach the loop's handler; the log says what
            if self.log is not None:
                self.log.error("web console request failed", error=repr(e))
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
        except BadRequest as e:
            await _send(writer, *_json(e.status, {"error": "bad-request", "message": e.message}))
            return
        except TimeoutError:
            await _send(writer, *_json(408, {"error": "timeout", "message": "request not received in time"}))
            return
        if self.loopback_only and not _loopback_host(req.headers.get("host", "")):
            await _send(writer, *_json(421, {"error": "bad-host", "message": "this console answers to loopback "
                                             "names only (localhost, 127.0.0.1, [::1])"}))
            return
        if req.method == "GET" and req.path == "/api/events":
            await self._stream(reader, writer)
            return
        status, headers, body = await self._route(req, writer)
        if req.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            body = b""
        await _send(writer, status, headers, body)

    async def _route(self, req: Request, writer: asyncio.StreamWriter) -> Response:
        if req.path.startswith("/api/actions/"):
            if req.method != "POST":
                return _allow(_json(405, {"error": "bad-request", "message": "actions are POST"}), "POST")
            return await self._action(req.path.removeprefix("/api/actions/"), req, writer)
        if req.method not in ("GET", "HEAD"):
            return _allow(_json(405, {"error": "bad-request", "message": "only GET and HEAD here"}), "GET, HEAD")
        if req.path in ASSETS:
            name, content_type = ASSETS[req.path]
            return 200, {"Content-Type": content_type}, self._assets[name]
        if req.path == "/api/state":
            return _json(200, await self.snapshot())
        return _json(404, {"error": "not-found", "message": f"no such path {req.path!r}"})

    async def _action(self, action: str, req: Request, writer: asyncio.StreamWriter) -> Response:
        op = ACTIONS.get(action)
        if op is None:
            return _json(404, {"error": "not-found", "message": f"no action {action!r}: one of {', '.join(ACTIONS)}"})
        if self.token is None:
            return _json(403, {"error": "forbidden", "message": "this console is read-only: the agent runs "
                                                                "without --http-token"})
        sent = req.headers.get(TOKEN_HEADER, "").strip().encode("latin-1", "replace")
        if not hmac.compare_digest(sent, self.token):
            return _json(403, {"error": "forbidden", "message": "missing or wrong operator token "
                                                                f"({TOKEN_HEADER.title()} header)"})
        try:
            args = json.loads(req.body or b"{}")
        except ValueError:
            return _json(400, {"error": "bad-request", "message": "the body must be a JSON object"})
        if not isinstance(args, dict):
            return _json(400, {"error": "bad-request", "message": "the body must be a JSON object"})
        wanted = {"name", "to", "params"} if op == "migrate" else {"name"}
        args = {k: v for k, v in args.items() if k in wanted}
        if self.log is not None:
            self.log.info("web console action", action=action, vm=args.get("name"), to=args.get("to"),
                          peer=_peer(writer))
        return await self._run(op, args)

    async def _run(self, op: str, args: dict[str, Any]) -> Response:
        from agent.ops import OpError  # agent.ops builds on the VM manager; only actions need it

        try:
            result = await self.handle(op, args)
        except OpError as e:
            return _json(STATUS_OF_CODE.get(e.code, 500), {"error": e.code, "message": e.message})
        except Exception as e:  # as the control API does: a bug in an op is told, the agent goes on
            if self.log is not None:
                self.log.error("web console action failed", op=op, error=repr(e))
            return _json(500, {"error": "internal", "message": f"{op} failed inside the agent: {e!r}"})
        return _json(200, {"result": result})

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sub = await self.hub.subscribe()
        if sub is None:
            await _send(writer, *_json(503, {"error": "busy", "message": "too many event streams open"}))
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        writer.transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)
        head = _head(200, {"Content-Type": "text/event-stream", **SECURITY_HEADERS, "Cache-Control": "no-store"},
                     None)
        gone = asyncio.ensure_future(_until_eof(reader, sub))
        try:
            writer.write(head + preamble())
            while True:
                chunk = await next_chunk(sub)
                if chunk is None:
                    break
                writer.write(chunk)
                if not await _drain_unless_dropped(writer, sub):
                    break
        finally:
            gone.cancel()
            self.hub.unsubscribe(sub)
            if sub.dropped.is_set():
                writer.transport.abort()  # what it has not read is dropped with it


async def _until_eof(reader: asyncio.StreamReader, sub: Subscriber) -> None:
    """The page closed its side (tab closed, reload): end its stream at once."""
    with contextlib.suppress(Exception):
        while await reader.read(1024):
            pass
    sub.dropped.set()


async def _drain_unless_dropped(writer: asyncio.StreamWriter, sub: Subscriber) -> bool:
    """Wait until the page took the bytes written, or until it is dropped (False)."""
    drain = asyncio.ensure_future(writer.drain())
    dropped = asyncio.ensure_future(sub.dropped.wait())
    try:
        done, _ = await asyncio.wait({drain, dropped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (drain, dropped):
            if not fut.done():
                fut.cancel()
    if drain in done:
        drain.result()  # a connection error ends the stream here
        return True
    return False


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        raise BadRequest(400, "expected an HTTP/1.x request head (at most 8 KiB)") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "expected METHOD PATH HTTP/1.x")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "bad Content-Length") from None
    if not 0 <= length <= MAX_BODY:
        raise BadRequest(413, f"the body may hold at most {MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise BadRequest(400, "body shorter than its Content-Length") from None
    return Request(parts[0], parts[1].split("?", 1)[0], headers, body)


def _loopback_host(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    else:
        host = host.rpartition(":")[0] if host.count(":") == 1 else host
    return is_loopback(host)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def _json(status: int, data: Any) -> Response:
    body = json.dumps(data, separators=(",", ":"), default=str).encode()
    return status, {"Content-Type": "application/json"}, body


def _allow(response: Response, methods: str) -> Response:
    response[1]["Allow"] = methods
    return response


def _head(status: int, headers: dict[str, str], length: int | None) -> bytes:
    all_headers = {**headers, "Connection": "close"}
    if length is not None:
        all_headers["Content-Length"] = str(length)
    text = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
    text += "".join(f"{k}: {v}\r\n" for k, v in all_headers.items()) + "\r\n"
    return text.encode("latin-1")


async def _send(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes) -> None:
    length = int(headers.pop("Content-Length", len(body)))
    writer.write(_head(status, {**SECURITY_HEADERS, **headers}, length) + body)
    await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)


def console(settings: Any, *, tls_dir: Path | None, ops: Any, vms: Any, migrations: Any, peers: Any,
            log: Any = None) -> WebServer:
    """The console of an agent: `settings` (agent/web_config.py WebSettings) over its parts."""
    from agent.web_state import AgentState

    state = AgentState(agent_info=lambda: ops.agent_info({}), vms=vms, migrations=migrations, peers=peers,
                       actions=settings.token is not None)
    hub = EventHub(state.snapshot, wake=state.changes, log=log)
    tls = https_context(tls_dir) if settings.https and tls_dir is not None else None
    return WebServer(hub=hub, snapshot=state.snapshot, handle=ops.handle, token=settings.token, log=log, tls=tls)
