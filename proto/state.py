"""The migration state machines: everything about message order lives here.

One ``SourceMachine`` / ``DestinationMachine`` per migration connection
(after the handshake). Transitions are a table ``{(state, message class,
direction): next state}``; ``send(msg)`` checks a message we are about to
send, ``receive(msg)`` one the peer sent. A message with no entry raises
``LocalProtocolError`` (send) or ``RemoteProtocolError`` (receive) naming
the role, the state and the message.

The exchange (docs/protocol.md, "The exchange" and "State machines")::

    source                               destination
      MigrateStart ------------------------> compatibility check
      <------------- MigrateAccept | MigrateRefuse
      PageBatch* DiskBatch* Sync  (round 0..n) ->
      <------------------------------------- SyncAck   (all of the round applied)
      RoundEnd ----------------------------->
      [pause] PageBatch* DiskBatch* RoundEnd ->
      DeviceState -------------------------->
      Digest ------------------------------->  check RAM digest
      <------------------------------------- Ready
      Commit ------------------------------->  (source now in doubt)
      <------------------------------------- Resumed  | InDoubtAnswer(False): start failed

    commit ahead (MigrationParams.commit_ahead), one round trip less in the downtime:
      Digest Commit ------------------------>  check RAM digest (Commit waits in the buffer)
      <------------------------------------- Ready Resumed  | Abort: digest refused, discarded

    in doubt, on a new connection:
      InDoubtQuery ------------------------->
      <------------------------------------- InDoubtAnswer(resumed)

Abort (either way) is legal in every state before COMMIT. Two crossing
Aborts are fine. A destination Abort that crosses the source's Commit (the
destination gave up in READY before COMMIT arrived) is accepted by the
source: the destination discarded its copy, so the source may resume. So is
one answering a Commit sent ahead (the digest did not check out): the
destination reads COMMIT only in READY, after the digest held.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from proto.messages import (
    Abort,
    CodeHint,
    Commit,
    DeviceState,
    Digest,
    DiskBatch,
    InDoubtAnswer,
    InDoubtQuery,
    Message,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    Sync,
    SyncAck,
)
from proto.postcopy_messages import (
    PageRequest,
    PostcopyAttach,
    PostcopyDiscard,
    PostcopyDone,
    PostcopyLacking,
    PostcopyRecover,
    PostcopyRecovered,
    PostcopyStart,
)
from proto.stream_messages import StreamAttach


class Direction(Enum):
    """Which way a message travels, seen from the machine's own side."""

    SEND = "send"  # we send it
    RECV = "recv"  # the peer sent it


SEND = Direction.SEND
RECV = Direction.RECV


class SourceState(Enum):
    """States of the sending side of one migration connection."""

    START = "start"  # authenticated; nothing sent yet
    PROPOSED = "proposed"  # MigrateStart sent; awaiting accept or refuse
    PRECOPY = "precopy"  # accepted; page batches and round ends flow (pre-copy and the final copy)
    SYNCING = "syncing"  # Sync sent after a round's pages; awaiting SyncAck
    STATE_SENT = "state-sent"  # VM paused, CPU/device state sent; the digest comes next
    AWAITING_READY = "awaiting-ready"  # digest sent; awaiting READY
    READY = "ready"  # destination ready; COMMIT may be sent (or Abort)
    COMMIT_AHEAD = "commit-ahead"  # COMMIT sent behind the digest: in doubt, awaiting READY then RESUMED
    COMMITTED = "committed"  # COMMIT sent: in doubt until RESUMED (keep the VM paused)
    QUERYING = "querying"  # in doubt, new connection: InDoubtQuery sent, awaiting the answer
    DONE = "done"  # RESUMED received: the destination owns the VM
    RESOLVED = "resolved"  # an InDoubtAnswer settled who owns the VM
    REFUSED = "refused"  # the destination refused; the VM keeps running here
    ABORTED = "aborted"  # aborted before COMMIT; the source resumes the VM
    PC_STARTING = "pc-starting"  # post-copy switch-over (v4): VM paused; the discards, then the state
    PC_AWAITING_READY = "pc-awaiting-ready"  # state sent (no digest); awaiting READY
    PC_READY = "pc-ready"  # destination ready; COMMIT may be sent (or Abort)
    PC_COMMITTED = "pc-committed"  # COMMIT sent: in doubt until RESUMED
    POSTCOPY = "postcopy"  # the VM runs there: pages pushed, requests answered, until PostcopyDone
    URGENT = "urgent"  # the urgent connection of a post-copy: answers to page requests only
    PC_SYNCING = "pc-syncing"  # Sync sent behind the discards made before the pause: awaiting SyncAck
    PC_RECOVERING = "pc-recovering"  # PostcopyRecover sent on a new connection: awaiting what the destination lacks
    STREAM_ATTACHING = "stream-attaching"  # StreamAttach sent on an extra data stream (v6): accept or refuse next
    STREAM = "stream"  # an extra data stream (v6): page batches, and a Sync closing each round's share


