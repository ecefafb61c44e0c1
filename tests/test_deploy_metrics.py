"""Prometheus metrics: the exposition of agent/metrics.py, then real agents' /metrics parsed by prometheus-client.

The parser is prometheus-client's own (`text_string_to_metric_families`), so "parses" means what a
Prometheus server would accept; the values are checked against what the agents did: VMs created,
migrations completed, refused and cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from agent.metrics import (
    CONTENT_TYPE,
    DOWNTIME_BUCKETS,
    Family,
    Histogram,
    MetricsServer,
    MigrationStats,
    escape_label,
    format_value,
    live_families,
    render,
)
from agent.migration.info import MigrationInfo, Status
from tests.agents import AgentProc, agent_pair, free_port, make_key, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples keyed by (sample name, labels), and each family's type, through prometheus-client."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


# -- the exposition format ---------------------------------------------------------------------------
def test_values_and_labels_are_written_as_the_format_wants() -> None:
    assert format_value(3.0) == "3" and format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf" and format_value(float("nan")) == "NaN"
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    f = Family("ferry_test_thing", "gauge", "A help text with a \\ backslash.")
    f.add(1.5, vm='we"ird\nname')
    samples, types = parse(render([f]))
    assert types == {"ferry_test_thing": "gauge"}
    assert value(samples, "ferry_test_thing", vm='we"ird\nname') == 1.5


def test_histogram_buckets_are_cumulative_and_end_in_inf() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 20.0):
        h.observe(v)
    f = Family("ferry_test_seconds", "histogram", "Test.")
    h.add_to(f, direction="out")
    samples, types = parse(render([f]))
    assert types == {"ferry_test_seconds": "histogram"}
    buckets = {le: value(samples, "ferry_test_seconds_bucket", direction="out", le=le)
               for le in ("0.1", "1", "10", "+Inf")}
    assert buckets == {"0.1": 2, "1": 3, "10": 3, "+Inf": 4}
    assert value(samples, "ferry_test_seconds_count", direction="out") == 4
    assert value(samples, "ferry_test_seconds_sum", direction="out") == pytest.approx(20.65)


def _finished(direction: str, status: Status, downtime: float | None = None, transferred: int = 0) -> MigrationInfo:
    info = MigrationInfo(vm="v", direction=direction, transferred=transferred, downtime_s=downtime)
    info.finish(status)
    return info


def test_migration_stats_count_outcomes_bytes_and_times_of_completed_ones() -> None:
    stats = MigrationStats()
    stats.record(_finished("out", Status.COMPLETED, downtime=0.02, transferred=1000))
    stats.record(_finished("out", Status.FAILED, transferred=10))
    stats.record(_finished("in", Status.COMPLETED, transferred=900))
    stats.record(_finished("in", Status.CANCELLED))
    stats.record(MigrationInfo(vm="v", direction="out"))  # still in setup: not a finished migration
    samples, types = parse(render(stats.families({"out": 5})))
    assert types["ferry_migrations"] == "counter"
    assert value(samples, "ferry_migrations_total", direction="out", outcome="completed") == 1
    assert value(samples, "ferry_migrations_total", direction="out", outcome="failed") == 1
    assert value(samples, "ferry_migrations_total", direction="out", outcome="cancelled") == 0
    assert value(samples, "ferry_migrations_total", direction="in", outcome="cancelled") == 1
    assert value(samples, "ferry_migration_bytes_total", direction="out") == 1015  # finished + live
    assert value(samples, "ferry_migration_bytes_total", direction="in") == 900
    assert value(samples, "ferry_migration_total_seconds_count", direction="out") == 1  # completed only
    assert value(samples, "ferry_migration_downtime_seconds_count") == 1
    assert value(samples, "ferry_migration_downtime_seconds_bucket", le="0.025") == 1
    assert value(samples, "ferry_migration_downtime_seconds_bucket", le=format_value(DOWNTIME_BUCKETS[0])) == 0


def test_bytes_counter_never_goes_back_while_a_migration_is_between_live_and_recorded() -> None:
    stats = MigrationStats()
    for live, expected in (({"out": 100}, 100), ({}, 100), ({"out": 150}, 150)):
        samples, _ = parse(render(stats.families(live)))
        assert value(samples, "ferry_migration_bytes_total", direction="out") == expected
    stats.record(_finished("out", Status.COMPLETED, transferred=160))
    samples, _ = parse(render(stats.families({})))
    assert value(samples, "ferry_migration_bytes_total", direction="out") == 160


def test_live_gauges_only_for_migrations_in_progress() -> None:
    running = MigrationInfo(vm="busy", direction="out", status=Status.ACTIVE, throttle=30, dirty_pages_rate=1234.0,
                            remaining=8192, bandwidth=1e6, expected_downtime_s=0.05, transferred=77)
    done = _finished("out", Status.COMPLETED)
    incoming = MigrationInfo(vm="other", direction="in", status=Status.ACTIVE, transferred=5)
    families, live_bytes = live_families([running.to_dict(), done.to_dict(), incoming.to_dict()])
    samples, _ = parse(render(families))
    assert value(samples, "ferry_migrations_active", direction="out") == 1
    assert value(samples, "ferry_migrations_active", direction="in") == 1
    assert value(samples, "ferry_migration_cpu_throttle_percent", vm="busy") == 30
    assert value(samples, "ferry_migration_dirty_pages_rate", vm="busy") == 1234
    assert value(samples, "ferry_migration_remaining_bytes", vm="busy") == 8192
    assert value(samples, "ferry_migration_bandwidth_bytes_per_second", vm="busy") == pytest.approx(1e6)
    assert value(samples, "ferry_migration_expected_downtime_seconds", vm="busy") == pytest.approx(0.05)
    assert not any(name == "ferry_migration_dirty_pages_rate" and ("vm", "v") in labels
                   for name, labels in samples)
    assert live_bytes == {"out": 77, "in": 5}


# -- the HTTP endpoint in process ----------------------------------------------------------------------
async def _http(address: tuple[str, int], request: bytes) -> bytes:
    """The whole answer to ``request`` (the server closes after one)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_each_scrape_collects_afresh_and_a_silent_client_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.05)  # the wait for a request head
    scrapes: list[int] = []

    def collect() -> str:
        scrapes.append(1)
        return f"ferry_test_scrapes {len(scrapes)}\n"

    server = MetricsServer(collect)
    address = await server.start("127.0.0.1", 0)
    try:
        first = await _http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\nferry_test_scrapes 1\n")
        assert f"Content-Type: {CONTENT_TYPE}".encode() in first
        assert (await _http(address, b"")).startswith(b"HTTP/1.1 408 ")  # connected, said nothing
        again = await _http(address, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")  # the query is ignored
        assert again.endswith(b"ferry_test_scrapes 2\n")
    finally:
        await server.close()
    assert len(scrapes) == 2  # the silent client cost no collection


# -- real agents -------------------------------------------------------------------------------------
def scrape(address: str) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        return parse(resp.read().decode())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc, str, str]]:
    """Agents A and B with metrics endpoints (B takes at most 96M of guests)."""
    ma, mb = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    pairs = agent_pair(tmp_path_factory.mktemp("metrics"), a={"metrics": ma}, b={"metrics": mb, "max_mem": "96M"},
                       cli_in_process=True)
    for a, b in pairs:  # agent_pair yields once; the loop's end runs its teardown
        yield a, b, ma, mb


