"""A VM's NIC across a migration: what the source proposes, what the destination checks and uses.

The source sends the NIC (bridge, mac, ip) in MigrateStart's ``params`` under the key ``nic``
(docs/protocol.md): a destination that does not know it ignores it. The destination applies the
operator's ``--nic-map`` (source bridge -> destination bridge), refuses a bridge it does not have
before any page moves, and picks a TAP name free on this host: with both agents on one host the
source's TAP still exists while the VM moves, so the destination's gets a suffix.

`host_refusal` and `free_tap` read /sys: blocking, for the session thread, never the loop.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from agent import nics
from agent.migration.common import describe, map_items
from agent.migration.seams import Lane, LogLike
from agent.nics import NicConfig, NicError
from vmruntime.control import VMError, VMGone

DRAIN_TIMEOUT_S = 10.0  # a paused VM process answers at once; this bounds a stuck one

PARAMS_KEY = "nic"  # the key in MigrateStart.params
TUN_PATH = "/dev/net/tun"


def proposal(nic: NicConfig) -> dict[str, Any]:
    """What travels: where the source plugs it, its MAC, the guest's IP. Not the TAP: a host's own."""
    return {"bridge": nic.bridge, "mac": nic.mac, "ip": nic.ip}


def proposed(params: Mapping[str, Any], nic_map: Mapping[str, str]) -> tuple[NicConfig, str] | None:
    """The NIC a MigrateStart proposes, on the destination's bridge (``nic_map`` applied), and the
    source's bridge; None without a NIC. NicError when malformed. The TAP is left empty: free_tap."""
    raw = params.get(PARAMS_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise NicError("the proposed NIC is not a map")
    fields = nics.nic_request({k: v for k, v in raw.items() if v is not None})
    source_bridge = fields["bridge"]
    bridge = nics.check_ifname(str(nic_map.get(source_bridge, source_bridge)), "bridge")
    if "mac" not in fields:
        raise NicError("the proposed NIC has no MAC")
    return NicConfig(bridge=bridge, mac=fields["mac"], tap="", ip=fields.get("ip")), source_bridge


def host_refusal(nic: NicConfig, source_bridge: str, sys_net: str = nics.SYS_NET) -> str | None:
    """Why this host cannot plug ``nic`` in (no TAP devices, its bridge missing), or None."""
    if not os.path.exists(TUN_PATH):
        return f"no {TUN_PATH} on the destination: it cannot create the VM's TAP"
    what = nics.bridge_problem(nic.bridge, sys_net)
    if what is None:
        return None
    mapped = f" (mapped from {source_bridge} by --nic-map)" if nic.bridge != source_bridge else ""
    hint = "" if mapped else " (map it to one of this host's bridges with --nic-map SRC_BR=DST_BR)"
    return f"bridge {nic.bridge}{mapped} {what} on the destination{hint}"


def free_tap(vm_name: str, taken: Collection[str] = (), sys_net: str = nics.SYS_NET) -> str:
    """The VM's TAP name (agent/nics.tap_name), or that name with a suffix ``-N`` when an
    interface of that name exists on this host or ``taken`` holds it."""
    base = nics.tap_name(vm_name)
    for i in range(100):
        suffix = "" if i == 0 else f"-{i}"
        name = base[:nics.IFNAMSIZ - len(suffix)] + suffix
        if name not in taken and not os.path.exists(os.path.join(sys_net, name)):
            return name
    raise NicError(f"no free TAP name for VM {vm_name} on this host")


def parse_nic_map(raw: object) -> dict[str, str]:
    """--nic-map values: a map {SRC_BR: DST_BR} or a list of "SRC_BR=DST_BR"; NicError if malformed."""
    try:
        items = map_items(raw, "nic-map", "SRC_BR=DST_BR")
    except ValueError as e:
        raise NicError(str(e)) from None
    return {nics.check_ifname(s, "bridge"): nics.check_ifname(d, "bridge") for s, d in items}


def tap_dropped(tap: str, sys_net: str = nics.SYS_NET) -> int | None:
    """Frames the kernel dropped on their way into the TAP (its queue full): its tx_dropped."""
    try:
        with open(os.path.join(sys_net, tap, "statistics", "tx_dropped")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def switchover_drops(lane: Lane, tap: str, dropped_at_pause: int) -> int:
    """Frames that reached the source's TAP after the pause and were never read: those still queued
    (read and dropped now: the VM goes) and those the full queue dropped (docs/cli.md).
    Raises VMError, VMGone or OSError when the VM process does not answer."""
    drained = int(lane.request("nic-drain", timeout=DRAIN_TIMEOUT_S).get("drained", 0))
    return drained + max(0, (tap_dropped(tap) or 0) - dropped_at_pause)


def count_drops(lane: Lane | None, nic: NicConfig | None, dropped_at_pause: int | None, log: LogLike) -> int | None:
    """``switchover_drops`` for the source's record: None without a NIC (or its count at the
    pause), and a warning instead of an error when the VM process does not answer."""
    if nic is None or lane is None or dropped_at_pause is None:
        return None
    try:
        return switchover_drops(lane, nic.tap, dropped_at_pause)
    except (VMError, VMGone, OSError) as exc:
        log.warning("counting the frames left at switch-over failed", tap=nic.tap, error=describe(exc))
        return None