class DestinationState(Enum):
    """States of the receiving side of one migration connection."""

    START = "start"  # authenticated; awaiting MigrateStart or InDoubtQuery
    CHECKING = "checking"  # MigrateStart received; checking compatibility
    RECEIVING = "receiving"  # accepted, guest RAM reserved; pages arrive
    SYNC_ASKED = "sync-asked"  # Sync received (every page before it applied): SyncAck comes next
    STATE_RECEIVED = "state-received"  # CPU/device state received; the digest comes next
    VERIFYING = "verifying"  # digest received; checking guest RAM
    READY = "ready"  # READY sent; awaiting COMMIT (never start without it)
    COMMITTED = "committed"  # COMMIT received; starting the VM
    ANSWERING = "answering"  # InDoubtQuery received; the answer comes next
    DONE = "done"  # RESUMED sent: the VM runs here
    RESOLVED = "resolved"  # InDoubtAnswer sent
    REFUSED = "refused"  # refused; nothing was touched
    ABORTED = "aborted"  # aborted before COMMIT; the copy here is discarded
    PC_STARTING = "pc-starting"  # PostcopyStart received: the discards (stale pages dropped), then the state
    PC_VERIFYING = "pc-verifying"  # state received; READY comes next
    PC_READY = "pc-ready"  # READY sent; awaiting COMMIT
    PC_COMMITTED = "pc-committed"  # COMMIT received; registering guest RAM and starting the VM
    POSTCOPY = "postcopy"  # the VM runs here on partial RAM: pages arrive, requests go out
    URGENT = "urgent"  # the urgent connection of a post-copy: answers to page requests arrive
    PC_SYNC_ASKED = "pc-sync-asked"  # Sync received: the discards before it are done, SyncAck comes next
    PC_RECOVERING = "pc-recovering"  # PostcopyRecover received: what this side lacks goes out, or a refusal
    STREAM_ATTACHING = "stream-attaching"  # StreamAttach received (v6): the answer is MigrateAccept or MigrateRefuse
    STREAM = "stream"  # an extra data stream (v6): page batches, and a Sync closing each round's share


Key = tuple[Enum, type[Message], Direction]

_S = SourceState
_D = DestinationState


def _abort_entries(states: Iterable[Enum], aborted: Enum) -> dict[Key, Enum]:
    """Abort, sent or received, from every given state (all before COMMIT)."""
    table: dict[Key, Enum] = {}
    for state in states:
        table[(state, Abort, SEND)] = aborted
        table[(state, Abort, RECV)] = aborted
    return table


