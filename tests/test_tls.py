"""Mutual TLS (--tls-dir): `ferry certs`, the contexts, the TLS data path, and real agents over TLS.

What must hold: certificates from `ferry certs` make working mutual TLS; two TLS agents migrate a
`verify` guest that ends with the digest of an unmigrated run, and the CLI works over TLS; a peer
whose certificate comes from another CA is refused whichever side it is on; a client without a
certificate is refused; a plaintext client gets a clean failure and the agent carries on; and the
cluster key is still required inside TLS.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import certs, tls
from agent.client import ClientError, call_sync
from agent.config import ConfigError, describe, load_config
from agent.migration.common import client_handshake
from agent.migration.tls import TLSConnection, client_connection
from agent.migration.transport import Connection, ConnectionClosed
from proto.auth import ClientHandshake
from proto.codec import encode
from proto.errors import ErrorCode, ProtocolError
from proto.messages import PageBatch
from tests.agents import (
    AgentProc,
    digest_line,
    make_key,
    run_cli_in_process,
    wait_for,
)
from tests.tlsagents import TLSAgent, start_tls_agent, tls_pair

pytestmark = pytest.mark.timeout(120)

VERIFY_ARGS = {"ws": "4M", "steps": "4000000"}  # a few seconds of guest time: the migration lands mid-run
PAGE = 4096


# -- certificates -----------------------------------------------------------------------------------
def _issue(ca: Path, out: Path, host: str = "127.0.0.1", *ips: str) -> Path:
    certs.issue(host, ca_dir=ca, out=out, ips=ips)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cluster CA with TLS dirs for agents A, B and an operator; a rogue CA with its own."""
    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root / "ca")
    certs.init_ca(root / "rogue-ca", name="someone else's CA")
    dirs = {name: _issue(root / "ca", root / name, name, "127.0.0.1") for name in ("A", "B", "cli")}
    dirs["rogue"] = _issue(root / "rogue-ca", root / "rogue", "C", "127.0.0.1")
    # Trusts the cluster CA but presents a certificate of the rogue CA: refused as a client.
    mixed = root / "mixed"
    mixed.mkdir()
    for name in ("cert.pem", "key.pem"):
        (mixed / name).write_bytes((dirs["rogue"] / name).read_bytes())
    (mixed / "ca.pem").write_bytes((root / "ca" / "ca.pem").read_bytes())
    dirs["mixed"] = mixed
    dirs["ca"] = root / "ca"
    return dirs


