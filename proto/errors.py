"""Protocol errors and the table of stable error codes.

This module owns the one error hierarchy of ferry's wire protocol and the
error codes that travel in ``ErrorResponse``, ``MigrateRefuse`` and ``Abort``.
Codes are stable strings: scripts match on them, humans read the message.

``ProtocolError`` is the root. ``LocalProtocolError`` means *we* were about to
break the protocol (a bug on this side, or the caller asked for an illegal
transition); ``RemoteProtocolError`` means the *peer* did (a bad frame, an
out-of-order message, a failed authentication).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes carried on the wire (values never change)."""

    NO_SUCH_VM = "no-such-vm"  # the named VM does not exist on this host
    VM_EXISTS = "vm-exists"  # a VM of that name already exists here
    INSUFFICIENT_MEMORY = "insufficient-memory"  # not enough free guest memory
    INSUFFICIENT_STORAGE = "insufficient-storage"  # a disk image (or its copy) cannot be stored
    BAD_REQUEST = "bad-request"  # malformed or invalid request arguments
    AUTH_FAILED = "auth-failed"  # challenge-response authentication failed
    INCOMPATIBLE = "incompatible"  # ISA, features or page size do not match
    UNSUPPORTED_VERSION = "unsupported-version"  # no common protocol version
    BUSY = "busy"  # the VM is already migrating / the agent is busy
    INTERNAL = "internal"  # unexpected failure inside the agent
    MIGRATION_FAILED = "migration-failed"  # a migration failed (see message)
    CANCELLED = "cancelled"  # cancelled by the operator
    NOT_FOUND = "not-found"  # unknown operation, migration id, ...
    TIMEOUT = "timeout"  # a peer or the VM did not answer in time
    PROTOCOL_ERROR = "protocol-error"  # a frame or message broke the protocol
    DIGEST_MISMATCH = "digest-mismatch"  # guest RAM digest differs after transfer


ERROR_CODES: frozenset[str] = frozenset(code.value for code in ErrorCode)


class ProtocolError(Exception):
    """Root of every protocol error; carries a stable ``code`` and a human message."""

    def __init__(self, message: str, code: str = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = str(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"


class LocalProtocolError(ProtocolError):
    """We tried to break the protocol: an illegal send, an invalid message to encode."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: a bad frame, an illegal message, a failed MAC."""


class FieldError(ValueError):
    """Internal: a message field or rule is broken. ``proto.codec`` turns it into a
    ``LocalProtocolError`` (encoding) or ``RemoteProtocolError`` (decoding)."""
