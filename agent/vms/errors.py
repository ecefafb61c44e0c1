"""The VM manager's errors and the rule for VM names."""

from __future__ import annotations

import re

from proto.errors import ErrorCode

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class VMError(Exception):
    """A VM operation refused or failed; `code` is a stable error code of proto.errors.ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


class NoSuchVM(VMError, KeyError):
    """No VM of that name on this host (a KeyError, as CONTRACTS.md promises for VMManager.get)."""

    def __init__(self, name: str, agent: str) -> None:
        super().__init__(ErrorCode.NO_SUCH_VM, f"no VM named {name!r} on agent {agent}")

    def __str__(self) -> str:
        return self.message


def check_name(name: str) -> None:
    """VM names are short tokens: they appear in logs, file names and command lines."""
    if not _NAME_RE.match(name):
        raise VMError(ErrorCode.BAD_REQUEST, f"invalid VM name {name!r}: use letters, digits, '.', '_', '-' (max 63)")