def test_certs_commands_write_a_ca_and_host_certificates(tmp_path: Path) -> None:
    ca, out = tmp_path / "ca", tmp_path / "hostA"
    assert run_cli_in_process("certs", "init", "--dir", str(ca)).returncode == 0
    result = run_cli_in_process("certs", "issue", "hostA", "--ip", "127.0.0.1", "--ip", "::1", "--dns",
                                "a.example", "--ca-dir", str(ca), "--out", str(out))
    assert "127.0.0.1" in result.stdout
    assert sorted(p.name for p in ca.iterdir()) == ["ca-key.pem", "ca.pem"]
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert stat.S_IMODE(os.stat(ca / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    assert certs.subject_alt_names(out / "cert.pem") == ["hostA", "127.0.0.1", "::1", "a.example"]
    assert (out / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
    # Nothing is overwritten by accident: the refusal names the file and says how.
    again = run_cli_in_process("certs", "init", "--dir", str(ca), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    bad = run_cli_in_process("certs", "issue", "h", "--ip", "not-an-ip", "--ca-dir", str(ca),
                             "--out", str(tmp_path / "h"), check=False)
    assert bad.returncode == 1 and "not an IP address" in bad.stderr


def _handshake(server_dir: Path, client_dir: Path | None, host: str = "127.0.0.1") -> bytes:
    """One TLS exchange on loopback: the server echoes what the client sends. Raises the client's error."""
    server_ctx = tls.load(server_dir).server
    client_ctx = tls.load(client_dir).client if client_dir else _certless_client(server_dir)
    lsock = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = lsock.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(s.recv(16))
        except (ssl.SSLError, OSError) as e:
            errors.append(e)
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(lsock.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=host) as c:
            c.sendall(b"ping")
            return c.recv(16)
    finally:
        t.join(10)
        lsock.close()


def _certless_client(server_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(server_dir / "ca.pem"))
    return ctx


def test_issued_certificates_make_mutual_tls_and_check_the_dialled_address(pki: dict[str, Path]) -> None:
    assert _handshake(pki["A"], pki["B"]) == b"ping"
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(pki["A"], pki["B"], host="127.0.0.2")  # the certificate does not name that address


def test_a_server_of_another_ca_is_refused(pki: dict[str, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki["rogue"], pki["B"])


@pytest.mark.parametrize("client", ["mixed", None], ids=["client-of-another-ca", "client-without-certificate"])
def test_a_client_the_server_cannot_verify_is_refused(pki: dict[str, Path], client: str | None) -> None:
    # TLS 1.3: the client's side of the handshake completes; the server's refusal ends the exchange.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(pki["A"], pki[client] if client else None)


def test_a_tls_dir_must_hold_all_three_files_and_a_matching_key(tmp_path: Path, pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="lacks cert.pem, key.pem"):
        tls.load(pki["ca"])  # a CA directory is not a TLS directory
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("ca.pem", "cert.pem"):
        (broken / name).write_bytes((pki["A"] / name).read_bytes())
    (broken / "key.pem").write_bytes((pki["B"] / "key.pem").read_bytes())  # someone else's key
    with pytest.raises(ConfigError, match="cannot load"):
        tls.load(broken)


def test_agent_config_takes_tls_dir(tmp_path: Path, pki: dict[str, Path]) -> None:
    key = make_key(tmp_path)
    config = load_config(["--key-file", str(key), "--state-dir", str(tmp_path), "--tls-dir", str(pki["A"])])
    assert config.tls_dir == pki["A"]
    assert f'tls-dir = "{pki["A"]}"' in describe(config)  # --check-config prints it back
    with pytest.raises(ConfigError, match="tls-dir"):
        load_config(["--key-file", str(key), "--tls-dir", str(tmp_path / "nowhere")])


# -- the data path ------------------------------------------------------------------------------------
def _tls_pair(pki: dict[str, Path]) -> tuple[TLSConnection, TLSConnection]:
    """A connected (source, destination) pair of TLSConnections over loopback TCP."""
    lsock = socket.create_server(("127.0.0.1", 0))
    out = socket.create_connection(lsock.getsockname())
    inc, _ = lsock.accept()
    lsock.close()
    server = tls.load(pki["B"]).server.wrap_socket(inc, server_side=True, do_handshake_on_connect=False)
    done = threading.Thread(target=server.do_handshake)
    done.start()
    client = tls.load(pki["A"]).client.wrap_socket(out, server_hostname="127.0.0.1")
    done.join()
    return TLSConnection(client), TLSConnection(server, guest_size=64 * PAGE * 64)


def test_tls_connection_moves_scattered_and_long_ranges_into_guest_ram(pki: dict[str, Path]) -> None:
    size = 64 * PAGE * 64
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    # Single pages (gathered before sending), a long range (sent straight), zero pages (no payload).
    ranges = [(i * 2 * PAGE, i * 2 * PAGE + PAGE) for i in range(300)] + [(size // 2, size)]
    zeros = [(300 * 2 * PAGE, 300 * 2 * PAGE + 4 * PAGE)]
    a, b = _tls_pair(pki)
    got: list[Any] = []
    receiver = threading.Thread(target=lambda: got.append(b.recv(memoryview(dst))))
    receiver.start()
    sent = a.send_pages(memoryview(src), ranges, zeros)
    receiver.join(30)
    assert isinstance(got[0], PageBatch) and got[0].zeros == tuple(zeros)
    assert b.received == sent == a.sent
    for start, end in ranges:
        assert dst[start:end] == src[start:end]
    assert dst[PAGE:2 * PAGE] == bytes(PAGE)  # a page not in the batch stays untouched
    a.close()
    b.close()


def test_tls_connection_shutdown_wakes_a_blocked_receiver(pki: dict[str, Path]) -> None:
    a, b = _tls_pair(pki)
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            b.recv(memoryview(bytearray(PAGE)))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    b.shutdown()
    t.join(10)
    assert not t.is_alive() and isinstance(errors[0], ConnectionClosed | OSError)
    a.close()
    b.close()


def test_plaintext_connection_is_still_the_plain_class() -> None:
    # The TLS path is an override chosen per connection: the plaintext data path is untouched.
    assert TLSConnection._sendmsg_all is not Connection._sendmsg_all
    assert "sendmsg" in Connection._sendmsg_all.__code__.co_names


# -- real agents ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[tuple[TLSAgent, TLSAgent]]:
    yield from tls_pair(tmp_path_factory.mktemp("tls-agents"), pki)


def test_tls_agents_migrate_a_guest_that_ends_with_the_unmigrated_digest(
        cluster: tuple[TLSAgent, TLSAgent], unmigrated_digest: Callable[[], bytes]) -> None:
    a, b = cluster
    a.cli("vm", "create", "v1", "--program", "verify", "--mem", "16M",
          *(f"--arg={k}={v}" for k, v in VERIFY_ARGS.items()))
    wait_for(lambda: a.call("vm-info", name="v1")["instructions"] > 100_000, what="verify under way")
    out = a.cli("migrate", "v1", "--to", b.control, json=True).json
    assert out["status"] == "completed", out
    assert out["ram"]["transferred"] > 0
    assert [vm["name"] for vm in b.call("vm-list")["vms"]] == ["v1"]
    wait_for(lambda: b.call("vm-info", name="v1")["state"] == "halted", timeout=100, what="verify to halt")
    console = b.cli("vm", "console", "v1").stdout.encode()
    assert digest_line(console) == unmigrated_digest()
    b.call("vm-destroy", name="v1")


def _until_closed(s: socket.socket) -> bool:
    """Read until the peer ends the connection (a close or a reset); False if it stays open 10 s."""
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_plaintext_client_gets_a_clean_failure_and_the_agent_carries_on(
        cluster: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, _ = cluster
    plain = AgentProc.cli(a, "agent", "info", check=False)  # no --tls-dir
    assert plain.returncode == 1 and "--tls-dir" in plain.stderr, plain.stderr
    # A plaintext ferry handshake at the migration listener: not TLS, dropped at once.
    with socket.create_connection(_hostport(a.migration), timeout=10) as s:
        s.sendall(encode(ClientHandshake(b"k" * 32, "plain", "migration").hello()))
        assert _until_closed(s)
    assert a.cli("agent", "info", json=True).json["name"] == "A"
    wait_for(lambda: "incoming migration connection failed" in a.log(), what="the refusal logged")


def _hostport(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("client, reason", [
    ("rogue", "certificate verify failed"),  # the agent's certificate is not of the client's CA
    ("mixed", ""),  # the client's certificate is not of the agent's CA
], ids=["agent-of-another-ca", "client-of-another-ca"])
def test_the_cli_with_certificates_of_another_ca_is_refused(
        cluster: tuple[TLSAgent, TLSAgent], pki: dict[str, Path], client: str, reason: str) -> None:
    a, _ = cluster
    result = AgentProc.cli(a, "--tls-dir", str(pki[client]), "agent", "info", check=False)
    assert result.returncode == 1 and "(auth-failed)" in result.stderr and reason in result.stderr, result.stderr
    assert a.cli("agent", "info", json=True).json["name"] == "A"


def test_a_client_without_a_certificate_is_refused(cluster: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, _ = cluster
    key = a.key_path.read_bytes().strip()
    with pytest.raises((ClientError, OSError)):
        call_sync(a.control, key, "agent-info", tls=_certless_client(pki["A"]))


def test_the_cluster_key_is_still_required_inside_tls(cluster: tuple[TLSAgent, TLSAgent], tmp_path: Path) -> None:
    a, _ = cluster
    wrong = make_key(tmp_path, "wrong.key")
    result = a.cli("agent", "info", check=False, key_path=wrong)
    assert result.returncode == 1 and "(auth-failed)" in result.stderr, result.stderr


def _migration_handshake(address: str, tls_dir: Path, key: bytes) -> str:
    """Dial a migration listener as a source would: TLS, then the cluster-key handshake."""
    host, port = _hostport(address)
    conn = client_connection(socket.create_connection((host, port), timeout=10), tls.load(tls_dir).client, host)
    try:
        return client_handshake(conn, key, "test")
    finally:
        conn.close()


def test_the_migration_listener_checks_certificates_and_the_key(
        cluster: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, _ = cluster
    key = a.key_path.read_bytes().strip()
    assert _migration_handshake(a.migration, pki["B"], key) == "A"
    # A source whose certificate is of another CA: refused (after its side of the TLS 1.3 handshake).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _migration_handshake(a.migration, pki["mixed"], key)
    # Valid certificates, wrong cluster key: refused inside TLS.
    with pytest.raises(ProtocolError) as refused:
        _migration_handshake(a.migration, pki["B"], b"another cluster key, 32 bytes..")
    assert refused.value.code == ErrorCode.AUTH_FAILED
    assert _migration_handshake(a.migration, pki["B"], key) == "A"  # and it carries on


def test_agents_with_another_ca_or_key_are_refused_both_ways(
        cluster: tuple[TLSAgent, TLSAgent], pki: dict[str, Path], tmp_path: Path) -> None:
    a, _ = cluster
    rogue = start_tls_agent(tmp_path, "C", a.key_path, pki["rogue"], pki["rogue"])
    wrong_key = start_tls_agent(tmp_path, "D", make_key(tmp_path, "other.key"), pki["B"], pki["cli"])
    try:
        a.cli("vm", "create", "c1", "--program", "counter", "--mem", "16M")
        rogue.cli("vm", "create", "c2", "--program", "counter", "--mem", "16M")
        # A refuses C's certificate when C serves, and C refuses A's in turn.
        to_rogue = a.cli("migrate", "c1", "--to", rogue.control, check=False)
        assert to_rogue.returncode == 1 and "(auth-failed)" in to_rogue.stderr, to_rogue.stderr
        from_rogue = rogue.cli("migrate", "c2", "--to", a.control, check=False)
        assert from_rogue.returncode == 1 and "(auth-failed)" in from_rogue.stderr, from_rogue.stderr
        # C's migration listener, dialled with the cluster's certificates: its certificate is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            _migration_handshake(rogue.migration, pki["B"], a.key_path.read_bytes().strip())
        # Valid certificates, another cluster key: refused inside TLS.
        to_d = a.cli("migrate", "c1", "--to", wrong_key.control, check=False)
        assert to_d.returncode == 1 and "(auth-failed)" in to_d.stderr, to_d.stderr
        # Every VM is still running where it was.
        assert a.call("vm-info", name="c1")["state"] == "running"
        assert rogue.call("vm-info", name="c2")["state"] == "running"
    finally:
        for agent, vm in ((a, "c1"), (rogue, "c2")):
            with contextlib.suppress(ClientError):
                agent.call("vm-destroy", name=vm)
        rogue.stop()
        wrong_key.stop()


@pytest.mark.slow
def test_tls_agents_migrate_by_postcopy_and_the_guest_ends_with_the_unmigrated_digest(
        cluster: tuple[TLSAgent, TLSAgent], unmigrated_digest: Callable[[], bytes]) -> None:
    """Post-copy's urgent connection (page requests and their answers) is a TLS connection too."""
    a, b = cluster
    a.cli("vm", "create", "p1", "--program", "verify", "--mem", "16M",
          *(f"--arg={k}={v}" for k, v in VERIFY_ARGS.items()))
    wait_for(lambda: a.call("vm-info", name="p1")["instructions"] > 100_000, what="verify under way")
    out = a.cli("migrate", "p1", "--to", b.control, "--postcopy", json=True).json
    assert out["status"] == "completed", out
    assert "post-copy" in out["summary"], out
    incoming = b.call("migrate-status", name="p1")
    assert incoming["status"] == "completed" and incoming["pages-unsettled"] == 0, incoming
    assert [vm["name"] for vm in a.call("vm-list")["vms"]] == []
    wait_for(lambda: b.call("vm-info", name="p1")["state"] == "halted", timeout=100, what="verify to halt")
    assert digest_line(b.cli("vm", "console", "p1").stdout.encode()) == unmigrated_digest()
    b.call("vm-destroy", name="p1")
