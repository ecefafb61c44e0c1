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


TWO_AGENTS: Ownership = TwoAgents()
