"""Hostile input on the migration listener of a real agent: each gets a clear error and a
closed connection, and the agent, its VMs and other migrations carry on.

Covered: garbage, truncated and oversized frames before the handshake; out-of-order
messages after it; a page batch that claims pages beyond the guest; a peer that sends a
byte a second (dropped by the handshake deadline, while a real migration goes through);
a burst of 200 connections; random bytes after a good handshake (hypothesis). The
decoders themselves are fuzzed in tests/test_proto_fuzz.py; the migration data path's
``Connection.recv`` is fuzzed here over a real socketpair into a real guest-RAM mapping.
"""

from __future__ import annotations

import contextlib
import mmap
import secrets
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto
from agent.migration.common import client_handshake
from agent.migration.transport import Connection, connect
from proto.frame import HEADER_SIZE, build_header
from proto.messages import (
    Commit,
    ErrorResponse,
    Hello,
    Message,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    PageBatch,
    Ready,
    RoundEnd,
    Sync,
    SyncAck,
)
from tests.agents import AgentProc, agent_pair, finished, names, runs_on, wait_for
from tests.faults import fd_count, migration_target
from tests.test_faults_cuts import busy, only_on
from vmruntime import isa

pytestmark = pytest.mark.timeout(120)

GUEST = 1 << 20


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path_factory.mktemp("hostile"), cli_in_process=True)


@pytest.fixture
def pair(agents: tuple[AgentProc, AgentProc]) -> Iterator[tuple[AgentProc, AgentProc]]:
    """The agents, with a VM running on B that must survive every test untouched."""
    a, b = agents
    busy(b, "bystander")
    b.wait_spare()  # counted in the descriptors; replaced after each incoming migration
    fds = fd_count(b.proc.pid)
    yield a, b
    runs_on(b, "bystander")
    assert b.proc.poll() is None
    for agent in agents:
        agent.destroy_all_vms()
    # Every hostile connection was closed by the agent: its descriptors are back.
    wait_for(lambda: fd_count(b.proc.pid) <= fds, timeout=15, what=f"B's descriptors back to {fds}")


def raw(b: AgentProc) -> socket.socket:
    s = socket.create_connection(migration_target(b), timeout=20)
    return s


def closed_with(s: socket.socket) -> list[Message]:
    """Read until the agent closes the connection; the messages it sent before closing."""
    dec = proto.Decoder(guest_size=None)
    out: list[Message] = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        dec.receive_data(data)
        while isinstance(ev := dec.next_event(), Message):
            out.append(ev)
        if not data:
            s.close()
            return out


def authenticated(a: AgentProc, b: AgentProc) -> Connection:
    """A migration connection to B that passed the handshake (we hold the cluster key)."""
    conn = Connection(connect(migration_target(b)))
    client_handshake(conn, a.key_path.read_bytes().strip(), "hostile")
    return conn


def start_msg(name: str = "h1", mem: int = GUEST) -> MigrateStart:
    return MigrateStart(secrets.token_hex(8), name, mem, 4096, isa.ISA_VERSION, tuple(sorted(isa.ISA_FEATURES)),
                        "hash", {})


def free_mem_restored(b: AgentProc) -> None:
    wait_for(lambda: b.call("agent-info")["free-mem"] + sum(v["mem"] for v in b.call("vm-list")["vms"])
             == b.call("agent-info")["max-mem"], what="B's reservations released")


def error_codes(msgs: list[Message]) -> list[str]:
    return [m.code for m in msgs if hasattr(m, "code")]


