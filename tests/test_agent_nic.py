"""Tests of a VM's NIC on the agent side: `--nic` parsing, MAC and TAP naming, the VM manager's checks,
`vm info`'s nics, the NIC in the VM's record, and the refusal to migrate a VM with a NIC.

The pure functions of agent/nics.py are tested alone; the VM manager over real VM processes; the end
to end test runs real agents, the real CLI, and a real bridge (`fyt<pid>`, made and deleted here).
Names carry the test process's pid: TAPs and bridges are per host, and other test runs may share it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import nics
from agent.cli import build_parser
from agent.logs import Log
from agent.ops import AgentIdentity, ControlOps, OpError
from agent.records import VMRecords
from agent.vms import VMError, VMManager
from tests.agents import make_key, start_agent

MiB = 1 << 20
PID = os.getpid()


# -- parsing and naming (agent/nics.py) ----------------------------------------------------------------
def test_nic_text_parses_to_the_control_api_map() -> None:
    assert nics.parse_nic_text("bridge=br0") == {"bridge": "br0"}
    assert nics.parse_nic_text("bridge=br0, mac=52:54:00:AB:cd:01 ,ip=10.0.0.2/24") == {
        "bridge": "br0", "mac": "52:54:00:ab:cd:01", "ip": "10.0.0.2/24"}
    assert nics.parse_nic_text("ip=010.0.0.2/8,bridge=b") == {"bridge": "b", "ip": "10.0.0.2/8"}


@pytest.mark.parametrize(("text", "words"), [
    ("bridge=br0,colour=red", "unknown key 'colour'"),
    ("bridge=br0,bridge=br1", "bridge given twice"),
    ("bridge=br0,mac", "expected KEY=VALUE"),
    ("mac=52:54:00:00:00:01", "needs bridge=BR"),
    ("bridge=", "needs bridge=BR"),
    ("bridge=a/b", "bad bridge name"),
    ("bridge=averyveryverylongname", "bad bridge name"),
    ("bridge=br0,mac=52:54:00:00:00", "bad MAC"),
    ("bridge=br0,mac=52-54-00-00-00-01", "bad MAC"),
    ("bridge=br0,mac=01:00:5e:00:00:01", "multicast"),
    ("bridge=br0,mac=ff:ff:ff:ff:ff:ff", "multicast"),
    ("bridge=br0,mac=00:00:00:00:00:00", "all zeros"),
    ("bridge=br0,ip=10.0.0.2", "expected A.B.C.D/NN"),
    ("bridge=br0,ip=10.0.0.256/24", "expected A.B.C.D/NN"),
    ("bridge=br0,ip=10.0.2/24", "expected A.B.C.D/NN"),
    ("bridge=br0,ip=10.0.0.2/33", "prefix length must be 0..32"),
    ("bridge=br0,ip=10.0.0.2/x", "prefix length must be 0..32"),
])
def test_bad_nic_text_is_refused_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(nics.NicError, match=words):
        nics.parse_nic_text(text)


def test_a_locally_or_globally_administered_unicast_mac_is_accepted() -> None:
    assert nics.parse_mac("02:00:00:00:00:01") == "02:00:00:00:00:01"
    assert nics.parse_mac("00:1B:21:0a:0b:0c") == "00:1b:21:0a:0b:0c"


def test_ip_to_boot_argument_value() -> None:
    assert nics.parse_ip("10.0.0.2/24") == (10 << 24 | 2, 24)
    assert nics.parse_ip("192.168.1.254/0") == (0xC0A801FE, 0)
    assert nics.format_ip(0xC0A801FE) == "192.168.1.254"


def test_generated_mac_is_stable_per_agent_and_vm_name() -> None:
    mac = nics.generated_mac("A", "n1")
    assert mac == nics.generated_mac("A", "n1")
    assert mac.startswith("52:54:00:") and nics.parse_mac(mac) == mac
    assert mac != nics.generated_mac("B", "n1")
    assert mac != nics.generated_mac("A", "n2")
    assert len({nics.generated_mac("A", f"v{i}") for i in range(200)}) == 200


def test_tap_names_fit_the_kernel_limit() -> None:
    assert nics.tap_name("n1") == "fy-n1"
    assert nics.tap_name("a" * 12) == "fy-" + "a" * 12
    long_name = nics.tap_name("a" * 13)
    assert len(long_name) <= nics.IFNAMSIZ and long_name.startswith("fy") and long_name[2] != "-"
    assert long_name == nics.tap_name("a" * 13) != nics.tap_name("a" * 14)
    assert all(len(nics.tap_name("x" * n)) <= 15 for n in range(1, 64))


def test_make_config_generates_the_mac_and_names_the_tap() -> None:
    config = nics.make_config("A", "n1", {"bridge": "br0", "ip": "10.0.0.2/24"})
    assert config == nics.NicConfig(bridge="br0", mac=nics.generated_mac("A", "n1"), tap="fy-n1", ip="10.0.0.2/24")
    given = nics.make_config("A", "n1", {"bridge": "br0", "mac": "02:AA:00:00:00:01"})
    assert given.mac == "02:aa:00:00:00:01" and given.ip is None
    with pytest.raises(nics.NicError, match="unknown NIC key"):
        nics.make_config("A", "n1", {"bridge": "br0", "vlan": "3"})


def test_nic_config_round_trips_through_the_record() -> None:
    config = nics.NicConfig(bridge="br0", mac="52:54:00:01:02:03", tap="fy-n1", ip="10.0.0.2/24")
    assert nics.NicConfig.from_record(config.to_record()) == config
    assert nics.NicConfig.from_record({**config.to_record(), "ip": None}).ip is None
    with pytest.raises(nics.NicError):
        nics.NicConfig.from_record({**config.to_record(), "tap": "../../etc"})
    assert config.boot_field() == {"tap": "fy-n1", "bridge": "br0", "mac": "52:54:00:01:02:03"}
    assert config.info(None) == {"mac": "52:54:00:01:02:03", "ip": "10.0.0.2/24", "bridge": "br0", "tap": "fy-n1",
                                 "rx-packets": 0, "tx-packets": 0, "rx-dropped": 0}
    status = {"rx-packets": 3, "tx-packets": 2, "rx-dropped": 1, "tx-dropped": 0, "link": True}
    assert config.info(status)["rx-packets"] == 3 and config.info(status)["rx-dropped"] == 1


def test_clash_names_the_vm_holding_the_mac_or_tap() -> None:
    mine = nics.NicConfig(bridge="br0", mac="52:54:00:00:00:01", tap="fy-a")
    assert nics.clash(mine, {}) is None
    assert nics.clash(mine, {"b": nics.NicConfig("br1", "52:54:00:00:00:02", "fy-b")}) is None
    assert "used by VM 'b'" in str(nics.clash(mine, {"b": nics.NicConfig("br1", mine.mac, "fy-b")}))
    assert "TAP name fy-a" in str(nics.clash(mine, {"c": nics.NicConfig("br1", "52:54:00:00:00:03", "fy-a")}))


def test_ip_reaches_only_programs_that_take_it(tmp_path: Path) -> None:
    config = nics.NicConfig(bridge="br0", mac="52:54:00:00:00:01", tap="fy-a", ip="10.0.0.2/24")
    assert nics.boot_args("idle", {}, config) == {}  # idle takes no arguments, and refuses unknown ones
    assert nics.boot_args("counter", {"every": "5"}, config) == {"every": "5"}
    path = str(tmp_path / "prog.fasm")
    assert nics.boot_args(path, {"x": "1"}, config) == {"x": "1", "ip": str(10 << 24 | 2), "prefix": "24"}
    assert nics.boot_args(path, {"ip": "7"}, config) == {"ip": "7", "prefix": "24"}  # the operator's own wins
    assert nics.boot_args(path, {}, nics.NicConfig("br0", "52:54:00:00:00:01", "fy-a")) == {}
    assert nics.boot_args(path, {"x": "1"}, None) == {"x": "1"}


def test_host_refusal_reads_sys_class_net(tmp_path: Path) -> None:
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "eth0").mkdir()
    config = nics.NicConfig(bridge="br0", mac="52:54:00:00:00:01", tap="fy-a")
    assert nics.host_refusal(config, str(tmp_path)) is None
    assert "bridge br9 does not exist" in str(nics.host_refusal(nics.NicConfig("br9", config.mac, "fy-a"), str(tmp_path)))
    assert "eth0 is not a bridge" in str(nics.host_refusal(nics.NicConfig("eth0", config.mac, "fy-a"), str(tmp_path)))
    (tmp_path / "fy-a").mkdir()
    assert "fy-a (its TAP name) already exists" in str(nics.host_refusal(config, str(tmp_path)))


def test_cli_takes_one_nic() -> None:
    ns = build_parser().parse_args(["vm", "create", "n1", "--program", "idle", "--nic", "bridge=br0,ip=10.0.0.2/24"])
    assert ns.nic == {"bridge": "br0", "ip": "10.0.0.2/24"}
    assert build_parser().parse_args(["vm", "create", "n1", "--program", "idle"]).nic is None


@pytest.mark.parametrize("argv", [
    ["--nic", "bridge=br0", "--nic", "bridge=br1"],
    ["--nic", "bridge=br0,speed=10"],
    ["--nic", "bridge=br0,mac=zz:54:00:00:00:01"],
    ["--nic", "bridge=br0,ip=1.2.3.4/40"],
])
def test_cli_refuses_bad_nics_as_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["vm", "create", "n1", "--program", "idle", *argv])
    assert e.value.code == 2
    assert "--nic" in capsys.readouterr().err


# -- the VM manager ------------------------------------------------------------------------------------
@pytest.fixture
def bridge() -> Iterator[str]:
    """A real Linux bridge for the test (needs CAP_NET_ADMIN), deleted afterwards."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing: no TAP devices on this host")
    name = f"fyt{PID}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


