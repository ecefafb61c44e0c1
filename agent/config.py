"""Agent configuration: command-line flags, the TOML config file, sizes, addresses, the cluster key.

This module owns how `ferry-agent` is configured. Every flag has the same key in the TOML file
(`--state-dir DIR` is `state-dir = "DIR"`); flags win over the file, the file wins over defaults.
It also owns the small parsers shared with the CLI: sizes ("64M", "4G", "4096"), "HOST:PORT"
addresses and the cluster key file.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import web_config
from agent.cluster import settings as cluster_settings
from agent.web_config import WebSettings

DEFAULT_STATE_DIR = "/var/lib/ferry"
DEFAULT_KEY_FILE = "/etc/ferry/cluster.key"
DEFAULT_CONTROL = "127.0.0.1:7700"
DEFAULT_MIGRATION = "127.0.0.1:7701"
CONTROL_SOCKET_NAME = "control.sock"
MIN_KEY_BYTES = 16
# Share of the host's MemTotal that guests may use when max-mem is not configured: the rest stays
# for the agent, the VM processes' interpreters and the host itself.
DEFAULT_MEM_SHARE = 0.75

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class ConfigError(Exception):
    """A flag, a config file key or the key file is unusable; the message says which and why.

    `problems` lists every problem found (the message joins them), so `--check-config` can show all.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


