"""Two hosts in network namespaces: the topology of the two-host network tests.

    host A (netns)                    switch (netns)                   host B (netns)
    br0 -- up0 ==veth== upa --+                             +-- upb ==veth== up0 -- br0
                              +--------- sw0 (bridge) ------+
                                          |
                                         swc ==veth== cl0 (client netns, CLIENT_IP)
    mig0 (MIG_A) ===================== migration veth ===================== mig0 (MIG_B)

Each host namespace has a bridge `br0` (the VMs' TAPs go on it, one agent per host runs inside
the namespace) with an uplink veth into the switch namespace's bridge; the client namespace sits
on that switch with an address in the guest subnet (tests/netlan.py's), and a separate veth pair
joins A and B directly as the dedicated migration network. No other path joins A and B, so a
migration between agents listening on MIG_A and MIG_B travels over that veth.

The namespaces carry a random suffix (several runs may share the machine); interfaces are named
inside them, so their names are short and fixed. `two_hosts()` removes every namespace (and with
them their interfaces and bridges) whatever happens, also when its body raises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.agents import run_ip
from tests.netlan import CLIENT_IP, Lan
from tests.netlan import net_unavailable as lan_unavailable

BRIDGE = "br0"  # the host bridge, the same name on both hosts: a VM needs no --nic-map
UPLINK = "up0"  # a host's end of its uplink veth
SWITCH_BRIDGE = "sw0"
CLIENT_IF = "cl0"
MIG_IF = "mig0"  # each host's end of the migration veth


@dataclass(frozen=True)
class TwoHosts:
    host_a: str  # netns names
    host_b: str
    switch: str
    client_ns: str
    mig_a: str  # host A's address on the migration veth (no prefix)
    mig_b: str

    @property
    def lan(self) -> Lan:
        """The client namespace as tests/netlan.py's Lan (its `client` and `capture` run there);
        `bridge` is the hosts' bridge name, the one a VM's --nic names."""
        return Lan(BRIDGE, self.client_ns, CLIENT_IF)

    def links(self, ns: str) -> list[str]:
        """The interface names in namespace ``ns`` (`ip -n NS link show`)."""
        out = run_ip("-n", ns, "-o", "link", "show").stdout
        return [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]

    def addresses(self, ns: str, dev: str) -> list[str]:
        """The IPv4 addresses (no prefix) of ``dev`` in namespace ``ns``."""
        out = run_ip("-n", ns, "-o", "-4", "addr", "show", "dev", dev).stdout
        return [line.split()[3].split("/")[0] for line in out.splitlines() if line.strip()]

    def uplink_port(self, host: str) -> str:
        """The switch's port toward host namespace ``host``."""
        return {self.host_a: "upa", self.host_b: "upb"}[host]

    def switch_port(self, mac: str) -> str | None:
        """The switch port its bridge sends frames for ``mac`` to (the entry it learned from
        the last frame ``mac`` sent), None when it has none (`uplink_port` names them)."""
        r = subprocess.run(["bridge", "-n", self.switch, "fdb", "show", "br", SWITCH_BRIDGE],
                           capture_output=True, text=True, timeout=30, check=True)
        for line in r.stdout.splitlines():
            words = line.split()
            if words[:2] == [mac.lower(), "dev"] and "permanent" not in words:
                return words[2]
        return None

    def counters(self, ns: str, dev: str) -> tuple[int, int]:
        """(rx bytes, tx bytes) of ``dev`` in namespace ``ns`` (its sysfs, seen from inside)."""
        path = f"/sys/class/net/{dev}/statistics"
        r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"{path}/rx_bytes", f"{path}/tx_bytes"],
                           capture_output=True, text=True, timeout=30, check=True)
        rx, tx = r.stdout.split()
        return int(rx), int(tx)


def net_unavailable() -> str | None:
    """Why the two-host topology cannot be built here (for a skip), or None."""
    if shutil.which("bridge") is None:
        return "iproute2's `bridge` is not installed"
    return lan_unavailable()


def _veth(ns: str, name: str, peer_ns: str, peer: str) -> None:
    run_ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns)


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    tag = os.urandom(3).hex()
    octet = int(tag[:2], 16)  # the migration subnet: private to the two namespaces, any will do
    topo = TwoHosts(f"fy2a-{tag}", f"fy2b-{tag}", f"fy2s-{tag}", f"fy2c-{tag}",
                    f"10.99.{octet}.1", f"10.99.{octet}.2")
    made: list[str] = []
    try:
        for ns in (topo.host_a, topo.host_b, topo.switch, topo.client_ns):
            run_ip("netns", "add", ns)
            made.append(ns)
            run_ip("-n", ns, "link", "set", "lo", "up")
        run_ip("-n", topo.switch, "link", "add", SWITCH_BRIDGE, "type", "bridge")
        run_ip("-n", topo.switch, "link", "set", SWITCH_BRIDGE, "up")
        for host, port in ((topo.host_a, "upa"), (topo.host_b, "upb")):
            run_ip("-n", host, "link", "add", BRIDGE, "type", "bridge")
            run_ip("-n", host, "link", "set", BRIDGE, "up")
            _veth(host, UPLINK, topo.switch, port)
            run_ip("-n", host, "link", "set", UPLINK, "master", BRIDGE, "up")
            run_ip("-n", topo.switch, "link", "set", port, "master", SWITCH_BRIDGE, "up")
        _veth(topo.client_ns, CLIENT_IF, topo.switch, "swc")
        run_ip("-n", topo.switch, "link", "set", "swc", "master", SWITCH_BRIDGE, "up")
        run_ip("-n", topo.client_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", CLIENT_IF)
        run_ip("-n", topo.client_ns, "link", "set", CLIENT_IF, "up")
        _veth(topo.host_a, MIG_IF, topo.host_b, MIG_IF)
        for host, addr in ((topo.host_a, topo.mig_a), (topo.host_b, topo.mig_b)):
            run_ip("-n", host, "addr", "add", f"{addr}/24", "dev", MIG_IF)
            run_ip("-n", host, "link", "set", MIG_IF, "up")
        yield topo
    finally:
        for ns in reversed(made):  # a namespace takes its interfaces, bridges and veth pairs with it
            run_ip("netns", "del", ns, check=False)
