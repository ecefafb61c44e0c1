"""Fault injection for tests: a frame-aware TCP proxy between agents, and kill helpers.

Not a conftest: import it. The proxy listens on a free loopback port and forwards every
connection to a target (an agent's migration or control listener). Each direction is
pumped frame by frame: the 28-byte proto header is parsed as it passes (message type,
body and payload lengths; bodies of small frames are decoded for rules that look inside,
e.g. the round number of a RoundEnd), so a fault can fire at an exact protocol point:

    proxy = FaultProxy(target=("127.0.0.1", 7441))
    proxy.add(Rule(direction=C2S, msg=Commit, when=AFTER, action=CUT))   # COMMIT delivered, then cut
    src.call("migrate", name="v", to=dst.control, migration=proxy.address_text)

Actions: PASS, CUT (close both sides of that connection), STALL (stop forwarding that
direction, sockets kept open, until ``release()``), CALL (run a callback, e.g. kill -9 an
agent, then go on), CUT_AFTER_BYTES (forward exactly N more bytes of the frame, then cut),
and GARBLE (forward the frame with random bytes for its payload);
``cut_after_bytes(direction, n)`` cuts the first connection after n bytes of a direction.
Link shaping for every connection: ``delay_s`` per chunk and ``throttle`` bytes/s.
Rules apply to the connection number ``conn`` (0 = the first through the proxy; None = all),
so a source's in-doubt query on a new connection passes untouched. Streams that are not
proto frames (garbage) are passed through as raw bytes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from proto.frame import HEADER_SIZE
from proto.messages import Message

C2S = "c2s"  # from the connecting side (the source) to the listener (the destination)
S2C = "s2c"
BEFORE = "before"  # act before the matching frame is forwarded
AFTER = "after"  # act once it has been forwarded whole
PASS, CUT, STALL, CALL, CUT_AFTER_BYTES = "pass", "cut", "stall", "call", "cut-after-bytes"
GARBLE = "garble"  # forward the frame with its payload replaced by random bytes of the same length

_HEAD = struct.Struct(">4sBBHIQ")  # magic, version, flags, type, body_len, payload_len (crc follows)
MAGIC = b"FRRY"
CHUNK = 256 * 1024
DECODE_LIMIT = 64 * 1024  # bodies up to this size are decoded for rule predicates


@dataclass
class Frame:
    """One frame seen by the proxy."""

    conn: int
    direction: str
    type: int
    body: dict[str, Any] | None  # decoded msgpack body (small frames only)
    payload_len: int


@dataclass
class Rule:
    """When the ``nth`` frame of type ``msg`` (matching ``where``) passes in ``direction``: ``action``."""

    direction: str
    msg: type[Message]
    action: str
    when: str = BEFORE
    nth: int = 1
    where: Callable[[Frame], bool] | None = None
    callback: Callable[[], None] | None = None  # for CALL
    nbytes: int = 0  # for CUT_AFTER_BYTES: bytes of the frame forwarded before the cut
    conn: int | None = 0
    seen: int = 0
    fired: threading.Event = field(default_factory=threading.Event)

    def matches(self, frame: Frame) -> bool:
        if frame.direction != self.direction or frame.type != self.msg.TYPE:
            return False
        if self.conn is not None and frame.conn != self.conn:
            return False
        if self.where is not None and not self.where(frame):
            return False
        self.seen += 1
        return self.seen == self.nth


class _Cut(Exception):
    """The connection is to be closed now."""


class FaultProxy:
    """A threaded TCP proxy with fault rules; ``close()`` (or leaving ``with``) stops it."""

    def __init__(self, target: tuple[str, int], *, delay_s: float = 0.0, throttle: float | None = None) -> None:
        self.target = target
        self.delay_s = delay_s
        self.throttle = throttle
        self.rules: list[Rule] = []
        self.frames: list[Frame] = []
        self.connections = 0
        self.refuse_new = False  # True: close new connections at once (the destination unreachable)
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._stream_cut: dict[str, int] = {}  # direction -> bytes of connection 0 to pass, then cut
        self._local = threading.local()  # per pump thread: its connection, direction, bytes passed
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self._lsock.getsockname()[:2]
        self._spawn(self._accept_loop)

    @property
    def address_text(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def cut_after_bytes(self, direction: str, nbytes: int) -> None:
        """Cut the first connection once ``nbytes`` have passed in ``direction`` (frames or not)."""
        self._stream_cut[direction] = nbytes

    def release(self) -> None:
        """Let stalled directions go on."""
        self._released.set()

    def types(self, direction: str, conn: int = 0) -> list[int]:
        with self._lock:
            return [f.type for f in self.frames if f.direction == direction and f.conn == conn]

    # -- plumbing --------------------------------------------------------------------------------
    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            if self.refuse_new:
                _cut((client,))
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the target is gone: so is this connection
                continue
            with self._lock:
                index = self.connections
                self.connections += 1
                self._socks += [client, upstream]
            pair = (client, upstream)
            self._spawn(self._pump, index, C2S, client, upstream, pair)
            self._spawn(self._pump, index, S2C, upstream, client, pair)

    def _pump(self, conn: int, direction: str, src: socket.socket, dst: socket.socket,
              pair: tuple[socket.socket, socket.socket]) -> None:
        self._local.left = self._stream_cut.get(direction) if conn == 0 else None
        try:
            while True:
                head = _recv_exact(src, HEADER_SIZE)
                if head is None:
                    break
                if head[:4] != MAGIC:
                    self._send(dst, head)
                    self._raw(src, dst)
                    break
                self._frame(conn, direction, head, src, dst)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the clean end on
        except _Cut:
            _cut(pair)
        except OSError:
            _cut(pair)

    def _frame(self, conn: int, direction: str, head: bytes, src: socket.socket, dst: socket.socket) -> None:
        _, _, _, mtype, body_len, payload_len = _HEAD.unpack(head[:_HEAD.size])
        body = _recv_exact(src, body_len) if body_len else b""
        if body is None:
            raise _Cut()
        frame = Frame(conn, direction, mtype, _decode(body), payload_len)
        with self._lock:
            self.frames.append(frame)
        rules = [r for r in self.rules if r.matches(frame)]
        budget = self._before(rules)
        self._forward(head + body, dst, budget)
        if budget is not None:
            budget -= len(head) + len(body)
        left = payload_len
        garble = any(r.action == GARBLE for r in rules)
        while left:
            chunk = src.recv(min(CHUNK, left))
            if not chunk:
                raise _Cut()
            left -= len(chunk)
            chunk = os.urandom(len(chunk)) if garble else chunk
            self._forward(chunk, dst, budget)
            if budget is not None:
                budget -= len(chunk)
        for r in rules:
            if r.when == AFTER:
                self._act(r)

    def _before(self, rules: list[Rule]) -> int | None:
        """Run the BEFORE rules; the byte budget of a CUT_AFTER_BYTES rule, if any."""
        budget = None
        for r in rules:
            if r.action == CUT_AFTER_BYTES:
                r.fired.set()
                budget = r.nbytes
            elif r.action == GARBLE:
                r.fired.set()
            elif r.when == BEFORE:
                self._act(r)
        return budget

    def _act(self, rule: Rule) -> None:
        rule.fired.set()
        if rule.action == CALL and rule.callback is not None:
            rule.callback()
        elif rule.action == CUT:
            raise _Cut()
        elif rule.action == STALL:
            self._released.wait()

    def _forward(self, data: bytes, dst: socket.socket, budget: int | None) -> None:
        if budget is not None and len(data) >= budget:
            self._send(dst, data[:max(budget, 0)])
            raise _Cut()
        self._send(dst, data)

    def _send(self, dst: socket.socket, data: bytes) -> None:
        left = getattr(self._local, "left", None)
        if left is not None:
            if len(data) >= left:
                dst.sendall(data[:left])
                raise _Cut()
            self._local.left = left - len(data)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.throttle:
            for i in range(0, len(data), 4096):
                dst.sendall(data[i:i + 4096])
                time.sleep(min(4096, len(data) - i) / self.throttle)
            return
        dst.sendall(data)

    def _raw(self, src: socket.socket, dst: socket.socket) -> None:
        while chunk := src.recv(CHUNK):
            self._send(dst, chunk)

    def close(self) -> None:
        self._closing = True
        self._released.set()
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)
        self._lsock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None on a clean end before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise _Cut()
            return None
        buf += chunk
    return bytes(buf)


def _decode(body: bytes) -> dict[str, Any] | None:
    if not body or len(body) > DECODE_LIMIT:
        return None
    try:
        value = msgpack.unpackb(body, raw=False)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def _cut(pair: tuple[socket.socket, ...]) -> None:
    """Close both sides at once with a reset, as a broken link or a killed peer looks: the
    peer's next send or receive fails at once (a half-closed socket would swallow its sends)."""
    for s in pair:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


