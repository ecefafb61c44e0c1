"""A VM's NIC as the agent sees it: the `--nic` text, its MAC, its TAP name, its record and its boot args.

Pure functions and one value type, `NicConfig`; what needs the host (does the bridge exist, is the
TAP name taken) is asked by the VM manager off the event loop (agent/vms/manager.py). One NIC per VM.

- The `--nic` text is `bridge=BR[,mac=52:54:00:xx:xx:xx][,ip=A.B.C.D/NN]` (`parse_nic_text`); the
  control API's `nic` argument is the same keys as a map (`nic_request`).
- A MAC not given is generated, stable for the VM's name on this agent: 52:54:00 (the prefix QEMU/KVM
  guests use) and 3 bytes of a hash of the agent's and the VM's names (`generated_mac`). A given MAC
  must be a unicast address, locally or globally administered, not all zeros.
- The TAP is `fy-NAME` when that fits the kernel's 15 characters, else `fy` and a hash of the name
  (`tap_name`): the same VM name gives the same TAP on every agent, so it is unique per host only
  with VM names unique per host (the manager refuses a TAP name already in use).
- The IP reaches the guest as boot arguments `ip` (A.B.C.D as the u32 A<<24|B<<16|C<<8|D) and
  `prefix`, for programs that take them (`boot_args`): shipped programs refuse arguments they do not
  declare, and boot arguments fill registers in name order, so an undeclared one would move the
  others. An assembly file takes every argument, these too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NIC_KEYS = ("bridge", "mac", "ip")
MAC_PREFIX = "52:54:00"
IFNAMSIZ = 15  # the longest Linux interface name
TAP_PREFIX = "fy"
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # no '/', ':' or blanks; also safe in a /sys path


SYS_NET = "/sys/class/net"  # where the kernel lists this host's interfaces

class NicError(ValueError):
    """A NIC setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class NicConfig:
    """One VM's NIC: where it is plugged (bridge), its MAC and TAP, the guest's IP ("A.B.C.D/NN")."""

    bridge: str
    mac: str
    tap: str
    ip: str | None = None

    def boot_field(self) -> dict[str, str]:
        """The `nic` field of the VM process's boot request."""
        return {"tap": self.tap, "bridge": self.bridge, "mac": self.mac}

    def to_record(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "mac": self.mac, "tap": self.tap, "ip": self.ip}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> NicConfig:
        """The NIC of a VM record (agent/records.py); NicError if the record's NIC is unusable."""
        ip = rec.get("ip")
        if ip is not None:
            parse_ip(str(ip))
        return cls(bridge=check_ifname(str(rec["bridge"]), "bridge"), mac=parse_mac(str(rec["mac"])),
                   tap=check_ifname(str(rec["tap"]), "TAP"), ip=None if ip is None else str(ip))

    def info(self, status: Mapping[str, Any] | None) -> dict[str, Any]:
        """The VM's `nics` entry: the config and the counters of the VM process's last status."""
        status = status or {}
        return {"mac": self.mac, "ip": self.ip, "bridge": self.bridge, "tap": self.tap,
                "rx-packets": int(status.get("rx-packets", 0)), "tx-packets": int(status.get("tx-packets", 0)),
                "rx-dropped": int(status.get("rx-dropped", 0))}


def parse_nic_text(text: str) -> dict[str, str]:
    """`bridge=BR[,mac=..][,ip=A.B.C.D/NN]` -> the control API's `nic` map, each value checked."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NicError(f"bad --nic {text!r}: expected KEY=VALUE items separated by ',' "
                           f"(keys: {', '.join(NIC_KEYS)})")
        if key not in NIC_KEYS:
            raise NicError(f"bad --nic {text!r}: unknown key {key!r} (keys: {', '.join(NIC_KEYS)})")
        if key in fields:
            raise NicError(f"bad --nic {text!r}: {key} given twice")
        fields[key] = value.strip()
    return nic_request(fields)


def nic_request(fields: Mapping[str, Any]) -> dict[str, str]:
    """Check the control API's `nic` map (keys of NIC_KEYS, bridge required); returns it normalised."""
    unknown = sorted(set(fields) - set(NIC_KEYS))
    if unknown:
        raise NicError(f"unknown NIC key(s) {', '.join(map(repr, unknown))} (keys: {', '.join(NIC_KEYS)})")
    if not fields.get("bridge"):
        raise NicError("a NIC needs bridge=BR (the host bridge its TAP is plugged into)")
    out = {"bridge": check_ifname(str(fields["bridge"]), "bridge")}
    if fields.get("mac") is not None:
        out["mac"] = parse_mac(str(fields["mac"]))
    if fields.get("ip") is not None:
        ip, prefix = parse_ip(str(fields["ip"]))
        out["ip"] = f"{format_ip(ip)}/{prefix}"
    return out


def check_ifname(name: str, what: str) -> str:
    if not _IFNAME_RE.match(name) or name in (".", ".."):
        raise NicError(f"bad {what} name {name!r}: at most {IFNAMSIZ} letters, digits, '.', '_', '-'")
    return name