MakeVMs = Callable[..., VMManager]


@pytest.fixture
async def make_vms() -> AsyncIterator[MakeVMs]:
    made: list[VMManager] = []

    def make(records: VMRecords | None = None) -> VMManager:
        vms = VMManager(agent_name="T", max_mem=256 * MiB, log=Log("debug", io.StringIO(), agent="T"),
                        records=records)
        made.append(vms)
        return vms

    yield make
    for vms in made:
        for vm in vms.list():
            await vms.drop(vm)
        await vms.shutdown()


async def test_a_missing_bridge_is_refused_before_any_process_starts(make_vms: MakeVMs) -> None:
    vms = make_vms()
    missing = f"fyx{PID}"
    with pytest.raises(VMError) as e:
        await vms.create(f"n{PID}", "idle", 4 * MiB, {}, nic={"bridge": missing})
    assert e.value.code == "bad-request"
    assert f"bridge {missing} does not exist" in e.value.message
    assert vms.list() == [] and vms.free_memory() == vms.max_mem
    # the name and its NIC are free again
    with pytest.raises(VMError, match="does not exist"):
        await vms.create(f"n{PID}", "idle", 4 * MiB, {}, nic={"bridge": missing})


async def test_bad_nic_maps_are_refused(make_vms: MakeVMs) -> None:
    vms = make_vms()
    for nic, words in (({"bridge": "br0", "mac": "01:02:03:04:05:06"}, "multicast"),
                       ({"mac": "52:54:00:00:00:01"}, "needs bridge"), ({"bridge": "b", "x": "1"}, "unknown NIC key")):
        with pytest.raises(VMError, match=words) as e:
            await vms.create("n1", "idle", 4 * MiB, {}, nic=nic)
        assert e.value.code == "bad-request"
    assert vms.list() == []


