"""Post-copy's messages (protocol version 4): the switch-over that resumes the VM on the
destination before all its pages are there, the page requests, and the end.

Registered in the same catalogue as proto.messages (type codes 49-56); proto.state imports this
module, so every channel knows them. The exchange is in docs/protocol.md, "Post-copy".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from proto import ranges as _ranges
from proto.errors import FieldError
from proto.limits import MAX_GUEST_SIZE, MAX_NAME_LEN, MAX_RANGES
from proto.messages import Message, register
from proto.ranges import Ranges

#: Most pages one PageRequest asks for (the faulting page and its neighbours).
MAX_REQUEST_PAGES = 256


class _NamesMigration(Message):
    """A message that names a migration and its VM (``migration_id``, ``vm_name``)."""

    __slots__ = ()
    migration_id: str
    vm_name: str

    def check(self, guest_size: int | None = None) -> None:
        for label, value in (("migration_id", self.migration_id), ("vm_name", self.vm_name)):
            if not value or len(value) > MAX_NAME_LEN:
                raise FieldError(f"{label} must be 1..{MAX_NAME_LEN} characters")


class _GuestRanges(Message):
    """A message that is a list of guest ranges (``ranges``), each inside the guest."""

    __slots__ = ()
    ranges: Ranges

    def check(self, guest_size: int | None = None) -> None:
        _ranges.check_bounds(self.ranges, MAX_RANGES, MAX_GUEST_SIZE if guest_size is None else guest_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self.ranges)} ranges>)"


@register(49)
@dataclass(frozen=True, slots=True, repr=False)
class PostcopyDiscard(_GuestRanges):
    """Source -> destination, after PostcopyStart: guest ranges whose copies on the destination
    are stale (the source's dirty set): the destination marks them so (punched out of the memfd,
    or kept behind userfaultfd MINOR mode), so the guest's touch fetches them afresh. As many as the dirty set needs, then DeviceState."""

    SINCE: ClassVar[int] = 4

    ranges: Ranges


@register(50)
@dataclass(frozen=True, slots=True)
class PostcopyStart(Message):
    """Source -> destination: the switch-over is a post-copy one. PostcopyDiscard* and a Sync
    (the VM still runs on the source), then after the pause PostcopyDiscard* again and
    DeviceState, then READY (no digest: guest RAM is not whole here until the post-copy ends),
    COMMIT, RESUMED, and the post-copy phase. ``pages``: the pages the discards before the
    pause name (checked at the Sync)."""

    SINCE: ClassVar[int] = 4

    pages: int

    def check(self, guest_size: int | None = None) -> None:
        if not 0 <= self.pages <= MAX_GUEST_SIZE // 4096:
            raise FieldError(f"pages {self.pages} is not a page count of guest RAM")


@register(51)
@dataclass(frozen=True, slots=True)
class PageRequest(Message):
    """Destination -> source, in post-copy: send ``npages`` pages from guest offset ``offset``
    at once (a vCPU waits for the first one), on the urgent connection."""

    SINCE: ClassVar[int] = 4

    offset: int
    npages: int

    def check(self, guest_size: int | None = None) -> None:
        size = MAX_GUEST_SIZE if guest_size is None else guest_size
        if self.offset % 4096 or not 1 <= self.npages <= MAX_REQUEST_PAGES:
            raise FieldError(f"request at {self.offset:#x} for {self.npages} pages: not page aligned, "
                             f"or not 1..{MAX_REQUEST_PAGES} pages")
        if not 0 <= self.offset < self.offset + self.npages * 4096 <= size:
            raise FieldError(f"request at {self.offset:#x} for {self.npages} pages is outside guest RAM")


@register(52)
@dataclass(frozen=True, slots=True)
class PostcopyAttach(_NamesMigration):
    """Source -> destination, first message of a second connection: it carries the answers to
    page requests of migration ``migration_id`` (the urgent connection), which never wait
    behind the background push on the main one."""

    SINCE: ClassVar[int] = 4

    migration_id: str
    vm_name: str


@register(53)
@dataclass(frozen=True, slots=True)
class PostcopyDone(Message):
    """Destination -> source: every page is present here; the source may destroy its copy."""

    SINCE: ClassVar[int] = 4

    pages_placed: int
    requests: int


@register(54)
@dataclass(frozen=True, slots=True)
class PostcopyRecover(_NamesMigration):
    """Source -> destination, first message of a new connection after the post-copy phase of
    migration ``migration_id`` lost its link: it becomes that migration's main connection. The
    destination answers PostcopyLacking* and PostcopyRecovered, or MigrateRefuse (an unknown
    migration id, another peer, a recovery already under way)."""

    SINCE: ClassVar[int] = 4

    migration_id: str
    vm_name: str


@register(55)
@dataclass(frozen=True, slots=True, repr=False)
class PostcopyLacking(_GuestRanges):
    """Destination -> source, answering PostcopyRecover: guest ranges the destination still lacks
    (missing, or requested and not yet arrived: the pages in flight when the link dropped). As
    many as the set needs, then PostcopyRecovered; the source's push sends exactly these."""

    SINCE: ClassVar[int] = 4

    ranges: Ranges


@register(56)
@dataclass(frozen=True, slots=True)
class PostcopyRecovered(Message):
    """Destination -> source: the lacking set is complete (``pages``: the pages it names, checked
    by the source); the post-copy phase goes on on the new connections."""

    SINCE: ClassVar[int] = 4

    pages: int

    def check(self, guest_size: int | None = None) -> None:
        if not 0 <= self.pages <= MAX_GUEST_SIZE // 4096:
            raise FieldError(f"pages {self.pages} is not a page count of guest RAM")


POSTCOPY_MESSAGES = (PostcopyDiscard, PostcopyStart, PageRequest, PostcopyAttach, PostcopyDone, PostcopyRecover,
                     PostcopyLacking, PostcopyRecovered)
