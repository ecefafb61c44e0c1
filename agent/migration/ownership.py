"""Who owns a VM across COMMIT, as the migration sessions ask it: one seam, two implementations.

The sessions (source.py, destination.py) call these at three points and know nothing of where
ownership is kept:

* the source, at setup: `proposal` (the MigrateStart params entry stating this host owns the VM);
* the destination, at COMMIT and before the VM starts: `claim` (raises `OwnershipLost` when this
  host must not run it);
* the source, once the destination answered COMMIT (or could not be asked): `settle` says who runs
  the VM: True the destination, False this host, None nobody can say (the VM stays paused).

`TwoAgents` is the two-agent mode: the destination's word settles it (docs/RELIABILITY.md, "in
doubt"). Cluster mode's is agent/cluster/owner.py: an etcd transaction at COMMIT decides, and the
source acts only on what a linearizable read of etcd names (docs/CLUSTER.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

PARAMS_KEY = "owner"  # MigrateStart.params: {"host", "generation", "to"} in cluster mode


class OwnershipLost(Exception):
    """The destination must not run the VM: the store names another owner (or none)."""


class Ownership(Protocol):
    """Ownership at COMMIT. Every method blocks: they run in session threads, never on the loop."""

    def proposal(self, vm_name: str, to: str) -> dict[str, Any]:
        """The source's MigrateStart params entries for migrating ``vm_name`` to agent ``to``;
        raises MigrationError when this host may not migrate it (not its owner)."""

    def refusal(self, vm_name: str, params: Mapping[str, Any]) -> str | None:
        """The destination, before anything is reserved: why it refuses these terms, or None."""

    def claim(self, vm_name: str, params: Mapping[str, Any]) -> None:
        """The destination at COMMIT: make this host the VM's owner before it runs it; raises
        OwnershipLost when it must not run it."""

    def settle(self, vm_name: str, params: Mapping[str, Any], dest_says: bool | None) -> bool | None:
        """The source after COMMIT, given the destination's word (True resumed, False never will,
        None no answer): True the destination runs the VM, False this host does, None unknown."""

    def owner(self, vm_name: str) -> str | None:
        """The host the store names the VM's owner (None: no store, or no record); raises
        MigrationError when the store cannot be read."""


def resolve_refusal(ownership: Ownership, vm_name: str, params: Mapping[str, Any], dest_says: bool | None,
                    resume_here: bool, force: bool) -> str | None:
    """The operator's migrate-resolve of an in-doubt migration, checked against the owner store
    (cluster mode; ``params`` the source's ownership terms): why it is refused, or None once the
    store agrees with it. Resuming here fences the record or takes it back from the destination,
    refused while the store names a destination that did not say it never will run the VM (unless
    ``force``: the operator knows that host is gone for good); destroying the copy here is refused
    unless the store names the destination. Blocks (store calls)."""
    terms = params.get(PARAMS_KEY)
    if not isinstance(terms, Mapping):
        return None  # two-agent mode: the destination's word and the operator's
    dest = str(terms.get("to", ""))
    owner = ownership.owner(vm_name)
    if not resume_here:
        if owner != dest:
            return (f"etcd names {owner!r} the owner of VM {vm_name}, not the destination {dest!r}: the "
                    "destination never took it over; resume it here instead (--resume-here)")
        return None
    if owner == dest and dest_says is not False and not force:
        return (f"etcd names the destination {dest!r} the owner of VM {vm_name}: it may be running it; "
                "if that host is gone for good, add --force")
    if ownership.settle(vm_name, params, False) is not False:
        return f"etcd names neither end of the migration the owner of VM {vm_name} ({owner!r}): settle it by hand"
    return None


class TwoAgents:
    """Two-agent mode: nothing kept outside the two agents; the destination's word is final."""

    def proposal(self, vm_name: str, to: str) -> dict[str, Any]:
        return {}

    def refusal(self, vm_name: str, params: Mapping[str, Any]) -> str | None:
        if params.get(PARAMS_KEY) is not None:
            return "the source is in cluster mode (--etcd) and this agent is not"
        return None

    def claim(self, vm_name: str, params: Mapping[str, Any]) -> None:
        return None

    def settle(self, vm_name: str, params: Mapping[str, Any], dest_says: bool | None) -> bool | None:
        return dest_says

    def owner(self, vm_name: str) -> str | None:
        return None


TWO_AGENTS: Ownership = TwoAgents()
