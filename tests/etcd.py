"""A real etcd cluster for the cluster-mode tests: three members on loopback in a tmp dir.

`etcd` comes from Debian's `etcd-server` (3.4.x). When it is missing the harness installs it with
apt-get (`apt-get update` once, then `apt-get install -y etcd-server`); the tests are skipped, with
the reason, only where that is impossible (not root, no apt-get). Each member gets its own client
and peer port and data dir; `stop(i)`/`start(i)` take one member down and back (quorum kept with
two), `stop_all`/`start_all` the whole cluster.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests import debs
from tests.agents import free_port

ETCD_PACKAGE = "etcd-server"
START_TIMEOUT = 30.0


def etcd_binary() -> str:
    """The etcd binary, installed from Debian when missing; pytest.skip where that cannot be done."""
    return debs.ensure("etcd", ETCD_PACKAGE)


class EtcdCluster:
    """Three etcd members on 127.0.0.1, their data under ``base``."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.binary = etcd_binary()
        self.base = base
        self.names = [f"e{i}" for i in range(size)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        self._started = [False] * size

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def urls(self) -> str:
        """The `--etcd` value: every member's client URL, comma-separated."""
        return ",".join(self.endpoints)

    def _command(self, i: int) -> list[str]:
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [self.binary, "--name", self.names[i], "--data-dir", str(self.base / self.names[i]),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.initial, "--initial-cluster-token", "ferry-test",
                "--initial-cluster-state", "existing" if self._started[i] else "new",
                "--log-level", "error", "--logger", "zap"]

    def start(self, i: int) -> None:
        log = open(self.base / f"{self.names[i]}.log", "ab")  # noqa: SIM115 (the process owns it)
        self.procs[i] = subprocess.Popen(self._command(i), stdout=log, stderr=log, start_new_session=True)
        log.close()
        self._started[i] = True

    def start_all(self) -> None:
        for i in range(len(self.names)):
            if self.procs[i] is None:
                self.start(i)
        self.wait_healthy()

    def stop(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is None:
            return
        proc.send_signal(sig)
        proc.wait(timeout=20)
        self.procs[i] = None

    def stop_all(self) -> None:
        for i in range(len(self.names)):
            self.stop(i)

    def healthy(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoints[i]}/health", timeout=2) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i, p in enumerate(self.procs) if p is not None):
                return
            time.sleep(0.2)
        logs = "\n".join((self.base / f"{n}.log").read_text(errors="replace")[-1500:] for n in self.names
                         if (self.base / f"{n}.log").exists())
        raise TimeoutError(f"etcd not healthy within {timeout} s:\n{logs}")


def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A started 3-member cluster, for a fixture to ``yield from``; killed at teardown."""
    base = tmp_path / "etcd"
    base.mkdir()
    cluster = EtcdCluster(base)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


class EtcdLink:
    """A TCP relay in front of each etcd member, for one agent: `cut()` closes every connection
    through it and refuses new ones (accepted, then closed at once), `restore()` forwards again.
    The agent is given `urls` instead of the cluster's."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self._blocked = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listeners: list[socket.socket] = []
        self.ports: list[int] = []
        for port in cluster.client_ports:
            lsock = socket.create_server(("127.0.0.1", 0))
            self._listeners.append(lsock)
            self.ports.append(lsock.getsockname()[1])
            threading.Thread(target=self._accept, args=(lsock, port), daemon=True).start()

    @property
    def urls(self) -> str:
        return ",".join(f"http://127.0.0.1:{p}" for p in self.ports)

    def cut(self) -> None:
        self._blocked.set()
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._blocked.clear()

    def close(self) -> None:
        self.cut()
        for lsock in self._listeners:
            lsock.close()

    def _accept(self, lsock: socket.socket, port: int) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            if self._blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
