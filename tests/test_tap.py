"""The VM process's NIC with real parts: a TAP on a Linux bridge the test creates, frames both ways.

The bridge gets a unique name (fyt<pid>...) in the test's own network
namespace and is deleted afterwards. The test talks to the guest through an
AF_PACKET socket on the bridge, with an experimental EtherType (0x88B5) so no
netfilter or IP stack on the host takes any interest in the frames.
Needs root and /dev/net/tun; skipped with the reason otherwise.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import MakeMemfd, SpawnVM
from tests.test_nic import ECHO
from vmruntime import tap
from vmruntime.asm import assemble
from vmruntime.control import VMError, VMHandle

pytestmark = pytest.mark.timeout(60)

RAM = 1 << 20
MAC = "52:54:00:12:34:56"
TEST_MAC = bytes.fromhex("020000000001")
ETHERTYPE = b"\x88\xb5"
PACKET_OUTGOING = 4
_names = itertools.count()


def _unavailable() -> str | None:
    if not os.path.exists(tap.TUN_PATH):
        return f"{tap.TUN_PATH} is missing: no TAP devices on this host"
    if os.geteuid() != 0:
        return "creating bridges and TAP devices needs root"
    return None


pytestmark = [pytestmark, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]


def _name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}{next(_names)}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _exists(ifname: str) -> bool:
    return os.path.exists(f"/sys/class/net/{ifname}")


@pytest.fixture
def bridge() -> Iterator[str]:
    name = _name("fyt")
    _ip("link", "add", name, "type", "bridge")
    try:
        _ip("link", "set", name, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def port(bridge: str) -> Iterator[socket.socket]:
    """An AF_PACKET socket on the bridge device: what the host side of the bridge sees and sends."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((bridge, 0))
    s.settimeout(0.2)
    try:
        yield s
    finally:
        s.close()


ECHO_WAITING_AN_HOUR = ECHO.replace("li r10, 1000000000\n", "li r10, 3600000000000\n", 1)
assert ECHO_WAITING_AN_HOUR != ECHO


def _frame(tag: bytes) -> bytes:
    return (b"\xff" * 6 + TEST_MAC + ETHERTYPE + b"ferry-tap " + tag).ljust(60, b"\0")


def _echo(port: socket.socket, tag: bytes, timeout: float = 5.0) -> None:
    """Send a frame (again every 0.5 s) until it comes back from the guest; fail after ``timeout``."""
    want = _frame(tag)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        port.send(want)
        resend = t0 + 0.5  # the TAP's bridge port may still be coming up: send again
        while time.monotonic() < min(resend, deadline):
            try:
                data, addr = port.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] != PACKET_OUTGOING and data == want:
                return
    raise AssertionError(f"no echo of {tag!r} within {timeout} s")


def _nic(tapname: str, bridge: str, mac: str = MAC) -> dict[str, str]:
    return {"tap": tapname, "bridge": bridge, "mac": mac}


