"""The web console's server without a browser: its settings, its event stream's bounds, its token rule.

The browser's side (the page itself, in Chromium) is tests/test_web_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import certs
from agent.config import ConfigError, load_config
from agent.web import WebServer
from agent.web_events import Differ, EventHub
from tests.agents import AgentProc, free_port, make_key, start_agent, wait_for

TOKEN = "operator-token-for-the-tests-0123"


def _token_file(tmp_path: Path, text: str = TOKEN) -> Path:
    path = tmp_path / "http.token"
    path.write_text(text + "\n")
    return path


def _base(tmp_path: Path) -> list[str]:
    return ["--key-file", str(make_key(tmp_path)), "--state-dir", str(tmp_path / "s"), "--max-mem", "64M"]


# -- settings -------------------------------------------------------------------------------------------
def test_console_settings_resolve_address_token_and_tls(tmp_path: Path) -> None:
    config = load_config([*_base(tmp_path), "--http", "127.0.0.1:0", "--http-token", str(_token_file(tmp_path))])
    assert config.web is not None
    assert config.web.address == ("127.0.0.1", 0) and config.web.token == TOKEN.encode()
    assert not config.web.https
    assert load_config(_base(tmp_path)).web is None


@pytest.mark.parametrize("flags, words", [
    (["--http", "0.0.0.0:8080"], "not a loopback address"),
    (["--http", "192.0.2.1:8080"], "--http-insecure on"),
    (["--http-token", "/nonexistent"], "needs http"),
    (["--http", "127.0.0.1:8080", "--http-token", "/nonexistent/token"], "cannot read"),
    (["--http", "127.0.0.1:8080", "--http-insecure", "maybe"], "not on or off"),
])
def test_console_settings_refuse_unsafe_or_broken_values(tmp_path: Path, flags: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config([*_base(tmp_path), *flags])


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too short"):
        load_config([*_base(tmp_path), "--http", "127.0.0.1:0", "--http-token", str(_token_file(tmp_path, "short"))])


def test_a_non_loopback_console_needs_tls_or_the_operators_word(tmp_path: Path) -> None:
    insecure = load_config([*_base(tmp_path), "--http", "0.0.0.0:8080", "--http-insecure", "on"])
    assert insecure.web is not None and not insecure.web.https and insecure.web.insecure
    certs.init_ca(tmp_path / "ca")
    certs.issue("127.0.0.1", ca_dir=tmp_path / "ca", out=tmp_path / "tls")
    https = load_config([*_base(tmp_path), "--http", "0.0.0.0:8080", "--tls-dir", str(tmp_path / "tls")])
    assert https.web is not None and https.web.https


def test_check_config_shows_the_console_keys_and_its_refusal(tmp_path: Path) -> None:
    token = _token_file(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "agent.daemon", *_base(tmp_path), "--http", "127.0.0.1:0",
                         "--http-token", str(token), "--check-config"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert 'http = "127.0.0.1:0"' in ok.stdout and f'http-token = "{token}"' in ok.stdout
    assert TOKEN not in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "agent.daemon", *_base(tmp_path), "--http", "0.0.0.0:0",
                          "--check-config"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a loopback address" in bad.stderr


# -- the differ -----------------------------------------------------------------------------------------
def test_differ_sends_what_changed_and_what_went() -> None:
    d = Differ()
    base: dict[str, Any] = {"agent": {"name": "A"}, "peers": [], "vms": [{"name": "v1", "state": "running"}],
                            "migrations": []}
    assert {e for e, _ in d.changes(base)} == {"agent", "peers", "vm"}
    assert d.changes(base) == []  # nothing changed: nothing sent
    moved = {**base, "vms": [], "migrations": [{"vm": "v1", "status": "active", "rounds": []}]}
    assert d.changes(moved) == [("migration", {"vm": "v1", "status": "active", "rounds": []}),
                                ("vm-removed", {"name": "v1"})]


# -- the event stream's bounds, on real sockets -----------------------------------------------------------
class FakeState:
    """A snapshot source whose contents the test sets."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] = {"agent": {"name": "T"}, "peers": [], "vms": [], "migrations": []}

    async def snapshot(self) -> dict[str, Any]:
        return self.snap


