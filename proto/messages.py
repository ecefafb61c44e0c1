"""The message catalogue: every message ferry's peers exchange, and its schema.

Messages are frozen, slotted dataclasses. One registry maps type codes to
classes (type 0 is Invalid: a zeroed frame means nothing). On the wire a
message is a msgpack map of its fields; ``to_fields`` / ``from_fields`` turn a
message into that map and back, checking every field's presence and type and
the message's own rules (``check``). Framing lives in ``proto.codec``.

Families (type code ranges):
  1-15   handshake: Hello, HelloReply, Auth, AuthOk
  16-31  control API: Request, Response, ErrorResponse, Event
  32-63  migration: MigrateStart ... InDoubtAnswer
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, get_type_hints

from proto import ranges as _ranges
from proto.errors import FieldError
from proto.limits import (
    COMPRESSION_VERSION,
    CURRENT_VERSION,
    MAX_BODY_SIZE,
    MAX_DISK_SIZE,
    MAX_GUEST_SIZE,
    MAX_HANDSHAKE_BODY,
    MAX_HINT_CODE,
    MAX_HINT_PCS,
    MAX_NAME_LEN,
    MAX_PAYLOAD_SIZE,
    MAX_RANGES,
    MAX_ZERO_RANGES,
    NONCE_SIZE,
    PAGE_SIZE,
)
from proto.ranges import Ranges

INVALID_TYPE = 0

M = TypeVar("M", bound="Message")


class Message:
    """Base of every message: ``TYPE`` is its wire code, ``check()`` its own rules."""

    __slots__ = ()
    TYPE: ClassVar[int] = INVALID_TYPE
    #: True for the one message that carries a raw payload behind its body.
    HAS_PAYLOAD: ClassVar[bool] = False
    #: Largest body this message may have (checked from the header, before the body is read).
    MAX_BODY: ClassVar[int] = MAX_BODY_SIZE
    #: First protocol version that has this message: never sent to, nor accepted from, older peers.
    SINCE: ClassVar[int] = 1

    def check(self, guest_size: int | None = None) -> None:
        """Raise ``FieldError`` if the message breaks its rules (beyond field types)."""


# --- field kinds: wire value <-> Python value, with type checks ------------------------------

_Converter = Callable[[Any], Any]


def _expect(kind: type | tuple[type, ...], label: str) -> _Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise FieldError(f"expected {label}, got {type(value).__name__}")
        return value

    return convert


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise FieldError("expected an array of strings")
    return tuple(value)


def _to_int_tuple(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FieldError("expected an array of integers")
    return tuple(value)


def _to_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FieldError("expected a map with string keys")
    return value


def _identity(value: Any) -> Any:
    return value


# annotation -> (to_wire, from_wire)
_KINDS: dict[Any, tuple[_Converter, _Converter]] = {
    int: (_identity, _expect(int, "an integer")),
    str: (_identity, _expect(str, "a string")),
    bytes: (_identity, _expect(bytes, "bytes")),
    bool: (_identity, _expect(bool, "a boolean")),
    float: (_identity, _to_float),
    tuple[str, ...]: (lambda value: list(_to_str_tuple(value)), _to_str_tuple),
    tuple[int, ...]: (lambda value: list(_to_int_tuple(value)), _to_int_tuple),
    dict[str, Any]: (_identity, _to_map),
    Any: (_identity, _identity),
    Ranges: (_ranges.to_wire, _ranges.from_wire),
}


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    to_wire: _Converter
    from_wire: _Converter
    since: int  # first protocol version that carries this field


MESSAGE_TYPES: dict[int, type[Message]] = {}
_SCHEMAS: dict[type[Message], tuple[_Field, ...]] = {}


def since(version: int, default: Any) -> Any:
    """A field added in protocol ``version``: not sent to, nor expected from, older peers
    (they get ``default``). This is how a version-2 catalogue keeps speaking version 1."""
    return field(default=default, metadata={"since": version})


def _build_schema(cls: type[Message]) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    schema = []
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.metadata.get("wire", True):
            continue
        to_wire, from_wire = _KINDS[hints[f.name]]
        schema.append(_Field(f.name, to_wire, from_wire, f.metadata.get("since", 1)))
    return tuple(schema)


def register(code: int) -> Callable[[type[M]], type[M]]:
    """Class decorator: give a message class its wire type code and schema."""

    def decorate(cls: type[M]) -> type[M]:
        if code == INVALID_TYPE or code in MESSAGE_TYPES:
            raise ValueError(f"message type code {code} is reserved or taken")
        cls.TYPE = code
        MESSAGE_TYPES[code] = cls
        _SCHEMAS[cls] = _build_schema(cls)
        return cls

    return decorate


def to_fields(msg: Message, version: int = CURRENT_VERSION) -> dict[str, Any]:
    """The wire map of ``msg`` for a peer speaking ``version`` (field types are checked on the way)."""
    out: dict[str, Any] = {}
    for f in _SCHEMAS[type(msg)]:
        if f.since > version:
            continue
        try:
            wire_value = f.to_wire(getattr(msg, f.name))
            if f.to_wire is not _ranges.to_wire:  # the range encoder checks its own input
                f.from_wire(wire_value)
        except FieldError as exc:
            raise FieldError(f"{type(msg).__name__}.{f.name}: {exc}") from None
        out[f.name] = wire_value
    return out


def from_fields(cls: type[M], wire: Any, version: int = CURRENT_VERSION) -> M:
    """Build a ``cls`` from the wire map of a ``version`` frame; missing, extra or
    ill-typed fields raise ``FieldError``."""
    if not isinstance(wire, dict):
        raise FieldError(f"{cls.__name__}: body must be a map, got {type(wire).__name__}")
    expected = [f for f in _SCHEMAS[cls] if f.since <= version]
    extra = set(wire) - {f.name for f in expected}
    if extra:
        raise FieldError(f"{cls.__name__}: unexpected field(s) {sorted(map(str, extra))}")
    values = {}
    for f in expected:
        if f.name not in wire:
            raise FieldError(f"{cls.__name__}: missing field {f.name!r}")
        try:
            values[f.name] = f.from_wire(wire[f.name])
        except FieldError as exc:
            raise FieldError(f"{cls.__name__}.{f.name}: {exc}") from None
    return cls(**values)


# --- shared rule helpers ----------------------------------------------------------------------


def _check_name(label: str, name: str) -> None:
    if not name or len(name) > MAX_NAME_LEN:
        raise FieldError(f"{label} must be 1..{MAX_NAME_LEN} characters, got {len(name)}")


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise FieldError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


# --- handshake --------------------------------------------------------------------------------


@register(1)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Client -> server: the versions it speaks, who it is, and a fresh nonce."""

    MAX_BODY: ClassVar[int] = MAX_HANDSHAKE_BODY

    min_version: int
    max_version: int
    name: str
    role: str  # "cli", "agent", "migration" ...: what the connection is for
    nonce: bytes

    def check(self, guest_size: int | None = None) -> None:
        if not 0 < self.min_version <= self.max_version:
            raise FieldError(f"bad version range {self.min_version}..{self.max_version}")
        _check_name("name", self.name)
        _check_name("role", self.role)
        _check_nonce(self.nonce)


