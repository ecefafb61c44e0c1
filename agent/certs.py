"""`ferry certs`: a small certificate authority for a ferry cluster (two hosts and an operator).

This module owns the files behind mutual TLS (agent/tls.py):

* ``ferry certs init --dir D`` makes the CA: ``D/ca.pem`` (certificate, 0644) and ``D/ca-key.pem``
  (its private key, 0600). Keep ``ca-key.pem`` off the hosts if you can.
* ``ferry certs issue HOST [--ip IP ...] [--dns NAME ...] --ca-dir D --out DIR`` makes a certificate
  for HOST signed by that CA: ``DIR/cert.pem``, ``DIR/key.pem`` (0600) and a copy of ``DIR/ca.pem``:
  a ready `--tls-dir`. HOST is the subject's common name and a subjectAltName (an IP SAN when it is
  an address, else a DNS SAN); every `--ip`/`--dns` adds one: name every address peers dial
  (control and migration). The certificate serves both ways (serverAuth and clientAuth), since an
  agent accepts connections and dials other agents.

* ``ferry certs revoke CERT... [--serial N ...] --ca-dir D [--out DIR ...]`` adds those certificates
  to the CA's revocation list ``D/crl.pem`` (made on first use, extended after) and copies it into
  each ``--out`` TLS directory, where agents load it (at start and on SIGHUP) and refuse the listed
  certificates. The list is valid as long as the CA.

Keys are ECDSA P-256, signatures SHA-256. Validity: 10 years for the CA, 825 days for a host
(the longest clients commonly accept). Existing files are never overwritten without ``force``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.tls import CA_FILE, CERT_FILE, CRL_FILE, KEY_FILE

CA_KEY_FILE = "ca-key.pem"
CA_DAYS = 3650
HOST_DAYS = 825
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a peer whose clock is a little behind


class CertsError(Exception):
    """A certs command cannot do what was asked; the message says why."""


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write a file with its final mode from the start (a private key is never readable by others)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as e:
        raise CertsError(f"{path} exists; pass --force to replace it") from e
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - BACKDATE, now + datetime.timedelta(days=days)


def _check_free(paths: Iterable[Path], force: bool) -> None:
    """Refuse before writing anything, so a refusal leaves no half-written set behind."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertsError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                         "pass --force to replace")


def init_ca(directory: str | Path, *, name: str = "ferry cluster CA", days: int = CA_DAYS,
            force: bool = False) -> Path:
    """Make a CA in ``directory`` (ca.pem, ca-key.pem); returns the path of ca.pem."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_free((d / CA_FILE, d / CA_KEY_FILE), force)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(d / CA_KEY_FILE, _key_pem(key), 0o600, force)
    _write(d / CA_FILE, _cert_pem(cert), 0o644, force)
    return d / CA_FILE


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CertsError(f"cannot load the CA from {ca_dir} ({CA_FILE}, {CA_KEY_FILE}; make it with "
                         f"`ferry certs init`): {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{ca_dir / CA_KEY_FILE} is not an ECDSA key")
    return cert, key


def _sans(host: str, ips: Sequence[str], dns: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltNames: HOST (IP or DNS) plus every --ip and --dns, without repeats."""
    names: list[x509.GeneralName] = []
    for text in (host, *ips):
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(text))
        except ValueError as e:
            if text is not host:
                raise CertsError(f"--ip {text!r} is not an IP address") from e
            name = x509.DNSName(text)
        if name not in names:
            names.append(name)
    for text in dns:
        if x509.DNSName(text) not in names:
            names.append(x509.DNSName(text))
    return names


def issue(host: str, *, ca_dir: str | Path, out: str | Path, ips: Sequence[str] = (),
          dns: Sequence[str] = (), days: int = HOST_DAYS, force: bool = False) -> Path:
    """Make ``out``/cert.pem and key.pem for ``host``, signed by the CA in ``ca_dir``, plus ca.pem."""
    if not host:
        raise CertsError("HOST must not be empty")
    ca_path = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_path)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_free((d / CERT_FILE, d / KEY_FILE), force)
    key = _new_key()
    start, end = _validity(days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_sans(host, ips, dns)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(d / KEY_FILE, _key_pem(key), 0o600, force)
    _write(d / CERT_FILE, _cert_pem(cert), 0o644, force)
    if (d / CA_FILE).resolve() != (ca_path / CA_FILE).resolve():
        shutil.copyfile(ca_path / CA_FILE, d / CA_FILE)
        os.chmod(d / CA_FILE, 0o644)
    return d / CERT_FILE


def _replace(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename: an agent reloading meanwhile reads old or new."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write(tmp, data, 0o644, True)
    os.replace(tmp, path)


def _serial_of(path: str | Path, ca_cert: x509.Certificate) -> int:
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise CertsError(f"cannot read a certificate from {path}: {e}") from e
    if cert.issuer != ca_cert.subject:
        raise CertsError(f"{path} was not issued by this CA ({ca_cert.subject.rfc4514_string()})")
    return cert.serial_number


def revoke(cert_paths: Sequence[str | Path] = (), *, ca_dir: str | Path, serials: Sequence[int] = (),
           out: Sequence[str | Path] = ()) -> list[int]:
    """Add certificates (files or serial numbers) to ``ca_dir``/crl.pem, copy it to each ``out``;
    returns every serial the list now holds."""
    ca_path = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_path)
    wanted = [_serial_of(p, ca_cert) for p in cert_paths] + list(serials)
    if not wanted:
        raise CertsError("name a certificate file or a --serial to revoke")
    crl_path = ca_path / CRL_FILE
    entries: dict[int, x509.RevokedCertificate] = {}
    if crl_path.exists():
        try:
            old = x509.load_pem_x509_crl(crl_path.read_bytes())
        except ValueError as e:
            raise CertsError(f"{crl_path} is not a revocation list: {e}") from e
        if not old.is_signature_valid(ca_key.public_key()):
            raise CertsError(f"{crl_path} is not signed by this CA")
        entries = {r.serial_number: r for r in old}
    now = datetime.datetime.now(datetime.UTC)
    for serial in wanted:
        if serial not in entries:
            entries[serial] = (x509.RevokedCertificateBuilder().serial_number(serial)
                               .revocation_date(now).build())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - BACKDATE).next_update(ca_cert.not_valid_after_utc))
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    data = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    _replace(crl_path, data)
    for d in out:
        _replace(Path(d) / CRL_FILE, data)
    return sorted(entries)


