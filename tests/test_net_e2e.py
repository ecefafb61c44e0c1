"""The guest network end to end: a `netd` VM on a host bridge, reached from a client namespace.

The host bridge lives in this test's namespace (a unique name per run); a client namespace hangs on
it by a veth pair, with an address in the VM's subnet. The agent creates the VM with `--nic`, its VM
process opens a TAP on the bridge, and the client talks to the guest as to any host on the LAN: the
kernel there resolves the guest's IP by ARP (which netd answers), pings it and sends it UDP. All
traffic stays between the client namespace and the VM's TAP; the namespace, the veth, the bridge and
every process are removed whatever the outcome (tests/netlan.py, the `lan` fixture).

Needs root, `ip` and /dev/net/tun; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents import AgentProc, make_key, start_agent, wait_for
from tests.netlan import GUEST_IP, Lan, net_unavailable

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=net_unavailable() or "")


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