def _counted(address: str, direction: str, outcome: str, n: int) -> Any:
    samples, _ = scrape(address)
    return value(samples, "ferry_migrations_total", direction=direction, outcome=outcome) == n


def test_metrics_follow_vms_and_migrations(pair: tuple[AgentProc, AgentProc, str, str]) -> None:
    a, b, ma, mb = pair
    samples, types = scrape(ma)
    assert types["ferry_vms"] == "gauge" and types["ferry_migration_downtime_seconds"] == "histogram"
    assert value(samples, "ferry_agent_info", agent="A", version=a.call("agent-info")["version"]) == 1
    assert value(samples, "ferry_vms", state="running") == 0
    assert value(samples, "ferry_migrations_total", direction="out", outcome="completed") == 0

    a.cli("vm", "create", "c1", "--program", "counter", "--mem", "64M")
    a.cli("vm", "create", "big", "--program", "idle", "--mem", "128M", "--paused")
    samples, _ = scrape(ma)
    assert value(samples, "ferry_vms", state="running") == 1 and value(samples, "ferry_vms", state="paused") == 1
    assert value(samples, "ferry_guest_memory_bytes", kind="used") == 192 << 20

    out = a.cli("migrate", "c1", "--to", b.control, json=True).json
    assert out["status"] == "completed"
    wait_for(lambda: _counted(ma, "out", "completed", 1), what="A to count the migration")
    wait_for(lambda: _counted(mb, "in", "completed", 1), what="B to count the migration")
    sa, _ = scrape(ma)
    sb, _ = scrape(mb)
    assert value(sa, "ferry_vms", state="running") == 0 and value(sb, "ferry_vms", state="running") == 1
    assert value(sa, "ferry_migration_total_seconds_count", direction="out") == 1
    assert value(sa, "ferry_migration_total_seconds_sum", direction="out") == pytest.approx(
        out["total-time"] / 1000, abs=0.5)
    assert value(sa, "ferry_migration_downtime_seconds_count") == 1
    assert value(sb, "ferry_migration_total_seconds_count", direction="in") == 1
    assert value(sb, "ferry_migration_downtime_seconds_count") == 0  # measured on the source only
    sent = value(sa, "ferry_migration_bytes_total", direction="out")
    assert sent >= out["ram"]["transferred"] > 0
    assert value(sb, "ferry_migration_bytes_total", direction="in") > 0

    # A refused migration (B has no room for 128M) is a failed one on A; B never ran it.
    refused = a.cli("migrate", "big", "--to", b.control, check=False)
    assert refused.returncode != 0
    wait_for(lambda: _counted(ma, "out", "failed", 1), what="A to count the refusal")
    sb, _ = scrape(mb)
    assert value(sb, "ferry_migrations_total", direction="in", outcome="failed") == 0
    b.destroy_all_vms()
    a.destroy_all_vms()


