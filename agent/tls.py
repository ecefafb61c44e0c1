"""Mutual TLS for ferry's TCP connections: the contexts built from a TLS directory.

This module owns how a `--tls-dir` becomes `ssl.SSLContext`s. The directory holds three PEM files
(written by `ferry certs issue`, agent/certs.py):

* ``ca.pem``: the cluster's CA certificate; a peer's certificate must chain to it;
* ``cert.pem``: this host's (or this operator's) certificate, signed by that CA;
* ``key.pem``: its private key (mode 0600);
* ``crl.pem`` (optional): the CA's revocation list (written by `ferry certs revoke`); when present,
  a peer whose certificate it lists is refused, both ways (OpenSSL's CRL check of the leaf).

Both sides present a certificate and verify the other's (CERT_REQUIRED), TLS 1.3 only. A client
also checks that the server's certificate names the host it dialled (a DNS or IP subjectAltName:
agents are mostly reached by IP, so `ferry certs issue --ip` puts IP SANs in). A server does not
check a client's name: clients dial from any address, so chaining to the cluster CA is what
admits them; the HMAC cluster-key handshake still runs inside the tunnel on every connection.
The unix control socket never uses TLS (local, mode 0600).

An agent holds its directory in a `TLSDir`: `reload()` (SIGHUP) loads the files again and, when they
load, swaps in the new contexts whole: every connection opened afterwards uses them, connections
already open keep the context they started with. A directory that no longer loads leaves the old
contexts in place. The asyncio control listener is bound to one context for its life, so it gets
`TLSDir.acceptor`, whose SNI callback hands each incoming handshake the current server context.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.config import ConfigError

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CRL_FILE = "crl.pem"
TLS_FILES = (CA_FILE, CERT_FILE, KEY_FILE)
# Seconds for a TLS handshake: as long as the cluster-key handshake may take.
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class TLSContexts:
    """The two contexts of one TLS directory: for accepting and for dialling."""

    directory: Path
    server: ssl.SSLContext
    client: ssl.SSLContext


class TLSSource(Protocol):
    """Where the migration engine takes its contexts from, at each connection it opens or accepts."""

    @property
    def server(self) -> ssl.SSLContext: ...

    @property
    def client(self) -> ssl.SSLContext: ...


def _files(directory: Path) -> tuple[Path, Path, Path]:
    """The three files, each checked for existence (one error naming every missing one)."""
    if not directory.is_dir():
        raise ConfigError(f"tls-dir: {str(directory)!r} is not a directory")
    paths = tuple(directory / name for name in TLS_FILES)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"tls-dir: {str(directory)!r} lacks {', '.join(missing)} "
                          f"(expected {', '.join(TLS_FILES)}; make them with `ferry certs issue`)")
    ca, cert, key = paths
    return ca, cert, key


def _context(purpose: ssl._SSLMethod, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a peer without a certificate is refused
    crl = ca.parent / CRL_FILE
    try:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if crl.exists():
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls-dir: cannot load {ca.parent}: {getattr(e, 'reason', None) or e}") from e
    return ctx


def load(directory: str | Path) -> TLSContexts:
    """Build the server and client contexts of ``directory``; ConfigError says what is wrong."""
    path = Path(directory)
    ca, cert, key = _files(path)
    server = _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
    client = _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
    client.check_hostname = True  # the server's DNS or IP SAN must name the host we dialled
    return TLSContexts(path, server, client)


class TLSDir:
    """The live contexts of an agent's TLS directory; `reload` replaces them whole or not at all."""

    def __init__(self, directory: str | Path) -> None:
        self.current = load(directory)
        self.directory = self.current.directory
        ca, cert, key = _files(self.directory)
        self.acceptor = _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
        self.acceptor.sni_callback = self._hand_over

    @property
    def server(self) -> ssl.SSLContext:
        return self.current.server

    @property
    def client(self) -> ssl.SSLContext:
        return self.current.client

    def reload(self) -> TLSContexts:
        """Load the directory again; on success new connections use it, else ConfigError and no change."""
        contexts = load(self.directory)
        self.install(contexts)
        return contexts

    def install(self, contexts: TLSContexts) -> None:
        """Make ``contexts`` (from `load` of this directory) the ones new connections use. Call it on
        the thread that accepts control connections (the event loop), so no handshake starts halfway."""
        self.current = contexts
        # OpenSSL takes the verification flags of a connection from the context it was created with
        # (the acceptor), the trusted certificates and CRL from the one the callback hands over.
        self.acceptor.verify_flags = contexts.server.verify_flags

    def _hand_over(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                   ctx: ssl.SSLContext) -> None:
        conn.context = self.current.server


def client_context(directory: str | Path | None) -> ssl.SSLContext | None:
    """The dialling context of ``directory``, or None (plaintext) when no directory is given."""
    return None if not directory else load(directory).client


def describe_error(exc: BaseException) -> str:
    """A short reason for a failed TLS exchange (OpenSSL's reason text when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else (str(exc) or type(exc).__name__)
