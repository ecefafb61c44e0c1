"""The handshake: version negotiation and mutual challenge-response authentication."""

from __future__ import annotations

import pytest

import proto
from proto.messages import Message

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def wire(msg: Message) -> Message:
    """Send a message through real framing, as a connection would."""
    dec = proto.Decoder()
    dec.receive_data(proto.encode(msg))
    out = dec.next_event()
    assert isinstance(out, Message)
    return out


def run(client: proto.ClientHandshake, server: proto.ServerHandshake) -> tuple[Message, Message, Message, Message]:
    hello = wire(client.hello())
    reply = wire(server.receive(hello))
    auth = client.receive(reply)
    assert auth is not None
    ok = wire(server.receive(wire(auth)))
    assert client.receive(ok) is None
    return hello, reply, auth, ok


def test_successful_handshake_both_sides_agree() -> None:
    client = proto.ClientHandshake(KEY, "src-agent", "migration")
    server = proto.ServerHandshake(KEY, "dst-agent")
    run(client, server)
    assert client.done and server.done
    assert client.version == server.version == proto.CURRENT_VERSION
    assert client.peer_name == "dst-agent" and server.peer_name == "src-agent"
    assert server.peer_role == "migration"


def test_key_never_crosses_the_wire() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli")
    server = proto.ServerHandshake(KEY, "b")
    frames = b"".join(proto.encode(m) for m in run(client, server))
    assert KEY not in frames and KEY[:16] not in frames


def test_wrong_key_fails_on_client_and_server() -> None:
    # Server with the wrong key: the client refuses the server's MAC.
    client = proto.ClientHandshake(KEY, "a", "cli")
    server = proto.ServerHandshake(OTHER_KEY, "b")
    reply = server.receive(client.hello())
    with pytest.raises(proto.RemoteProtocolError) as info:
        client.receive(reply)
    assert info.value.code == "auth-failed" and client.state is proto.HandshakeState.FAILED
    # Client with the wrong key, talking to a server that trusts its own key only: server refuses.
    good_server = proto.ServerHandshake(KEY, "b")
    bad_client = proto.ClientHandshake(OTHER_KEY, "a", "cli")
    reply = good_server.receive(bad_client.hello())
    forged = proto.Auth(proto.auth.compute_mac(OTHER_KEY, b"ferry-client-mac", b"guess"))
    with pytest.raises(proto.RemoteProtocolError) as info:
        good_server.receive(forged)
    assert info.value.code == "auth-failed" and not good_server.done


def test_client_learns_server_refusal_as_auth_failed() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli")
    server = proto.ServerHandshake(KEY, "b")
    reply = server.receive(client.hello())
    client.receive(reply)
    with pytest.raises(proto.RemoteProtocolError) as refused:
        server.receive(proto.Auth(b"\x00" * 32))
    refusal = wire(proto.error_response(refused.value))
    assert isinstance(refusal, proto.ErrorResponse) and refusal.id == 0
    with pytest.raises(proto.RemoteProtocolError) as info:
        client.receive(refusal)
    assert info.value.code == "auth-failed"


def test_replayed_client_auth_fails_against_a_fresh_server_nonce() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli")
    hello, _, auth, _ = run(client, proto.ServerHandshake(KEY, "b"))
    # An eavesdropper replays the recorded Hello and Auth to the same server later.
    replay_server = proto.ServerHandshake(KEY, "b")
    replay_server.receive(hello)
    with pytest.raises(proto.RemoteProtocolError) as info:
        replay_server.receive(auth)
    assert info.value.code == "auth-failed"


def test_replayed_server_reply_fails_against_a_fresh_client_nonce() -> None:
    _, reply, _, _ = run(proto.ClientHandshake(KEY, "a", "cli"), proto.ServerHandshake(KEY, "b"))
    fresh = proto.ClientHandshake(KEY, "a", "cli")
    fresh.hello()
    with pytest.raises(proto.RemoteProtocolError, match="failed authentication"):
        fresh.receive(reply)


def test_same_nonces_give_the_same_exchange_and_fresh_nonces_differ() -> None:
    n1, n2 = b"1" * 32, b"2" * 32
    a = run(proto.ClientHandshake(KEY, "a", "cli", nonce=n1), proto.ServerHandshake(KEY, "b", nonce=n2))
    b = run(proto.ClientHandshake(KEY, "a", "cli", nonce=n1), proto.ServerHandshake(KEY, "b", nonce=n2))
    c = run(proto.ClientHandshake(KEY, "a", "cli"), proto.ServerHandshake(KEY, "b"))
    assert a == b
    assert a[1] != c[1] and a[2] != c[2]


def test_reflected_server_mac_is_not_a_client_mac() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli")
    server = proto.ServerHandshake(KEY, "b")
    reply = server.receive(client.hello())
    assert isinstance(reply, proto.HelloReply)
    with pytest.raises(proto.RemoteProtocolError, match="failed authentication"):
        server.receive(proto.Auth(reply.mac))


def test_tampered_hello_detected_by_client() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli", versions=(1, 1))
    hello = client.hello()
    assert isinstance(hello, proto.Hello)
    server = proto.ServerHandshake(KEY, "b")
    tampered = proto.Hello(hello.min_version, hello.max_version, "mallory", hello.role, hello.nonce)
    with pytest.raises(proto.RemoteProtocolError, match="failed authentication"):
        client.receive(server.receive(tampered))


def test_version_negotiation_picks_highest_common() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli", versions=(1, 3))
    server = proto.ServerHandshake(KEY, "b", versions={1, 2})
    run(client, server)
    assert client.version == server.version == 2


def test_no_common_version() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli", versions=(3, 4))
    server = proto.ServerHandshake(KEY, "b", versions={1, 2})
    with pytest.raises(proto.RemoteProtocolError) as info:
        server.receive(client.hello())
    assert info.value.code == "unsupported-version"


def test_client_refuses_version_outside_its_range() -> None:
    client = proto.ClientHandshake(KEY, "a", "cli", versions=(1, 1))
    hello = client.hello()
    assert isinstance(hello, proto.Hello)
    lying = proto.ServerHandshake(KEY, "b", versions={1, 2})
    reply = lying.receive(proto.Hello(1, 2, hello.name, hello.role, hello.nonce))
    with pytest.raises(proto.RemoteProtocolError) as info:
        client.receive(reply)
    assert info.value.code == "unsupported-version"


def test_out_of_order_messages() -> None:
    server = proto.ServerHandshake(KEY, "b")
    with pytest.raises(proto.RemoteProtocolError, match="server handshake in state START: unexpected Auth"):
        server.receive(proto.Auth(b"x" * 32))
    client = proto.ClientHandshake(KEY, "a", "cli")
    with pytest.raises(proto.RemoteProtocolError, match="client handshake in state START: unexpected AuthOk"):
        client.receive(proto.AuthOk())
    client2 = proto.ClientHandshake(KEY, "a", "cli")
    client2.hello()
    with pytest.raises(proto.LocalProtocolError):
        client2.hello()


def test_short_key_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        proto.ServerHandshake(b"short", "b")