SOURCE_TRANSITIONS: dict[Key, Enum] = {
    (_S.START, MigrateStart, SEND): _S.PROPOSED,
    (_S.START, InDoubtQuery, SEND): _S.QUERYING,
    (_S.PROPOSED, MigrateAccept, RECV): _S.PRECOPY,
    (_S.PROPOSED, MigrateRefuse, RECV): _S.REFUSED,
    (_S.PRECOPY, PageBatch, SEND): _S.PRECOPY,
    (_S.PRECOPY, DiskBatch, SEND): _S.PRECOPY,
    (_S.PRECOPY, RoundEnd, SEND): _S.PRECOPY,
    (_S.PRECOPY, CodeHint, SEND): _S.PRECOPY,
    (_S.PRECOPY, Sync, SEND): _S.SYNCING,
    (_S.SYNCING, SyncAck, RECV): _S.PRECOPY,
    (_S.PRECOPY, DeviceState, SEND): _S.STATE_SENT,
    (_S.STATE_SENT, Digest, SEND): _S.AWAITING_READY,
    (_S.AWAITING_READY, Ready, RECV): _S.READY,
    (_S.READY, Commit, SEND): _S.COMMITTED,
    # Commit ahead: the destination reads COMMIT only once it sent READY, so it never acts on it
    # unless the digest held; an Abort (digest refused) means it never will.
    (_S.AWAITING_READY, Commit, SEND): _S.COMMIT_AHEAD,
    (_S.COMMIT_AHEAD, Ready, RECV): _S.COMMITTED,
    (_S.COMMIT_AHEAD, Abort, RECV): _S.ABORTED,
    (_S.COMMITTED, Resumed, RECV): _S.DONE,
    (_S.COMMITTED, InDoubtAnswer, RECV): _S.RESOLVED,  # the destination failed to start: not resumed
    (_S.COMMITTED, Abort, RECV): _S.ABORTED,  # the destination aborted before it saw COMMIT
    (_S.QUERYING, InDoubtAnswer, RECV): _S.RESOLVED,
    (_S.ABORTED, Abort, RECV): _S.ABORTED,  # crossing aborts
    **_abort_entries((_S.START, _S.PROPOSED, _S.PRECOPY, _S.SYNCING, _S.STATE_SENT, _S.AWAITING_READY, _S.READY), _S.ABORTED),
    # Post-copy (version 4): READY without a digest, then the VM runs there while pages flow.
    (_S.PRECOPY, PostcopyStart, SEND): _S.PC_STARTING,
    (_S.PC_STARTING, PostcopyDiscard, SEND): _S.PC_STARTING,
    (_S.PC_STARTING, Sync, SEND): _S.PC_SYNCING,
    (_S.PC_SYNCING, SyncAck, RECV): _S.PC_STARTING,
    (_S.PC_STARTING, DeviceState, SEND): _S.PC_AWAITING_READY,
    (_S.PC_AWAITING_READY, Ready, RECV): _S.PC_READY,
    (_S.PC_READY, Commit, SEND): _S.PC_COMMITTED,
    (_S.PC_COMMITTED, Resumed, RECV): _S.POSTCOPY,
    (_S.PC_COMMITTED, InDoubtAnswer, RECV): _S.RESOLVED,
    (_S.PC_COMMITTED, Abort, RECV): _S.ABORTED,
    (_S.POSTCOPY, PageBatch, SEND): _S.POSTCOPY,
    (_S.POSTCOPY, PostcopyDone, RECV): _S.DONE,
    (_S.START, PostcopyAttach, SEND): _S.URGENT,
    (_S.URGENT, PageRequest, RECV): _S.URGENT,
    (_S.URGENT, PageBatch, SEND): _S.URGENT,
    **_abort_entries((_S.PC_STARTING, _S.PC_AWAITING_READY, _S.PC_READY, _S.PC_SYNCING), _S.ABORTED),
    # Post-copy recovery: a new main connection after the link was lost in the post-copy phase.
    (_S.START, PostcopyRecover, SEND): _S.PC_RECOVERING,
    (_S.PC_RECOVERING, PostcopyLacking, RECV): _S.PC_RECOVERING,
    (_S.PC_RECOVERING, PostcopyRecovered, RECV): _S.POSTCOPY,
    (_S.PC_RECOVERING, MigrateRefuse, RECV): _S.REFUSED,
    # An extra data stream (version 6): its Sync marks the end of its share of a round and has no
    # answer on it (the main connection's SyncAck answers for every stream).
    (_S.START, StreamAttach, SEND): _S.STREAM_ATTACHING,
    (_S.STREAM_ATTACHING, MigrateAccept, RECV): _S.STREAM,
    (_S.STREAM_ATTACHING, MigrateRefuse, RECV): _S.REFUSED,
    (_S.STREAM, PageBatch, SEND): _S.STREAM,
    (_S.STREAM, Sync, SEND): _S.STREAM,
    **_abort_entries((_S.STREAM,), _S.ABORTED),
}

