"""What a destination checks in a MigrateStart before it reserves anything, and its refusal.

The destination session (agent/migration/destination.py) runs these in its thread: the source's
parameters as this host reads them, the ISA and page size, the NIC on this host's bridge, the disk
image in this host's allowed directories. A failed check is `Refused` with a stable code, answered
with MigrateRefuse (docs/protocol.md); nothing has been touched yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from agent.disk_copy import DiskFull
from agent.disks import DiskConfig, DiskError
from agent.migration import disk_move, nic_move
from agent.migration import info as params_info
from agent.migration.info import PAGE_SIZE, MigrationParams
from agent.nics import NicConfig, NicError
from proto.errors import ErrorCode
from proto.messages import MigrateStart
from vmruntime import isa


class Refused(Exception):
    """The compatibility check failed; nothing was touched."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def params_of(start: MigrateStart) -> MigrationParams:
    """The source's parameters (informational: it enforces them); one this host does not know is
    left out, not a reason to drop the rest."""
    try:
        return MigrationParams.from_dict({k: v for k, v in start.params.items() if k in params_info.PARAM_KEYS})
    except (ValueError, TypeError):
        return MigrationParams()


def incoming_nic(start: MigrateStart) -> NicConfig | None:
    """The NIC the source proposes, on this host's bridge and a free TAP name; Refused (incompatible)
    when this host cannot plug it in. Reads /sys: for the session thread."""
    try:
        got = nic_move.proposed(start.params, params_of(start).nic_map)
        if got is None:
            return None
        nic, source_bridge = got
        why = nic_move.host_refusal(nic, source_bridge)
        if why is not None:
            raise Refused(ErrorCode.INCOMPATIBLE, why)
        return dataclasses.replace(nic, tap=nic_move.free_tap(start.vm_name))
    except NicError as e:
        raise Refused(ErrorCode.INCOMPATIBLE, f"the VM's NIC: {e}") from None


def incoming_disk(start: MigrateStart, allowed: Sequence[Path]) -> tuple[DiskConfig, str | None] | None:
    """The source's disk image as this host names it (or its copy here, and the identity the copy
    takes); Refused when this host does not see the same image in its allowed directories, or
    cannot take a copy (agent/migration/disk_move.py)."""
    try:
        return disk_move.incoming(start.params, params_of(start).disk_map, allowed)
    except DiskFull as e:
        raise Refused(ErrorCode.INSUFFICIENT_STORAGE, f"the VM's disk: {e}") from None
    except DiskError as e:
        raise Refused(ErrorCode.INCOMPATIBLE, f"the VM's disk: {e}") from None


def check_compatible(start: MigrateStart) -> None:
    """Refuse what this host cannot run, before anything is touched."""
    if start.page_size != PAGE_SIZE:
        raise Refused(ErrorCode.INCOMPATIBLE, f"page size {start.page_size}, this host uses {PAGE_SIZE}")
    if start.isa_version not in isa.ACCEPTED_ISA_VERSIONS:  # newer than ours, or unknown
        raise Refused(ErrorCode.INCOMPATIBLE, f"ISA version {start.isa_version}, this host runs {isa.ISA_VERSION}")
    missing = set(start.isa_features) - set(isa.ISA_FEATURES)
    if missing:
        raise Refused(ErrorCode.INCOMPATIBLE, f"ISA features {sorted(missing)} are not supported here")
