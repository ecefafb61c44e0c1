"""Storage move on one host: `ferry vm move-storage` of an idle guest's image against `cp --sparse=always`.

A real ferry-agent on loopback runs an `idle` guest on a sparse image (1 GiB, 256 MiB of data in
64 extents spread over it; `--quick`: 256 MiB with 64 MiB). Interleaved, each run moves the image to
the other of two directories (the agent's whole move: the first pass, the rounds, the pause, the
switch, the old image removed; its total time and downtime as the move reports them) and copies the
image with `cp --sparse=always` (alone, and followed by an fsync of the copy, which the move does
too). Median and worst of the runs; both read the image from the page cache.

    .venv/bin/python -m bench.bench_storage_move [--quick] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.client import call_once
from bench.bench_agent import Agent

MiB = 1 << 20
EXTENTS = 64


def make_image(path: Path, size: int, data: int) -> None:
    """A sparse image of ``size`` bytes with ``data`` bytes of random data in EXTENTS extents spread evenly."""
    piece = data // EXTENTS
    chunk = os.urandom(piece)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(EXTENTS):
            f.seek(i * (size // EXTENTS))
            f.write(chunk)


def call(agent: Agent, op: str, **args: Any) -> Any:
    return asyncio.run(call_once(agent.control, agent.key, op, args))


def move(agent: Agent, to: Path) -> dict[str, Any]:
    """One move to ``to``; its final report (wall time added as ``wall``, ms)."""
    t = time.perf_counter()
    call(agent, "vm-move-storage", name="m", to=str(to))
    while True:
        info = call(agent, "vm-move-storage-status", name="m")
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.01)
    info["wall"] = (time.perf_counter() - t) * 1000
    if info["status"] != "completed":
        raise SystemExit(f"the move failed: {info}")
    return dict(info)


def cp(src: Path, dst: Path, sync: bool) -> float:
    """``cp --sparse=always`` (and an fsync of the copy when ``sync``), ms; the copy is removed after."""
    t = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    if sync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    ms = (time.perf_counter() - t) * 1000
    os.unlink(dst)
    return ms


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 256 MiB image with 64 MiB of data")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    size, data = (256 * MiB, 64 * MiB) if a.quick else (1024 * MiB, 256 * MiB)
    with tempfile.TemporaryDirectory(prefix="ferry-bench-move-") as tmp:
        agent = Agent(Path(tmp) / "a")
        try:
            disks = Path(tmp) / "a" / "state" / "disks"
            here, there = disks / "one", disks / "two"
            here.mkdir(parents=True)
            there.mkdir()
            make_image(here / "m.img", size, data)
            call(agent, "vm-create", name="m", program="idle", mem="4M", disk={"path": str(here / "m.img")})
            moves: list[dict[str, Any]] = []
            plain: list[float] = []
            synced: list[float] = []
            for i in range(a.runs):
                src, dst = (here, there) if i % 2 == 0 else (there, here)
                plain.append(cp(src / "m.img", Path(tmp) / "cp.img", sync=False))
                moves.append(move(agent, dst))
                synced.append(cp(dst / "m.img", Path(tmp) / "cp.img", sync=True))
            call(agent, "vm-destroy", name="m")
        finally:
            agent.stop()
    load = os.getloadavg()[0]
    print(f"Storage move of an idle guest's {size // MiB} MiB image with {data // MiB} MiB of data "
          f"({EXTENTS} extents), {a.runs} runs interleaved, {os.cpu_count()} CPUs, load average {load:.1f}\n")
    print("| copy | median ms | worst ms | MiB/s of data (median) |")
    print("|---|---:|---:|---:|")
    rows = [("ferry vm move-storage (total-time)", [float(m["total-time"]) for m in moves]),
            ("ferry vm move-storage (CLI wall time)", [m["wall"] for m in moves]),
            ("cp --sparse=always", plain), ("cp --sparse=always + fsync", synced)]
    for name, values in rows:
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {max(values):.0f} | {data / MiB / (med / 1000):.0f} |")
    downtimes = [float(m["downtime"]) for m in moves]
    rounds = [len(m["rounds"]) for m in moves]
    print(f"\nDowntime of the moves: median {statistics.median(downtimes):.0f} ms, worst {max(downtimes):.0f} ms; "
          f"rounds (first pass and final included): {', '.join(map(str, rounds))}. Downtime breakdown of "
          f"the median move (ms): "
          + ", ".join(f"{k} {v}" for k, v in sorted(moves, key=lambda m: m["downtime"])[len(moves) // 2]
                      ["downtime-breakdown"].items()))


if __name__ == "__main__":
    main()
