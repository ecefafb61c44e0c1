"""Several data streams per migration (protocol version 6): the message that ties an extra
connection to a migration under way.

Registered in the same catalogue as proto.messages (type code 57); proto.state imports this
module, so every channel knows it. The exchange and the ordering rule are in docs/protocol.md,
"Several streams".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from proto.errors import FieldError
from proto.limits import MAX_NAME_LEN, MAX_STREAMS, STREAMS_VERSION
from proto.messages import Message, register

#: Length bounds of a stream key (the secret MigrateStart's params carry for the extra streams).
MIN_STREAM_KEY = 16
MAX_STREAM_KEY = 64


@register(57)
@dataclass(frozen=True, slots=True)
class StreamAttach(Message):
    """Source -> destination, first message of an extra data connection: it carries page batches
    of migration ``migration_id`` as stream ``index`` (1 .. streams - 1; the main connection is
    stream 0). ``key`` is the migration's stream key, which only the source that sent MigrateStart
    on the main connection knows."""

    SINCE: ClassVar[int] = STREAMS_VERSION

    migration_id: str
    index: int
    key: bytes

    def check(self, guest_size: int | None = None) -> None:
        if not self.migration_id or len(self.migration_id) > MAX_NAME_LEN:
            raise FieldError(f"migration_id must be 1..{MAX_NAME_LEN} characters")
        if not 1 <= self.index < MAX_STREAMS:
            raise FieldError(f"stream index {self.index} is not 1..{MAX_STREAMS - 1}")
        if not MIN_STREAM_KEY <= len(self.key) <= MAX_STREAM_KEY:
            raise FieldError(f"stream key of {len(self.key)} bytes, expected {MIN_STREAM_KEY}..{MAX_STREAM_KEY}")


STREAM_MESSAGES = (StreamAttach,)