DESTINATION_TRANSITIONS: dict[Key, Enum] = {
    (_D.START, MigrateStart, RECV): _D.CHECKING,
    (_D.START, InDoubtQuery, RECV): _D.ANSWERING,
    (_D.CHECKING, MigrateAccept, SEND): _D.RECEIVING,
    (_D.CHECKING, MigrateRefuse, SEND): _D.REFUSED,
    (_D.RECEIVING, PageBatch, RECV): _D.RECEIVING,
    (_D.RECEIVING, DiskBatch, RECV): _D.RECEIVING,
    (_D.RECEIVING, RoundEnd, RECV): _D.RECEIVING,
    (_D.RECEIVING, CodeHint, RECV): _D.RECEIVING,
    (_D.RECEIVING, Sync, RECV): _D.SYNC_ASKED,
    (_D.SYNC_ASKED, SyncAck, SEND): _D.RECEIVING,
    (_D.RECEIVING, DeviceState, RECV): _D.STATE_RECEIVED,
    (_D.STATE_RECEIVED, Digest, RECV): _D.VERIFYING,
    (_D.VERIFYING, Ready, SEND): _D.READY,
    (_D.READY, Commit, RECV): _D.COMMITTED,
    (_D.COMMITTED, Resumed, SEND): _D.DONE,
    (_D.COMMITTED, InDoubtAnswer, SEND): _D.RESOLVED,  # start failed: tell the source it may resume
    (_D.ANSWERING, InDoubtAnswer, SEND): _D.RESOLVED,
    (_D.ABORTED, Abort, RECV): _D.ABORTED,  # crossing aborts
    **_abort_entries(
        (_D.START, _D.CHECKING, _D.RECEIVING, _D.SYNC_ASKED, _D.STATE_RECEIVED, _D.VERIFYING, _D.READY), _D.ABORTED
    ),
    (_D.RECEIVING, PostcopyStart, RECV): _D.PC_STARTING,
    (_D.PC_STARTING, PostcopyDiscard, RECV): _D.PC_STARTING,
    (_D.PC_STARTING, Sync, RECV): _D.PC_SYNC_ASKED,
    (_D.PC_SYNC_ASKED, SyncAck, SEND): _D.PC_STARTING,
    (_D.PC_STARTING, DeviceState, RECV): _D.PC_VERIFYING,
    (_D.PC_VERIFYING, Ready, SEND): _D.PC_READY,
    (_D.PC_READY, Commit, RECV): _D.PC_COMMITTED,
    (_D.PC_COMMITTED, Resumed, SEND): _D.POSTCOPY,
    (_D.PC_COMMITTED, InDoubtAnswer, SEND): _D.RESOLVED,
    (_D.POSTCOPY, PageBatch, RECV): _D.POSTCOPY,
    (_D.POSTCOPY, PostcopyDone, SEND): _D.DONE,
    (_D.START, PostcopyAttach, RECV): _D.URGENT,
    (_D.URGENT, PageRequest, SEND): _D.URGENT,
    (_D.URGENT, PageBatch, RECV): _D.URGENT,
    **_abort_entries((_D.PC_STARTING, _D.PC_VERIFYING, _D.PC_READY, _D.PC_SYNC_ASKED), _D.ABORTED),
    (_D.START, PostcopyRecover, RECV): _D.PC_RECOVERING,
    (_D.PC_RECOVERING, PostcopyLacking, SEND): _D.PC_RECOVERING,
    (_D.PC_RECOVERING, PostcopyRecovered, SEND): _D.POSTCOPY,
    (_D.PC_RECOVERING, MigrateRefuse, SEND): _D.REFUSED,
    (_D.START, StreamAttach, RECV): _D.STREAM_ATTACHING,
    (_D.STREAM_ATTACHING, MigrateAccept, SEND): _D.STREAM,
    (_D.STREAM_ATTACHING, MigrateRefuse, SEND): _D.REFUSED,
    (_D.STREAM, PageBatch, RECV): _D.STREAM,
    (_D.STREAM, Sync, RECV): _D.STREAM,
    **_abort_entries((_D.STREAM,), _D.ABORTED),
}

