"""The web console's settings: `--http`, `--http-token`, `--http-insecure` and their checks.

This module owns which keys configure the console (agent/web.py) and the rule of where it may be
served: plain HTTP on a loopback address only; any other address needs HTTPS (the agent's
`--tls-dir` certificate and key) or the operator's explicit `--http-insecure on`. Actions
(migrate, cancel, pause, resume) need a token file; without one the console is read-only.
agent/config.py merges these keys into its own and calls `web_settings` while resolving.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_TOKEN_BYTES = 16

KEYS: dict[str, str] = {
    "http": "serve the web console at http://HOST:PORT/ (https with --tls-dir; a non-loopback HOST "
            "needs --tls-dir or --http-insecure on) (default: off)",
    "http-token": "file holding the web console's operator token (at least 16 bytes): actions (migrate, "
                  "cancel, pause, resume) need it; without it the console is read-only (default: none)",
    "http-insecure": "on: serve the console over plain HTTP even on a non-loopback address (default: off)",
}
METAVARS = {"http": "HOST:PORT", "http-token": "FILE", "http-insecure": "on|off"}
TOML_TYPES: dict[str, tuple[type, ...]] = {"http-insecure": (str, bool)}


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The resolved console settings (none of it when `http` is not set)."""

    address: tuple[str, int]
    token_file: Path | None = None
    token: bytes | None = None  # the token's bytes, whitespace stripped; None: read-only
    https: bool = False  # serve TLS with the agent's --tls-dir certificate
    insecure: bool = False  # plain HTTP off loopback, on the operator's word

    def describe(self) -> dict[str, str]:
        """The keys as `ferry-agent --check-config` prints them (the token by path, never its bytes)."""
        from agent.config import format_hostport

        out = {"http": format_hostport(*self.address)}
        if self.token_file is not None:
            out["http-token"] = str(self.token_file)
        if self.insecure:
            out["http-insecure"] = "on"
        return out


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals; a name other than localhost counts as not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(path: str | Path) -> bytes:
    """The token file's bytes, whitespace stripped, at least MIN_TOKEN_BYTES; ConfigError otherwise."""
    from agent.config import ConfigError

    try:
        token = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"http-token: cannot read {str(path)!r}: {e.strerror or e}") from e
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"http-token: {str(path)!r} is too short: {len(token)} bytes, need at least "
                          f"{MIN_TOKEN_BYTES}")
    return token


def web_settings(values: dict[str, Any], tls_dir: Any) -> WebSettings | None:
    """The console settings of merged config `values`, or None when `http` is not set.

    ``tls_dir``: the agent's resolved TLS directory (None without one): the console serves HTTPS
    with it unless `http-insecure` is on."""
    from agent.config import ConfigError, _switch, parse_hostport

    if not values.get("http"):
        if values.get("http-token"):  # a token for no console: a mistake worth saying
            raise ConfigError("http-token: needs http (the console's address)")
        return None
    try:
        address = parse_hostport(str(values["http"]))
    except ValueError as e:
        raise ConfigError(f"http: {e}") from e
    insecure = _switch(values, "http-insecure", False)
    https = tls_dir is not None and not insecure
    if not https and not insecure and not is_loopback(address[0]):
        raise ConfigError(f"http: {address[0]!r} is not a loopback address: serve the console there over "
                          "HTTPS (--tls-dir) or say --http-insecure on")
    token_file = Path(str(values["http-token"])) if values.get("http-token") else None
    token = load_token(token_file) if token_file is not None else None
    return WebSettings(address, token_file, token, https, insecure)