def parse_size(text: str | int) -> int:
    """Parse a byte size: a plain number of bytes or a number with a binary suffix K, M, G, T."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: negative")
        return text
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix")
    return int(m.group(1)) << _SIZE_SHIFT[m.group(2).lower()]


def format_size(n: int) -> str:
    """Render a byte count compactly with binary units (the inverse of parse_size where exact)."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    return str(n)


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse "HOST:PORT" (IPv6 as "[::1]:PORT") into (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"invalid address {text!r}: expected HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def format_hostport(host: str, port: int) -> str:
    """Render (host, port) so that parse_hostport reads it back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster key: the file's bytes with surrounding whitespace stripped, at least 16 bytes."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read key file {str(path)!r}: {e.strerror or e}") from e
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"key file {str(path)!r} is too short: {len(key)} bytes, need at least {MIN_KEY_BYTES}")
    return key


def host_mem_total() -> int:
    """MemTotal of this host in bytes, from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("MemTotal missing from /proc/meminfo")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The resolved configuration of one agent."""

    name: str
    control: tuple[str, int]
    migration: tuple[str, int]
    state_dir: Path
    key_file: Path
    key: bytes
    max_mem: int  # bytes of guest RAM this host accepts (its own VMs plus incoming ones)
    dirty_tracker: str  # "auto" or a backend name from vmruntime.dirty.BACKENDS
    log_level: str
    metrics: tuple[str, int] | None = None  # the Prometheus endpoint, off when None
    tls_dir: Path | None = None  # ca.pem, cert.pem, key.pem: mutual TLS on TCP (agent/tls.py); off when None
    spare_vm: bool = True  # keep a VM process started ahead of need for incoming migrations (vmruntime/spare.py)
    # Directories besides STATE_DIR/disks where VM disk images may live (agent/disks.py).
    disk_dirs: tuple[Path, ...] = ()
    # Progress deadline of every wait on a migration connection, in and out (agent/migration/transport.py).
    stall_timeout: float = 4.0
    # Most outgoing migrations at once; the others wait their turn (agent/migration/slots.py).
    max_outgoing: int = 4
    web: WebSettings | None = None  # the web console (agent/web.py); off when None
    # When a migration switches to post-copy unless its params say (agent/migration/postcopy_source.py).
    postcopy_after: str = "never"
    # Data connections of an outgoing migration unless its params say (agent/migration/streams.py).
    streams: int = 1
    cluster: cluster_settings.ClusterSettings | None = None  # cluster mode on etcd (--etcd); None: two agents

    @property
    def control_socket(self) -> Path:
        """The unix socket of the control API, for the CLI on this host."""
        return self.state_dir / CONTROL_SOCKET_NAME


# The keys a config file may hold, with the flag help; each is also a --flag.
_KEYS: dict[str, str] = {
    "name": "agent name, unique in the cluster (default: the host name)",
    "control": f"control API address HOST:PORT (default: {DEFAULT_CONTROL})",
    "migration": f"migration listener address HOST:PORT (default: {DEFAULT_MIGRATION})",
    "state-dir": f"state directory, holds the control socket (default: {DEFAULT_STATE_DIR})",
    "key-file": f"shared cluster key file (default: {DEFAULT_KEY_FILE})",
    "max-mem": "guest memory this host accepts, e.g. 4G (default: 75%% of MemTotal)",
    "dirty-tracker": "dirty tracking backend: auto, uffd-wp-async, uffd-wp-sync, hash (default: auto)",
    "log-level": "debug, info, warning or error (default: info)",
    "metrics": "serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    "tls-dir": "directory holding ca.pem, cert.pem and key.pem: mutual TLS on the control and migration "
               "TCP connections, in and out (default: off)",
    "spare-vm": "on: keep one idle VM process (ferry-spare, ~20 MiB) for the next incoming migration, which "
                "then starts 0.1-0.15 s sooner; off: start one per incoming migration (default: on)",
    "disk-dirs": "directories where VM disk images may live besides STATE_DIR/disks, ':'-separated "
                 "(a TOML array of strings in the config file); absolute paths (default: none)",
    "stall-timeout": "seconds a migration connection may stay silent in a wait before its peer counts as "
                     "dead or frozen and the migration fails (default: 4)",
    "max-outgoing": "most outgoing migrations at once, 1-64; more wait in a queue, in order (default: 4)",
    "postcopy-after": "outgoing migrations switch to post-copy: never, auto (when pre-copy will not converge) "
                      "or after round N, unless the migration says (default: never)",
    "streams": "data connections per outgoing migration, 1-8, unless the migration says; each is sent "
               "and received by its own thread (default: the host's cores, at most 8)",
    **cluster_settings.KEYS,
}
_KEYS.update(web_config.KEYS)  # http, http-token, http-insecure (agent/web_config.py)
LOG_LEVELS = ("debug", "info", "warning", "error")
_METAVARS = {"control": "HOST:PORT", "migration": "HOST:PORT", "max-mem": "SIZE", "dirty-tracker": "BACKEND",
             "metrics": "HOST:PORT", "tls-dir": "DIR", "spare-vm": "on|off",
             "disk-dirs": "DIR[:DIR...]", "stall-timeout": "S", "max-outgoing": "N", "postcopy-after": "auto|N|never",
             "streams": "N",
             **web_config.METAVARS, **cluster_settings.METAVARS}
# TOML types a key accepts (flags are always strings); the rest take strings only.
_TOML_TYPES: dict[str, tuple[type, ...]] = {"max-mem": (str, int), "stall-timeout": (str, int, float),
                                            "max-outgoing": (str, int), "streams": (str, int), "spare-vm": (str, bool),
                                            "disk-dirs": (str, list), **web_config.TOML_TYPES,
                                            **cluster_settings.TOML_TYPES}
_SWITCH = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def build_parser() -> argparse.ArgumentParser:
    """The ferry-agent flag parser; every value defaults to None so the config file can fill it."""
    p = argparse.ArgumentParser(prog="ferry-agent", description="ferry host agent: runs VMs and migrates them.")
    p.add_argument("--config", metavar="FILE", help="TOML config file with the same keys as the flags")
    for key, help_text in _KEYS.items():
        p.add_argument(f"--{key}", dest=key.replace("-", "_"), metavar=_METAVARS.get(key, key.split("-")[-1].upper()),
                       help=help_text)
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration (flags and --config file) and this host's side of it, print "
                        "the resolved settings or every problem found, and exit: 0 valid, 2 not")
    return p


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r}: {e}") from e
    unknown = sorted(set(data) - set(_KEYS))
    problems = [f"config file {path!r}: unknown keys {', '.join(unknown)}"] if unknown else []
    problems += _type_problems(path, data)
    if problems:
        raise ConfigError("; ".join(problems), problems)
    return data


def _type_problems(path: str, data: dict[str, Any]) -> list[str]:
    """A key with a TOML value of the wrong type (e.g. max-mem = 1.5, control = 7700)."""
    problems = []
    for key, value in data.items():
        allowed = _TOML_TYPES.get(key, (str,))
        if key in _KEYS and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = " or ".join({str: "a string", int: "an integer", float: "a number", bool: "a boolean",
                                  list: "an array"}[t]
                                for t in allowed)
            problems.append(f"config file {path!r}: {key} must be {names}, not {type(value).__name__} {value!r}")
    return problems


def _merged(ns: argparse.Namespace) -> dict[str, Any]:
    """Flags over config file: a dict keyed by the config key names."""
    values: dict[str, Any] = _read_toml(ns.config) if ns.config else {}
    for key in _KEYS:
        flag_value = getattr(ns, key.replace("-", "_"))
        if flag_value is not None:
            values[key] = flag_value
    return values


def _address(values: dict[str, Any], key: str, default: str) -> tuple[str, int]:
    try:
        return parse_hostport(str(values.get(key, default)))
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from e


def _max_mem(values: dict[str, Any]) -> int:
    if "max-mem" not in values:
        return int(host_mem_total() * DEFAULT_MEM_SHARE)
    try:
        return parse_size(values["max-mem"])
    except ValueError as e:
        raise ConfigError(f"max-mem: {e}") from e


def _choice(values: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = str(values.get(key, default))
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _switch(values: dict[str, Any], key: str, default: bool) -> bool:
    """An on/off key: a TOML boolean, or on, off (true, false, yes, no) as a string or flag."""
    value = values.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() not in _SWITCH:
        raise ConfigError(f"{key}: {value!r} is not on or off")
    return _SWITCH[str(value).lower()]


def _disk_dirs(values: dict[str, Any]) -> tuple[Path, ...]:
    """disk-dirs: ':'-separated absolute directories (or a TOML array of them)."""
    raw = values.get("disk-dirs") or ()
    items = raw.split(":") if isinstance(raw, str) else list(raw)
    dirs = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"disk-dirs: {item!r} is not a directory path")
        if item.strip() == "":
            continue
        if not os.path.isabs(item):
            raise ConfigError(f"disk-dirs: {item!r} is not an absolute path")
        dirs.append(Path(item))
    return tuple(dirs)


def valid_postcopy_after(value: str) -> bool:
    """A migration's (and the agent's) postcopy-after: ``never``, ``auto`` or a round number from 1."""
    return value in ("never", "auto") or (value.isdigit() and int(value) >= 1)


def _postcopy_after(values: dict[str, Any]) -> str:
    raw = str(values.get("postcopy-after", "never"))
    if not valid_postcopy_after(raw):
        raise ConfigError(f"postcopy-after: must be never, auto or a round number >= 1, got {raw!r}")
    return raw


def _stall_timeout(values: dict[str, Any]) -> float:
    raw = values.get("stall-timeout", 4.0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"stall-timeout: not a number of seconds: {raw!r}") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"stall-timeout: must be in (0, 3600] seconds, got {raw!r}")
    return value


def _max_outgoing(values: dict[str, Any]) -> int:
    try:
        return int(cluster_settings.number(values, "max-outgoing", 4, int, 1, 64))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def default_streams() -> int:
    """The streams of an outgoing migration when nothing says: one per core (a stream's thread
    keeps a core busy copying or encrypting), at most MAX_STREAMS."""
    from proto.limits import MAX_STREAMS

    return max(1, min(MAX_STREAMS, os.cpu_count() or 1))


def _streams(values: dict[str, Any]) -> int:
    try:
        return int(cluster_settings.number(values, "streams", default_streams(), int, 1, 8))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _metrics(values: dict[str, Any]) -> tuple[str, int] | None:
    return _address(values, "metrics", "") if values.get("metrics") else None


def _tls_dir(values: dict[str, Any]) -> Path | None:
    """The TLS directory, loaded once here so a bad certificate or key is a configuration error."""
    if not values.get("tls-dir"):
        return None
    from agent import tls, tls_check  # both build on this module's ConfigError

    found = tls_check.file_problems(str(values["tls-dir"]))
    if found:
        raise ConfigError("; ".join(found), found)
    return tls.load(str(values["tls-dir"])).directory


def _cluster(values: dict[str, Any]) -> cluster_settings.ClusterSettings | None:
    try:
        return cluster_settings.resolve(values)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _distinct_addresses(control: Any, migration: Any, metrics: Any, http: Any = None) -> None:
    """Two listeners on one HOST:PORT cannot both bind; say so before trying (port 0 picks a free one)."""
    seen: dict[tuple[str, int], str] = {}
    for key, addr in (("control", control), ("migration", migration), ("metrics", metrics), ("http", http)):
        if not isinstance(addr, tuple) or addr[1] == 0:
            continue
        if addr in seen:
            raise ConfigError(f"{key}: {format_hostport(*addr)} is also the {seen[addr]} address")
        seen[addr] = key


class _Problems:
    """Runs each part of the resolution, keeping every ConfigError instead of stopping at the first."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def take(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigError as e:
            self.found += e.problems
            return None


