"""What can be known about a TLS directory before any peer connects: its checks and its expiry.

This module owns the checks `ferry-agent --check-config` runs on a `--tls-dir` (agent/tls.py) and the
expiry figures behind the agent's warning and its ferry_tls_expiry_seconds gauge:

* `file_problems`: the files are there and parse, the key is the certificate's, the certificate is
  signed by the CA, and an optional crl.pem is a revocation list signed by that CA. The agent
  refuses to start on any of these (agent/config.py), as a peer would refuse the certificate anyway;
* `usage_problems`: the certificate and the CA are valid now (not expired, not yet valid), the
  certificate is not on the directory's own revocation list, and its subjectAltNames cover each
  address peers dial (control and migration). A wildcard listen address (0.0.0.0, ::) names no
  host, so it cannot be checked here: issue the certificate for the addresses peers use.
* `expiries` / `expiry_warnings`: when the certificate and the CA end, and the warnings due within
  `EXPIRY_WARNING` of that.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent.config import ConfigError
from agent.tls import CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE, TLS_FILES

EXPIRY_WARNING = datetime.timedelta(days=30)
WILDCARDS = ("", "0.0.0.0", "::")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _read(directory: Path) -> tuple[x509.Certificate, x509.Certificate, list[str]]:
    """The CA and the certificate, parsed; ConfigError names the first file that does not parse."""
    certs: list[x509.Certificate] = []
    for name in (CA_FILE, CERT_FILE):
        try:
            certs.append(x509.load_pem_x509_certificate((directory / name).read_bytes()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"tls-dir: {directory / name} is not a PEM certificate ({e})") from e
    return certs[0], certs[1], []


def file_problems(directory: str | Path) -> list[str]:
    """Missing or unparseable files, a key of another certificate, a certificate of another CA."""
    d = Path(directory)
    if not d.is_dir():
        return [f"tls-dir: {str(d)!r} is not a directory"]
    missing = [name for name in TLS_FILES if not (d / name).is_file()]
    if missing:
        return [f"tls-dir: {str(d)!r} lacks {', '.join(missing)} (expected {', '.join(TLS_FILES)}; "
                "make them with `ferry certs issue`)"]
    try:
        ca, cert, problems = _read(d)
    except ConfigError as e:
        return e.problems
    try:
        key = serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        problems.append(f"tls-dir: {d / KEY_FILE} is not an unencrypted PEM private key ({e})")
    else:
        if key.public_key() != cert.public_key():
            problems.append(f"tls-dir: {d / KEY_FILE} is not the key of {d / CERT_FILE}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        problems.append(f"tls-dir: {d / CERT_FILE} ({cert.subject.rfc4514_string()}) is not signed by the CA "
                        f"in {d / CA_FILE} ({ca.subject.rfc4514_string()})")
    problems += _crl_problems(d, ca)
    return problems


def _crl(directory: Path) -> x509.CertificateRevocationList | None:
    path = directory / CRL_FILE
    return x509.load_pem_x509_crl(path.read_bytes()) if path.exists() else None


def _crl_problems(directory: Path, ca: x509.Certificate) -> list[str]:
    path = directory / CRL_FILE
    try:
        crl = _crl(directory)
    except (OSError, ValueError) as e:
        return [f"tls-dir: {path} is not a PEM revocation list ({e})"]
    if crl is None:
        return []
    try:  # a CA key that cannot sign (X25519, X448) counts as a bad signature
        signed = crl.issuer == ca.subject and crl.is_signature_valid(cast(Any, ca.public_key()))
    except TypeError:
        signed = False
    if not signed:
        return [f"tls-dir: {path} is not signed by the CA in {directory / CA_FILE}"]
    if crl.next_update_utc is not None and crl.next_update_utc < _now():
        return [f"tls-dir: {path} expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC (every peer would be "
                "refused); make a new one with `ferry certs revoke`"]
    return []


def _validity_problem(what: str, cert: x509.Certificate, now: datetime.datetime) -> list[str]:
    if now > cert.not_valid_after_utc:
        return [f"tls-dir: {what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    if now < cert.not_valid_before_utc:
        return [f"tls-dir: {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                "(check this host's clock)"]
    return []


def _names(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _covers(names: list[x509.GeneralName], host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        wanted = host.lower().rstrip(".")
        for n in names:
            if isinstance(n, x509.DNSName):
                pattern = n.value.lower().rstrip(".")
                if pattern == wanted or (pattern.startswith("*.") and "." in wanted
                                         and wanted.split(".", 1)[1] == pattern[2:]):
                    return True
        return False
    return any(isinstance(n, x509.IPAddress) and n.value == ip for n in names)


def usage_problems(directory: str | Path, addresses: Sequence[tuple[str, str]]) -> list[str]:
    """Validity now, revocation, and the SANs against ``addresses`` ((key, host) pairs)."""
    d = Path(directory)
    try:
        ca, cert, problems = _read(d)
    except ConfigError as e:
        return e.problems
    now = _now()
    problems += _validity_problem(f"{d / CERT_FILE}", cert, now)
    problems += _validity_problem(f"the CA {d / CA_FILE}", ca, now)
    try:
        crl = _crl(d)
    except (OSError, ValueError):
        crl = None  # file_problems says why
    if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        problems.append(f"tls-dir: {d / CERT_FILE} (serial {cert.serial_number:#x}) is on the revocation list "
                        f"{d / CRL_FILE}: peers refuse it")
    names = _names(cert)
    shown = ", ".join(str(n.value) for n in names) or "none"
    for key, host in addresses:
        if host not in WILDCARDS and not _covers(names, host):
            problems.append(f"tls-dir: {d / CERT_FILE} does not name the {key} address {host} (its names: "
                            f"{shown}); reissue it with `ferry certs issue ... --ip`/`--dns`")
    return problems


def expiries(directory: str | Path) -> dict[str, datetime.datetime]:
    """When the certificate ("cert") and the CA ("ca") of ``directory`` stop being valid."""
    ca, cert, _ = _read(Path(directory))
    return {"cert": cert.not_valid_after_utc, "ca": ca.not_valid_after_utc}


def expiry_warnings(ends: dict[str, datetime.datetime], now: datetime.datetime | None = None) -> list[str]:
    """A sentence for each of ``ends`` that is over or within EXPIRY_WARNING."""
    now = now or _now()
    what = {"cert": "the agent's certificate", "ca": "the CA certificate"}
    out = []
    for which, end in ends.items():
        left = end - now
        if left <= datetime.timedelta(0):
            out.append(f"{what.get(which, which)} expired on {end:%Y-%m-%d %H:%M} UTC")
        elif left <= EXPIRY_WARNING:
            out.append(f"{what.get(which, which)} expires on {end:%Y-%m-%d %H:%M} UTC, in {left.days} days "
                       f"{left.seconds // 3600} hours")
    return out
