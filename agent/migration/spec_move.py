"""A VM's spec across a migration: the program it booted and the arguments given at `vm create`.

The VM's image is not carried (guest RAM is), but what `vm info` shows of how the VM was made is
(agent/vmspec.py): the source sends it in MigrateStart's ``params`` under the key ``spec``
(docs/protocol.md), and the destination names the arriving VM by it (agent/vms/incoming.py). A
source that sends none, or a malformed one, leaves the destination's VM without one: its program
reads MIGRATED_PROGRAM and it has no arguments (the VM migrates all the same: nothing runs by it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.migration.seams import MigratingVM
from agent.vmspec import VMSpec, parse

PARAMS_KEY = "spec"  # the key in MigrateStart.params
SINCE = 3  # the protocol version whose destinations take it (an older one refuses an unknown param)


def proposal(vm: MigratingVM, version: int) -> dict[str, Any]:
    """The params entry that carries the VM's program and boot arguments to a peer speaking protocol
    ``version``; none for an older peer."""
    return {PARAMS_KEY: VMSpec(vm.program, dict(vm.args)).to_dict()} if version >= SINCE else {}


def incoming(params: Mapping[str, Any]) -> VMSpec | None:
    """The spec a MigrateStart carries; None when it carries none or a malformed one."""
    return parse(params.get(PARAMS_KEY))