async def _open_stream(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


async def test_a_page_that_never_reads_is_dropped_and_the_others_keep_their_stream() -> None:
    state = FakeState()
    hub = EventHub(state.snapshot, queue_events=8, live_tick=0.01, idle_tick=0.01)
    server = WebServer(hub=hub, snapshot=state.snapshot, handle=_no_actions, token=None)
    _, port = await server.start("127.0.0.1", 0)
    stuck = await _open_stream(port, rcvbuf=4096)  # connects, asks for events, never reads
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    try:
        await wait_for_async(lambda: len(hub.clients) == 2, "both streams subscribed")
        received = 0
        big = "x" * 16384
        for i in range(400):  # ~6.5 MB of events: far more than the stuck page's buffers hold
            state.snap = {**state.snap, "agent": {"name": "T", "n": i, "pad": big}}
            await asyncio.sleep(0.012)
            while True:  # the reading page takes what arrived
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 20), 0.001)
                except TimeoutError:
                    break
                received += chunk.count(b"event: agent")
            if hub.dropped:
                break
            for sub in hub.clients:
                assert sub.queue.qsize() <= 8  # bounded, whatever the page does
        assert hub.dropped == 1, "the page that never reads was not dropped"
        assert len(hub.clients) == 1 and received > 0
        # Its connection is closed by the agent: the stuck page reads what was buffered, then EOF.
        stuck.setblocking(True)
        stuck.settimeout(10)
        while True:
            try:
                if not stuck.recv(1 << 20):
                    break
            except ConnectionResetError:
                break
    finally:
        stuck.close()
        writer.close()
        await server.close()


async def _no_actions(op: str, args: dict[str, Any]) -> Any:
    raise AssertionError("no action may run")


async def wait_for_async(pred: Any, what: str) -> None:
    for _ in range(1000):  # 10 s at most
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_no_page_open_no_watcher_runs() -> None:
    calls = 0
    state = FakeState()

    async def counted() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return state.snap

    hub = EventHub(counted, idle_tick=0.01)
    sub = await hub.subscribe()
    assert sub is not None
    await asyncio.sleep(0.1)
    hub.unsubscribe(sub)
    await asyncio.sleep(0.05)
    after = calls
    await asyncio.sleep(0.1)
    assert calls == after  # the last page left: no more snapshots
    await hub.close()