async def test_a_mac_used_by_another_vm_is_refused(make_vms: MakeVMs, bridge: str) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="ferry-nic-", dir="/tmp"))  # attach socket paths must be short
    records = VMRecords(state_dir)
    vms = make_vms(records)
    mac = "52:54:00:aa:bb:cc"
    try:
        first = await vms.create(f"n{PID}", "idle", 4 * MiB, {}, nic={"bridge": bridge, "mac": mac,
                                                                       "ip": "10.9.0.2/24"})
        assert first.info()["nics"] == [{"mac": mac, "ip": "10.9.0.2/24", "bridge": bridge, "tap": f"fy-n{PID}",
                                         "rx-packets": 0, "tx-packets": 0, "rx-dropped": 0}]
        with pytest.raises(VMError) as e:
            await vms.create(f"m{PID}", "idle", 4 * MiB, {}, nic={"bridge": bridge, "mac": mac.upper()})
        assert e.value.code == "bad-request" and f"MAC {mac} is already used by VM 'n{PID}'" in e.value.message
        assert [vm.name for vm in vms.list()] == [f"n{PID}"]
        # the record holds the NIC, for a restarted agent (agent/vms/adopt.py)
        [rec] = records.read_all()
        assert rec["nic"] == {"bridge": bridge, "mac": mac, "tap": f"fy-n{PID}", "ip": "10.9.0.2/24"}
        # a VM without a NIC lists none, and a VM with a generated MAC gets another MAC
        plain = await vms.create(f"p{PID}", "idle", 4 * MiB, {})
        assert plain.info()["nics"] == []
        other = await vms.create(f"o{PID}", "idle", 4 * MiB, {}, nic={"bridge": bridge})
        assert other.nic is not None and other.nic.mac == nics.generated_mac("T", f"o{PID}")
    finally:
        for vm in vms.list():
            await vms.drop(vm)
        shutil.rmtree(state_dir, ignore_errors=True)