#: Message types that carry the migration id, checked against the one the connection started with.
_ID_CARRIERS = (MigrateAccept, Commit, InDoubtAnswer)


class _Machine:
    """Table-driven transitions for one role; subclasses give the table and the start state."""

    role: str
    table: dict[Key, Enum]

    def __init__(self, start: Enum) -> None:
        self.state: Enum = start
        self.migration_id: str | None = None

    def send(self, msg: Message) -> Enum:
        """Check and record that we send ``msg``; returns the new state."""
        return self._step(msg, SEND, LocalProtocolError)

    def receive(self, msg: Message) -> Enum:
        """Check and record that the peer sent ``msg``; returns the new state."""
        return self._step(msg, RECV, RemoteProtocolError)

    def can_send(self, cls: type[Message]) -> bool:
        """Whether a message of type ``cls`` may be sent now."""
        return (self.state, cls, SEND) in self.table

    def can_receive(self, cls: type[Message]) -> bool:
        """Whether a message of type ``cls`` may arrive now (the data path asks before reading a body)."""
        return (self.state, cls, RECV) in self.table

    def _step(self, msg: Message, direction: Direction, error: type[ProtocolError]) -> Enum:
        nxt = self.table.get((self.state, type(msg), direction))
        if nxt is None:
            verb = "send" if direction is SEND else "receive"
            raise error(f"{self.role} in state {self.state.name} cannot {verb} {type(msg).__name__}")
        self._check_id(msg, error)
        self.state = nxt
        return nxt

    def _check_id(self, msg: Message, error: type[ProtocolError]) -> None:
        if isinstance(msg, MigrateStart | InDoubtQuery | PostcopyAttach | PostcopyRecover | StreamAttach):
            self.migration_id = msg.migration_id
        elif isinstance(msg, _ID_CARRIERS) and msg.migration_id != self.migration_id:
            raise error(
                f"{self.role} in state {self.state.name}: {type(msg).__name__} for migration "
                f"{msg.migration_id!r}, this connection is {self.migration_id!r}"
            )


class SourceMachine(_Machine):
    """The sending side of a migration (or of an in-doubt query)."""

    role = "source"
    table = SOURCE_TRANSITIONS

    def __init__(self) -> None:
        super().__init__(SourceState.START)

    @property
    def in_doubt(self) -> bool:
        """COMMIT sent and no answer yet: keep the VM paused, never resume it blindly."""
        return self.state in (SourceState.COMMIT_AHEAD, SourceState.COMMITTED, SourceState.PC_COMMITTED,
                              SourceState.QUERYING)


class DestinationMachine(_Machine):
    """The receiving side of a migration (or the answering side of an in-doubt query)."""

    role = "destination"
    table = DESTINATION_TRANSITIONS

    def __init__(self) -> None:
        super().__init__(DestinationState.START)

    @property
    def may_start_vm(self) -> bool:
        """Only after COMMIT may the destination start the VM."""
        return self.state in (DestinationState.COMMITTED, DestinationState.PC_COMMITTED)
