"""Certificates over an agent's life: SIGHUP reload, revocation (crl.pem), --check-config, expiry warnings."""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import certs, tls, tls_check
from agent.config import build_parser
from agent.daemon import check_config
from agent.metrics import AgentMetrics
from tests.agents import AgentProc, free_port, make_key, run_cli_in_process, wait_for
from tests.tlsagents import TLSAgent, start_tls_agent, tls_pair

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA with TLS dirs for agents A and B and two operators; a rogue CA with one of its own."""
    certs.init_ca(tmp_path / "ca")
    certs.init_ca(tmp_path / "rogue-ca", name="someone else's CA")
    dirs = {name: tmp_path / name for name in ("A", "B", "cli", "cli2")}
    for name, d in dirs.items():
        certs.issue(name, ca_dir=tmp_path / "ca", out=d, ips=["127.0.0.1"])
    certs.issue("R", ca_dir=tmp_path / "rogue-ca", out=tmp_path / "rogue", ips=["127.0.0.1"])
    dirs["rogue"] = tmp_path / "rogue"
    dirs["ca"] = tmp_path / "ca"
    return dirs


def _common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def _hostport(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _presented(address: str, client_dir: Path) -> str:
    """The common name of the certificate a listener presents to a new connection."""
    host, port = _hostport(address)
    with socket.create_connection((host, port), timeout=10) as raw, \
            tls.load(client_dir).client.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return str(x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)[0].value)


# -- --check-config ------------------------------------------------------------------------------------
def _check(tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str],
           migration_host: str = "127.0.0.1") -> tuple[int, str]:
    ns = build_parser().parse_args([
        "--control", f"127.0.0.1:{free_port()}", "--migration", f"{migration_host}:{free_port()}",
        "--key-file", str(make_key(tmp_path)), "--state-dir", str(tmp_path / "state"), "--tls-dir", str(tls_dir)])
    code = check_config(ns)
    return code, capsys.readouterr().err


def _trust_both(d: Path, pki: dict[str, Path]) -> None:
    """ca.pem with the cluster CA and the rogue one, as while a cluster moves to a new CA."""
    (d / "ca.pem").write_bytes((pki["ca"] / "ca.pem").read_bytes() + (pki["rogue"] / "ca.pem").read_bytes())


def _bad_dir(case: str, pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(pki["A"], d)
    if case == "missing":
        (d / "key.pem").unlink()
    elif case == "garbage":
        (d / "cert.pem").write_text("not a certificate\n")
    elif case == "other-key":
        shutil.copyfile(pki["B"] / "key.pem", d / "key.pem")
    elif case == "other-ca":
        shutil.copyfile(pki["rogue"] / "ca.pem", d / "ca.pem")
    elif case == "expired":
        certs.issue("A", ca_dir=pki["ca"], out=d, ips=["127.0.0.1"], days=0, force=True)
    elif case == "not-yet-valid":
        monkeypatch.setattr(certs, "BACKDATE", -datetime.timedelta(days=1))
        certs.issue("A", ca_dir=pki["ca"], out=d, ips=["127.0.0.1"], days=30, force=True)
    elif case == "address":
        certs.issue("A", ca_dir=pki["ca"], out=d, ips=["127.0.0.3"], force=True)
    elif case == "revoked":
        certs.revoke([d / "cert.pem"], ca_dir=pki["ca"], out=[d])
    elif case == "foreign-crl":
        certs.revoke([pki["rogue"] / "cert.pem"], ca_dir=pki["rogue"].parent / "rogue-ca", out=[d])
    elif case == "crl-lacks-a-ca":  # two CAs trusted, a list of one only: the other's peers would be refused
        _trust_both(d, pki)
        certs.revoke([pki["B"] / "cert.pem"], ca_dir=pki["ca"], out=[d])
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "lacks key.pem"),
    ("garbage", "cert.pem is not a PEM certificate"),
    ("other-key", "key.pem is not the key of"),
    ("other-ca", "is not signed by the CA"),
    ("expired", "cert.pem expired on"),
    ("not-yet-valid", "is not valid before"),
    ("address", "does not name the control address 127.0.0.1"),
    ("revoked", "is on the revocation list"),
    ("foreign-crl", "is not signed by a CA in"),
    ("crl-lacks-a-ca", "holds no list of the CA CN=someone else's CA"),
])
def test_check_config_catches_each_bad_tls_dir(pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, case: str, message: str) -> None:
    d = _bad_dir(case, pki, tmp_path, monkeypatch)
    code, err = _check(tmp_path, d, capsys)
    assert code == 2 and message in err, err


def test_check_config_accepts_a_good_tls_dir_and_checks_the_migration_address(
        pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs.revoke([pki["B"] / "cert.pem"], ca_dir=pki["ca"], out=[pki["A"]])  # a list without A on it
    code, err = _check(tmp_path, pki["A"], capsys)
    assert code == 0, err
    # Two CAs trusted, with a list of each: valid.
    _trust_both(pki["A"], pki)
    certs.revoke([pki["rogue"] / "cert.pem"], ca_dir=pki["rogue"].parent / "rogue-ca")
    (pki["A"] / "crl.pem").write_bytes((pki["ca"] / "crl.pem").read_bytes()
                                       + (pki["rogue"].parent / "rogue-ca" / "crl.pem").read_bytes())
    code, err = _check(tmp_path, pki["A"], capsys)
    assert code == 0, err
    code, err = _check(tmp_path, pki["A"], capsys, migration_host="127.0.0.2")
    assert code == 2 and "does not name the migration address 127.0.0.2" in err, err


# -- ferry certs revoke --------------------------------------------------------------------------------
def test_certs_revoke_makes_then_extends_the_list_and_copies_it(pki: dict[str, Path]) -> None:
    serial = x509.load_pem_x509_certificate((pki["cli"] / "cert.pem").read_bytes()).serial_number
    r = run_cli_in_process("certs", "revoke", str(pki["cli"] / "cert.pem"), "--ca-dir", str(pki["ca"]),
                           "--out", str(pki["A"]), "--out", str(pki["B"]))
    assert "1 revoked certificate" in r.stdout
    r = run_cli_in_process("certs", "revoke", "--serial", "0x1234", "--ca-dir", str(pki["ca"]), "--out", str(pki["A"]))
    assert "2 revoked certificates" in r.stdout
    crl = x509.load_pem_x509_crl((pki["A"] / "crl.pem").read_bytes())
    assert sorted(e.serial_number for e in crl) == sorted([serial, 0x1234])
    assert (pki["A"] / "crl.pem").read_bytes() == (pki["ca"] / "crl.pem").read_bytes()
    assert x509.load_pem_x509_crl((pki["B"] / "crl.pem").read_bytes()).get_revoked_certificate_by_serial_number(
        serial) is not None
    refused = run_cli_in_process("certs", "revoke", str(pki["rogue"] / "cert.pem"), "--ca-dir", str(pki["ca"]),
                                 check=False)
    assert refused.returncode == 1 and "not issued by this CA" in refused.stderr


class _NoVMs:
    max_mem = 1 << 30

    def list(self) -> list[Any]:
        return []

    def free_memory(self) -> int:
        return self.max_mem


# -- expiry --------------------------------------------------------------------------------------------
def test_expiry_gauge_and_warnings_from_the_certificate_dates(pki: dict[str, Path]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ends = {"cert": now + datetime.timedelta(days=10), "ca": now + datetime.timedelta(days=3650)}
    text = AgentMetrics(agent_name="A", version="0", vms=_NoVMs(), migrations=None, tls_expiries=lambda: ends).collect()
    [cert_line] = [line for line in text.splitlines() if line.startswith('ferry_tls_expiry_seconds{cert="cert"}')]
    assert abs(float(cert_line.split()[-1]) - 10 * 86400) < 60
    assert "# TYPE ferry_tls_expiry_seconds gauge" in text
    [warning] = tls_check.expiry_warnings(ends, now)
    assert "the agent's certificate expires on" in warning and "in 10 days 0 hours" in warning
    assert tls_check.expiry_warnings({"ca": now - datetime.timedelta(days=1)}, now)[0].startswith(
        "the CA certificate expired on")
    assert tls_check.expiries(pki["A"])["cert"] - now > datetime.timedelta(days=800)


@pytest.fixture
def pair(tmp_path: Path, pki: dict[str, Path]) -> Iterator[tuple[TLSAgent, TLSAgent]]:
    yield from tls_pair(tmp_path, pki)


def test_an_agent_near_expiry_warns_in_its_log_and_metrics(pki: dict[str, Path], tmp_path: Path) -> None:
    certs.issue("A", ca_dir=pki["ca"], out=pki["A"], ips=["127.0.0.1"], days=10, force=True)
    metrics = f"127.0.0.1:{free_port()}"
    agent = start_tls_agent(tmp_path, "A", make_key(tmp_path), pki["A"], pki["cli"], metrics=metrics)
    try:
        wait_for(lambda: "the agent's certificate expires on" in agent.log(), what="the expiry warning")
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        gauges = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
                  for line in text.splitlines() if line.startswith("ferry_tls_expiry_seconds{")}
        assert abs(gauges['cert="cert"'] - 10 * 86400) < 120, gauges
        assert gauges['cert="ca"'] > 3000 * 86400, gauges
        # A certificate with years left, loaded on SIGHUP: the gauge follows it.
        certs.issue("A", ca_dir=pki["ca"], out=pki["A"], ips=["127.0.0.1"], force=True)
        agent.reload()
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
            assert 'ferry_tls_expiry_seconds{cert="cert"} 7' in resp.read().decode()  # 825 days: 7.1e7 s
    finally:
        agent.stop()


# -- reload, rotation and revocation on running agents -------------------------------------------------
def test_certificates_rotate_under_a_running_migration(pair: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, b = pair
    a.cli("vm", "create", "v1", "--program", "memstress", "--mem", "32M", "--arg", "ws=16M")
    wait_for(lambda: a.call("vm-info", name="v1")["instructions"] > 1_000_000, what="memstress warm-up")
    # 8 MB/s for a 16M working set: seconds of migration, during which both agents reload (a downtime
    # bound that lets it end after a round or two).
    a.cli("migrate", "v1", "--to", b.control, "--bandwidth", "8M", "--compress", "none", "--max-downtime", "5000",
          "--detach")
    wait_for(lambda: a.call("migrate-status", name="v1")["ram"]["transferred"] > 2 << 20, timeout=30,
             what="the migration under way")
    # New certificates from the same CA, under new names, for both agents; then SIGHUP both.
    for name in ("A", "B"):
        certs.issue(f"{name}2", ca_dir=pki["ca"], out=pki[name], ips=["127.0.0.1"], force=True)
    a.reload()
    b.reload()
    assert '"tls reloaded"' in a.log() and '"tls reloaded"' in b.log()
    assert a.call("migrate-status", name="v1")["status"] not in ("completed", "failed", "cancelled")
    done = wait_for(lambda: (s := a.call("migrate-status", name="v1"))["status"] in ("completed", "failed") and s,
                    timeout=60, what="the migration to end")
    assert done["status"] == "completed", done
    assert b.call("vm-info", name="v1")["state"] == "running"
    # New connections get the new certificates, and a new migration runs on them.
    for address in (a.control, a.migration):
        assert _presented(address, pki["cli"]) == "A2"
    assert _presented(b.migration, pki["cli"]) == "B2"
    back = b.cli("migrate", "v1", "--to", a.control, json=True).json
    assert back["status"] == "completed", back
    assert a.call("vm-info", name="v1")["state"] == "running"


def test_a_revoked_operator_certificate_is_refused_and_a_bad_reload_changes_nothing(
        pair: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, _ = pair
    certs.revoke([pki["cli"] / "cert.pem"], ca_dir=pki["ca"], out=[pki["A"]])
    a.reload()
    refused = a.cli("agent", "info", check=False)
    assert refused.returncode == 1 and "(auth-failed)" in refused.stderr, refused.stderr
    a.client_dir = pki["cli2"]  # another operator's certificate: still accepted
    assert a.cli("agent", "info", json=True).json["name"] == "A"
    # Files that do not load: the agent says why and keeps the certificates (and the list) in use.
    (pki["A"] / "crl.pem").write_text("not a revocation list\n")
    (pki["A"] / "cert.pem").write_bytes((pki["B"] / "cert.pem").read_bytes())
    a.reload(count=2)
    assert '"tls reload failed' in a.log() and "crl.pem is not a PEM revocation list" in a.log()
    assert _presented(a.control, pki["cli2"]) == "A"
    assert a.cli("agent", "info", json=True).json["name"] == "A"
    assert AgentProc.cli(a, "--tls-dir", str(pki["cli"]), "agent", "info", check=False).returncode == 1


def test_a_revoked_peer_agent_is_refused_both_ways(pair: tuple[TLSAgent, TLSAgent], pki: dict[str, Path]) -> None:
    a, b = pair
    certs.revoke([pki["B"] / "cert.pem"], ca_dir=pki["ca"], out=[pki["A"]])
    a.reload()
    a.cli("vm", "create", "c1", "--program", "counter", "--mem", "16M")
    b.cli("vm", "create", "c2", "--program", "counter", "--mem", "16M")
    # A dials B (control, then migration): B's certificate is on A's list.
    to_b = a.cli("migrate", "c1", "--to", b.control, check=False)
    assert to_b.returncode == 1 and "(auth-failed)" in to_b.stderr and "revoked" in to_b.stderr, to_b.stderr
    # B dials A: A refuses B's client certificate.
    to_a = b.cli("migrate", "c2", "--to", a.control, check=False)
    assert to_a.returncode == 1 and "(auth-failed)" in to_a.stderr, to_a.stderr
    with pytest.raises((ssl.SSLError, ConnectionError)):
        host, port = _hostport(a.migration)
        with socket.create_connection((host, port), timeout=10) as raw, \
                tls.load(pki["B"]).client.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(b"x")
            assert s.recv(1) != b""  # TLS 1.3: the refusal arrives on the first read
    assert a.call("vm-info", name="c1")["state"] == "running"
    assert b.call("vm-info", name="c2")["state"] == "running"
