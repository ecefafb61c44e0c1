"""Socket buffers of the migration data path sized for the path's round trip (transport.connect
for the sender's send buffer, transport.accepted for the receiver's receive buffer)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from agent.migration import transport

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the FORCE socket options need CAP_NET_ADMIN"),
    pytest.mark.skipif(transport._sysctl_max("ipv4/tcp_rmem") >= 2 * transport.RECV_BUFFER
                       or transport._sysctl_max("ipv4/tcp_wmem") >= 2 * transport.SEND_BUFFER,
                       reason="autotuning here reaches the sized buffers: nothing to set"),
]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        yield lsock


def pair(lsock: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = transport.connect(lsock.getsockname()[:2])
    server, _ = lsock.accept()
    return client, transport.accepted(server)


def buffers(sock: socket.socket) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def test_the_kernel_measures_the_handshake_round_trip(listener: socket.socket) -> None:
    client, server = pair(listener)
    with client, server:
        for sock in (client, server):
            rtt = transport.handshake_rtt(sock)
            assert rtt is not None and rtt >= 0  # no upper bound: a loaded host may stall the handshake


def test_a_short_path_keeps_autotuning(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_connection(listener.getsockname()[:2]) as plain:
        default_snd, default_rcv = buffers(plain)
        listener.accept()[0].close()
    # A LAN's round trip (fixed: a loaded host can stretch loopback's past what autotuning covers).
    monkeypatch.setattr(transport, "handshake_rtt", lambda sock: 0.0002)
    client, server = pair(listener)
    with client, server:
        assert buffers(client)[0] == default_snd  # nothing set
        assert buffers(server)[1] == default_rcv


@pytest.mark.parametrize("rtt", [0.05, None])
def test_a_long_path_gets_buffers_for_its_round_trip(listener: socket.socket, monkeypatch: pytest.MonkeyPatch,
                                                     rtt: float | None) -> None:
    monkeypatch.setattr(transport, "handshake_rtt", lambda sock: rtt)
    client, server = pair(listener)
    with client, server:
        # round trip x PATH_RATE up to each cap (an unknown round trip: the cap); the kernel
        # reports twice what was asked.
        need = transport.PATH_RATE if rtt is None else int(rtt * transport.PATH_RATE)
        assert buffers(client)[0] == 2 * min(need, transport.SEND_BUFFER)
        assert buffers(server)[1] == 2 * min(need, transport.RECV_BUFFER)
        assert buffers(server)[1] > transport._sysctl_max("ipv4/tcp_rmem")  # past what autotuning reaches
        client.sendall(b"x" * 100_000)  # and it still moves data
        got = 0
        while got < 100_000:
            got += len(server.recv(65536))


def test_a_medium_path_gets_what_it_needs(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "handshake_rtt", lambda sock: 0.040)
    monkeypatch.setattr(transport, "RECV_BUFFER", 1 << 30)
    client, server = pair(listener)
    with client, server:
        want = int(0.040 * transport.PATH_RATE)
        assert buffers(server)[1] == 2 * want


def test_zero_turns_sizing_off(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_connection(listener.getsockname()[:2]) as plain:
        default_rcv = buffers(plain)[1]
        listener.accept()[0].close()
    monkeypatch.setattr(transport, "handshake_rtt", lambda sock: 0.05)
    monkeypatch.setattr(transport, "RECV_BUFFER", 0)
    client, server = pair(listener)
    with client, server:
        assert buffers(server)[1] == default_rcv
