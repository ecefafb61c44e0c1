"""Where a VM goes: the live host with the most free capacity that fits it (pure).

A host fits a VM when it is not in maintenance, has the VM's guest memory free and a VM slot
free. Among those the one left with the most free memory wins; then fewer VMs, then less CPU
load, then the name, so the choice is the same on every agent for the same records. Dead hosts
have no record (their lease expired) and are never candidates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from agent.cluster.model import HostRecord


def fits(host: HostRecord, mem: int) -> bool:
    return not host.maintenance and host.mem_free >= mem and host.vms < host.slots


def place(hosts: Iterable[HostRecord], mem: int, exclude: Collection[str] = ()) -> HostRecord | None:
    """The host for a VM of ``mem`` bytes of guest memory, or None when none fits."""
    candidates = [h for h in hosts if h.name not in exclude and fits(h, mem)]
    if not candidates:
        return None
    return min(candidates, key=lambda h: (-(h.mem_free - mem), h.vms, h.cpu, h.name))
