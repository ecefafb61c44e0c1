"""Two hosts in network namespaces: a VM migrated over a veth pair and back, on a dedicated migration address.

Each "host" is a network namespace with one end of a veth pair and two addresses on it: 10.250.0.x
for the control API and metrics, 10.250.1.x for the migration listener, which is bound to that
address only, so guest memory can only travel over the migration network. The agents and the `ferry`
CLI run through `ip netns exec`, traffic stays between the two namespaces, and the namespaces and
every process are removed whatever the outcome (unique names per run). The oracle is the guest's
determinism: `verify` migrated there and back ends with the digest of an unmigrated run.

Needs root and a working `ip netns` (CI has both); elsewhere the test is skipped with the reason.
Nothing is installed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import make_key, run_ip, wait_for
from vmruntime.runlocal import run_local

BIN = Path(sys.executable).parent  # this virtualenv's ferry and ferry-agent entry points
ROOT = Path(__file__).resolve().parent.parent


def _entry(script: str, module: str) -> list[str]:
    """The installed entry point, or the same code through `python -m` when there is none."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]
VERIFY_ARGS = {"ws": "4M", "steps": "4000000"}  # seconds of guest time: the first migration lands mid-run
CONTROL_PORT, MIGRATION_PORT, METRICS_PORT = 7700, 7701, 9701
CMD_TIMEOUT = 120.0


def _netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (the test installs nothing)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"ferry-probe-{os.getpid()}-{os.urandom(3).hex()}"
    r = run_ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    run_ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace with its agent."""

    ns: str
    control_ip: str
    migration_ip: str
    tmp: Path
    key: Path
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.tmp / f"{self.ns}.log"

    @property
    def control(self) -> str:
        return f"{self.control_ip}:{CONTROL_PORT}"

    @property
    def migration(self) -> str:
        return f"{self.migration_ip}:{MIGRATION_PORT}"

    @property
    def metrics(self) -> str:
        return f"{self.control_ip}:{METRICS_PORT}"

    def start_agent(self, name: str, notify_socket: str) -> None:
        argv = ["ip", "netns", "exec", self.ns, *_entry("ferry-agent", "agent.daemon"), "--name", name,
                "--control", self.control,
                "--migration", self.migration, "--metrics", self.metrics, "--state-dir", str(self.tmp / name),
                "--key-file", str(self.key)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": notify_socket}, cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside this host's namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                           timeout=CMD_TIMEOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        if check and r.returncode != 0:
            raise AssertionError(f"[{self.ns}] {' '.join(argv)} exited {r.returncode}\nstdout: {r.stdout}\n"
                                 f"stderr: {r.stderr}\n--- agent log ---\n{self.log()[-4000:]}")
        return r

    def ferry(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `ferry` CLI, run inside this host's namespace against this host's agent."""
        return self.run(*_entry("ferry", "agent.cli"), "--agent", self.control, "--key-file", str(self.key), *args,
                        check=check)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the agent's group: it and any VM process left
        except ProcessLookupError:
            pass
        if code is None:
            self.proc.wait()
        self.returncode = code
        print(f"--- log of {self.ns} ---\n{self.log()[-6000:]}")  # shown when the test failed
        return code


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair, torn down (agents, VMs, namespaces) whatever happens."""
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tok = f"{os.getpid() % 100000}{os.urandom(2).hex()}"
    key = make_key(tmp_path)
    a = Host(f"ferry-a-{tok}", "10.250.0.1", "10.250.1.1", tmp_path, key)
    b = Host(f"ferry-b-{tok}", "10.250.0.2", "10.250.1.2", tmp_path, key)
    created: list[str] = []
    try:
        for h in (a, b):
            run_ip("netns", "add", h.ns)
            created.append(h.ns)
        _wire(a, b, f"fa{tok}", f"fb{tok}")  # interface names: at most 15 characters
        yield a, b
    finally:
        codes = [h.stop() for h in (a, b)]
        for ns in created:
            run_ip("netns", "del", ns, check=False)
        print(f"agent exit codes: {codes}")


def _wire(a: Host, b: Host, veth_a: str, veth_b: str) -> None:
    """The veth pair, created with its ends already inside the namespaces: the host never sees it."""
    run_ip("link", "add", veth_a, "netns", a.ns, "type", "veth", "peer", "name", veth_b, "netns", b.ns)
    for h, dev in ((a, veth_a), (b, veth_b)):
        run_ip("-n", h.ns, "addr", "add", f"{h.control_ip}/24", "dev", dev)
        run_ip("-n", h.ns, "addr", "add", f"{h.migration_ip}/24", "dev", dev)
        run_ip("-n", h.ns, "link", "set", dev, "up")
        run_ip("-n", h.ns, "link", "set", "lo", "up")


class NotifyReceiver:
    """A NOTIFY_SOCKET (a path: abstract names are per network namespace) to learn when an agent is ready."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, host: Host, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert host.proc is not None
            if host.proc.poll() is not None:
                raise AssertionError(f"agent in {host.ns} exited {host.proc.returncode}\n{host.log()}")
            self.sock.settimeout(0.2)
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                continue
        raise AssertionError(f"agent in {host.ns} not ready in {timeout} s\n{host.log()}")

    def close(self) -> None:
        self.sock.close()


