"""The guest network end to end: a `netd` VM on a host bridge, reached from a client namespace.

The host bridge lives in this test's namespace (a unique name per run); a client namespace hangs on
it by a veth pair, with an address in the VM's subnet. The agent creates the VM with `--nic`, its VM
process opens a TAP on the bridge, and the client talks to the guest as to any host on the LAN: the
kernel there resolves the guest's IP by ARP (which netd answers), pings it and sends it UDP. All
traffic stays between the client namespace and the VM's TAP; the namespace, the veth, the bridge and
every process are removed whatever the outcome.

Needs root, `ip` and /dev/net/tun; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agents import AgentProc, make_key, run_ip, start_agent, wait_for

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.213.7"
GUEST_IP = f"{SUBNET}.10"
CLIENT_IP = f"{SUBNET}.2"


def _unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "bridges, TAP devices and network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


@dataclass
class Lan:
    bridge: str
    client_ns: str

    def client(self, *args: str) -> dict[str, Any]:
        """Run tests/netclient.py in the client namespace; its one JSON line."""
        r = subprocess.run(["ip", "netns", "exec", self.client_ns, sys.executable, "-m", "tests.netclient", *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, f"netclient {' '.join(args)} failed: {r.stderr.strip()}"
        result: dict[str, Any] = json.loads(r.stdout)
        return result


@pytest.fixture
def lan() -> Iterator[Lan]:
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
        yield Lan(bridge, ns)
    finally:
        run_ip("netns", "del", ns, check=False)  # takes the veth pair with it
        run_ip("link", "del", bridge, check=False)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    with start_agent(tmp_path, "A", make_key(tmp_path)) as a:
        yield a


def _console(agent: AgentProc, name: str) -> str:
    return str(agent.cli("vm", "console", name).stdout)


def test_netd_on_a_bridge_answers_arp_ping_udp_echo_and_keeps_its_key_values(agent: AgentProc, lan: Lan) -> None:
    agent.cli("vm", "create", "n1", "--program", "netd", "--mem", "16M",
              "--nic", f"bridge={lan.bridge},ip={GUEST_IP}/24")
    wait_for(lambda: "netd: up" in _console(agent, "n1"), timeout=20, what="netd's start line")
    nic = agent.cli("vm", "info", "n1", json=True).json["nics"][0]
    assert nic["bridge"] == lan.bridge and nic["ip"] == f"{GUEST_IP}/24"
    assert Path(f"/sys/class/net/{lan.bridge}/brif/{nic['tap']}").exists()

    ping = lan.client("ping", GUEST_IP, "--count", "3")  # ARP first: the kernel must learn netd's MAC
    assert ping == {"sent": 3, "received": 3, "bad": 0}
    assert lan.client("udp", GUEST_IP, "7", "hello", "again")["replies"] == ["hello", "again"]
    kv = lan.client("udp", GUEST_IP, "5000", "PUT colour deep blue", "GET colour", "GET shape")
    assert kv["replies"] == ["OK\n", "VALUE deep blue\n", "NOTFOUND\n"]

    counters = agent.cli("vm", "info", "n1", json=True).json["nics"][0]
    assert counters["rx-packets"] >= 8 and counters["tx-packets"] >= 8  # ARP, 3 pings, 2 echoes, KV
    agent.cli("vm", "destroy", "n1")
    wait_for(lambda: not Path(f"/sys/class/net/{nic['tap']}").exists(), timeout=10, what="the TAP removed")
