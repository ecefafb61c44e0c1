"""What cluster mode keeps in etcd: the keys and the JSON of a host's and a VM's record (pure).

Under the prefix (default /ferry):

* `hosts/NAME`: one per live agent, attached to its lease: `HostRecord` (addresses, capacity,
  load, maintenance). The key vanishes when the lease expires: the host is dead.
* `maintenance/NAME`: present while host NAME is in maintenance; on no lease, so the flag outlives
  the agent (a restarted agent comes back in maintenance and goes on emptying its host);
* `migrations/VM`: a migration an evacuation started, in flight (from, to), on the source's lease;
* `vms/NAME`: one per VM of the cluster: `VMRecord` (spec, owner host, generation). It is created
  with the VM (owner: the host that made it, generation 1), moved only by the ownership transaction
  at COMMIT (agent/cluster/owner.py: owner and generation compared, generation + 1) and deleted
  with the VM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


class Keys:
    """The key names under one cluster prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")

    @property
    def hosts(self) -> str:
        return f"{self.prefix}/hosts/"

    @property
    def vms(self) -> str:
        return f"{self.prefix}/vms/"

    @property
    def migrations(self) -> str:
        return f"{self.prefix}/migrations/"

    @property
    def balancer(self) -> str:
        return f"{self.prefix}/balancer"

    @property
    def held(self) -> str:
        return f"{self.prefix}/balanced/"

    def maintenance(self, name: str) -> str:
        return f"{self.prefix}/maintenance/{name}"

    def migration(self, vm: str) -> str:
        return f"{self.migrations}{vm}"

    def host(self, name: str) -> str:
        return f"{self.hosts}{name}"

    def vm(self, name: str) -> str:
        return f"{self.vms}{name}"


@dataclass(frozen=True, slots=True)
class HostRecord:
    """One agent as the cluster sees it."""

    name: str
    control: str  # HOST:PORT of its control API
    migration: str  # HOST:PORT of its migration listener
    mem_total: int  # capacity: guest memory this host accepts (max-mem)
    mem_used: int  # guest memory committed to VMs (running, incoming, being created)
    slots: int  # capacity: most VMs this host runs
    vms: int  # VMs on this host
    cpu: float  # load: the VMs' CPU use, in cores (1.0: one core busy)
    maintenance: bool = False  # no placements; being emptied
    instance: str = ""  # tells this agent run from another of the same name

    @property
    def mem_free(self) -> int:
        return max(0, self.mem_total - self.mem_used)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> HostRecord:
        d = json.loads(raw)
        return cls(name=str(d["name"]), control=str(d["control"]), migration=str(d["migration"]),
                   mem_total=int(d["mem_total"]), mem_used=int(d["mem_used"]), slots=int(d["slots"]),
                   vms=int(d["vms"]), cpu=float(d.get("cpu", 0.0)), maintenance=bool(d.get("maintenance", False)),
                   instance=str(d.get("instance", "")))


@dataclass(frozen=True, slots=True)
class VMRecord:
    """One VM of the cluster: who owns (runs) it, at which generation, and how it was made."""

    name: str
    owner: str
    generation: int
    spec: dict[str, Any] = field(default_factory=dict)  # program, args, mem

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> VMRecord | None:
        """The record, or None when it is not one (a stale or forged value is never trusted)."""
        try:
            d = json.loads(raw)
            return cls(name=str(d["name"]), owner=str(d["owner"]), generation=int(d["generation"]),
                       spec=dict(d.get("spec") or {}))
        except (ValueError, KeyError, TypeError):
            return None

    def moved_to(self, host: str) -> VMRecord:
        """The record after a migration to ``host`` (or a fence, with ``host`` the owner itself)."""
        return VMRecord(self.name, host, self.generation + 1, self.spec)
