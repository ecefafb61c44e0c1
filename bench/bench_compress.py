"""Compression on capped and uncapped links: --compress none vs zstd vs auto, two agents on loopback.

A paused guest (nothing dirties it: every run moves the same pages) whose RAM
above the code is all written, in two kinds:

* **compressible**: memstress ``values=const`` over the working set (one word
  per page, the rest zero: zstd turns 4 KiB into a few bytes);
* **random**: bench/fill_random.fasm (a 1 MiB pseudo-random block repeated,
  beyond zstd's window: as incompressible as random bytes).

Each is migrated over a ``--bandwidth`` cap of 50 MB/s and 200 MB/s and
uncapped, with each mode, interleaved (none, zstd, auto, none, ...) so the
host's noise falls on all three alike, back and forth between the agents.
Reported per cell: median and worst total time, median bytes on the wire, and
whether auto compressed. The host is shared: its load average is printed with
the table.

    .venv/bin/python -m bench.bench_compress [--quick] [--mem 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import describe_machine, format_load, load_average, median
from tests.agents import AgentProc, make_key, names, start_agent, wait_for
from vmruntime.isa import DATA_ADDR

FILL_PROGRAM = str(Path(__file__).resolve().parent / "fill_random.fasm")
MODES = ("none", "zstd", "auto")
LINKS: tuple[tuple[str, int | None], ...] = (("50 MB/s", 50_000_000), ("200 MB/s", 200_000_000), ("loopback", None))
FINAL = ("completed", "failed", "cancelled")


def make_guest(agent: AgentProc, name: str, kind: str, mem: int) -> None:
    """Create the guest, wait until its working set is written, pause it."""
    ws = mem - DATA_ADDR
    if kind == "random":
        agent.call("vm-create", name=name, program=FILL_PROGRAM, mem=str(mem), args={"ws": str(ws)})
        wait_for(lambda: agent.call("vm-info", name=name)["console-bytes"] >= 1, timeout=600, what="fill")
    else:
        agent.call("vm-create", name=name, program="memstress", mem=str(mem),
                   args={"ws": str(ws), "rate": "0", "pattern": "seq", "values": "const"})
        # Flat out in order: every page of the working set written within a few seconds; a pass
        # over it is about ws / 4096 stores.
        wait_for(lambda: agent.call("vm-info", name=name)["instructions"] > 8 * ws // 4096,
                 timeout=600, what="memstress to cover its working set")
    agent.call("vm-pause", name=name)


def migrate(src: AgentProc, dst: AgentProc, name: str, params: dict[str, Any]) -> dict[str, Any]:
    src.call("migrate", name=name, to=dst.control, params=params)
    while True:
        info: dict[str, Any] = src.call("migrate-status", name=name)
        if info["status"] in FINAL:
            return info
        time.sleep(0.05)


def run_kind(a: AgentProc, b: AgentProc, kind: str, mem: int, runs: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    name = f"bench-{kind}"
    make_guest(a, name, kind, mem)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    src, dst = a, b
    for link, cap in LINKS:
        for _ in range(runs):
            for mode in MODES:
                params: dict[str, Any] = {"compress": mode, "max-downtime": 1000}
                if cap is not None:
                    params["bandwidth"] = cap
                info = migrate(src, dst, name, params)
                if info["status"] != "completed":
                    print(f"{kind} {link} {mode}: {info['status']}: {info.get('error-desc')}", file=sys.stderr)
                    results.setdefault((link, mode + " failed"), []).append(info)
                    wait_for(lambda d=dst: name not in names(d), timeout=120,
                             what="the destination to discard its copy")
                    continue
                results.setdefault((link, mode), []).append(info)
                src, dst = dst, src
                print(f"{kind} {link} {mode}: {info['total-time']} ms, {info['ram']['transferred'] >> 20} MiB",
                      file=sys.stderr)
    src.call("vm-destroy", name=name)
    return results


def table(kind: str, results: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    lines = [f"| {kind} | link | mode | runs | total s (median) | total s (worst) | MiB on the wire | "
             "compressed pages | compression-rate |", "|---|---|---|---|---|---|---|---|---|"]
    for link, _ in LINKS:
        for mode in MODES:
            rs = results.get((link, mode), [])
            if not rs:
                lines.append(f"| {kind} | {link} | {mode} | 0 | - | - | - | - | - |")
                continue
            failed = len(results.get((link, mode + " failed"), []))
            totals = [r["total-time"] / 1000 for r in rs]
            wire = median([r["ram"]["transferred"] / 2**20 for r in rs])
            pages = median([r["compression"]["pages"] for r in rs])
            rate = median([r["compression"]["compression-rate"] for r in rs])
            lines.append(f"| {kind} | {link} | {mode} | {len(rs)}{f' ({failed} failed)' if failed else ''} | "
                         f"{median(totals):.2f} | {max(totals):.2f} | "
                         f"{wire:.0f} | {pages:.0f} | {rate:g} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB guests, one run per cell")
    ap.add_argument("--mem", default=None, help="guest RAM (bytes, or with M/G suffix); default 1G")
    ap.add_argument("--runs", type=int, default=None, help="migrations per cell (default 3)")
    ap.add_argument("--kinds", default="compressible,random", help="guests, comma-separated")
    ns = ap.parse_args(argv)
    from vmruntime.programs import parse_size

    mem = parse_size(ns.mem or ("256M" if ns.quick else "1G"))
    ns.runs = ns.runs or (1 if ns.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    key = make_key(tmp)
    lines: list[str] = []
    loads = [load_average()]
    try:
        with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a, start_agent(tmp, "B", key) as b:
            for kind in ns.kinds.split(","):
                lines += table(kind, run_kind(a, b, kind, mem, ns.runs)) + [""]
                loads.append(load_average())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = describe_machine()
    print(f"Machine: {m.cpu_model}, {m.cores} cores, {m.date}; load average before and after each guest: "
          + ", ".join(format_load(x) for x in loads))
    print(f"{mem >> 20} MiB paused guests, two agents on loopback, modes interleaved, {ns.runs} run(s) per cell\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
