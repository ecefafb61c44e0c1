"""One end of a migration connection, sans-IO: the codec and the role's state machine together.

A ``Channel`` is what an h11 ``Connection`` is to HTTP: bytes out of ``send``,
bytes into ``receive_data``, messages out of ``next_event``, and every
message, either way, checked against the role's state machine (proto.state)
in the same call that encodes or decodes it. Whoever owns the socket never
steps the machine by hand, so no frame can cross the wire unchecked.

The order is checked from ``start(machine)`` on: the authentication
handshake before it has its own state machine (proto.auth), and a channel
that is never started only frames (a test or bench peer that breaks the
order on purpose).

Two ways in, as in proto.codec:

* buffered: ``receive_data(bytes)``, then ``next_event()`` until ``NEED_DATA``
  (a page batch comes whole, its payload as bytes);
* the zero-copy data path: ``receive_header(raw)`` parses the fixed header
  and refuses, before the body is read, a frame the codec does not allow or
  the machine does not expect now; ``receive_body(header, body)`` decodes the
  body and steps the machine. A page batch's payload is then the caller's to
  read: ``PageBatch.payload_targets()`` says where each piece goes in guest
  RAM, already checked against ``guest_size``.

Sending: ``send(msg)`` returns header + body; a page batch's payload (the
sum of its range lengths) is the caller's to write right after it.
``send_error(msg)`` frames the connection-level ``ErrorResponse`` that tells
the peer why we give up: legal in any state (it is outside the migration's
order), and the last frame the channel sends.
"""

from __future__ import annotations

from collections.abc import Collection

from proto.codec import Decoder, Sentinel, decode_body, encode, message_class
from proto.errors import LocalProtocolError, RemoteProtocolError
from proto.frame import Header, parse_header
from proto.limits import MAX_BODY_SIZE, MAX_PAYLOAD_SIZE, SUPPORTED_VERSIONS
from proto.messages import ErrorResponse, Message
from proto.state import DestinationMachine, SourceMachine

Machine = SourceMachine | DestinationMachine


class Channel:
    """Encoder, decoder and (once started) the state machine of one end of a connection.

    ``guest_size`` checks page ranges (set it once the guest size is agreed);
    ``versions``, ``max_payload`` and ``max_body`` are the codec's limits
    (proto.codec.Decoder).
    """

    def __init__(
        self,
        machine: Machine | None = None,
        *,
        guest_size: int | None = None,
        versions: Collection[int] = SUPPORTED_VERSIONS,
        max_payload: int = MAX_PAYLOAD_SIZE,
        max_body: int = MAX_BODY_SIZE,
    ) -> None:
        self._machine = machine
        self._decoder = Decoder(guest_size, versions, max_payload, max_body)
        self._gave_up = False  # an ErrorResponse went out: nothing may follow it
        # Frames go out as the oldest version we accept until the handshake chose one, so an
        # older peer can read our Hello (docs/protocol.md, "Versions").
        self.version = min(versions)

    def speak(self, version: int) -> None:
        """The handshake chose ``version``: send it from now on, and accept only it."""
        if version not in self._decoder.versions:
            raise LocalProtocolError(f"protocol version {version} is not one this channel accepts")
        self.version = version
        self._decoder.versions = frozenset({version})

    # -- the machine -------------------------------------------------------------------------------
    @property
    def machine(self) -> Machine | None:
        """The role's state machine, or None while the order is not checked (before ``start``)."""
        return self._machine

    def start(self, machine: Machine) -> None:
        """Check every message from now on against ``machine`` (after the handshake)."""
        if self._machine is not None:
            raise LocalProtocolError(f"channel already checks the order as {self._machine.role}")
        self._machine = machine

    # -- the guest size page ranges are checked against, shared with the buffered decoder ---------
    @property
    def guest_size(self) -> int | None:
        return self._decoder.guest_size

    @guest_size.setter
    def guest_size(self, size: int | None) -> None:
        self._decoder.guest_size = size

    # -- sending ---------------------------------------------------------------------------------
    def send(self, msg: Message) -> bytes:
        """Check that ``msg`` may be sent now, step the machine, and return header + body.

        Nothing is stepped when the message cannot be encoded: the machine
        records only frames that can actually go out.
        """
        if self._gave_up:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} after giving up the connection")
        frame = encode(msg, self.version)
        if self._machine is not None:
            self._machine.send(msg)
        return frame

    def send_error(self, msg: ErrorResponse) -> bytes:
        """Frame the ErrorResponse that tells the peer why we give up the connection, in any state.

        The machine is not stepped (its order ends here, unfinished) and
        every later ``send`` raises LocalProtocolError.
        """
        if self._gave_up:
            raise LocalProtocolError("the connection was given up already")
        frame = encode(msg, self.version)
        self._gave_up = True
        return frame

    # -- receiving, buffered ---------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection."""
        self._decoder.receive_data(data)

    def next_event(self) -> Message | Sentinel:
        """The next complete message (the machine stepped), ``NEED_DATA``, or ``CLOSED``."""
        event = self._decoder.next_event()
        if isinstance(event, Message) and self._machine is not None:
            self._machine.receive(event)
        return event

    # -- receiving, the zero-copy data path -----------------------------------------------------
    def receive_header(self, raw: bytes | bytearray | memoryview, max_payload: int | None = None) -> Header:
        """Parse and check a frame header before its body is read.

        Raises RemoteProtocolError for a header the codec refuses (version,
        sizes, unknown type, a stray payload; ``max_payload`` lowers the
        channel's limit for this frame) or a message the machine does not
        expect in its current state.
        """
        d = self._decoder
        limit = d.max_payload if max_payload is None else min(max_payload, d.max_payload)
        header = parse_header(raw, d.versions, limit, d.max_body)
        cls = message_class(header)
        machine = self._machine
        if machine is not None and not machine.can_receive(cls):
            raise RemoteProtocolError(f"{machine.role} in state {machine.state.name} cannot receive {cls.__name__}")
        return header

    def receive_body(self, header: Header, body: bytes | bytearray | memoryview) -> Message:
        """Decode and check the body ``header`` announced, and step the machine.

        A page batch's ranges are checked against ``guest_size``; its payload
        (``header.payload_len`` bytes) follows on the wire, for the caller.
        """
        msg = decode_body(header, body, self.guest_size)
        if self._machine is not None:
            self._machine.receive(msg)
        return msg
