"""The pieces of stall detection without agents: the transport's progress deadline and keep-alive,
the policy's progress decision, the progress watchdog, and where the settings are read."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli, cli_migrate
from agent.config import ConfigError, describe, load_config
from agent.migration import progress, transport
from agent.migration.common import MigrationError
from agent.migration.info import MigrationParams
from agent.migration.policy import progress_stalled
from agent.migration.transport import Connection
from proto.messages import Ready


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = transport.connect(lsock.getsockname()[:2], io_timeout=0.3)
        server, _ = lsock.accept()
        server = transport.accepted(server, io_timeout=0.3)
        yield client, server
        client.close()
        server.close()


def test_a_silent_peer_fails_a_wait_within_the_stall_timeout(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    conn = Connection(client)
    assert conn.stall_s == pytest.approx(0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="stall"):
        conn.recv()
    assert 0.25 < time.monotonic() - t0 < 3.0  # the 0.3 s deadline


def test_the_stall_timeout_can_change_mid_connection(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    conn = Connection(client)
    conn.set_stall_timeout(1.5)
    assert conn.stall_s == 1.5
    Connection(server).send(Ready())  # a message that arrives in time is read, not timed out
    assert isinstance(conn.recv(), Ready)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="1.5 s"):
        conn.recv()
    assert 1.4 < time.monotonic() - t0 < 5.0


def test_migration_sockets_probe_a_silent_path(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in tcp_pair:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == transport.KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 300


def test_the_default_detects_a_stall_within_five_seconds() -> None:
    assert transport.STALL_TIMEOUT_S <= 5.0
    assert transport.IO_TIMEOUT_S == transport.STALL_TIMEOUT_S


def test_progress_stalled_is_a_pure_decision() -> None:
    assert progress_stalled(100.0, None) is None  # off
    assert progress_stalled(1.9, 2.0) is None
    why = progress_stalled(2.0, 2.0)
    assert why is not None and "no progress" in why and "progress-timeout 2 s" in why


class _Session:
    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.failure: Exception | None = None
        self.interrupted = threading.Event()
        self.refuse = False

    def interrupt(self, failure: Exception) -> bool:
        if self.refuse:
            return False
        self.failure = failure
        self.interrupted.set()
        return True


def test_the_watchdog_interrupts_a_session_whose_bytes_stand_still(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    session = _Session()
    session.conn = Connection(tcp_pair[0])
    watch = progress.ProgressWatch(session, 0.5)
    watch.start()
    try:
        for _ in range(8):  # moving: no interrupt, however long it lasts in all
            session.conn.sent += 1
            time.sleep(0.1)
        assert not session.interrupted.is_set()
        assert session.interrupted.wait(5.0)
    finally:
        watch.stop()
    assert isinstance(session.failure, MigrationError) and session.failure.code == "timeout"


def test_migration_params_carry_both_timeouts() -> None:
    p = MigrationParams.from_dict({"stall-timeout": 10, "progress-timeout": 150})
    assert (p.stall_timeout_s, p.progress_timeout_s) == (10.0, 150.0)
    assert MigrationParams.from_dict(p.to_dict()) == p
    assert MigrationParams().progress_timeout_s is None and MigrationParams().stall_timeout_s is None
    with pytest.raises(ValueError, match="stall-timeout"):
        MigrationParams(stall_timeout_s=0)
    with pytest.raises(ValueError, match="progress-timeout"):
        MigrationParams(progress_timeout_s=-1)


def test_ferry_migrate_passes_the_flags_as_params() -> None:
    ns = cli.build_parser().parse_args(["migrate", "v", "--to", "h:1", "--stall-timeout", "8",
                                        "--progress-timeout", "150"])
    assert isinstance(ns, argparse.Namespace)
    params = cli_migrate.migrate_params(ns)
    assert params["stall-timeout"] == 8 and params["progress-timeout"] == 150
    plain = cli_migrate.migrate_params(cli.build_parser().parse_args(["migrate", "v", "--to", "h:1"]))
    assert "stall-timeout" not in plain and "progress-timeout" not in plain


def test_the_agent_config_sets_the_stall_timeout(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    assert load_config(["--key-file", str(key)]).stall_timeout == transport.STALL_TIMEOUT_S
    cfg = load_config(["--key-file", str(key), "--stall-timeout", "2.5"])
    assert cfg.stall_timeout == 2.5 and 'stall-timeout = "2.5"' in describe(cfg)
    conf = tmp_path / "agent.toml"
    conf.write_text("stall-timeout = 7\n")
    assert load_config(["--config", str(conf), "--key-file", str(key)]).stall_timeout == 7.0
    with pytest.raises(ConfigError, match="stall-timeout"):
        load_config(["--key-file", str(key), "--stall-timeout", "0"])
    with pytest.raises(ConfigError, match="stall-timeout"):
        load_config(["--key-file", str(key), "--stall-timeout", "soon"])


def test_a_bandwidth_cap_lengthens_the_receivers_deadline() -> None:
    # The sender's rate limiter sleeps a batch's worth (4 MiB) before sending it: at 1 MiB/s the
    # receiver hears nothing for about 4 s between batches, and must not take that for a stall.
    assert MigrationParams().receive_stall(4.0) == 4.0
    assert MigrationParams(stall_timeout_s=9).receive_stall(4.0) == 9.0
    assert MigrationParams(bandwidth=1 << 20).receive_stall(4.0) == pytest.approx(8.0)
    assert MigrationParams(bandwidth=1 << 30).receive_stall(4.0) == pytest.approx(4.0, abs=0.01)
