"""Prometheus metrics of one agent: the figures, their text exposition (format 0.0.4) and its HTTP endpoint.

This module owns what `ferry-agent --metrics HOST:PORT` serves at /metrics: VMs by state, guest memory,
migrations by direction and outcome, histograms of the total time and the downtime of completed
migrations, bytes sent and received, and for each migration in progress its dirty rate, throttle,
remaining bytes, bandwidth and expected downtime, and with `--tls-dir` the seconds until the agent's
certificate and its CA expire. Every metric is named ferry_*.

Counters and histograms accumulate in `MigrationStats`, fed by the migration engine's `on_finished`
hook from its session threads (hence the lock). Gauges are read at scrape time from the VM manager and
`MigrationManager.infos()`. The HTTP side is a deliberately small asyncio server: GET (or HEAD) of
/metrics, one request per connection, bounded head size and read time; anything else gets a 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VM_STATES = ("running", "paused", "halted", "faulted", "migrating")
DIRECTIONS = ("out", "in")
OUTCOMES = ("completed", "failed", "cancelled")
LIVE_STATUSES = ("setup", "active", "device")
# Seconds. Total time spans a tiny idle guest (~0.1 s) to a large busy one; downtime is what
# --max-downtime bounds, 300 ms by default, so its buckets are dense below a second.
TOTAL_TIME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0

Labels = tuple[tuple[str, str], ...]


# -- the text exposition format ----------------------------------------------------------------------
def escape_label(value: str) -> str:
    """A label value as the format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, +Inf/-Inf/NaN spelled as Prometheus spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels_text(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels) + "}"


@dataclass
class Family:
    """One metric family: its HELP and TYPE lines and its samples (suffix, labels, value)."""

    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, tuple(labels.items()), value))

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}",
                 f"# TYPE {self.name} {self.type}"]
        lines += [f"{self.name}{suffix}{_labels_text(labels)} {format_value(value)}"
                  for suffix, labels, value in self.samples]
        return "\n".join(lines) + "\n"


def render(families: Iterable[Family]) -> str:
    """The whole exposition: every family, each with its HELP and TYPE."""
    return "".join(f.render() for f in families)


