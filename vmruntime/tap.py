"""The host side of a VM's NIC: a TAP device on a bridge, and frames between it and the machine.

Owns the TAP of one VM process: opening it (``/dev/net/tun``, IFF_TAP |
IFF_NO_PI, not persistent, so the kernel removes it when the process exits),
attaching it to a bridge and setting it up (ioctls only, no subprocess), and
moving frames: received frames go to ``Machine.nic_deliver`` (a bounded
number per call, never blocking), frames the guest queued go to the TAP
(a full TAP queue drops the frame and counts it, never blocks).  The guest
side (registers, rings) is vmruntime/nic.py's; the VM process's loop
(vmruntime/vmproc.py) decides when to call in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vmruntime.nic import mac_text, parse_mac

if TYPE_CHECKING:
    from vmruntime.machine import Machine

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = 40  # sizeof(struct ifreq) on Linux
SYS_NET = "/sys/class/net"

# Frames read from the TAP per call: bounds the host work between two vCPU slices.
RX_BATCH = 64
_READ_SIZE = 65536  # larger than any frame the TAP can hand us; oversized ones are dropped whole


class NicSetupError(Exception):
    """The host side of a NIC cannot be set up (missing bridge, TAP name in use, no /dev/net/tun)."""


def parse_config(raw: object) -> tuple[str, str, int]:
    """(tap, bridge, mac) from a request's ``nic`` field: {"tap", "bridge", "mac"}; ValueError if malformed."""
    if not isinstance(raw, Mapping):
        raise ValueError("nic must be a map {tap, bridge, mac}")
    tap, bridge, mac = raw.get("tap"), raw.get("bridge"), raw.get("mac")
    for what, name in (("TAP", tap), ("bridge", bridge)):
        if not (isinstance(name, str) and 0 < len(name.encode()) < IFNAMSIZ and name.isascii()
                and "/" not in name and name not in (".", "..") and not any(c.isspace() for c in name)):
            raise ValueError(f"nic {what} name {name!r} is not a valid interface name (1..15 characters)")
    if not isinstance(mac, str):
        raise ValueError("nic mac must be a string like 52:54:00:12:34:56")
    return tap, bridge, parse_mac(mac)  # type: ignore[return-value]


def _ifreq(name: str, payload: bytes = b"") -> bytearray:
    req = bytearray(_IFREQ)
    req[:IFNAMSIZ] = name.encode().ljust(IFNAMSIZ, b"\0")
    req[IFNAMSIZ:IFNAMSIZ + len(payload)] = payload
    return req


def open_tap(name: str, bridge: str) -> int:
    """Create TAP name on bridge, up; its non-blocking fd.  NicSetupError names what is wrong."""
    if not os.path.isdir(os.path.join(SYS_NET, bridge, "bridge")):
        what = "is not a bridge" if os.path.exists(os.path.join(SYS_NET, bridge)) else "does not exist"
        raise NicSetupError(f"bridge {bridge} {what}")
    if os.path.exists(os.path.join(SYS_NET, name)):
        raise NicSetupError(f"TAP name {name} is in use (an interface of that name exists)")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NicSetupError(f"no {TUN_PATH} on this host: cannot create TAP {name}") from None
    except OSError as e:
        raise NicSetupError(f"cannot open {TUN_PATH} for TAP {name}: {e.strerror}") from None
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI)))
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise NicSetupError(f"TAP name {name} is in use") from None
            raise NicSetupError(f"cannot create TAP {name}: {e.strerror}") from None
        _attach_and_up(name, bridge)
    except BaseException:
        os.close(fd)  # the TAP is not persistent: closing removes it
        raise
    return fd


def _attach_and_up(name: str, bridge: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        req = _ifreq(name)
        fcntl.ioctl(s, SIOCGIFINDEX, req)
        index = struct.unpack_from("i", req, IFNAMSIZ)[0]
        try:
            fcntl.ioctl(s, SIOCBRADDIF, _ifreq(bridge, struct.pack("i", index)))
        except OSError as e:
            raise NicSetupError(f"cannot attach TAP {name} to bridge {bridge}: {e.strerror}") from None
        req = _ifreq(name)
        fcntl.ioctl(s, SIOCGIFFLAGS, req)
        flags = struct.unpack_from("H", req, IFNAMSIZ)[0]
        try:
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
        except OSError as e:
            raise NicSetupError(f"cannot set TAP {name} up: {e.strerror}") from None


class HostNic:
    """One VM's TAP and the frames between it and the machine's NIC."""

    def __init__(self, tap: str, bridge: str, mac: int, fd: int) -> None:
        self.tap = tap
        self.bridge = bridge
        self.mac = mac
        self.fd = fd

    @classmethod
    def open(cls, raw: object) -> HostNic:
        """From a request's ``nic`` field; ValueError / NicSetupError refuse the request."""
        tap, bridge, mac = parse_config(raw)
        return cls(tap, bridge, mac, open_tap(tap, bridge))

    def fileno(self) -> int:
        return self.fd

    def check_machine(self, machine: Machine) -> None:
        """A restored machine must have a NIC with this MAC (the saved state decides the guest's MAC)."""
        if machine.nic_mac is None:
            raise ValueError(f"the saved state has no NIC, the request asks for {mac_text(self.mac)}")
        if machine.nic_mac != self.mac:
            raise ValueError(f"the saved state's NIC has MAC {mac_text(machine.nic_mac)}, "
                             f"the request asks for {mac_text(self.mac)}")

    def receive(self, machine: Machine, limit: int = RX_BATCH) -> int:
        """Move up to limit waiting frames from the TAP into the machine; how many were read."""
        n = 0
        while n < limit:
            try:
                frame = os.read(self.fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the TAP went away under us: nothing more to read this time
            if not frame:
                break
            n += 1
            machine.nic_deliver(frame)  # one too big or too small is dropped and counted there
        return n

    def send(self, machine: Machine) -> None:
        """Write the frames the guest queued; a full TAP queue drops (TX_DROPPED), never blocks."""
        failed = 0
        for frame in machine.nic_take_tx():
            try:
                os.write(self.fd, frame)
            except OSError:  # EAGAIN, or the TAP is gone or down (EIO)
                failed += 1
        if failed:
            machine.nic_tx_failed(failed)

    def inject(self, frames: list[bytes]) -> int:
        """Write frames into the TAP as if the guest sent them (the agent's announce after a
        migration); how many went out. A full queue drops, never blocks."""
        sent = 0
        for frame in frames:
            try:
                os.write(self.fd, bytes(frame))
                sent += 1
            except OSError:
                pass
        return sent

    def drain(self) -> int:
        """Read and drop every frame waiting in the TAP (a paused VM leaving this host); how many."""
        n = 0
        while True:
            try:
                if not os.read(self.fd, _READ_SIZE):
                    return n
            except OSError:  # EAGAIN: empty; or the TAP is gone
                return n
            n += 1

    def status(self, machine: Machine | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"tap": self.tap, "bridge": self.bridge, "mac": mac_text(self.mac)}
        info = machine.nic_info() if machine is not None else {}
        for key in ("rx-packets", "tx-packets", "rx-dropped", "tx-dropped"):
            fields[key] = info.get(key, 0)
        fields["link"] = bool(info.get("link", False))
        return fields

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