async def test_control_api_checks_the_nic_map_of_a_migration_before_any_traffic(make_vms: MakeVMs, bridge: str,
                                                            tmp_path: Path) -> None:
    vms = make_vms()
    asked: list[str] = []

    async def peer_info(address: str) -> dict[str, Any]:
        asked.append(address)
        return {"name": "B", "instance": "other", "migration": "127.0.0.1:1"}

    log = Log("debug", io.StringIO(), agent="T")
    ident = AgentIdentity("T", ("127.0.0.1", 7700), ("127.0.0.1", 7701), tmp_path)
    ops = ControlOps(identity=ident, vms=vms, migrations=None, peer_info=peer_info, log=log)
    with pytest.raises(OpError, match="nic must be a map"):
        await ops.handle("vm-create", {"name": "x", "program": "idle", "mem": "4M", "nic": "bridge=br0"})
    info = await ops.handle("vm-create", {"name": f"n{PID}", "program": "idle", "mem": "4M",
                                          "nic": {"bridge": bridge}})
    assert info["nics"][0]["tap"] == f"fy-n{PID}"
    with pytest.raises(OpError) as e:
        await ops.handle("migrate", {"name": f"n{PID}", "to": "127.0.0.1:7", "params": {"nic-map": ["x"]}})
    assert e.value.code == "bad-request" and "SRC_BR=DST_BR" in e.value.message
    assert asked == []  # refused before any traffic
    assert (await ops.handle("vm-info", {"name": f"n{PID}"}))["state"] == "running"


# -- end to end: real agents, the real CLI, a real bridge ---------------------------------------------
def _wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _broadcast_on(ifname: str) -> None:
    """Send one broadcast Ethernet frame out of ``ifname`` (a bridge floods it to its ports)."""
    frame = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + b"ferry-nic-test".ljust(46, b"\0")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(frame)


def test_vm_with_a_nic_end_to_end(tmp_path: Path, bridge: str) -> None:
    key = make_key(tmp_path)
    name = f"n{PID}"
    tap = f"fy-{name}"
    with start_agent(tmp_path, "A", key) as a, start_agent(tmp_path, "B", key) as b:
        a.cli("vm", "create", name, "--program", "idle", "--nic", f"bridge={bridge},ip=10.99.0.2/24")
        info = a.cli("vm", "info", name, json=True).json
        assert info["state"] == "running"
        [nic] = info["nics"]
        assert nic["bridge"] == bridge and nic["tap"] == tap and nic["ip"] == "10.99.0.2/24"
        assert nic["mac"] == nics.generated_mac("A", name)
        assert all(isinstance(nic[k], int) for k in ("rx-packets", "tx-packets", "rx-dropped"))
        assert os.path.exists(f"/sys/class/net/{bridge}/brif/{tap}"), "the VM's TAP is not on the bridge"
        text = a.cli("vm", "info", name).stdout
        assert f"tap {tap}" in text and f"bridge {bridge}" in text
        # a frame the bridge floods to the TAP reaches the device; idle sets no RX ring, so it is
        # dropped there, and the counter shows in vm info (read from the VM process's status)
        _broadcast_on(bridge)
        assert _wait_for(lambda: a.cli("vm", "info", name, json=True).json["nics"][0]["rx-dropped"] >= 1)
        # a second VM may not take its MAC; one on a missing bridge is refused before it starts
        dup = a.cli("vm", "create", "d1", "--program", "idle", "--nic", f"bridge={bridge},mac={nic['mac']}",
                    check=False)
        assert dup.returncode == 1 and "(bad-request)" in dup.stderr and repr(name) in dup.stderr
        gone = a.cli("vm", "create", "d2", "--program", "idle", "--nic", f"bridge=fyx{PID}", check=False)
        assert gone.returncode == 1 and f"bridge fyx{PID} does not exist" in gone.stderr
        # migrating it to a bridge the destination does not have is refused before anything moves;
        # it runs on here (tests/test_net_migration.py migrates VMs with a NIC)
        mig = a.cli("migrate", name, "--to", b.control, "--nic-map", f"{bridge}=fyx{PID}", check=False)
        assert mig.returncode == 1, mig.stdout
        assert f"bridge fyx{PID} (mapped from {bridge} by --nic-map) does not exist" in mig.stderr
        assert a.cli("vm", "info", name, json=True).json["state"] == "running"
        assert b.cli("vm", "list", json=True).json == []
        # a restarted agent re-adopts it with its NIC, its TAP still on the bridge
        assert a.stop(keep_vms=True) == 0
        with start_agent(tmp_path, "A", key) as a2:
            again = a2.cli("vm", "info", name, json=True).json
            assert again["nics"][0]["tap"] == tap and again["nics"][0]["mac"] == nic["mac"]
            assert os.path.exists(f"/sys/class/net/{bridge}/brif/{tap}")
            a2.cli("vm", "destroy", name)
            assert _wait_gone(f"/sys/class/net/{tap}"), "vm destroy left the TAP behind"
