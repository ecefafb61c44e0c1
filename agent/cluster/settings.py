"""Cluster mode's settings: the `--etcd*` flags and config keys, parsed into one `ClusterSettings`.

agent/config.py adds these keys to the agent's own and calls `resolve`; an agent without `etcd`
has no cluster settings and runs in two-agent mode. This module raises ValueError; config.py turns
it into its ConfigError.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PREFIX = "/ferry"
DEFAULT_TTL_S = 10
DEFAULT_UPDATE_S = 3.0
DEFAULT_PER_HOST = 2  # KubeVirt's default outbound migrations per node
DEFAULT_PER_CLUSTER = 5  # ... and per cluster
DEFAULT_HOLD_ROUNDS = 10  # a VM the balancer moved stays put this many balancing intervals

KEYS: dict[str, str] = {
    "etcd": "cluster mode: etcd client URLs, comma-separated (http://HOST:PORT or https://...); "
            "the agent registers there and VM ownership is decided there (default: off, two-agent mode)",
    "etcd-prefix": f"key prefix of this cluster in etcd (default: {DEFAULT_PREFIX})",
    "etcd-ttl": f"seconds of this host's lease in etcd: a host silent this long is shown dead (default: {DEFAULT_TTL_S})",
    "etcd-ca": "CA file to check etcd's certificate with (https endpoints)",
    "etcd-cert": "client certificate file for etcd (with etcd-key)",
    "etcd-key": "client key file for etcd (with etcd-cert)",
    "etcd-user": "etcd user name (with etcd-password-file)",
    "etcd-password-file": "file holding the etcd user's password",
    "evacuate-per-host": f"most migrations out of this host at once when it is evacuated or balanced, 1-64 "
                         f"(default: {DEFAULT_PER_HOST})",
    "evacuate-per-cluster": f"an evacuation or balancing pass starts no migration while this many are in flight "
                            f"in the cluster, 1-1000 (default: {DEFAULT_PER_CLUSTER})",
    "balance-interval": "seconds between the agent-side balancing passes (one agent of the cluster runs them "
                        "at a time); 0: off (default: 0)",
    "balance-hold": f"seconds a VM moved by the balancing loop is not moved by it again "
                    f"(default: {DEFAULT_HOLD_ROUNDS} x balance-interval)",
}
METAVARS = {"etcd": "URL[,URL...]", "etcd-prefix": "PREFIX", "etcd-ttl": "S", "etcd-ca": "FILE",
            "etcd-cert": "FILE", "etcd-key": "FILE", "etcd-user": "USER", "etcd-password-file": "FILE",
            "evacuate-per-host": "N", "evacuate-per-cluster": "N", "balance-interval": "S", "balance-hold": "S"}
TOML_TYPES: dict[str, tuple[type, ...]] = {"etcd": (str, list), "etcd-ttl": (str, int), "evacuate-per-host": (str, int),
                                           "evacuate-per-cluster": (str, int),
                                           "balance-interval": (str, int, float), "balance-hold": (str, int, float)}



@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """How this agent reaches etcd and what it keeps there."""

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    ttl_s: int = DEFAULT_TTL_S
    update_s: float = DEFAULT_UPDATE_S  # how often the host's record is rewritten (load, VMs)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None
    per_host: int = DEFAULT_PER_HOST  # evacuation and balancing limits (agent/cluster/evacuate.py)
    per_cluster: int = DEFAULT_PER_CLUSTER
    balance_interval: float = 0.0  # 0: no balancing loop (agent/cluster/balancer.py)
    balance_hold: float = 0.0

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for https endpoints (None: the system's defaults, or plain http)."""
        if self.ca is None and self.cert is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx

    def describe(self) -> dict[str, Any]:
        """The settings as config keys (for --check-config), the password left out."""
        out: dict[str, Any] = {"etcd": ",".join(self.endpoints), "etcd-prefix": self.prefix, "etcd-ttl": self.ttl_s,
                               "evacuate-per-host": self.per_host, "evacuate-per-cluster": self.per_cluster,
                               "balance-interval": self.balance_interval, "balance-hold": self.balance_hold}
        for key, value in (("etcd-ca", self.ca), ("etcd-cert", self.cert), ("etcd-key", self.key),
                           ("etcd-user", self.user)):
            if value is not None:
                out[key] = str(value)
        return out


def resolve(values: dict[str, Any]) -> ClusterSettings | None:
    """The cluster settings from merged config values; None when `etcd` is not set."""
    raw = values.get("etcd")
    if not raw:
        return None
    per_host = number(values, "evacuate-per-host", DEFAULT_PER_HOST, int, 1, 64)
    per_cluster = number(values, "evacuate-per-cluster", DEFAULT_PER_CLUSTER, int, 1, 1000)
    interval = number(values, "balance-interval", 0.0, float, 0.0, 86400.0)
    hold = number(values, "balance-hold", DEFAULT_HOLD_ROUNDS * interval, float, 0.0, 7 * 86400.0)
    items = raw.split(",") if isinstance(raw, str) else [str(x) for x in raw]
    endpoints = tuple(x.strip() for x in items if x.strip())
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"etcd: {url!r} is not an http:// or https:// URL")
    prefix = str(values.get("etcd-prefix", DEFAULT_PREFIX)).rstrip("/")
    if not prefix.startswith("/"):
        raise ValueError(f"etcd-prefix: {prefix!r} must start with /")
    try:
        ttl = int(values.get("etcd-ttl", DEFAULT_TTL_S))
    except (TypeError, ValueError):
        raise ValueError(f"etcd-ttl: not a whole number of seconds: {values.get('etcd-ttl')!r}") from None
    if not 2 <= ttl <= 3600:
        raise ValueError(f"etcd-ttl: must be 2..3600 seconds, got {ttl}")
    files = {k: Path(str(values[k])) for k in ("etcd-ca", "etcd-cert", "etcd-key", "etcd-password-file")
             if values.get(k)}
    for key, path in files.items():
        if not path.is_file():
            raise ValueError(f"{key}: {str(path)!r} is not a readable file")
    if ("etcd-cert" in files) != ("etcd-key" in files):
        raise ValueError("etcd-cert and etcd-key go together")
    user = str(values["etcd-user"]) if values.get("etcd-user") else None
    if (user is not None) != ("etcd-password-file" in files):
        raise ValueError("etcd-user and etcd-password-file go together")
    password = files["etcd-password-file"].read_text().strip() if "etcd-password-file" in files else None
    settings = ClusterSettings(endpoints=endpoints, prefix=prefix, ttl_s=ttl,
                           update_s=max(0.5, min(DEFAULT_UPDATE_S, ttl / 3)),
                           ca=files.get("etcd-ca"), cert=files.get("etcd-cert"), key=files.get("etcd-key"),
                           user=user, password=password, per_host=per_host, per_cluster=per_cluster,
                           balance_interval=interval, balance_hold=hold)
    try:
        settings.ssl_context()  # a certificate, key or CA that does not load is a configuration error
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"etcd TLS files: {e}") from e
    return settings


def number(values: dict[str, Any], key: str, default: Any, kind: type, low: Any, high: Any) -> Any:
    """``values[key]`` as ``kind`` within low..high, ``default`` when unset."""
    raw = values.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: not a {'whole ' if kind is int else ''}number: {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{key}: must be {low}..{high}, got {raw}")
    return value