def parse_mac(text: str) -> str:
    """A unicast MAC (locally or globally administered, not all zeros) as lowercase aa:bb:cc:dd:ee:ff."""
    if not _MAC_RE.match(text.strip()):
        raise NicError(f"bad MAC {text!r}: expected six hex octets separated by ':', e.g. 52:54:00:12:34:56")
    mac = text.strip().lower()
    octets = bytes.fromhex(mac.replace(":", ""))
    if octets[0] & 1:
        raise NicError(f"bad MAC {text!r}: a multicast address (the first octet is odd); a NIC needs a unicast one")
    if not any(octets):
        raise NicError(f"bad MAC {text!r}: all zeros")
    return mac


def parse_ip(text: str) -> tuple[int, int]:
    """`A.B.C.D/NN` -> (the address as a u32, A most significant; the prefix length 0..32)."""
    addr, sep, prefix_text = text.strip().partition("/")
    parts = addr.split(".")
    if not sep or len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise NicError(f"bad ip {text!r}: expected A.B.C.D/NN, e.g. 10.0.0.2/24")
    if not prefix_text.isdigit() or int(prefix_text) > 32:
        raise NicError(f"bad ip {text!r}: the prefix length must be 0..32")
    value = 0
    for p in parts:
        value = value << 8 | int(p)
    return value, int(prefix_text)


def format_ip(value: int) -> str:
    return ".".join(str(value >> shift & 0xFF) for shift in (24, 16, 8, 0))


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def generated_mac(agent_name: str, vm_name: str) -> str:
    """The MAC of a VM given none: 52:54:00 and 3 bytes of a hash of the agent's and VM's names."""
    return MAC_PREFIX + "".join(f":{b:02x}" for b in _digest("ferry-mac", agent_name, vm_name)[:3])


def tap_name(vm_name: str) -> str:
    """`fy-NAME` when it fits IFNAMSIZ, else `fy` and 10 hex digits of a hash of the name."""
    plain = f"{TAP_PREFIX}-{vm_name}"
    if len(plain) <= IFNAMSIZ:
        return plain
    return TAP_PREFIX + _digest("ferry-tap", vm_name).hex()[:10]


def make_config(agent_name: str, vm_name: str, request: Mapping[str, Any]) -> NicConfig:
    """The NIC of a new VM from the control API's `nic` map: checked, MAC generated if not given."""
    fields = nic_request(request)
    return NicConfig(bridge=fields["bridge"], mac=fields.get("mac") or generated_mac(agent_name, vm_name),
                     tap=tap_name(vm_name), ip=fields.get("ip"))


def clash(nic: NicConfig, others: Mapping[str, NicConfig]) -> str | None:
    """Why ``nic`` cannot be used next to the NICs of ``others`` (VM name -> NIC), or None."""
    for name, other in sorted(others.items()):
        if other.mac == nic.mac:
            return f"MAC {nic.mac} is already used by VM {name!r}"
        if other.tap == nic.tap:
            return f"TAP name {nic.tap} is already used by VM {name!r}"
    return None


def boot_args(program: str, args: Mapping[str, str], nic: NicConfig | None) -> dict[str, str]:
    """The boot arguments with the NIC's `ip` and `prefix` added for a program that takes them.

    Arguments the operator gave by name win. A shipped program gets only the ones it declares (it
    refuses others); an assembly file gets both."""
    from vmruntime.programs import PROGRAMS  # here: the CLI imports this module and never boots

    out = dict(args)
    if nic is None or nic.ip is None:
        return out
    ip, prefix = parse_ip(nic.ip)
    for key, value in (("ip", str(ip)), ("prefix", str(prefix))):
        if key in out:
            continue
        if program in PROGRAMS and not _declares(program, {**out, key: value}):
            continue
        out[key] = value
    return out


def _declares(program: str, args: Mapping[str, str]) -> bool:
    """Does the shipped program take every one of these arguments (parse_args refuses unknown ones)?"""
    from vmruntime.programs import parse_args

    try:
        parse_args(program, args)
    except ValueError as e:
        return "does not take" not in str(e)
    return True


def bridge_problem(bridge: str, sys_net: str = SYS_NET) -> str | None:
    """"does not exist" or "is not a bridge" for an interface ``bridge`` of this host that is no
    bridge, or None. Reads /sys: blocking, for a worker thread."""
    if os.path.exists(os.path.join(sys_net, bridge, "bridge")):
        return None
    return "is not a bridge" if os.path.exists(os.path.join(sys_net, bridge)) else "does not exist"


def host_refusal(nic: NicConfig, sys_net: str = SYS_NET) -> str | None:
    """Why this host cannot take ``nic`` now (its bridge missing, its TAP name in use), or None.
    Reads /sys: blocking, for a worker thread."""
    what = bridge_problem(nic.bridge, sys_net)
    if what is not None:
        return f"bridge {nic.bridge} {what} on this host"
    if os.path.exists(os.path.join(sys_net, nic.tap)):
        return f"an interface named {nic.tap} (its TAP name) already exists on this host"
    return None
