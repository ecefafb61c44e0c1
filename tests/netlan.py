"""The LAN of the guest network tests: a host bridge and a client namespace on it by a veth pair.

The bridge lives in the test's namespace (a unique name per run); the client namespace has an
address in the VM's subnet, so it talks to a guest on the bridge as to any host on the LAN, with
tests/netclient.py. `make_lan` removes the namespace, the veth and the bridge whatever the outcome;
tests/conftest.py offers it as the `lan` fixture. Needs root, `ip` and /dev/net/tun
(`net_unavailable` says what is missing, for a skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.agents import run_ip

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.213.7"
GUEST_IP = f"{SUBNET}.10"
CLIENT_IP = f"{SUBNET}.2"


def net_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "bridges, TAP devices and network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


@dataclass
class Lan:
    bridge: str
    client_ns: str
    client_if: str  # the client namespace's end of the veth

    def _argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, sys.executable, "-m", "tests.netclient", *args]

    def client(self, *args: str) -> dict[str, Any]:
        """Run tests/netclient.py in the client namespace; its one JSON line."""
        r = subprocess.run(self._argv(*args), capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, f"netclient {' '.join(args)} failed: {r.stderr.strip()}"
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    @contextmanager
    def capture(self, ethertype: int, count: int, timeout: float = 30.0) -> Iterator[Capture]:
        """Capture frames of ``ethertype`` on the client's interface while the block runs (and
        after it, until ``count`` came or ``timeout`` passed): `Capture.frames()` has them."""
        proc = subprocess.Popen(self._argv("capture", self.client_if, hex(ethertype), "--count", str(count),
                                           "--timeout", str(timeout)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()  # the socket is bound: nothing sent from now on is missed
            assert ready.strip() == "ready", f"netclient capture did not start: {proc.stderr.read() if proc.stderr else ''}"
            yield Capture(proc)
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout + 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Capture:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def frames(self) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"netclient capture failed: {err.strip()}"
        frames: list[dict[str, Any]] = json.loads(out)["frames"]
        return frames


@contextmanager
def make_lan() -> Iterator[Lan]:
    tag = f"{os.getpid() % 100000}{os.urandom(1).hex()}"
    bridge, ns, veth = f"fyb{tag}", f"fyc{tag}", f"fyv{tag}"
    run_ip("link", "add", bridge, "type", "bridge")
    try:
        run_ip("link", "set", bridge, "up")
        run_ip("netns", "add", ns)
        run_ip("link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
        run_ip("link", "set", f"{veth}a", "master", bridge, "up")
        run_ip("link", "set", f"{veth}b", "netns", ns)
        run_ip("-n", ns, "addr", "add", f"{CLIENT_IP}/24", "dev", f"{veth}b")
        run_ip("-n", ns, "link", "set", f"{veth}b", "up")
        run_ip("-n", ns, "link", "set", "lo", "up")
        yield Lan(bridge, ns, f"{veth}b")
    finally:
        run_ip("netns", "del", ns, check=False)  # takes the veth pair with it
        run_ip("link", "del", bridge, check=False)