def subject_alt_names(cert_path: str | Path) -> list[str]:
    """The SANs of a certificate as text (for `ferry certs issue`'s report and the tests)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in ext]


# -- the `ferry certs` subcommands ---------------------------------------------------------------------
def add_commands(sub: Any) -> None:
    """`ferry certs init`, `issue` and `revoke` (local: no agent, no cluster key)."""
    c = sub.add_parser("certs", help="make a CA and host certificates for mutual TLS (--tls-dir)")
    cs = c.add_subparsers(dest="certs_command", metavar="CERTSCOMMAND", required=True)
    i = cs.add_parser("init", help=f"make a CA: DIR/{CA_FILE} and DIR/{CA_KEY_FILE}")
    i.add_argument("--dir", required=True, metavar="DIR", help="where to write the CA (created mode 0700)")
    i.add_argument("--name", default="ferry cluster CA", help="the CA's common name")
    i.add_argument("--days", type=int, default=CA_DAYS, help=f"validity in days (default {CA_DAYS})")
    i.add_argument("--force", action="store_true", help="replace existing files")
    s = cs.add_parser("issue", help=f"make DIR/{CERT_FILE}, DIR/{KEY_FILE} (and a copy of {CA_FILE}) for HOST")
    s.add_argument("host", metavar="HOST", help="the host's name or address (common name and a SAN)")
    s.add_argument("--ip", action="append", default=[], metavar="IP",
                   help="an address peers dial (control, migration); repeatable")
    s.add_argument("--dns", action="append", default=[], metavar="NAME", help="another DNS name; repeatable")
    s.add_argument("--ca-dir", required=True, metavar="DIR", help="the CA made by `ferry certs init`")
    s.add_argument("--out", required=True, metavar="DIR", help="the TLS directory to write (an agent's --tls-dir)")
    s.add_argument("--days", type=int, default=HOST_DAYS, help=f"validity in days (default {HOST_DAYS})")
    s.add_argument("--force", action="store_true", help="replace existing files")
    r = cs.add_parser("revoke", help=f"add certificates to the CA's revocation list DIR/{CRL_FILE}")
    r.add_argument("certs", nargs="*", metavar="CERT", help="a certificate file (cert.pem) to revoke")
    r.add_argument("--serial", action="append", default=[], type=_serial, metavar="N",
                   help="a serial number to revoke (decimal or 0x hex); repeatable")
    r.add_argument("--ca-dir", required=True, metavar="DIR", help="the CA made by `ferry certs init`")
    r.add_argument("--out", action="append", default=[], metavar="DIR",
                   help=f"a TLS directory to copy {CRL_FILE} into (then SIGHUP its agent); repeatable")
    c.set_defaults(run=None)


def _serial(text: str) -> int:
    return int(text, 0)


def run_command(ns: argparse.Namespace) -> int:
    """Run a parsed `ferry certs ...` command: 0 done, 1 refused (the message on stderr)."""
    try:
        if ns.certs_command == "init":
            path = init_ca(ns.dir, name=ns.name, days=ns.days, force=ns.force)
            print(f"CA written: {path} and {path.parent / CA_KEY_FILE} (keep the key private)")
        elif ns.certs_command == "revoke":
            serials = revoke(ns.certs, ca_dir=ns.ca_dir, serials=ns.serial, out=ns.out)
            where = ", ".join([str(Path(ns.ca_dir) / CRL_FILE), *(str(Path(d) / CRL_FILE) for d in ns.out)])
            print(f"revocation list written: {where}; {len(serials)} revoked certificate"
                  f"{'' if len(serials) == 1 else 's'}")
        else:
            path = issue(ns.host, ca_dir=ns.ca_dir, out=ns.out, ips=ns.ip, dns=ns.dns, days=ns.days, force=ns.force)
            print(f"certificate for {ns.host} written to {path.parent} ({CA_FILE}, {CERT_FILE}, {KEY_FILE}); "
                  f"names: {', '.join(subject_alt_names(path))}")
    except CertsError as e:
        print(f"ferry: error: {e}", file=sys.stderr)
        return 1
    return 0