def test_live_gauges_during_a_slow_migration_then_cancelled(pair: tuple[AgentProc, AgentProc, str, str]) -> None:
    a, b, ma, _ = pair
    before, _ = scrape(ma)
    sent_before = value(before, "ferry_migration_bytes_total", direction="out")
    a.cli("vm", "create", "s1", "--program", "memstress", "--mem", "64M", "--arg", "ws=8M", "--arg", "rate=4000")
    # 4 MiB/s against a guest dirtying ~16 MiB/s: rounds of about 2 s that never converge, until cancelled.
    a.call("migrate", name="s1", to=b.control, params={"bandwidth": 4 << 20, "compress": "none"})  # raw: the cap is the brake

    def a_round_done() -> Any:
        samples, _ = scrape(ma)
        if value(samples, "ferry_migrations_active", direction="out") != 1:
            return None
        # The dirty rate is measured at the end of a round: once it shows, a round is done.
        return samples if value(samples, "ferry_migration_dirty_pages_rate", vm="s1") > 0 else None

    samples = wait_for(a_round_done, timeout=30, what="the first round to finish while active")
    live_sent = value(samples, "ferry_migration_bytes_total", direction="out")
    assert live_sent > sent_before  # the running migration's bytes are in the counter already
    assert value(samples, "ferry_migration_cpu_throttle_percent", vm="s1") == 0  # no auto-converge asked
    assert value(samples, "ferry_migration_remaining_bytes", vm="s1") > 0
    assert value(samples, "ferry_migration_bandwidth_bytes_per_second", vm="s1") > 0
    assert value(samples, "ferry_vms", state="migrating") == 1
    a.call("migrate-cancel", name="s1")
    cancelled = 1 + int(value(before, "ferry_migrations_total", direction="out", outcome="cancelled"))
    wait_for(lambda: _counted(ma, "out", "cancelled", cancelled), what="the cancel to count")
    samples, _ = scrape(ma)
    assert value(samples, "ferry_migrations_active", direction="out") == 0
    assert ("ferry_migration_remaining_bytes", frozenset({("vm", "s1")})) not in samples
    assert value(samples, "ferry_vms", state="running") == 1  # back on the source
    assert value(samples, "ferry_migration_bytes_total", direction="out") >= live_sent  # a counter never goes back
    a.destroy_all_vms()


def _raw(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_endpoint_answers_bad_requests_clearly_and_keeps_serving(
        pair: tuple[AgentProc, AgentProc, str, str]) -> None:
    a, _, ma, _ = pair
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{ma}/nope", timeout=10)
    assert e.value.code == 404 and b"/metrics" in e.value.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"http://{ma}/metrics", data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    assert _raw(ma, b"\x00\xffgarbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(ma, b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(ma, b"GET /metrics").startswith(b"HTTP/1.1 400 ")  # closed before the head ended
    head = _raw(ma, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    samples, _ = scrape(ma)  # still serving, and the agent still answers its API
    assert ("ferry_agent_info", frozenset({("agent", "A"), ("version", a.call("agent-info")["version"])})) in samples


def test_metrics_flag_and_config_key(tmp_path: Path) -> None:
    from agent.config import load_config

    key = make_key(tmp_path)
    conf = tmp_path / "agent.toml"
    conf.write_text('metrics = "127.0.0.1:9901"\n')
    assert load_config(["--config", str(conf), "--key-file", str(key)]).metrics == ("127.0.0.1", 9901)
    assert load_config(["--key-file", str(key), "--metrics", "[::1]:9"]).metrics == ("::1", 9)
    assert load_config(["--key-file", str(key)]).metrics is None
