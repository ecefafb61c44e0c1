"""ferry wire protocol: sans-IO framing, messages, handshake, state machines.

No sockets, no asyncio: bytes in, messages out, and back. The agent and the
CLI own the connections; this package owns what travels on them.

- ``proto.limits``   versions and every limit the decoder enforces
- ``proto.errors``   ProtocolError (Local / Remote) and the stable ErrorCode table
- ``proto.frame``    the fixed binary frame header
- ``proto.ranges``   page range lists: wire form and rules
- ``proto.messages`` the message catalogue (frozen dataclasses) and its schema
- ``proto.codec``    encode / parse_header + decode_body / buffered Decoder
- ``proto.auth``     challenge-response handshake over the cluster key
- ``proto.state``    source and destination migration state machines
- ``proto.channel``  one end of a connection: the codec and the role's state machine together
"""

from proto.auth import ClientHandshake, HandshakeState, ServerHandshake, error_response, new_nonce
from proto.channel import Channel
from proto.codec import (
    CLOSED,
    NEED_DATA,
    Decoder,
    Sentinel,
    check_header,
    decode_body,
    encode,
    encode_full,
    message_class,
)
from proto.errors import ERROR_CODES, ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from proto.frame import HEADER_SIZE, Header, parse_header
from proto.limits import (
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
    MIN_VERSION,
    NONCE_SIZE,
    PAGE_SIZE,
    SUPPORTED_VERSIONS,
)
from proto.messages import (
    CONTROL_MESSAGES,
    HANDSHAKE_MESSAGES,
    MESSAGE_TYPES,
    MIGRATION_MESSAGES,
    Abort,
    Auth,
    AuthOk,
    CodeHint,
    Commit,
    DeviceState,
    Digest,
    DiskBatch,
    ErrorResponse,
    Event,
    Hello,
    HelloReply,
    InDoubtAnswer,
    InDoubtQuery,
    Message,
    MigrateAccept,
    MigrateRefuse,
    MigrateStart,
    PageBatch,
    RangeBatch,
    Ranges,
    Ready,
    Request,
    Response,
    Resumed,
    RoundEnd,
    Sync,
    SyncAck,
)
from proto.postcopy_messages import (
    POSTCOPY_MESSAGES,
    PageRequest,
    PostcopyAttach,
    PostcopyDiscard,
    PostcopyDone,
    PostcopyLacking,
    PostcopyRecover,
    PostcopyRecovered,
    PostcopyStart,
)
from proto.state import (
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    DestinationMachine,
    DestinationState,
    Direction,
    SourceMachine,
    SourceState,
)
from proto.stream_messages import STREAM_MESSAGES, StreamAttach

__all__ = [
    "Channel", "ClientHandshake", "HandshakeState", "ServerHandshake", "error_response", "new_nonce",
    "DESTINATION_TRANSITIONS", "SOURCE_TRANSITIONS", "DestinationMachine", "DestinationState", "Direction",
    "SourceMachine", "SourceState",
    "CLOSED", "NEED_DATA", "Decoder", "Sentinel", "check_header", "decode_body", "encode", "encode_full",
    "message_class", "ERROR_CODES", "ErrorCode", "LocalProtocolError", "ProtocolError", "RemoteProtocolError",
    "HEADER_SIZE", "Header", "parse_header", "CURRENT_VERSION", "MAX_BODY_SIZE", "MAX_DISK_SIZE", "MAX_GUEST_SIZE", "MAX_HANDSHAKE_BODY",
    "MAX_HINT_CODE", "MAX_HINT_PCS", "MAX_NAME_LEN", "MAX_PAYLOAD_SIZE", "MAX_RANGES", "MAX_ZERO_RANGES", "MIN_VERSION", "NONCE_SIZE",
    "PAGE_SIZE", "SUPPORTED_VERSIONS", "CONTROL_MESSAGES", "HANDSHAKE_MESSAGES", "MESSAGE_TYPES",
    "MIGRATION_MESSAGES", "Abort", "Auth", "AuthOk", "CodeHint", "Commit", "DeviceState", "Digest", "DiskBatch", "ErrorResponse",
    "Event", "Hello", "HelloReply", "InDoubtAnswer", "InDoubtQuery", "Message", "MigrateAccept",
    "MigrateRefuse", "MigrateStart", "PageBatch", "RangeBatch", "Ranges", "Ready", "Request", "Response", "Resumed",
    "RoundEnd", "Sync", "SyncAck", "POSTCOPY_MESSAGES", "PageRequest", "PostcopyAttach", "PostcopyDiscard",
    "PostcopyDone", "PostcopyLacking", "PostcopyRecover", "PostcopyRecovered", "PostcopyStart",
    "STREAM_MESSAGES", "StreamAttach",
]  # fmt: skip