# -- a real agent's console: state, the token rule, TLS --------------------------------------------------
def _http(url: str, *, method: str = "GET", body: Any = None, token: str | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Ferry-Token"] = token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def consoled(tmp_path: Path) -> Iterator[tuple[AgentProc, str]]:
    port = free_port()
    agent = start_agent(tmp_path, "A", make_key(tmp_path), http=f"127.0.0.1:{port}",
                        http_token=_token_file(tmp_path))
    try:
        yield agent, f"http://127.0.0.1:{port}"
    finally:
        agent.stop()


def test_actions_need_the_token_and_run_with_it(consoled: tuple[AgentProc, str]) -> None:
    agent, url = consoled
    agent.call("vm-create", name="v1", program="idle", mem="4M")
    status, state = _http(f"{url}/api/state")
    assert status == 200 and state["actions"] is True and [v["name"] for v in state["vms"]] == ["v1"]
    for token in (None, "wrong-token-wrong-token"):
        status, reply = _http(f"{url}/api/actions/pause", method="POST", body={"name": "v1"}, token=token)
        assert status == 403 and reply["error"] == "forbidden"
    assert agent.call("vm-info", name="v1")["state"] == "running"
    status, reply = _http(f"{url}/api/actions/pause", method="POST", body={"name": "v1"}, token=TOKEN)
    assert status == 200 and reply["result"]["state"] == "paused"
    status, reply = _http(f"{url}/api/actions/pause", method="POST", body={"name": "nope"}, token=TOKEN)
    assert status == 404 and reply["error"] == "no-such-vm"
    status, _ = _http(f"{url}/api/actions/destroy", method="POST", body={"name": "v1"}, token=TOKEN)
    assert status == 404  # not an action of the console
    assert agent.call("vm-info", name="v1")["state"] == "paused"
    page = urllib.request.urlopen(f"{url}/", timeout=10)
    assert b"/app.js" in page.read() and "default-src 'self'" in page.headers["Content-Security-Policy"]


def test_a_console_without_a_token_is_read_only(tmp_path: Path) -> None:
    port = free_port()
    with start_agent(tmp_path, "A", make_key(tmp_path), http=f"127.0.0.1:{port}") as agent:
        agent.call("vm-create", name="v1", program="idle", mem="4M")
        status, state = _http(f"http://127.0.0.1:{port}/api/state")
        assert status == 200 and state["actions"] is False
        status, reply = _http(f"http://127.0.0.1:{port}/api/actions/pause", method="POST", body={"name": "v1"},
                              token=TOKEN)
        assert status == 403 and "read-only" in reply["message"]
        assert agent.call("vm-info", name="v1")["state"] == "running"


def test_a_rebound_host_name_is_refused_on_loopback(consoled: tuple[AgentProc, str]) -> None:
    _, url = consoled
    req = urllib.request.Request(f"{url}/api/state", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 421


def _served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        cert = tls.getpeercert(binary_form=True)
    assert cert is not None
    return cert


def test_the_console_serves_https_with_the_agents_certificate_and_reloads_it(tmp_path: Path) -> None:
    certs.init_ca(tmp_path / "ca")
    tls_dir = certs.issue("127.0.0.1", ca_dir=tmp_path / "ca", out=tmp_path / "tls").parent
    port = free_port()
    agent = AgentProc(tmp_path, "A", make_key(tmp_path), {"tls_dir": tls_dir, "http": f"127.0.0.1:{port}"})
    try:
        wait_for(lambda: "agent started" in agent.log() or agent.proc.poll() is not None, what="agent start")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
        status, state = _http(f"https://127.0.0.1:{port}/api/state", context=ctx)
        assert status == 200 and state["agent"]["name"] == "A"
        with pytest.raises(OSError):  # plain HTTP to the TLS listener: no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5)
        before = _served_certificate(port, ctx)
        certs.issue("127.0.0.1", ca_dir=tmp_path / "ca", out=tls_dir, force=True)  # a rotation
        os.kill(agent.proc.pid, signal.SIGHUP)
        wait_for(lambda: "tls reloaded" in agent.log(), what="the agent to reload its TLS directory")
        after = _served_certificate(port, ctx)
        assert after != before and after == ssl.PEM_cert_to_DER_cert((tls_dir / "cert.pem").read_text())
    finally:
        agent.stop()


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return reply


async def test_bad_requests_get_a_clear_status_and_no_action_runs() -> None:
    state = FakeState()
    server = WebServer(hub=EventHub(state.snapshot), snapshot=state.snapshot, handle=_no_actions,
                       token=TOKEN.encode())
    _, port = await server.start("127.0.0.1", 0)
    host = f"Host: 127.0.0.1:{port}\r\n"
    try:
        assert (await _exchange(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await _exchange(port, f"GET /api/actions/pause HTTP/1.1\r\n{host}\r\n".encode())).startswith(
            b"HTTP/1.1 405 ")
        big = f"POST /api/actions/pause HTTP/1.1\r\n{host}X-Ferry-Token: {TOKEN}\r\nContent-Length: 999999\r\n\r\n"
        assert (await _exchange(port, big.encode())).startswith(b"HTTP/1.1 413 ")
        bad_json = f"POST /api/actions/pause HTTP/1.1\r\n{host}X-Ferry-Token: {TOKEN}\r\nContent-Length: 3\r\n\r\n[1]"
        assert (await _exchange(port, bad_json.encode())).startswith(b"HTTP/1.1 400 ")
        no_token = f"POST /api/actions/pause HTTP/1.1\r\n{host}Content-Length: 2\r\n\r\n{{}}"
        assert (await _exchange(port, no_token.encode())).startswith(b"HTTP/1.1 403 ")
        head = await _exchange(port, f"HEAD /api/state HTTP/1.1\r\n{host}\r\n".encode())
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    finally:
        await server.close()


async def test_a_wake_event_brings_the_next_snapshot_before_the_tick() -> None:
    state = FakeState()
    changed = asyncio.Event()
    hub = EventHub(state.snapshot, idle_tick=3600.0, wake=lambda: [changed])
    sub = await hub.subscribe()
    assert sub is not None
    await sub.queue.get()  # the state event
    await asyncio.sleep(0.1)  # the watcher's first pass is over: it waits, on the event or for an hour
    assert sub.queue.empty()
    state.snap = {**state.snap, "vms": [{"name": "v1", "state": "paused"}]}
    changed.set()
    event = await asyncio.wait_for(sub.queue.get(), 10)
    assert event.startswith(b"event: vm\n")
    await hub.close()