def resolve(values: dict[str, Any]) -> AgentConfig:
    """Turn merged key/values into a checked AgentConfig (reads the key file); ConfigError lists all problems."""
    key_file = Path(str(values.get("key-file", DEFAULT_KEY_FILE)))
    trackers = ("auto", "uffd-wp-async", "uffd-wp-sync", "hash")
    p = _Problems()
    fields: dict[str, Any] = {
        "name": str(values.get("name") or socket.gethostname()),
        "control": p.take(_address, values, "control", DEFAULT_CONTROL),
        "migration": p.take(_address, values, "migration", DEFAULT_MIGRATION),
        "state_dir": Path(str(values.get("state-dir", DEFAULT_STATE_DIR))),
        "key_file": key_file,
        "key": p.take(load_key, key_file),
        "max_mem": p.take(_max_mem, values),
        "dirty_tracker": p.take(_choice, values, "dirty-tracker", "auto", trackers),
        "log_level": p.take(_choice, values, "log-level", "info", LOG_LEVELS),
        "metrics": p.take(_metrics, values),
        "tls_dir": p.take(_tls_dir, values),
        "spare_vm": p.take(_switch, values, "spare-vm", True),
        "disk_dirs": p.take(_disk_dirs, values),
        "stall_timeout": p.take(_stall_timeout, values),
        "max_outgoing": p.take(_max_outgoing, values),
        "postcopy_after": p.take(_postcopy_after, values),
        "streams": p.take(_streams, values),
        "cluster": p.take(_cluster, values),
    }
    fields["web"] = p.take(web_config.web_settings, values, values.get("tls-dir"))
    web = fields["web"].address if fields["web"] is not None else None
    p.take(_distinct_addresses, fields["control"], fields["migration"], fields["metrics"], web)
    if p.found:
        raise ConfigError("; ".join(p.found), p.found)
    return AgentConfig(**fields)


