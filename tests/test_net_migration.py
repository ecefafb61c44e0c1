"""A VM with a NIC migrates between two agents on this host, and the destination announces it.

Both agents plug their VMs into one host bridge; a client namespace on it (tests/netlan.py) keeps
key-value pairs in a `netd` guest over UDP, then reads them back, pings and captures the RARP
frames the destination sends after the switch-over. The destination's refusals (a bridge it does
not have, a MAC one of its VMs uses) leave the VM running on the source.

Needs root, `ip` and /dev/net/tun; elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.announce import ETH_P_RARP
from tests.agents import AgentProc, agent_pair, names, run_ip, start_agent, wait_for
from tests.netlan import GUEST_IP, Lan, net_unavailable

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=net_unavailable() or "")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    yield from agent_pair(tmp_path)


def _netd(agent: AgentProc, name: str, bridge: str, *extra: str) -> dict[str, object]:
    agent.cli("vm", "create", name, "--program", "netd", "--mem", "16M", "--nic",
              f"bridge={bridge},ip={GUEST_IP}/24", *extra)
    wait_for(lambda: "netd: up" in str(agent.cli("vm", "console", name).stdout), timeout=20, what="netd up")
    nic: dict[str, object] = agent.cli("vm", "info", name, json=True).json["nics"][0]
    return nic


def _on_bridge(bridge: str, tap: object) -> bool:
    return Path(f"/sys/class/net/{bridge}/brif/{tap}").exists()


def _kv(lan: Lan, *messages: str) -> list[str | None]:
    replies: list[str | None] = lan.client("udp", GUEST_IP, "5000", *messages)["replies"]
    return replies


def test_netd_migrates_keeps_its_values_and_is_announced(pair: tuple[AgentProc, AgentProc], lan: Lan) -> None:
    a, b = pair
    nic_a = _netd(a, "n1", lan.bridge)
    mac, tap_a = nic_a["mac"], nic_a["tap"]
    assert _kv(lan, "PUT colour deep blue", "PUT shape round") == ["OK\n", "OK\n"]

    with lan.capture(ETH_P_RARP, count=5) as cap:
        out = a.cli("migrate", "n1", "--to", b.control, json=True).json
        frames = cap.frames()
    assert out["status"] == "completed", out
    assert isinstance(out["rx-dropped-at-switchover"], int) and out["rx-dropped-at-switchover"] >= 0
    assert len(frames) == 5  # the default rounds, one RARP each, from the guest's MAC
    assert all(f["src"] == f["sha"] == f["tha"] == mac and f["op"] == 3 and f["dst"] == "ff:ff:ff:ff:ff:ff"
               for f in frames), frames

    incoming = b.call("migrate-status", name="n1")
    assert incoming["direction"] == "in" and sum(incoming["code-blocks"].values()) > 0  # the code hint came
    info = b.cli("vm", "info", "n1", json=True).json
    [nic_b] = info["nics"]
    assert info["state"] == "running" and nic_b["mac"] == mac and nic_b["ip"] == f"{GUEST_IP}/24"
    assert nic_b["bridge"] == lan.bridge and _on_bridge(lan.bridge, nic_b["tap"])
    assert nic_b["tap"] != tap_a  # A's TAP still existed while the VM moved: B's has a suffix
    assert f"tap {nic_b['tap']}" in b.cli("vm", "info", "n1").stdout
    [rec] = [json.loads(p.read_text()) for p in (b.state_dir / "vms").glob("*.json")]
    assert rec["nic"] == {"bridge": lan.bridge, "mac": mac, "tap": nic_b["tap"], "ip": f"{GUEST_IP}/24"}
    assert "n1" not in names(a)
    wait_for(lambda: not Path(f"/sys/class/net/{tap_a}").exists(), timeout=10, what="A's TAP removed")

    assert _kv(lan, "GET colour", "GET shape") == ["VALUE deep blue\n", "VALUE round\n"]
    assert lan.client("ping", GUEST_IP, "--count", "3") == {"sent": 3, "received": 3, "bad": 0}

    # by hand, as many rounds as asked
    with lan.capture(ETH_P_RARP, count=2) as cap:
        b.cli("vm", "announce", "n1", "--announce-rounds", "2", "--announce-initial", "0")
        assert len(cap.frames()) == 2

    # and back, without announce this time (rounds 0)
    back = b.cli("migrate", "n1", "--to", a.control, "--announce-rounds", "0", json=True).json
    assert back["status"] == "completed", back
    # A kept the blocks its VM process had translated when the VM left: loaded, not translated, now
    assert a.call("migrate-status", name="n1")["code-blocks"]["warm"] > 0
    nic_back = a.cli("vm", "info", "n1", json=True).json["nics"][0]
    assert nic_back["mac"] == mac and _on_bridge(lan.bridge, nic_back["tap"])
    assert _kv(lan, "GET colour") == ["VALUE deep blue\n"]

    # the agent restarts: it re-adopts the VM that came by migration, NIC and TAP with it
    assert a.stop(keep_vms=True) == 0
    with start_agent(a.state_dir.parent, "A", a.key_path) as a2:
        again = a2.cli("vm", "info", "n1", json=True).json["nics"][0]
        assert (again["mac"], again["tap"]) == (mac, nic_back["tap"]) and _on_bridge(lan.bridge, again["tap"])
        assert _kv(lan, "GET shape") == ["VALUE round\n"]
        a2.cli("vm", "destroy", "n1")
        wait_for(lambda: not Path(f"/sys/class/net/{nic_back['tap']}").exists(), timeout=10, what="TAP removed")


def test_the_destinations_nic_refusals_leave_the_vm_running_on_the_source(pair: tuple[AgentProc, AgentProc],
                                                                          lan: Lan) -> None:
    a, b = pair
    nic = _netd(a, "n2", lan.bridge)

    def refused(*flags: str) -> str:
        r = a.cli("migrate", "n2", "--to", b.control, *flags, check=False)
        assert r.returncode == 1, r.stdout
        assert a.cli("vm", "info", "n2", json=True).json["state"] == "running"
        assert "n2" not in names(b)
        return str(r.stderr)

    missing = f"fyx{os.getpid() % 100000}"
    err = refused("--nic-map", f"{lan.bridge}={missing}")
    assert f"bridge {missing} (mapped from {lan.bridge} by --nic-map) does not exist on the destination" in err
    assert "(incompatible)" in err

    b.cli("vm", "create", "other", "--program", "idle", "--nic", f"bridge={lan.bridge},mac={nic['mac']}")
    err = refused()
    assert f"incompatible MAC address on the destination: VM other uses {nic['mac']}" in err
    b.cli("vm", "destroy", "other")
    assert _kv(lan, "PUT still here") == ["OK\n"]  # it ran on, reachable, through all this

    # a bridge that went away under the VM: the destination does not have it either
    gone = f"fyg{os.getpid() % 100000}"
    run_ip("link", "add", gone, "type", "bridge")
    try:
        a.cli("vm", "create", "n3", "--program", "idle", "--nic", f"bridge={gone}")
    finally:
        run_ip("link", "del", gone)
    r = a.cli("migrate", "n3", "--to", b.control, check=False)
    assert r.returncode == 1 and f"bridge {gone} does not exist on the destination" in r.stderr
    assert a.cli("vm", "info", "n3", json=True).json["state"] == "running"