# -- before the handshake ------------------------------------------------------------------------
def test_garbage_gets_a_protocol_error_and_a_closed_connection(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    s = raw(b)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
    msgs = closed_with(s)
    assert [type(m) for m in msgs] == [ErrorResponse] and msgs[0].code == "protocol-error", msgs


def test_truncated_frames_are_dropped(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    hello = proto.encode(Hello(1, 1, "x", "migration", bytes(32)))
    for cut in (5, HEADER_SIZE, len(hello) - 3):
        s = raw(b)
        s.sendall(hello[:cut])
        s.shutdown(socket.SHUT_WR)
        assert error_codes(closed_with(s)) in ([], ["protocol-error"])


def test_oversized_frames_are_refused_before_the_body_is_read(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    for body_len, payload_len in ((64 << 20, 0), ((4 << 10) + 1, 0), (10, 1 << 40)):
        header = build_header(1, Hello.TYPE, b"", 0)
        fields = bytearray(header[:24])
        struct.pack_into(">IQ", fields, 8, body_len, payload_len)
        frame = bytes(fields) + struct.pack(">I", zlib.crc32(bytes(fields)))
        s = raw(b)
        s.sendall(frame)  # and nothing more: the agent must answer without waiting for the body
        assert error_codes(closed_with(s)) == ["protocol-error"]


def test_a_byte_a_second_peer_is_dropped_and_blocks_no_migration(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    s = raw(b)
    hello = proto.encode(Hello(1, 1, "slow", "migration", bytes(32)))
    dropped = threading.Event()
    sent = [0]

    def trickle() -> None:
        try:
            for byte in hello:
                s.send(bytes([byte]))
                sent[0] += 1
                time.sleep(1.0)
        except OSError:
            dropped.set()

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    busy(a, "m")
    a.call("migrate", name="m", to=b.control)  # meanwhile a real migration goes through
    assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")
    # The handshake deadline (10 s) drops it long before its 100-odd bytes are through.
    assert error_codes(closed_with(s)) == []
    t.join(40)
    assert dropped.is_set() and sent[0] < len(hello)
    # The agent logs it right after it shut the socket: the trickle can see the shutdown first.
    wait_for(lambda: "handshake not done" in b.log(), timeout=10, what="the handshake deadline's log line")


def test_a_burst_of_200_connections_does_not_stop_migrations(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    socks = []
    for _ in range(200):
        try:
            socks.append(socket.create_connection(migration_target(b), timeout=5))
        except OSError:
            pass  # a full backlog may refuse some: that is the point of a limit
    busy(a, "m")
    a.call("migrate", name="m", to=b.control)
    assert finished(a, "m")["status"] == "completed"
    only_on(b, a, "m")
    for s in socks:
        s.close()
    assert "too many unauthenticated" in b.log()


# -- after the handshake ---------------------------------------------------------------------------
@pytest.mark.parametrize("first", [
    PageBatch(((0, 4096),), ()),
    Ready(),
    Commit("0123456789abcdef"),
    RoundEnd(0, 0, 0, 0, 0.0, 0, 0.0),
    Sync(0),
    SyncAck(0),
])
def test_out_of_order_first_message_is_refused(pair: tuple[AgentProc, AgentProc], first: Message) -> None:
    a, b = pair
    conn = authenticated(a, b)
    payload = b"\0" * first.payload_len if isinstance(first, PageBatch) else b""
    conn.sock.sendall(proto.encode(first) + payload)
    assert error_codes(closed_with(conn.sock)) == ["protocol-error"]
    assert names(b) == ["bystander"]


def test_out_of_order_message_mid_migration_aborts_and_frees_the_reservation(
        pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    conn = authenticated(a, b)
    start = start_msg("h2")
    conn.send(start)
    assert isinstance(conn.recv(), MigrateAccept)
    conn.sock.sendall(proto.encode(Commit(start.migration_id)))  # COMMIT before any READY
    assert error_codes(closed_with(conn.sock)) == ["protocol-error"]
    assert b.call("migrate-status", name="h2")["status"] == "failed"
    assert names(b) == ["bystander"]
    free_mem_restored(b)


def test_pages_beyond_the_guest_are_refused_before_a_byte_is_written(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    conn = authenticated(a, b)
    start = start_msg("h3")
    conn.send(start)
    assert isinstance(conn.recv(), MigrateAccept)
    batch = PageBatch(((GUEST, GUEST + 4096),), ())  # the page just past the end of the guest
    conn.sock.sendall(proto.encode(batch) + b"\xab" * 4096)
    msgs = closed_with(conn.sock)
    assert error_codes(msgs) == ["protocol-error"], msgs
    assert "guest" in msgs[0].reason, msgs
    assert b.call("migrate-status", name="h3")["status"] == "failed"
    free_mem_restored(b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes_after_the_handshake_close_the_connection(pair: tuple[AgentProc, AgentProc],
                                                               junk: bytes) -> None:
    a, b = pair
    conn = authenticated(a, b)
    conn.sock.sendall(junk)
    with contextlib.suppress(OSError):  # ENOTCONN: the agent already reset it (a bad magic, say)
        conn.sock.shutdown(socket.SHUT_WR)
    closed_with(conn.sock)  # the agent closes it, whatever the bytes were
    assert b.proc.poll() is None


def test_claims_of_a_huge_guest_or_a_replayed_migration_are_refused(pair: tuple[AgentProc, AgentProc]) -> None:
    a, b = pair
    conn = authenticated(a, b)
    conn.send(start_msg("huge", mem=1 << 40))
    refusal = conn.recv()
    assert isinstance(refusal, MigrateRefuse) and refusal.code == "insufficient-memory", refusal
    conn.close()
    conn = authenticated(a, b)
    start = start_msg("h4")
    conn.send(start)
    assert isinstance(conn.recv(), MigrateAccept)
    conn.close()  # the source vanishes: B discards
    free_mem_restored(b)
    again = authenticated(a, b)
    again.send(start)  # the same migration id once more: a replay
    refusal = again.recv()
    assert isinstance(refusal, MigrateRefuse) and refusal.code == "bad-request", refusal
    again.close()
    assert names(b) == ["bystander"]


# -- the data path decoder, fuzzed -----------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 3))
def test_connection_recv_only_raises_protocol_or_connection_errors(data: bytes, prefix: int) -> None:
    """Random frames (or a valid batch header followed by junk) into a guest-RAM mapping: the
    receiver raises a ProtocolError or a connection error, never anything else, and never
    writes outside the guest."""
    ram = mmap.mmap(-1, GUEST + 8192)
    ram[GUEST:] = b"\x5a" * 8192  # a guard beyond the guest
    frames = [b"", proto.encode(PageBatch(((0, 4096),), ())), proto.encode(RoundEnd(0, 1, 0, 1, 0.1, 0, 0.0)),
              proto.encode(PageBatch(((GUEST - 4096, GUEST),), ()))]
    left, right = socket.socketpair()
    try:
        left.sendall(frames[prefix] + data)
        left.close()
        right.settimeout(5)
        conn = Connection(right, guest_size=GUEST)
        view = memoryview(ram)
        try:
            while True:
                conn.recv(view[:GUEST])
        except (proto.ProtocolError, ConnectionError, TimeoutError):
            pass
        finally:
            view.release()
        assert ram[GUEST:] == b"\x5a" * 8192
    finally:
        right.close()
        ram.close()