def _gone(ifname: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _exists(ifname):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_echo_guest_on_a_bridge(spawn_vm: SpawnVM, bridge: str, port: socket.socket) -> None:
    tapname = _name("fyt")
    vm = spawn_vm(RAM)
    # The guest idles in WAITs of an hour of virtual time: only a frame ending the wait gets an echo
    # back before _echo gives up.
    vm.boot(assemble(ECHO_WAITING_AN_HOUR), {}, nic=_nic(tapname, bridge))
    assert os.path.realpath(f"/sys/class/net/{tapname}/master").endswith("/" + bridge)
    _echo(port, b"one")
    for i in range(3):
        _echo(port, b"again %d" % i)
    nic = vm.status()["nic"]
    assert nic["tap"] == tapname and nic["bridge"] == bridge and nic["mac"] == MAC and nic["link"] is True
    assert nic["rx-packets"] >= 4 and nic["tx-packets"] >= 4 and nic["tx-dropped"] == 0
    # a second VM cannot take the same TAP name
    other = spawn_vm(RAM)
    with pytest.raises(VMError, match=f"TAP name {tapname} is in use"):
        other.boot(assemble(ECHO), {}, nic=_nic(tapname, bridge, "52:54:00:00:00:02"))
    # paused: the link is down for the guest and nothing is read
    vm.pause()
    assert vm.status()["nic"]["link"] is False
    vm.resume()
    assert vm.status()["nic"]["link"] is True
    _echo(port, b"after resume")
    assert vm.stop() == 0
    assert _gone(tapname), "the TAP outlived its VM process"


def test_a_bridge_that_vanishes_under_a_running_vm_costs_it_only_its_network(spawn_vm: SpawnVM) -> None:
    bridge, tapname = _name("fyv"), _name("fyt")
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("link", "set", bridge, "up")
        vm = spawn_vm(RAM)
        vm.boot(assemble(ECHO), {}, nic=_nic(tapname, bridge))
        _ip("link", "del", bridge)
        assert _gone(bridge)
        # the TAP stays, unplugged; the guest runs on and the VM process answers as before
        assert _exists(tapname) and not os.path.exists(f"/sys/class/net/{tapname}/master")
        before = vm.status()["instructions"]
        deadline = time.monotonic() + 5
        while vm.status()["instructions"] == before:
            assert time.monotonic() < deadline, "the guest stopped when its bridge went"
            time.sleep(0.02)
        status = vm.status()
        assert status["status"] == "running" and status["nic"]["bridge"] == bridge
        vm.pause()
        vm.resume()
        assert vm.stop() == 0
        assert _gone(tapname), "the TAP outlived its VM process"
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_missing_bridge_is_refused_and_leaves_nothing(spawn_vm: SpawnVM) -> None:
    tapname, missing = _name("fyt"), _name("fynobr")
    vm = spawn_vm(RAM)
    with pytest.raises(VMError, match=f"bridge {missing} does not exist"):
        vm.boot(assemble(ECHO), {}, nic=_nic(tapname, missing))
    assert not _exists(tapname)
    with pytest.raises(VMError, match="bridge lo is not a bridge"):
        vm.boot(assemble(ECHO), {}, nic=_nic(tapname, "lo"))
    assert vm.status()["status"] == "created"
    vm.boot(assemble(ECHO), {})  # the same process still boots, without a NIC
    assert "nic" not in vm.status()


def test_malformed_nic_is_refused(spawn_vm: SpawnVM, bridge: str) -> None:
    vm = spawn_vm(RAM)
    for nic, match in (({"tap": "x" * 16, "bridge": bridge, "mac": MAC}, "interface name"),
                       ({"tap": "fyt-ok", "bridge": bridge, "mac": "52:54:00"}, "malformed MAC"),
                       ({"tap": "fyt-ok", "bridge": "eth0-nope/x", "mac": MAC}, "interface name")):
        with pytest.raises(VMError, match=match):
            vm.boot(assemble(ECHO), {}, nic=nic)
    assert vm.status()["status"] == "created"


def test_restore_keeps_the_nic_and_checks_its_mac(spawn_vm: SpawnVM, make_memfd: MakeMemfd, bridge: str,
                                                  port: socket.socket) -> None:
    fd = make_memfd(RAM)
    tapname = _name("fyt")
    first = spawn_vm(RAM, ram_fd=fd)
    first.boot(assemble(ECHO), {}, nic=_nic(tapname, bridge))
    _echo(port, b"before")
    state = first.pause()
    assert state["devices"]["nic"]["rx_packets"] >= 1
    assert first.stop() == 0 and _gone(tapname)
    second: VMHandle = spawn_vm(RAM, ram_fd=fd)
    with pytest.raises(VMError, match="52:54:00:12:34:56"):
        second.restore(state, nic=_nic(tapname, bridge, "52:54:00:00:00:09"))
    assert not _exists(tapname)
    second.restore(state, nic=_nic(tapname, bridge))
    _echo(port, b"after restore")
    assert second.status()["nic"]["rx-packets"] > state["devices"]["nic"]["rx_packets"]


def test_no_tun_device_is_a_clear_refusal(bridge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tap, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(tap.NicSetupError, match="no /nonexistent/net/tun"):
        tap.open_tap(_name("fyt"), bridge)