def host_problems(config: AgentConfig) -> list[str]:
    """What this host says about a valid configuration: a state dir that cannot be used, an address
    that is not one of this host's (checked by binding port 0 on it, so a running agent's ports do not
    count as a problem)."""
    problems = _state_dir_problems(config.state_dir)
    problems += [f"disk-dirs: {d} is not a directory" for d in config.disk_dirs if not d.is_dir()]
    web = config.web.address if config.web is not None else None
    for key, addr in (("control", config.control), ("migration", config.migration), ("metrics", config.metrics),
                      ("http", web)):
        if addr is not None:
            problems += _bind_problems(key, addr[0])
    return problems


def _state_dir_problems(path: Path) -> list[str]:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the agent creates the missing part: it must be able to
    if not existing.is_dir():
        return [f"state-dir: {str(existing)!r} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"state-dir: {str(existing)!r} is not writable"]
    return []


def _bind_problems(key: str, host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return [f"{key}: cannot resolve {host!r}: {e.strerror}"]
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(sockaddr)
        except OSError as e:
            return [f"{key}: cannot listen on {host!r} on this host: {e.strerror or e}"]
    return []


def describe(config: AgentConfig) -> str:
    """The resolved configuration as TOML (the key file by path, never the key)."""
    values = {
        "name": config.name, "control": format_hostport(*config.control),
        "migration": format_hostport(*config.migration), "state-dir": str(config.state_dir),
        "key-file": str(config.key_file), "max-mem": _exact_size(config.max_mem),
        "dirty-tracker": config.dirty_tracker, "log-level": config.log_level,
        "spare-vm": "on" if config.spare_vm else "off", "stall-timeout": f"{config.stall_timeout:g}",
        "max-outgoing": str(config.max_outgoing),
        "postcopy-after": config.postcopy_after, "streams": str(config.streams),
    }
    if config.web is not None:
        values.update(config.web.describe())
    if config.metrics is not None:
        values["metrics"] = format_hostport(*config.metrics)
    if config.tls_dir is not None:
        values["tls-dir"] = str(config.tls_dir)
    if config.disk_dirs:
        values["disk-dirs"] = ":".join(map(str, config.disk_dirs))
    if config.cluster is not None:
        values.update({k: str(v) for k, v in config.cluster.describe().items()})
    return "".join(f"{k} = {_toml_string(v)}\n" for k, v in values.items())


def _exact_size(n: int) -> str:
    text = format_size(n)
    return text if "." not in text else str(n)  # "12.3M" would not read back


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_from_args(ns: argparse.Namespace) -> AgentConfig:
    """The AgentConfig of parsed flags (and their --config file); ConfigError on any bad value."""
    return resolve(_merged(ns))


def load_config(argv: list[str] | None = None) -> AgentConfig:
    """Parse flags (and the --config file) into an AgentConfig; ConfigError on any bad value."""
    return config_from_args(build_parser().parse_args(argv))
