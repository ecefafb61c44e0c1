"""Agent and control API latencies: what an operator and the migration's commit step wait for.

Measured against a real ferry-agent on loopback (plus the VM manager in-process for the start of an
incoming VM):

- control call: one vm-info Request -> Response on an open, authenticated TCP connection;
- connect + handshake + call: a fresh connection per call (what each CLI command does);
- CLI command: `ferry vm list` as a subprocess, Python start-up included;
- vm create: vm-create of a 64 MiB counter VM until it runs (spawn, boot), then vm-destroy;
- ferry migrate: `ferry migrate --json` of a 64 MiB counter VM between two agents (wall time of the
  command, and the downtime the migration reported);
- incoming start: VMManager.start_incoming (restore + resume inside the migration's downtime) with
  the VM process pre-spawned while pages arrive (what the agent does) and spawned at commit time.

Each figure is the median over runs of each run's median (p50) and 99th percentile.

    .venv/bin/python -m bench.bench_agent [--quick] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.client import call_once, connect
from agent.logs import Log
from agent.vms import VMManager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Agent:
    """A throwaway ferry-agent on loopback."""

    def __init__(self, tmp: Path, key_from: Path | None = None) -> None:
        tmp.mkdir()
        self.key_path = key_from or tmp / "key"
        if key_from is None:
            self.key_path.write_bytes(base64.b64encode(os.urandom(32)))
        self.key = self.key_path.read_bytes()
        self.control = f"127.0.0.1:{_free_port()}"
        argv = [sys.executable, "-m", "agent.daemon", "--name", f"bench-{tmp.name}", "--control", self.control,
                "--migration", f"127.0.0.1:{_free_port()}", "--state-dir", str(tmp / "state"),
                "--key-file", str(self.key_path), "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                asyncio.run(call_once(self.control, self.key, "vm-list"))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        # VM processes outlive their agent (docs/RELIABILITY.md, "Agent restarts") and would hold the
        # runner's stdout open; they are in the agent's process group, which the bench ends whole.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


async def _timed(n: int, once: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await once()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


async def control_calls(agent: Agent, n: int) -> list[float]:
    client = await connect(agent.control, agent.key)
    try:
        return await _timed(n, lambda: client.call("vm-info", {"name": "b1"}))
    finally:
        await client.close()


async def fresh_connections(agent: Agent, n: int) -> list[float]:
    return await _timed(n, lambda: call_once(agent.control, agent.key, "vm-info", {"name": "b1"}))


def cli_commands(agent: Agent, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "agent.cli", "--agent", agent.control, "--key-file",
                        str(agent.key_path), "vm", "list"], check=True, capture_output=True)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


async def vm_creates(agent: Agent, n: int) -> list[float]:
    client = await connect(agent.control, agent.key)
    samples = []
    try:
        for i in range(n):
            t = time.perf_counter()
            await client.call("vm-create", {"name": f"c{i}", "program": "counter", "mem": 64 << 20})
            samples.append((time.perf_counter() - t) * 1000)
            await client.call("vm-destroy", {"name": f"c{i}"})
    finally:
        await client.close()
    return samples


async def incoming_starts(n: int, prespawn: bool) -> list[float]:
    """start_incoming of a copy of a paused 64 MiB VM, the VM process pre-spawned or not."""
    vms = VMManager(agent_name="bench", max_mem=1 << 30, log=Log("error", io.StringIO()))
    samples = []
    try:
        src = await vms.create("src", "counter", 64 << 20, {})
        await asyncio.sleep(0.2)
        state = await src.pause()
        for i in range(n):
            samples.append(await _one_incoming(vms, f"in{i}", src.ram, state, prespawn))
            await vms.destroy(f"in{i}")
    finally:
        await vms.shutdown()
    return samples


async def _one_incoming(vms: VMManager, name: str, ram: object, state: dict[str, object], prespawn: bool) -> float:
    inc = vms.reserve_incoming(name, 64 << 20)
    if not prespawn and inc.spawning is not None:  # no process prepared: spawn at commit time
        spawned = await inc.spawning
        spawned.process.kill()
        await spawned.process.wait()
        inc.spawning = None
    else:
        await asyncio.sleep(0.5)  # pages would be arriving meanwhile; the process finishes starting
    inc.ram[:] = ram[:]  # type: ignore[index]
    t = time.perf_counter()
    await vms.start_incoming(inc, state, None)
    return (time.perf_counter() - t) * 1000


def cli_migrations(src: Agent, dst: Agent, n: int) -> tuple[list[float], list[float]]:
    """`ferry migrate --json` of a 64 MiB counter VM there and back: wall time and reported downtime."""
    walls, downtimes = [], []
    asyncio.run(call_once(src.control, src.key, "vm-create", {"name": "mig", "program": "counter", "mem": 64 << 20}))
    agents = (src, dst)
    for i in range(n):
        a, b = agents[i % 2], agents[(i + 1) % 2]
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "agent.cli", "--agent", a.control, "--key-file", str(a.key_path),
                              "migrate", "mig", "--to", b.control, "--json"], capture_output=True, text=True)
        walls.append((time.perf_counter() - t) * 1000)
        if out.returncode != 0:
            raise RuntimeError(f"ferry migrate failed: {out.stderr.strip()} {out.stdout[-500:]}")
        downtimes.append(float(json.loads(out.stdout)["downtime"]))
    asyncio.run(call_once(agents[n % 2].control, src.key, "vm-destroy", {"name": "mig"}))
    return walls, downtimes


def one_run(agent: Agent, peer: Agent, quick: bool) -> dict[str, list[float]]:
    calls, conns, clis, creates, starts, migs = (50, 10, 3, 3, 3, 2) if quick else (500, 50, 10, 10, 8, 6)
    walls, downtimes = cli_migrations(agent, peer, migs)
    return {
        "ferry migrate --json, 64 MiB counter VM (wall)": walls,
        "  its reported downtime": downtimes,
        "control call (vm-info)": asyncio.run(control_calls(agent, calls)),
        "connect + handshake + call": asyncio.run(fresh_connections(agent, conns)),
        "CLI command (ferry vm list)": cli_commands(agent, clis),
        "vm create 64 MiB (until running)": asyncio.run(vm_creates(agent, creates)),
        "incoming start, VM process pre-spawned": asyncio.run(incoming_starts(starts, prespawn=True)),
        "incoming start, VM process spawned at commit": asyncio.run(incoming_starts(starts, prespawn=False)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_agent", description="agent and control API latencies")
    p.add_argument("--quick", action="store_true", help="few samples, 2 runs")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args(argv)
    runs = 2 if a.quick else a.runs
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        agent = Agent(Path(tmp) / "a")
        peer = Agent(Path(tmp) / "b", key_from=agent.key_path)
        try:
            asyncio.run(call_once(agent.control, agent.key, "vm-create",
                                  {"name": "b1", "program": "idle", "mem": 4 << 20}))
            results = [one_run(agent, peer, a.quick) for _ in range(runs)]
        finally:
            agent.stop()
            peer.stop()
    print(f"| what ({runs} runs, median of runs) | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    for what in results[0]:
        p50 = statistics.median(_pct(r[what], 0.5) for r in results)
        p99 = statistics.median(_pct(r[what], 0.99) for r in results)
        print(f"| {what} | {p50:.2f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
