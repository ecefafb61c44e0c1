"""Distance: the data-path migration at 0, 10 and 50 ms round trip, through a delaying proxy and a delayed link.

The distance scenario. The data-path guest (bench/fill_random.fasm over all its RAM, so every
page is non-zero) is migrated paused (pure copy) between real agents:

* **direct**: agent to agent on loopback, the baseline;
* **proxy**: through bench/delay_proxy.py (a userspace TCP relay adding half the round trip each
  way) at 0 ms (the proxy's own cost), 10 and 50 ms, named by the ``migrate`` op's ``migration``
  override. The relay's hops are loopback connections, so it shows what the *protocol* does with a
  round trip (a stop-and-wait per batch would crawl; setup and switch-over round trips show) but
  not what TCP does: the window between the agents is never the limit;
* **link**: to an agent in a network namespace joined by a delayed TUN link (delay_proxy.py
  ``--tun``), where TCP runs end to end over the real round trip: windows, buffers, slow start.

References measured in the same run: the raw Python copy of bench/baseline_copy.py through the
proxy at each delay; and over the link, the data path alone (agent/migration/transport.py page
batches from a filled memfd into a fresh one in the namespace) with the send buffer left to Linux
autotuning (before) and with the buffer transport.connect() sizes from the handshake round trip
(after): what the socket change buys.

Runs are interleaved (one of each path, then again) so drifting load on the two shared cores hits
every path alike; medians. Target: throughput at 50 ms >= 50 % of loopback.

Then the switch-over's round trips: a small running guest migrated over the direct and proxy paths
with and without ``commit-ahead`` (COMMIT right behind the digest instead of after READY: one round
trip less in the downtime, docs/protocol.md), alternately, downtime and its verify + commit parts.

    .venv/bin/python -m bench.bench_distance            # 1 GiB guest, 3 runs per path
    .venv/bin/python -m bench.bench_distance --quick    # 256 MiB guest, 1 run per path (a smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.common import describe_machine, format_size, markdown_table, median, module_argv

FINAL = ("completed", "failed", "cancelled")
VM = "bench-distance"
MAX_FAILURES = 3
AHEAD_VM = "bench-ahead"  # the small running guest of the commit-ahead comparison
AHEAD_RUNS = 7  # migrations per path and mode (2 in --quick)
DEFAULT_SEND_BUFFER = 32 << 20  # the big buffer compared when the agents run with autotuning


@dataclass
class Series:
    """One path and what was measured over it."""

    label: str
    kind: str  # direct | proxy | link
    rtt_ms: float = 0.0
    r0_gib_s: list[float] = field(default_factory=list)  # ferry round 0 (sender side)
    copy_gib_s: list[float] = field(default_factory=list)  # guest size / (total - setup)
    total_ms: list[float] = field(default_factory=list)
    setup_ms: list[float] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    ref_gib_s: list[float] = field(default_factory=list)  # raw copy (direct, proxy) / data path, big buffer (link)
    dp_auto: list[float] = field(default_factory=list)  # direct, link: the data path alone, autotuned send buffer
    dp_big: list[float] = field(default_factory=list)  # direct, link: the data path alone, SEND_BUFFER
    failed: int = 0

    def add(self, info: dict[str, Any], size: int) -> None:
        r0 = info["rounds"][0]
        self.r0_gib_s.append(int(r0["bytes"]) / max(float(r0["seconds"]), 1e-9) / 2**30)
        total, setup = float(info["total-time"]), float(info["setup-time"])
        self.copy_gib_s.append(size / 2**30 / (max(total - setup, 1.0) / 1000))
        self.total_ms.append(total)
        self.setup_ms.append(setup)
        self.downtime_ms.append(float(info["downtime"]))


@dataclass
class AheadSeries:
    """Downtime over one path, COMMIT after READY (False) and right behind the digest (True)."""

    label: str
    downtime_ms: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    switch_ms: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})  # verify + commit
    failed: int = 0


# --- processes: proxies, the link, agents -------------------------------------------------------


class Proxy:
    """A bench/delay_proxy.py relay process in front of ``target``; ``address`` is where to connect."""

    def __init__(self, target: str, rtt_ms: float) -> None:
        self.proc = subprocess.Popen(module_argv("bench.delay_proxy", ["--target", target, "--rtt-ms", str(rtt_ms)]),
                                     stdout=subprocess.PIPE, text=True)
        line = _readline(self.proc.stdout)
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        self.address = line.split()[1]
        self.port = int(self.address.rpartition(":")[2])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by its own pid: a relay holds nothing worth a clean exit
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Link:
    """A bench/delay_proxy.py ``--tun`` link to a fresh network namespace; ``rtt()`` changes its delay."""

    def __init__(self) -> None:
        self.netns = f"ferry-distance-{os.getpid()}"
        self.proc = subprocess.Popen(module_argv("bench.delay_proxy", ["--tun", self.netns]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _readline(self.proc.stdout)
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"delayed link did not start: {line!r}")
        self.local, self.remote = line.split()[1:3]

    def rtt(self, ms: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"rtt {ms}\n")
        self.proc.stdin.flush()
        if _readline(self.proc.stdout) != "ok\n":
            raise RuntimeError("delayed link did not take the new round trip")

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the link removes its namespace at the end of its stdin
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _readline(stream: IO[str] | None) -> str:
    return stream.readline() if stream is not None else ""


def start_agent_at(tmp: Path, name: str, key: Path, host: str, link: Link | None = None) -> Any:
    """A ferry-agent with its control and migration listeners on ``host`` (inside the link's
    namespace when ``link`` is given). tests/agents.py starts agents on 127.0.0.1 with
    ``sys.executable``: its later flags override the loopback ones, and for the namespace its
    interpreter is, for the moment of the start, a wrapper that enters the namespace first."""
    from tests.agents import AgentProc, free_port

    control, migration = f"{host}:{free_port()}", f"{host}:{free_port()}"
    saved = sys.executable
    if link is not None:
        wrapper = tmp / f"python-in-{link.netns}"
        wrapper.write_text(f'#!/bin/sh\nexec {" ".join(link.argv([saved]))} "$@"\n')
        wrapper.chmod(0o755)
        sys.executable = str(wrapper)
    try:
        agent = AgentProc(tmp, name, key, {"control": control, "migration": migration})
    finally:
        sys.executable = saved
    agent.control, agent.migration = control, migration
    try:
        agent.wait_ready()
    except BaseException:
        agent.stop(signal.SIGKILL)
        raise
    return agent


# --- references: the raw copy through the proxy, the data path over the link --------------------


@contextlib.contextmanager
def raw_links(rtts: list[float], stack: contextlib.ExitStack) -> Iterator[dict[float | None, socket.socket]]:
    """A bench/baseline_copy.py receiver per path: direct (key None) and through a proxy per rtt.

    The receiver child connects to the port it is given, so a proxied one is given the proxy's and
    the proxy relays to our listener; the data crosses the proxy's reverse direction, delayed alike.
    """
    from bench.baseline_copy import REQUEST

    conns: dict[float | None, socket.socket] = {}
    procs: list[subprocess.Popen[bytes]] = []
    listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    listener.settimeout(30.0)
    port = listener.getsockname()[1]
    try:
        for rtt in [None, *rtts]:
            if rtt is None:
                child_port = port
            else:
                proxy = Proxy(f"127.0.0.1:{port}", rtt)
                stack.callback(proxy.stop)
                child_port = proxy.port
            procs.append(subprocess.Popen(module_argv("bench.baseline_copy", ["--receiver", str(child_port)])))
            conn, _ = listener.accept()
            conn.settimeout(300.0)
            conns[rtt] = stack.enter_context(conn)
        yield conns
        for conn in conns.values():
            with contextlib.suppress(OSError):
                conn.sendall(REQUEST.pack(0, 0))  # the receiver's "stop"
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def link_receiver_main(host: str, size: int) -> None:
    """In the namespace: accept data-path transfers of ``size`` bytes, each into a fresh guest RAM."""
    from agent.migration.transport import Connection, accepted
    from agent.vms import close_guest_ram, create_guest_ram
    from proto.messages import PageBatch, Ready

    with socket.create_server((host, 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        while True:
            sock, _ = listener.accept()
            conn = Connection(accepted(sock), guest_size=size)  # as the destination agent's
            fd, ram = create_guest_ram("bench-distance-rx", size)
            view = memoryview(ram)
            try:
                while isinstance(conn.recv(view), PageBatch):
                    pass
                conn.send(Ready())
            finally:
                view.release()
                conn.close()
                close_guest_ram(fd, ram)


def link_transfer(addr: tuple[str, int], src: memoryview, send_buffer: int) -> float:
    """Seconds from connect to the receiver's answer for the data path of all of ``src`` over the
    link, with transport.SEND_BUFFER set to ``send_buffer`` for the connection (0: autotuning)."""
    from agent.migration import transport
    from agent.migration.pages import plan_batches
    from proto.messages import Ready

    t0 = time.perf_counter()
    saved, transport.SEND_BUFFER = transport.SEND_BUFFER, send_buffer
    try:
        conn = transport.Connection(transport.connect(addr))
    finally:
        transport.SEND_BUFFER = saved
    try:
        for batch in plan_batches(src, [(0, len(src))]):
            conn.send_pages(src, batch.ranges, batch.zeros)
        conn.send(Ready())
        conn.recv()
    finally:
        conn.close()
    return time.perf_counter() - t0


def _before_after(s: Series, addr: tuple[str, int], src: memoryview, big: int, i: int) -> None:
    """The data path alone with an autotuned and with a sized send buffer, in turn first and second
    (the second of two back-to-back transfers is not in the same position as the first)."""
    gib = len(src) / 2**30
    for buf in ((0, big) if i % 2 == 0 else (big, 0)):
        (s.dp_big if buf else s.dp_auto).append(gib / link_transfer(addr, src, buf))


# --- the run ------------------------------------------------------------------------------------


def migrate_once(src: Any, dst: Any, name: str, via: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """Migrate ``name`` from ``src`` to ``dst`` (its memory stream through ``via`` if given) and
    return the final MigrationInfo."""
    args: dict[str, Any] = {"name": name, "to": dst.control, "params": params}
    if via is not None:
        args["migration"] = via
    src.call("migrate", **args)
    while (info := src.call("migrate-status", name=name))["status"] not in FINAL:
        time.sleep(0.01)
    return info


class Run:
    """The agents, the guest, and where it is; one migration at a time."""

    def __init__(self, size: int, agents: dict[str, Any]) -> None:
        self.size = size
        self.agents = agents
        self.where = "A"

    def migrate(self, to: str, via: str | None, series: Series) -> bool:
        src, dst = self.agents[self.where], self.agents[to]
        src.call("vm-pause", name=VM)
        info = migrate_once(src, dst, VM, via, {})
        if info["status"] != "completed":
            series.failed += 1
            print(f"{series.label}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
            return False
        series.add(info, self.size)
        self.where = to
        return True


def measure(size: int, runs: int, rtts: list[float], use_link: bool,
            ahead_runs: int) -> tuple[list[Series], list[AheadSeries], str]:
    """Every path ``runs`` times (completed migrations), interleaved, with its reference; then
    the commit-ahead comparison, ``ahead_runs`` per path and mode."""
    from agent.migration import transport
    from bench.baseline_copy import filled_memfd, send_once
    from bench.bench_migrate import fill_guest
    from tests.agents import make_key

    direct = Series("direct (loopback)", "direct")
    proxied = [Series(f"proxy {r:g} ms", "proxy", r) for r in rtts]
    linked = [Series(f"link {r:g} ms", "link", r) for r in rtts] if use_link else []
    tmp = Path(tempfile.mkdtemp(prefix="ferry-distance-"))
    key = make_key(tmp)
    load: list[float] = []
    # The agents' logs (printed when they stop) go to stderr: stdout is the Markdown report.
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
        link = None
        if use_link:
            link = Link()
            stack.callback(link.stop)
        host = link.local if link else "127.0.0.1"  # a local address the namespace can reach
        agents = {n: stack.enter_context(start_agent_at(tmp, n, key, host)) for n in ("A", "C")}
        if link is not None:
            agents["B"] = stack.enter_context(start_agent_at(tmp, "B", key, link.remote, link))
        relays: dict[tuple[str, float], str] = {}
        for n in ("A", "C"):
            for r in rtts:
                proxy = Proxy(agents[n].migration, r)
                stack.callback(proxy.stop)
                relays[(n, r)] = proxy.address
        raw = stack.enter_context(raw_links(rtts, stack))
        raw_src = filled_memfd(size)
        stack.callback(raw_src.close)
        receivers: dict[str, tuple[str, int]] = {}
        for where, ip in [("loopback", "127.0.0.1")] + ([("link", link.remote)] if link else []):
            argv = module_argv("bench.bench_distance", ["--link-receiver", ip, "--size", str(size)])
            rx = subprocess.Popen(link.argv(argv) if where == "link" and link else argv, stdout=subprocess.PIPE,
                                  text=True)
            stack.callback(rx.wait)
            stack.callback(rx.kill)  # by its pid (ip netns exec runs the receiver in its own process)
            receivers[where] = (ip, int(_readline(rx.stdout)))
        big = transport.SEND_BUFFER or DEFAULT_SEND_BUFFER
        fill_guest(agents["A"], VM, size)
        run = Run(size, agents)
        src_view = memoryview(raw_src)
        stack.callback(src_view.release)
        for i in range(runs):
            for s, rtt in [(direct, None), *zip(proxied, rtts, strict=True)]:
                if len(s.total_ms) >= runs or s.failed > MAX_FAILURES:
                    continue
                s.ref_gib_s.append(size / 2**30 / send_once(raw[rtt], raw_src, False).seconds)
                if s is direct:
                    _before_after(s, receivers["loopback"], src_view, big, i)
                to = "C" if run.where == "A" else "A"
                run.migrate(to, None if rtt is None else relays[(to, rtt)], s)
                load.append(os.getloadavg()[0])
            for s in linked:
                assert link is not None
                link.rtt(s.rtt_ms)
                _before_after(s, receivers["link"], src_view, big, i)
                s.ref_gib_s.append(s.dp_big[-1])
                home = run.where
                for to in ("B", home):  # there and back: both are samples of the link
                    for _ in range(MAX_FAILURES + 1):
                        if run.migrate(to, None, s):
                            break
                load.append(os.getloadavg()[0])
        agents[run.where].call("vm-destroy", name=VM)
        ahead = measure_commit_ahead(agents, relays, rtts, ahead_runs)
    shutil.rmtree(tmp, ignore_errors=True)  # state dirs, logs, key, the namespace wrapper
    load_text = f"{min(load):.2f}-{max(load):.2f}" if load else "?"
    return [direct, *proxied, *linked], ahead, load_text


def measure_commit_ahead(agents: dict[str, Any], relays: dict[tuple[str, float], str], rtts: list[float],
                         runs: int) -> list[AheadSeries]:
    """A running 64 MiB counter guest between A and C, each path, COMMIT after READY and ahead of
    it alternately (the order flipped every run), ``runs`` completed migrations each."""
    paths: list[tuple[AheadSeries, float | None]] = [(AheadSeries("direct (loopback)"), None)]
    paths += [(AheadSeries(f"proxy {r:g} ms"), r) for r in rtts]
    where = "A"
    agents[where].call("vm-create", name=AHEAD_VM, program="counter", mem="64M", args={"every": "4096"})
    for i in range(runs):
        for s, rtt in paths:
            for ahead in ((False, True) if i % 2 == 0 else (True, False)):
                for _ in range(MAX_FAILURES + 1):
                    to = "C" if where == "A" else "A"
                    via = None if rtt is None else relays[(to, rtt)]
                    info = migrate_once(agents[where], agents[to], AHEAD_VM, via, {"commit-ahead": ahead})
                    if info["status"] == "completed":
                        where = to
                        parts = info["downtime-breakdown"]
                        s.downtime_ms[ahead].append(float(info["downtime"]))
                        s.switch_ms[ahead].append(float(parts.get("verify", 0)) + float(parts.get("commit", 0)))
                        break
                    s.failed += 1
                    print(f"{s.label}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
    agents[where].call("vm-destroy", name=AHEAD_VM)
    return [s for s, _ in paths]


# --- output -------------------------------------------------------------------------------------


def _med(values: list[float], fmt: str = ".2f") -> str:
    return format(median(values), fmt) if values else "-"


def _ratio(values: list[float], base: list[float]) -> str:
    return f"{median(values) / median(base):.0%}" if values and base else "-"


def markdown(series: list[Series], size: int, runs: int, load: str) -> str:
    from agent.migration.transport import RECV_BUFFER, SEND_BUFFER

    direct = series[0]
    proxy0 = next((s for s in series if s.kind == "proxy" and s.rtt_ms == 0), None)
    link0 = next((s for s in series if s.kind == "link" and s.rtt_ms == 0), None)
    rows = []
    for s in series:
        base0 = proxy0 if s.kind == "proxy" else link0 if s.kind == "link" else direct
        ref = "raw copy" if s.kind != "link" else "data path"
        rows.append([s.label, len(s.total_ms), s.failed, _med(s.r0_gib_s), _med(s.copy_gib_s),
                     _ratio(s.copy_gib_s, direct.copy_gib_s), _ratio(s.copy_gib_s, base0.copy_gib_s if base0 else []),
                     _med(s.total_ms, ".0f"), _med(s.setup_ms, ".0f"), _med(s.downtime_ms, ".0f"),
                     f"{_med(s.ref_gib_s)} ({ref})", _ratio(s.ref_gib_s, direct.ref_gib_s) if s.kind != "link" else "-"])
    links = [s for s in series if s.dp_auto]
    m = describe_machine()
    out = [
        f"{format_size(size)} guest, every page non-zero (bench/fill_random.fasm), migrated paused; "
        f"median of {runs} completed migrations per path (link paths: {2 * runs}, there and back), paths "
        f"interleaved; load average {load} during the run ({m.cpu_model}, {m.cores} CPUs, kernel {m.kernel}). "
        "`copy GiB/s` = guest size / (total time - setup time): the copy and the switch-over; `round 0` is "
        "`rounds[0]` bytes / seconds on the sender, optimistic by what the path holds in flight. "
        "`vs 0 ms` compares with the same kind of path at 0 ms (the proxy's or the link's own cost removed). "
        "Reference: bench/baseline_copy.py's raw copy through a proxy of the same delay (direct and proxy "
        "rows), or the data path alone over the link (link rows); each right before its migration.",
        "",
        markdown_table(["path", "runs", "failed", "round 0 GiB/s", "copy GiB/s", "vs direct", "vs 0 ms",
                        "total ms", "setup ms", "downtime ms", "reference GiB/s", "ref vs direct"], rows,
                       "lrrrrrrrrrrr"),
        "",
    ]
    if links:
        big = (SEND_BUFFER or DEFAULT_SEND_BUFFER) >> 20
        lrows = [[s.label, len(s.dp_auto), _med(s.dp_auto), _med(s.dp_big), _ratio(s.dp_big, s.dp_auto)]
                 for s in links]
        out += [
            f"What the send buffer buys: the data path alone (agent/migration/transport.py: connect, "
            f"{format_size(size)} of page batches from a filled memfd into a fresh one in another process, the "
            "receiver's answer; so it includes two round trips), with Linux autotuning of the send buffer "
            f"(capped at net.ipv4.tcp_wmem max = {_sysctl_max('net/ipv4/tcp_wmem')} bytes) and with the send "
            "buffer `transport.connect()` asks for (handshake round trip x 1 GiB/s, at most "
            f"{big} MiB, SO_SNDBUFFORCE; nothing is set when autotuning reaches that far, so the short paths "
            "compare like with like and show the noise), alternately, same run. The agents of this run had "
            f"FERRY_MIGRATION_SNDBUF={SEND_BUFFER} ({'autotuning' if not SEND_BUFFER else 'the sized buffer'}).",
            "",
            markdown_table(["path", "runs", "autotuned GiB/s", "sized send buffer GiB/s", "gain"],
                           lrows, "lrrrr"),
            "",
        ]
    out += [
        "Target: ferry at 50 ms round trip >= 50 % of loopback (`vs direct`). The link is a userspace "
        "TUN forwarder on the same two cores, so it costs throughput at 0 ms already: `vs 0 ms` is the path's "
        "delay alone. Page batches are never acknowledged, so a round streams; each pre-copy round ends with "
        "one round trip (Sync/SyncAck: the source harvests once the destination applied the round, so nothing "
        "is in flight at the pause), and the other round trips are in setup (TCP connect, hello, auth, "
        "MigrateStart/Accept: four) and in the switch-over (Digest/Ready, Commit/Resumed: two, in the "
        "downtime; one with commit ahead, below). The destination's receive buffer is sized from the "
        "handshake round trip as the send "
        f"buffer is (at most {RECV_BUFFER >> 20} MiB; FERRY_MIGRATION_RCVBUF). The proxy's hops are loopback "
        "connections, so only the link shows TCP's window at work.",
    ]
    return "\n".join(out)


def ahead_markdown(series: list[AheadSeries], runs: int) -> str:
    rows = []
    for s in series:
        off, on = s.downtime_ms[False], s.downtime_ms[True]
        saved = f"{median(off) - median(on):.1f}" if off and on else "-"
        rows.append([s.label, f"{len(off)} / {len(on)}", s.failed, _med(off, ".1f"), _med(on, ".1f"), saved,
                     _med(s.switch_ms[False], ".1f"), _med(s.switch_ms[True], ".1f")])
    return "\n".join([
        "**Commit ahead** (`ferry migrate --commit-ahead`): a running 64 MiB counter guest, migrated back and "
        f"forth, COMMIT after READY (off) and right behind the digest (on) alternately; medians of {runs} "
        "completed migrations each. \"switch\" = the downtime's verify + commit parts (digest sent until "
        "RESUMED). Ahead, the source is in doubt from the digest on: a destination that dies while it checks "
        "the digest leaves the VM paused for an in-doubt query (docs/protocol.md).",
        "",
        markdown_table(["path", "runs off / on", "failed", "downtime off ms", "downtime on ms", "saved ms",
                        "switch off ms", "switch on ms"], rows, "lrrrrrrr"),
    ])


def _sysctl_max(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().split()[-1]
    except (OSError, IndexError):
        return "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB guest")
    ap.add_argument("--size", default=None, help="guest RAM (bytes or with M/G suffix); default 1G, 256M quick")
    ap.add_argument("--runs", type=int, default=None, help="completed migrations per path (default 3, 1 quick)")
    ap.add_argument("--rtts", default="0,10,50", help="round trips, ms, comma-separated")
    ap.add_argument("--ahead-runs", type=int, default=None,
                    help=f"migrations per path and mode of the commit-ahead comparison (default {AHEAD_RUNS}, 2 quick)")
    ap.add_argument("--no-link", action="store_true", help="skip the delayed link (needs root and ip netns)")
    ap.add_argument("--link-receiver", metavar="HOST", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from vmruntime.programs import parse_size

    size = parse_size(a.size or ("256M" if a.quick else "1G"))
    if a.link_receiver:
        link_receiver_main(a.link_receiver, size)
        return
    use_link = not a.no_link and os.geteuid() == 0 and subprocess.run(
        ["ip", "netns", "list"], capture_output=True).returncode == 0
    rtts = [float(x) for x in a.rtts.split(",") if x.strip()]
    runs = a.runs or (1 if a.quick else 3)
    ahead_runs = a.ahead_runs or (2 if a.quick else AHEAD_RUNS)
    series, ahead, load = measure(size, runs, rtts, use_link, ahead_runs)
    print(markdown(series, size, runs, load))
    print()
    print(ahead_markdown(ahead, ahead_runs))
    if not use_link:
        print("\nThe delayed link was skipped (it needs root and `ip netns`).")


if __name__ == "__main__":
    main()
