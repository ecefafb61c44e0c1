"""systemd notifications: agent/sdnotify.py alone, then a real ferry-agent on a NOTIFY_SOCKET the test owns.

The test plays systemd: it binds the datagram socket, passes NOTIFY_SOCKET (and WATCHDOG_USEC) in the
agent's environment and reads what the agent says: READY=1 only once its listeners answer, WATCHDOG=1
keep-alives, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import call_sync
from agent.sdnotify import Notifier, socket_address, watchdog_interval
from tests.agents import free_port, make_key

RECV_TIMEOUT = 15.0


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: one datagram per notification, parsed into dicts."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = socket_address(address)
        assert bind_to is not None
        self.sock.bind(bind_to)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = RECV_TIMEOUT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.received.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float = RECV_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"@ferry-test-notify-{os.getpid()}-{os.urandom(4).hex()}")
    yield fake
    fake.close()


# -- the module alone ----------------------------------------------------------------------------------
def test_socket_address_forms() -> None:
    assert socket_address("@systemd/notify") == "\0systemd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None


def test_watchdog_interval_is_half_the_period_and_only_for_its_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 42) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "43"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_notifier_sends_to_a_path_socket_and_forgets_the_environment(tmp_path: Path) -> None:
    fake = FakeSystemd(str(tmp_path / "notify"))
    env = {"NOTIFY_SOCKET": fake.env_value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    n = Notifier.from_env(env)
    assert env == {"OTHER": "kept"}  # children of the agent must not notify in its name
    assert n.enabled and n.watchdog == 1.0
    assert n.ready("up\nand running")
    assert fake.next() == {"READY": "1", "STATUS": "up and running"}
    assert n.keepalive()
    assert fake.next() == {"WATCHDOG": "1"}
    assert n.stopping("bye")
    assert fake.next() == {"STOPPING": "1", "STATUS": "bye"}
    n.close()
    fake.close()


def test_notifier_sends_to_an_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_systemd.env_value})
    assert n.watchdog is None
    assert n.status("hello")
    assert abstract_systemd.next() == {"STATUS": "hello"}


def test_notifier_without_systemd_or_with_a_dead_socket_does_nothing_and_never_raises(tmp_path: Path) -> None:
    assert not Notifier.from_env({}).ready("x")
    warnings: list[tuple[str, dict[str, object]]] = []

    class Log:
        def warning(self, msg: str, **fields: object) -> None:
            warnings.append((msg, fields))

    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}, log=Log())
    assert not n.ready("x")
    assert not n.keepalive()
    assert len(warnings) == 1 and warnings[0][0] == "cannot notify systemd"  # said once, not per keep-alive


# -- a real agent --------------------------------------------------------------------------------------
def _start_agent(tmp_path: Path, env_extra: dict[str, str], *flags: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    key = make_key(tmp_path)
    control = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "agent.log"
    argv = [sys.executable, "-m", "agent.daemon", "--name", "N", "--control", control,
            "--migration", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
            "--key-file", str(key), *flags]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **env_extra}, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, control, key


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _kill_vm(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_agent_says_ready_once_listening_then_keeps_alive_then_stopping(
        tmp_path: Path, abstract_systemd: FakeSystemd) -> None:
    metrics_port = free_port()
    proc, control, key_path = _start_agent(
        tmp_path, {"NOTIFY_SOCKET": abstract_systemd.env_value, "WATCHDOG_USEC": "300000"},
        "--metrics", f"127.0.0.1:{metrics_port}")
    vm_pid: int | None = None
    try:
        ready = abstract_systemd.wait_for("READY")
        # READY=1 means every listener is up: the first attempt at each must succeed, no retries.
        key = key_path.read_bytes().strip()
        assert call_sync(control, key, "vm-list", {})["vms"] == []
        socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()
        assert ready["READY"] == "1"
        assert control in ready["STATUS"] and f"metrics 127.0.0.1:{metrics_port}" in ready["STATUS"]
        keepalives = [abstract_systemd.wait_for("WATCHDOG") for _ in range(3)]  # every 0.15 s
        assert all(m == {"WATCHDOG": "1"} for m in keepalives)

        # VM processes do not inherit NOTIFY_SOCKET: only the agent speaks to systemd.
        vm = call_sync(control, key, "vm-create", {"name": "v1", "program": "idle", "mem": 16 << 20})
        vm_pid = int(vm["pid"])
        environ = Path(f"/proc/{vm['pid']}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for e in environ)
        # The status line follows the VMs (`systemctl status` shows it).
        assert ready["STATUS"].startswith("agent N: 0 VMs (0 migrating); ")
        assert abstract_systemd.wait_for("STATUS")["STATUS"].startswith("agent N: 1 VM (0 migrating); ")

        proc.send_signal(signal.SIGTERM)
        stopping = abstract_systemd.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1" and "stopping" in stopping["STATUS"]
        assert proc.wait(15) == 0
    finally:
        _stop(proc)
        _kill_vm(vm_pid)  # VMs outlive their agent: never leave this one behind
    abstract_systemd.sock.setblocking(False)
    while True:  # what came after STOPPING=1: keep-alives at most, never another status
        try:
            abstract_systemd.received.append({"late": abstract_systemd.sock.recv(4096).decode()})
        except BlockingIOError:
            break
    after = abstract_systemd.received[abstract_systemd.received.index(stopping) + 1:]
    assert all(m == {"WATCHDOG": "1"} or m.get("late") == "WATCHDOG=1\n" for m in after), after
    assert sum("READY" in m for m in abstract_systemd.received) == 1  # said once


def test_agent_without_watchdog_sends_no_keepalives(tmp_path: Path, abstract_systemd: FakeSystemd) -> None:
    proc, control, _ = _start_agent(tmp_path, {"NOTIFY_SOCKET": abstract_systemd.env_value,
                                               "WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"})
    try:
        abstract_systemd.wait_for("READY")
        proc.send_signal(signal.SIGTERM)
        abstract_systemd.wait_for("STOPPING")
        assert proc.wait(15) == 0
    finally:
        _stop(proc)
    assert not any("WATCHDOG" in m for m in abstract_systemd.received)  # WATCHDOG_PID named another process


def test_agent_that_cannot_listen_tells_systemd_why_and_never_ready(
        tmp_path: Path, abstract_systemd: FakeSystemd) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, _, _ = _start_agent(tmp_path, {"NOTIFY_SOCKET": abstract_systemd.env_value},
                                  "--metrics", f"127.0.0.1:{port}")
        try:
            status = abstract_systemd.wait_for("STATUS")
            assert proc.wait(15) == 1
        finally:
            _stop(proc)
    assert "READY" not in status and status["STATUS"].startswith("cannot listen")