@register(2)
@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    """Server -> client: chosen version, server identity and nonce, and the server's MAC."""

    MAX_BODY: ClassVar[int] = MAX_HANDSHAKE_BODY

    version: int
    name: str
    nonce: bytes
    mac: bytes

    def check(self, guest_size: int | None = None) -> None:
        _check_name("name", self.name)
        _check_nonce(self.nonce)


@register(3)
@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Client -> server: the client's MAC over both nonces (proves the cluster key)."""

    MAX_BODY: ClassVar[int] = MAX_HANDSHAKE_BODY

    mac: bytes


@register(4)
@dataclass(frozen=True, slots=True)
class AuthOk(Message):
    """Server -> client: authenticated; the connection now speaks the chosen version."""

    MAX_BODY: ClassVar[int] = MAX_HANDSHAKE_BODY


# --- control API ------------------------------------------------------------------------------


@register(16)
@dataclass(frozen=True, slots=True)
class Request(Message):
    """A control API call: ``op`` names the operation (the agent's business), ``args`` its arguments."""

    id: int
    op: str
    args: dict[str, Any]


@register(17)
@dataclass(frozen=True, slots=True)
class Response(Message):
    """The successful result of request ``id`` (any msgpack value)."""

    id: int
    result: Any


@register(18)
@dataclass(frozen=True, slots=True)
class ErrorResponse(Message):
    """Request ``id`` failed (id 0: the connection failed, e.g. auth). ``code`` is an ErrorCode."""

    id: int
    code: str
    message: str


@register(19)
@dataclass(frozen=True, slots=True)
class Event(Message):
    """An unsolicited item of a stream tied to request ``id`` (console output, progress)."""

    id: int
    kind: str
    data: Any