def round_is(n: int) -> Callable[[Frame], bool]:
    """Rule predicate: a RoundEnd of round ``n``."""
    return lambda f: f.body is not None and f.body.get("round") == n


# -- kill helpers ------------------------------------------------------------------------------------
def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_agent(agent: Any) -> Callable[[], None]:
    """A callback that kill -9s an agent (its VMs run on, as after any agent crash)."""
    def kill() -> None:
        kill9(agent.proc.pid)
        agent.proc.wait()
    return kill


def incoming_vm_pids(agent: Any) -> list[int]:
    """VM processes of ``agent`` that belong to no listed VM: the idle process of an incoming migration."""
    listed = {vm["pid"] for vm in agent.call("vm-list")["vms"]}
    return [p for p in agent.group_processes() if p != agent.proc.pid and p not in listed]


def migration_target(agent: Any) -> tuple[str, int]:
    """An agent's migration listener, for the proxy to forward to."""
    host, _, port = agent.migration.rpartition(":")
    return host, int(port)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_status(agent: Any, vm: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                what: str = "migration phase") -> dict[str, Any]:
    """Poll migrate-status on ``agent`` until ``predicate(info)``: the polling way to reach a phase."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info: dict[str, Any] = agent.call("migrate-status", name=vm)
            if predicate(info):
                return info
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} of {vm} on {agent.name}")
        time.sleep(0.02)
