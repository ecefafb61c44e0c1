"""A VM's spec: how it was made, as `vm info` shows it (the program it booted, the arguments given).

Kept by the VM (agent/vms/vm.py), written in its record, and carried by a migration
(agent/migration/spec_move.py). The guest's image is not part of it: guest RAM carries the program.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_FIELD = 4096  # longest program name, argument key or value accepted from a peer or a record


@dataclass(frozen=True)
class VMSpec:
    """The program a VM booted and the boot arguments given at `vm create`."""

    program: str
    args: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"program": self.program, "args": dict(self.args)}


def parse(raw: object) -> VMSpec | None:
    """A spec from its dict form; None when ``raw`` is not one (absent or malformed)."""
    if not isinstance(raw, Mapping):
        return None
    program, args = raw.get("program"), raw.get("args", {})
    if not (_text(program) and isinstance(args, Mapping) and all(_text(k) and _text(v) for k, v in args.items())):
        return None
    return VMSpec(program=str(program), args={str(k): str(v) for k, v in args.items()})


def _text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_FIELD