# --- migration --------------------------------------------------------------------------------


@register(32)
@dataclass(frozen=True, slots=True)
class MigrateStart(Message):
    """Source -> destination: what would arrive, for the compatibility check."""

    migration_id: str  # random, ties this migration's messages and in-doubt queries together
    vm_name: str
    mem_size: int  # guest RAM bytes, page aligned
    page_size: int
    isa_version: int
    isa_features: tuple[str, ...]
    dirty_tracker: str  # the source's tracking backend, for the record
    params: dict[str, Any]  # migration parameters (max downtime, ...), informational

    def check(self, guest_size: int | None = None) -> None:
        _check_name("migration_id", self.migration_id)
        _check_name("vm_name", self.vm_name)
        if not 0 < self.mem_size <= MAX_GUEST_SIZE or self.mem_size % PAGE_SIZE:
            raise FieldError(f"mem_size {self.mem_size} is not a page-aligned size up to {MAX_GUEST_SIZE}")


@register(33)
@dataclass(frozen=True, slots=True)
class MigrateAccept(Message):
    """Destination -> source: compatible, guest RAM reserved; send pages."""

    migration_id: str


@register(34)
@dataclass(frozen=True, slots=True)
class MigrateRefuse(Message):
    """Destination -> source: refused before anything was touched (``code`` is an ErrorCode)."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True, repr=False)
class RangeBatch(Message):
    """A batch of bytes at offsets: ``ranges`` are followed by their bytes as raw payload, in
    order; ``zeros`` are ranges to zero, with no payload. The base of PageBatch (guest RAM) and
    DiskBatch (a disk image): the frame's payload is the same, the address space differs.

    Ranges are half-open ``(start, end)`` offsets, page aligned, sorted, not overlapping (within
    and across the two lists). ``compressed`` (COMPRESSION_VERSION): 0, the payload is the ranges'
    bytes; else one zstd frame of that many bytes, no more than theirs, inflating to exactly them
    (docs/protocol.md). ``payload`` (as on the wire) is filled only by the buffered ``Decoder``.
    """

    HAS_PAYLOAD: ClassVar[bool] = True

    ranges: Ranges
    zeros: Ranges = ()
    payload: bytes = field(default=b"", repr=False, compare=False, metadata={"wire": False})
    compressed: int = since(COMPRESSION_VERSION, 0)

    def _check_within(self, size: int) -> None:
        """Counts, bounds, data/zero disjointness, and the declared sizes. The per-list rules
        (aligned, non-empty, ascending) are checked by the wire conversion, which always runs."""
        _ranges.check_bounds(self.ranges, MAX_RANGES, size)
        _ranges.check_bounds(self.zeros, MAX_ZERO_RANGES, size)
        _ranges.check_disjoint(self.ranges, self.zeros)
        if self.compressed and not 0 < self.compressed <= self.payload_len <= MAX_PAYLOAD_SIZE:
            raise FieldError(f"{self.compressed} compressed bytes for {self.payload_len} bytes of ranges "
                             f"(at most those, and at most {MAX_PAYLOAD_SIZE})")

    @property
    def payload_len(self) -> int:
        """Bytes the payload stands for: the sum of the data range lengths."""
        return _ranges.total_length(self.ranges)

    def payload_targets(self) -> list[tuple[int, int]]:
        """Where the payload goes: ``(offset, length)`` per data range, in payload order."""
        return _ranges.targets(self.ranges)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ranges={_ranges.summary(self.ranges)}, zeros={_ranges.summary(self.zeros)})"


@register(35)
@dataclass(frozen=True, slots=True, repr=False)
class PageBatch(RangeBatch):
    """Source -> destination: guest pages; ranges are guest RAM offsets."""

    def check(self, guest_size: int | None = None) -> None:
        self._check_within(MAX_GUEST_SIZE if guest_size is None else guest_size)


@register(48)
@dataclass(frozen=True, slots=True, repr=False)
class DiskBatch(RangeBatch):
    """Source -> destination, when the disk is copied (version 3): bytes of the VM's disk image;
    ranges are image offsets. The destination checks them against the disk's size before it
    writes (the channel knows the guest's RAM size, not the disk's)."""

    SINCE: ClassVar[int] = 3

    def check(self, guest_size: int | None = None) -> None:
        self._check_within(MAX_DISK_SIZE)


@register(36)
@dataclass(frozen=True, slots=True)
class RoundEnd(Message):
    """Source -> destination: a pre-copy round is complete, with its figures."""

    round: int
    pages: int  # data pages sent this round
    zero_pages: int  # zero pages sent this round
    bytes_sent: int  # payload bytes sent this round
    seconds: float  # duration of the round
    dirty_pages: int  # pages dirtied during the round (next round's work)
    dirty_rate: float  # pages dirtied per second during the round


@register(37)
@dataclass(frozen=True, slots=True)
class DeviceState(Message):
    """Source -> destination: CPU and device state of the paused VM (``Machine.save_state()``)."""

    state: dict[str, Any]


@register(38)
@dataclass(frozen=True, slots=True)
class Digest(Message):
    """Source -> destination: digest of all guest RAM after the final pages (e.g. xxh3_128 hex)."""

    algorithm: str
    value: str


@register(39)
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """Destination -> source: state and digest check out; ready to start on COMMIT."""


@register(40)
@dataclass(frozen=True, slots=True)
class Commit(Message):
    """Source -> destination: ownership passes; start the VM. The source is now in doubt."""

    migration_id: str


@register(41)
@dataclass(frozen=True, slots=True)
class Resumed(Message):
    """Destination -> source: the VM runs here now; the source may destroy its copy."""


@register(42)
@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Either side, before COMMIT: stop; the destination discards, the source resumes."""

    code: str
    reason: str


