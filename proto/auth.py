"""The connection handshake: version negotiation and mutual authentication.

Used on control and migration connections alike, sans-IO: the caller sends
the messages these objects return and feeds them what the peer sent.

    client                                   server
      | Hello(min..max version, name, role, nonce_c)  |
      |---------------------------------------------->|  picks the highest common version
      |  HelloReply(version, name, nonce_s, mac_s)    |  mac_s = HMAC(key, "server" + transcript)
      |<----------------------------------------------|
      |  Auth(mac_c)                                  |  client checks mac_s first;
      |---------------------------------------------->|  mac_c = HMAC(key, "client" + transcript)
      |  AuthOk  (or ErrorResponse(0, auth-failed))   |
      |<----------------------------------------------|

The transcript binds both fresh 32-byte nonces, both names, the role, the
offered version range and the chosen version, so neither MAC can be replayed
into another exchange, reflected to the other side, or used to downgrade the
version. The cluster key never crosses the wire; MACs are compared with
``hmac.compare_digest``. Either side that finds a bad MAC raises
``RemoteProtocolError`` with code ``auth-failed`` and may tell the peer with
``error_response(exc)``; a peer's ``ErrorResponse`` raises the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Collection
from enum import Enum

from proto.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from proto.limits import CURRENT_VERSION, MIN_VERSION, NONCE_SIZE, SUPPORTED_VERSIONS
from proto.messages import Auth, AuthOk, ErrorResponse, Hello, HelloReply, Message

#: Shortest cluster key accepted (bytes).
MIN_KEY_SIZE = 16

_SERVER_LABEL = b"ferry-server-mac"
_CLIENT_LABEL = b"ferry-client-mac"


class HandshakeState(Enum):
    """Where a handshake stands (both sides)."""

    START = "start"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # client: Hello sent, awaiting HelloReply
    REPLY_SENT = "reply-sent"  # server: HelloReply sent, awaiting Auth
    AUTH_SENT = "auth-sent"  # client: Auth sent, awaiting AuthOk
    DONE = "done"  # authenticated; the connection speaks ``version``
    FAILED = "failed"  # authentication or negotiation failed; close the connection


def new_nonce() -> bytes:
    """A fresh random nonce."""
    return os.urandom(NONCE_SIZE)


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def transcript(hello: Hello, version: int, server_name: str, server_nonce: bytes) -> bytes:
    """The bytes both MACs cover: every field of the exchange, length-prefixed."""
    parts = (
        hello.nonce, server_nonce, hello.name.encode(), server_name.encode(), hello.role.encode(),
        b"%d-%d" % (hello.min_version, hello.max_version), b"%d" % version,
    )  # fmt: skip
    return b"".join(_field(p) for p in parts)


def compute_mac(key: bytes, label: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``label`` + ``data`` under the cluster key."""
    return hmac.new(key, _field(label) + data, hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"cluster key must be at least {MIN_KEY_SIZE} bytes")
    return key


def error_response(exc: ProtocolError, request_id: int = 0) -> ErrorResponse:
    """The ``ErrorResponse`` telling the peer why we give up (id 0: connection-level)."""
    return ErrorResponse(request_id, exc.code, exc.message)


def _peer_error(msg: ErrorResponse) -> RemoteProtocolError:
    return RemoteProtocolError(f"peer refused: {msg.message}", msg.code)


class _Handshake:
    """Shared bookkeeping: state, the unexpected-message error, failure marking."""

    role = "handshake"

    def __init__(self, key: bytes, name: str, nonce: bytes | None) -> None:
        self._key = _check_key(key)
        self.name = name
        self.nonce = nonce if nonce is not None else new_nonce()
        self.state = HandshakeState.START
        self.version: int | None = None
        self.peer_name: str | None = None

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    def _unexpected(self, msg: Message) -> RemoteProtocolError:
        state, self.state = self.state, HandshakeState.FAILED
        if isinstance(msg, ErrorResponse):
            return _peer_error(msg)
        return RemoteProtocolError(f"{self.role} handshake in state {state.name}: unexpected {type(msg).__name__}")

    def _fail(self, message: str, code: str = ErrorCode.AUTH_FAILED) -> RemoteProtocolError:
        self.state = HandshakeState.FAILED
        return RemoteProtocolError(message, code)