class Histogram:
    """Cumulative-bucket histogram of observations (not locked: MigrationStats locks around it)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def add_to(self, family: Family, **labels: str) -> None:
        """The _bucket (cumulative, le="+Inf" last), _sum and _count samples of this histogram."""
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            family.add(running, "_bucket", **labels, le=format_value(bound))
        family.add(self.count, "_bucket", **labels, le="+Inf")
        family.add(self.sum, "_sum", **labels)
        family.add(self.count, "_count", **labels)


# -- what accumulates: finished migrations -------------------------------------------------------------
class MigrationStats:
    """Counters and histograms of the migrations this agent finished (in and out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # record() runs in migration session threads
        self.outcomes = {(d, o): 0 for d in DIRECTIONS for o in OUTCOMES}
        self.bytes = dict.fromkeys(DIRECTIONS, 0)  # wire bytes of finished migrations, by direction
        self._bytes_shown = dict.fromkeys(DIRECTIONS, 0)  # the counter as last exposed, never to go back
        self.total_time = {d: Histogram(TOTAL_TIME_BUCKETS) for d in DIRECTIONS}
        self.downtime = Histogram(DOWNTIME_BUCKETS)

    def record(self, info: Any) -> None:
        """Count one finished migration; `info` is a MigrationInfo (the engine's on_finished hook)."""
        d = info.to_dict()
        direction, outcome = d["direction"], d["status"]
        if direction not in DIRECTIONS or outcome not in OUTCOMES:
            return  # not finished (the hook fires after the session ended, so this is defensive)
        with self._lock:
            self.outcomes[direction, outcome] += 1
            self.bytes[direction] += int(d["ram"]["transferred"])
            if outcome == "completed":
                self.total_time[direction].observe(info.total_s())
                if info.downtime_s is not None:
                    self.downtime.observe(info.downtime_s)

    def families(self, live_bytes: dict[str, int]) -> list[Family]:
        """The accumulated families; `live_bytes` adds the bytes of migrations still running."""
        with self._lock:
            return [self._outcome_family(), self._bytes_family(live_bytes), self._total_time_family(),
                    self._downtime_family()]

    def _outcome_family(self) -> Family:
        f = Family("ferry_migrations_total", "counter",
                   "Migrations finished by this agent, by direction (out: source, in: destination) and outcome.")
        for (direction, outcome), n in self.outcomes.items():
            f.add(n, direction=direction, outcome=outcome)
        return f

    def _bytes_family(self, live_bytes: dict[str, int]) -> Family:
        f = Family("ferry_migration_bytes_total", "counter",
                   "Bytes on the migration wire (page data and framing): direction out = sent, in = received.")
        for direction in DIRECTIONS:
            # Between a session's final status and its on_finished call its bytes are neither live
            # nor finished; a counter must not dip meanwhile (Prometheus would read a reset).
            total = max(self._bytes_shown[direction], self.bytes[direction] + live_bytes.get(direction, 0))
            self._bytes_shown[direction] = total
            f.add(total, direction=direction)
        return f

    def _total_time_family(self) -> Family:
        f = Family("ferry_migration_total_seconds", "histogram",
                   "Total time of completed migrations, from the request to the VM running on the destination.")
        for direction in DIRECTIONS:
            self.total_time[direction].add_to(f, direction=direction)
        return f

    def _downtime_family(self) -> Family:
        f = Family("ferry_migration_downtime_seconds", "histogram",
                   "Downtime of completed outgoing migrations, measured on the source from pause to RESUMED.")
        self.downtime.add_to(f)
        return f


# -- what is read at scrape time: VMs and migrations in progress ---------------------------------------
def vm_families(vms: Any) -> list[Family]:
    """VMs by state and guest memory, from the VM manager."""
    listed = vms.list()
    by_state = dict.fromkeys(VM_STATES, 0)
    for vm in listed:
        by_state[vm.state] = by_state.get(vm.state, 0) + 1
    states = Family("ferry_vms", "gauge", "VMs on this agent, by state.")
    for state, n in by_state.items():
        states.add(n, state=state)
    mem = Family("ferry_guest_memory_bytes", "gauge",
                 "Guest memory: used by VMs, free for new or incoming ones, and the limit (max-mem).")
    free = vms.free_memory()
    mem.add(sum(vm.mem for vm in listed), kind="used")
    mem.add(free, kind="free")
    mem.add(vms.max_mem, kind="limit")
    return [states, mem]


_LIVE_GAUGES = (
    ("ferry_migration_dirty_pages_rate", "Pages the guest dirtied per second in the latest round.",
     lambda d: d["ram"]["dirty-pages-rate"]),
    ("ferry_migration_cpu_throttle_percent", "vCPU throttle applied by auto-converge, in percent.",
     lambda d: d["cpu-throttle-percentage"]),
    ("ferry_migration_remaining_bytes", "Guest memory known dirty and not yet sent.",
     lambda d: d["ram"]["remaining"]),
    ("ferry_migration_bandwidth_bytes_per_second", "Measured bandwidth of the latest round.",
     lambda d: d["ram"]["mbps"] * 1e6 / 8),
    ("ferry_migration_expected_downtime_seconds", "Downtime expected if the migration switched over now.",
     lambda d: d["expected-downtime"] / 1000),
)


def live_families(infos: list[dict[str, Any]]) -> tuple[list[Family], dict[str, int]]:
    """Gauges of the migrations in progress, and their wire bytes so far by direction."""
    live = [d for d in infos if d.get("status") in LIVE_STATUSES]
    active = Family("ferry_migrations_active", "gauge", "Migrations in progress, by direction.")
    for direction in DIRECTIONS:
        active.add(sum(1 for d in live if d["direction"] == direction), direction=direction)
    families = [active]
    for name, help_text, get in _LIVE_GAUGES:
        f = Family(name, "gauge", help_text + " Per outgoing migration in progress.")
        for d in live:
            if d["direction"] == "out":
                f.add(float(get(d)), vm=str(d["vm"]))
        families.append(f)
    live_bytes = {direction: sum(int(d["ram"]["transferred"]) for d in live if d["direction"] == direction)
                  for direction in DIRECTIONS}
    return families, live_bytes


def tls_expiry_family(ends: dict[str, Any], now: float) -> Family:
    """Seconds until each certificate of the TLS directory ("cert", "ca") expires; negative once expired."""
    family = Family("ferry_tls_expiry_seconds", "gauge",
                    "Seconds until the agent's TLS certificate (cert=\"cert\") or its CA (cert=\"ca\") expires.")
    for which, end in ends.items():
        family.add(round(end.timestamp() - now), cert=which)
    return family


class AgentMetrics:
    """Everything /metrics shows for one agent."""

    def __init__(self, *, agent_name: str, version: str, vms: Any, migrations: Any,
                 tls_expiries: Callable[[], dict[str, Any]] | None = None) -> None:
        self.agent_name = agent_name
        self.version = version
        self.vms = vms
        self.migrations = migrations
        self.tls_expiries = tls_expiries  # when the TLS certificates in use end (agent/tls_check.py)
        self.stats = MigrationStats()

    def collect(self) -> str:
        """The exposition text of this moment."""
        info = Family("ferry_agent_info", "gauge", "Always 1; the labels name the agent and its version.")
        info.add(1, agent=self.agent_name, version=self.version)
        infos = self.migrations.infos() if self.migrations is not None else []
        live, live_bytes = live_families(infos)
        tls = [tls_expiry_family(self.tls_expiries(), time.time())] if self.tls_expiries is not None else []
        return render([info, *vm_families(self.vms), *live, *self.stats.families(live_bytes), *tls])


# -- the HTTP endpoint ----------------------------------------------------------------------------------
class MetricsServer:
    """A minimal HTTP/1.1 server for GET /metrics; one request per connection."""

    def __init__(self, collect: Callable[[], str], log: Any = None) -> None:
        self.collect = collect
        self.log = log
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, headers, body = await self._respond(reader)
            writer.write(_response(status, headers, body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, OSError):
            pass  # the scraper went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return _text("400 Bad Request", "bad request: expected an HTTP/1.x request head\n")
        except TimeoutError:
            return _text("408 Request Timeout", "request head not received in time\n")
        return self._route(head)

    def _route(self, head: bytes) -> tuple[str, dict[str, str], bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text("400 Bad Request", "bad request: expected METHOD PATH HTTP/1.x\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, headers, body = _text("405 Method Not Allowed", "only GET and HEAD\n")
            headers["Allow"] = "GET, HEAD"
        elif target == "/metrics":
            status, headers, body = "200 OK", {"Content-Type": CONTENT_TYPE}, self.collect().encode()
        elif target == "/":
            status, headers, body = _text("200 OK", "ferry-agent: metrics at /metrics\n")
        else:
            status, headers, body = _text("404 Not Found", f"no such path {target!r}; metrics are at /metrics\n")
        if method == "HEAD":
            headers["Content-Length"] = str(len(body))
            body = b""
        return status, headers, body


def _text(status: str, text: str) -> tuple[str, dict[str, str], bytes]:
    return status, {"Content-Type": "text/plain; charset=utf-8"}, text.encode()


def _response(status: str, headers: dict[str, str], body: bytes) -> bytes:
    headers = {"Content-Length": str(len(body)), **headers, "Connection": "close"}
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body
