"""What can be known about a TLS directory before any peer connects: its checks and its expiry.

This module owns the checks `ferry-agent --check-config` runs on a `--tls-dir` (agent/tls.py) and the
expiry figures behind the agent's warning and its ferry_tls_expiry_seconds gauge:

* `file_problems`: the files are there and parse, the key is the certificate's, the certificate is
  signed by a CA of ca.pem, and an optional crl.pem holds a revocation list signed by each CA of
  ca.pem (ca.pem holds two CAs while a cluster moves to a new one, and OpenSSL refuses a peer
  whose CA has no list), none expired. The agent
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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Files:
    """The parsed certificates of a TLS directory."""

    cas: list[x509.Certificate]  # ca.pem may hold several CAs (while the cluster moves to a new one)
    cert: x509.Certificate
    issuer: x509.Certificate | None  # the CA of ca.pem that signed cert, if any


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(directory: Path) -> _Files:
    """ca.pem and cert.pem, parsed; ConfigError names the first file that does not parse."""
    try:
        cas = x509.load_pem_x509_certificates((directory / CA_FILE).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"tls-dir: {directory / CA_FILE} is not a PEM certificate ({e})") from e
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"tls-dir: {directory / CERT_FILE} is not a PEM certificate ({e})") from e
    return _Files(cas, cert, next((ca for ca in cas if _signed_by(cert, ca)), None))


def _subjects(cas: list[x509.Certificate]) -> str:
    return "; ".join(ca.subject.rfc4514_string() for ca in cas)


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
        files = _read(d)
    except ConfigError as e:
        return e.problems
    problems = []
    try:
        key = serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        problems.append(f"tls-dir: {d / KEY_FILE} is not an unencrypted PEM private key ({e})")
    else:
        if key.public_key() != files.cert.public_key():
            problems.append(f"tls-dir: {d / KEY_FILE} is not the key of {d / CERT_FILE}")
    if files.issuer is None:
        problems.append(f"tls-dir: {d / CERT_FILE} ({files.cert.subject.rfc4514_string()}) is not signed by the "
                        f"CA in {d / CA_FILE} ({_subjects(files.cas)})")
    return problems + _crl_problems(d, files.cas)


def _crls(directory: Path) -> list[x509.CertificateRevocationList]:
    """Every revocation list in crl.pem (one per CA of ca.pem); none without the file."""
    path = directory / CRL_FILE
    if not path.exists():
        return []
    text = path.read_bytes()
    blocks = [b"-----BEGIN X509 CRL-----" + part.split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n"
              for part in text.split(b"-----BEGIN X509 CRL-----")[1:]]
    if not blocks:
        raise ValueError("no BEGIN X509 CRL block")
    return [x509.load_pem_x509_crl(block) for block in blocks]


def _signs(ca: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    try:  # a CA key that cannot sign (X25519, X448) counts as a bad signature
        return crl.issuer == ca.subject and crl.is_signature_valid(cast(Any, ca.public_key()))
    except TypeError:
        return False


def _crl_problems(directory: Path, cas: list[x509.Certificate]) -> list[str]:
    path = directory / CRL_FILE
    try:
        crls = _crls(directory)
    except (OSError, ValueError) as e:
        return [f"tls-dir: {path} is not a PEM revocation list ({e})"]
    problems = []
    for crl in crls:
        if not any(_signs(ca, crl) for ca in cas):
            problems.append(f"tls-dir: {path}: the list of {crl.issuer.rfc4514_string()} is not signed by a CA "
                            f"in {directory / CA_FILE}")
        elif crl.next_update_utc is not None and crl.next_update_utc < _now():
            problems.append(f"tls-dir: {path} expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC (every peer "
                            "would be refused); make a new one with `ferry certs revoke`")
    if crls:
        # OpenSSL refuses a peer whose CA has no list in the file ("unable to get certificate CRL").
        problems += [f"tls-dir: {path} holds no list of the CA {ca.subject.rfc4514_string()}: every certificate "
                     "it signed would be refused (concatenate its crl.pem in)"
                     for ca in cas if not any(_signs(ca, crl) for crl in crls)]
    return problems


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
        files = _read(d)
    except ConfigError as e:
        return e.problems
    now = _now()
    cert = files.cert
    problems = _validity_problem(f"{d / CERT_FILE}", cert, now)
    for ca in files.cas:
        problems += _validity_problem(f"the CA {ca.subject.rfc4514_string()} in {d / CA_FILE}", ca, now)
    try:
        crls = _crls(d)
    except (OSError, ValueError):
        crls = []  # file_problems says why
    if any(crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number)
           is not None for crl in crls):
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
    """When the certificate ("cert") and its CA ("ca": the one that signed it, else the first to end)
    stop being valid."""
    files = _read(Path(directory))
    ca_end = (files.issuer.not_valid_after_utc if files.issuer is not None
              else min(ca.not_valid_after_utc for ca in files.cas))
    return {"cert": files.cert.not_valid_after_utc, "ca": ca_end}


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