class ClientHandshake(_Handshake):
    """The connecting side: ``hello()``, then ``receive(reply) -> Auth``, then ``receive(AuthOk)``."""

    role = "client"

    def __init__(
        self,
        key: bytes,
        name: str,
        role: str,
        versions: tuple[int, int] = (MIN_VERSION, CURRENT_VERSION),
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(key, name, nonce)
        self._hello = Hello(versions[0], versions[1], name, role, self.nonce)

    def hello(self) -> Hello:
        """The first message to send."""
        if self.state is not HandshakeState.START:
            raise LocalProtocolError(f"client handshake in state {self.state.name}: Hello already sent")
        self.state = HandshakeState.HELLO_SENT
        return self._hello

    def receive(self, msg: Message) -> Message | None:
        """Feed the server's message; returns what to send next (``Auth``) or None when done."""
        if self.state is HandshakeState.HELLO_SENT and isinstance(msg, HelloReply):
            return self._on_reply(msg)
        if self.state is HandshakeState.AUTH_SENT and isinstance(msg, AuthOk):
            self.state = HandshakeState.DONE
            return None
        raise self._unexpected(msg)

    def _on_reply(self, reply: HelloReply) -> Auth:
        hello = self._hello
        if not hello.min_version <= reply.version <= hello.max_version:
            raise self._fail(f"server chose version {reply.version} outside our range", ErrorCode.UNSUPPORTED_VERSION)
        data = transcript(hello, reply.version, reply.name, reply.nonce)
        if not hmac.compare_digest(reply.mac, compute_mac(self._key, _SERVER_LABEL, data)):
            raise self._fail(f"server {reply.name!r} failed authentication (wrong cluster key or replay)")
        self.version, self.peer_name = reply.version, reply.name
        self.state = HandshakeState.AUTH_SENT
        return Auth(compute_mac(self._key, _CLIENT_LABEL, data))


class ServerHandshake(_Handshake):
    """The accepting side: ``receive(Hello) -> HelloReply``, then ``receive(Auth) -> AuthOk``."""

    role = "server"

    def __init__(
        self,
        key: bytes,
        name: str,
        versions: Collection[int] = SUPPORTED_VERSIONS,
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(key, name, nonce)
        self.versions = frozenset(versions)
        self.peer_role: str | None = None
        self._transcript = b""

    def receive(self, msg: Message) -> Message:
        """Feed the client's message; returns the reply to send (``HelloReply`` or ``AuthOk``)."""
        if self.state is HandshakeState.START and isinstance(msg, Hello):
            return self._on_hello(msg)
        if self.state is HandshakeState.REPLY_SENT and isinstance(msg, Auth):
            return self._on_auth(msg)
        raise self._unexpected(msg)

    def _on_hello(self, hello: Hello) -> HelloReply:
        common = self.versions & set(range(hello.min_version, hello.max_version + 1))
        if not common:
            raise self._fail(
                f"no common protocol version: peer {hello.min_version}..{hello.max_version}, "
                f"we {sorted(self.versions)}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        self.version, self.peer_name, self.peer_role = max(common), hello.name, hello.role
        self._transcript = transcript(hello, self.version, self.name, self.nonce)
        self.state = HandshakeState.REPLY_SENT
        return HelloReply(self.version, self.name, self.nonce, compute_mac(self._key, _SERVER_LABEL, self._transcript))

    def _on_auth(self, auth: Auth) -> AuthOk:
        if not hmac.compare_digest(auth.mac, compute_mac(self._key, _CLIENT_LABEL, self._transcript)):
            raise self._fail(f"client {self.peer_name!r} failed authentication (wrong cluster key or replay)")
        self.state = HandshakeState.DONE
        return AuthOk()