@register(43)
@dataclass(frozen=True, slots=True)
class InDoubtQuery(Message):
    """Source -> destination (new connection): did migration ``migration_id`` of ``vm_name`` resume?"""

    vm_name: str
    migration_id: str


@register(44)
@dataclass(frozen=True, slots=True)
class InDoubtAnswer(Message):
    """Destination -> source: ``resumed`` True, the VM runs here; False, it did not and never will."""

    migration_id: str
    resumed: bool


@register(45)
@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Source -> destination, in pre-copy after a round's last batch: answer SyncAck once every
    page sent before this is applied (the source harvests and decides with nothing in flight)."""

    round: int


@register(46)
@dataclass(frozen=True, slots=True)
class SyncAck(Message):
    """Destination -> source: every page sent before Sync ``round`` is applied here. From version 2,
    ``held_s``: how long the destination held this answer back while its VM process translated
    the code hint's blocks (docs/protocol.md), which the source leaves out of its bandwidth."""

    round: int
    held_s: float = since(2, 0.0)

    def check(self, guest_size: int | None = None) -> None:
        if not 0.0 <= self.held_s <= 3600.0:
            raise FieldError(f"held_s {self.held_s} is not a duration in seconds")


@register(47)
@dataclass(frozen=True, slots=True)
class CodeHint(Message):
    """Source -> destination, before round 0: the guest's code (its region's bytes, from
    ``code_start``) and the start PCs of the blocks the source's vCPU compiled, for the destination
    to translate before it resumes the VM (docs/PERFORMANCE.md, "The guest network"). Advice
    only: the destination uses what it translated only if its guest RAM ends up holding the same
    code, and may ignore the hint."""

    SINCE: ClassVar[int] = 2
    MAX_BODY: ClassVar[int] = MAX_HINT_CODE + 5 * MAX_HINT_PCS + 256

    code_start: int
    code: bytes
    pcs: tuple[int, ...]

    def check(self, guest_size: int | None = None) -> None:
        end = self.code_start + len(self.code)
        if len(self.code) > MAX_HINT_CODE or end > (MAX_GUEST_SIZE if guest_size is None else guest_size):
            raise FieldError(f"{len(self.code)} code bytes at {self.code_start} are not inside guest RAM "
                             f"or exceed {MAX_HINT_CODE}")
        if len(self.pcs) > MAX_HINT_PCS:
            raise FieldError(f"{len(self.pcs)} PCs, at most {MAX_HINT_PCS}")
        if not all(self.code_start <= pc < end for pc in self.pcs):
            raise FieldError("a PC outside the code range")


HANDSHAKE_MESSAGES = (Hello, HelloReply, Auth, AuthOk)
CONTROL_MESSAGES = (Request, Response, ErrorResponse, Event)
MIGRATION_MESSAGES = (
    MigrateStart, MigrateAccept, MigrateRefuse, PageBatch, RoundEnd, DeviceState, Digest,
    Ready, Commit, Resumed, Abort, InDoubtQuery, InDoubtAnswer, Sync, SyncAck, CodeHint, DiskBatch,
)  # fmt: skip