def _unmigrated_digest() -> tuple[threading.Thread, io.BytesIO, list[int]]:
    out, status = io.BytesIO(), []
    t = threading.Thread(target=lambda: status.append(run_local("verify", 16 << 20, dict(VERIFY_ARGS), out,
                                                                max_seconds=200)))
    t.start()
    return t, out, status


def _digest(console: str) -> str:
    lines = [ln for ln in console.splitlines() if ln.startswith("digest ")]
    assert len(lines) == 1, console[-500:]
    return lines[0]


def _vm_info(host: Host, name: str) -> dict[str, Any]:
    return dict(json.loads(host.ferry("vm", "info", name, "--json").stdout))


def _metric(host: Host, at: Host, name: str, **labels: str) -> float:
    """One sample of `at`'s /metrics, fetched from inside `host`'s namespace."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://{at.metrics}/metrics', timeout=10).read().decode())"
    text = host.run(sys.executable, "-c", code).stdout
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels} at {at.metrics}")


def test_vm_migrates_between_namespaces_over_the_migration_address_and_back(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    ready = NotifyReceiver(a.tmp / "notify")
    try:
        a.start_agent("A", str(ready.path))
        ready.wait_ready(a)
        b.start_agent("B", str(ready.path))
        ready.wait_ready(b)
    finally:
        ready.close()
    reference = _unmigrated_digest()

    # From A's namespace over the veth, B's control API names its migration listener: the other network.
    assert json.loads(a.ferry("--agent", b.control, "agent", "info", "--json").stdout)["migration"] == b.migration
    a.ferry("vm", "create", "v1", "--program", "verify", "--mem", "16M",
            *(f"--arg={k}={v}" for k, v in VERIFY_ARGS.items()))
    wait_for(lambda: _vm_info(a, "v1")["instructions"] > 100_000, timeout=30, what="verify under way")

    there = json.loads(a.ferry("migrate", "v1", "--to", b.control, "--json").stdout)
    assert there["status"] == "completed", there
    # The source was sent to B's migration address, on the migration network, not to its control address.
    assert f"migration={b.migration}" in a.log()
    assert "v1" in b.ferry("vm", "list").stdout and "v1" not in a.ferry("vm", "list").stdout

    # Paused on B, so that its digest line is printed on A at the end, not on B when a slow machine
    # let it run out there (console output does not travel with a migration); it migrates paused.
    b.ferry("vm", "pause", "v1")
    assert _vm_info(b, "v1")["state"] == "paused", "verify ran out on B before the way back"
    back = json.loads(b.ferry("migrate", "v1", "--to", a.control, "--json").stdout)
    assert back["status"] == "completed", back
    assert f"migration={a.migration}" in b.log()
    a.ferry("vm", "resume", "v1")

    wait_for(lambda: _vm_info(a, "v1")["state"] == "halted", timeout=200, what="verify to halt")
    console = a.ferry("vm", "console", "v1").stdout
    t, out, status = reference
    t.join()
    assert status == [0], out.getvalue()[-500:]
    assert _digest(console) == _digest(out.getvalue().decode())

    # Each agent counted one migration each way; B's figures read from A's namespace, over the veth.
    for host, at in ((a, a), (a, b)):
        for direction in ("out", "in"):
            assert _metric(host, at, "ferry_migrations_total", direction=direction, outcome="completed") == 1
    assert b.stop() == 0 and a.stop() == 0
