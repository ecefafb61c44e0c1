"""Post-copy against pre-copy and QEMU's post-copy, for a guest dirtying twice what the link carries.

Results: docs/BENCHMARKS.md, "bench_postcopy"; docs/PERFORMANCE.md, section 20.

Two agents on loopback; a guest of ``--mem`` running ``memstress`` (random pages of a ``--ws``
working set, random values) at ``--rate`` pages a second; every migration capped at half that
rate in bytes (``bandwidth``: the guest dirties 2x what the link carries), compression off (one
word per page would compress away the test). Modes, interleaved, ``--runs`` each, the guest
migrated back and forth:

- ``precopy``: the default, pre-copy with auto-converge (the guest is throttled until it fits);
- ``hybrid``: ``postcopy-after auto``: pre-copy while the policy sees it converge, then post-copy;
- ``postcopy``: ``postcopy-after 1``, post-copy right after the first full round;
- ``qemu``: QEMU's post-copy (``postcopy-ram`` capability, ``migrate``, then
  ``migrate-start-postcopy`` once the first pass is sent: bench/qemu_postcopy.py), its guest a
  multiboot kernel that writes the same pages at the same rate, the same cap (QEMU's
  ``max-bandwidth``; ``max-postcopy-bandwidth`` for its post-copy push). Skipped (with the
  reason) when QEMU cannot be installed or started. Each side's guest is paused while the other
  side's runs (the host has two cores; QEMU's guest spins on the TSC between stores).

Reported per mode, median and worst of the runs: total time, downtime, bytes sent / guest size,
guest slowdown (1 - the guest's progress rate during the migration over its rate just before,
progress being instructions for ferry's guest and stores for QEMU's), page request latency
p50/p99 and blocktime (post-copy modes; QEMU reports blocktime, not request latency).

    .venv/bin/python -m bench.bench_postcopy [--quick] [--runs 3] [--json] [--no-qemu]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_migrate import migrate_once
from bench.common import MiB, markdown_table, median
from tests.agents import AgentProc, make_key, start_agent
from vmruntime.programs import parse_size

PAGE = 4096
MODES = {
    "precopy": {},
    "hybrid": {"postcopy-after": "auto"},
    "postcopy": {"postcopy-after": "1"},
}
RATE_WINDOW_S = 1.0  # the guest's progress rate just before a migration: measured over this long
SETTLE_S = 1.0  # after a migration: the guest reaches its rate again before the next


@dataclass
class Run:
    mode: str
    ok: bool
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    bytes_ratio: float = 0.0
    slowdown: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    blocktime_ms: float | None = None
    requests: int | None = None
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def guest_args(ws: int, rate: int) -> dict[str, str]:
    return {"ws": str(ws), "rate": str(rate), "pattern": "random", "values": "random"}


def instructions(agent: AgentProc, name: str) -> tuple[float, int]:
    info = agent.call("vm-info", name=name)
    return time.monotonic(), int(info["instructions"])


def progress_rate(agent: AgentProc, name: str, window: float) -> float:
    t0, i0 = instructions(agent, name)
    time.sleep(window)
    t1, i1 = instructions(agent, name)
    return (i1 - i0) / (t1 - t0)


def ferry_run(src: AgentProc, dst: AgentProc, name: str, mode: str, cap: int, mem: int) -> Run:
    params = {**MODES[mode], "bandwidth": cap, "compress": "none"}
    before = progress_rate(src, name, RATE_WINDOW_S)
    t0, i0 = instructions(src, name)
    info = migrate_once(src, dst, name, params)
    if info["status"] != "completed":
        return Run(mode, False, note=f"{info['status']}: {info.get('error-desc')}")
    t1, i1 = instructions(dst, name)
    during = (i1 - i0) / (t1 - t0)
    incoming: dict[str, Any] = dst.call("migrate-status", name=name) if mode != "precopy" else {}
    return Run(mode, True, total_ms=float(info["total-time"]), downtime_ms=float(info["downtime"]),
               bytes_ratio=float(info["ram"]["transferred"]) / mem, slowdown=max(0.0, 1.0 - during / before),
               p50_ms=incoming.get("postcopy-latency-p50"), p99_ms=incoming.get("postcopy-latency-p99"),
               blocktime_ms=incoming.get("postcopy-blocktime"), requests=incoming.get("postcopy-requests"),
               note=info.get("summary", ""),
               raw={"source": {k: info.get(k) for k in ("total-time", "downtime", "ram", "rounds",
                                                         "downtime-breakdown", "summary")},
                    "destination": {k: v for k, v in incoming.items() if k.startswith(("postcopy", "pages"))}})


def cell(values: list[float], fmt: str) -> str:
    """``median (worst)`` of the values: worst is the largest (every figure here is a cost)."""
    if not values:
        return "-"
    return f"{format(median(values), fmt)} ({format(max(values), fmt)})"


def table(runs: list[Run]) -> str:
    rows = []
    for mode in [*MODES, "qemu"]:
        done = [r for r in runs if r.mode == mode and r.ok]
        failed = [r for r in runs if r.mode == mode and not r.ok]
        if not done and not failed:
            continue
        rows.append([mode, f"{len(done)}/{len(done) + len(failed)}",
                     cell([r.total_ms / 1000 for r in done], ".2f"), cell([r.downtime_ms for r in done], ".1f"),
                     cell([r.bytes_ratio for r in done], ".2f"), cell([r.slowdown * 100 for r in done], ".0f"),
                     cell([r.p50_ms for r in done if r.p50_ms is not None], ".2f"),
                     cell([r.p99_ms for r in done if r.p99_ms is not None], ".1f"),
                     cell([r.blocktime_ms for r in done if r.blocktime_ms is not None], ".0f")])
    return markdown_table(["mode", "completed", "total s", "downtime ms", "bytes / guest", "guest slowdown %",
                           "request p50 ms", "request p99 ms", "blocktime ms"], rows, "lrrrrrrrr")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB guest, 64 MiB working set, 3 runs")
    ap.add_argument("--mem", help="guest RAM (default 256M, 128M with --quick)")
    ap.add_argument("--ws", help="working set (default half of --mem)")
    ap.add_argument("--rate", type=int, default=32768, help="pages the guest dirties a second (default 32768)")
    ap.add_argument("--runs", type=int, default=3, help="migrations per mode (default 3)")
    ap.add_argument("--modes", default="precopy,hybrid,postcopy,qemu", help="comma-separated modes")
    ap.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    ap.add_argument("--json", action="store_true", help="print every run as JSON")
    a = ap.parse_args(argv)
    mem = parse_size(a.mem or ("128M" if a.quick else "256M"))
    ws = parse_size(a.ws) if a.ws else mem // 2
    modes = [m for m in a.modes.split(",") if m and not (a.no_qemu and m == "qemu")]
    unknown = set(modes) - {*MODES, "qemu"}
    if unknown or a.runs < 1 or a.rate < 2 or ws >= mem:
        ap.error(f"bad modes {sorted(unknown)}, or --runs < 1, --rate < 2, or --ws not below --mem")
    cap = a.rate * PAGE // 2  # the guest dirties twice what the link carries
    runs: list[Run] = []
    qemu = None
    if "qemu" in modes:
        from bench import qemu_postcopy

        qemu, why = qemu_postcopy.prepare(mem, ws, a.rate, cap)
        if qemu is None:
            print(f"qemu: skipped: {why}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-postcopy-"))
    key = make_key(tmp)
    ferry_modes = [m for m in modes if m in MODES]
    with contextlib.ExitStack() as stack:
        if qemu is not None:
            stack.enter_context(qemu)
        with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as ag_a, \
                start_agent(tmp, "B", key) as ag_b:
            name = "bench-pc"
            if ferry_modes:
                ag_a.call("vm-create", name=name, program="memstress", mem=str(mem), args=guest_args(ws, a.rate))
                time.sleep(2.0)  # the working set touched, the rate reached
            src, dst = ag_a, ag_b
            for i in range(a.runs):
                for mode in modes:
                    if mode == "qemu":
                        if qemu is not None:
                            if ferry_modes:
                                src.call("vm-pause", name=name)
                            runs.append(qemu.run())
                            print(f"run {i} qemu: {runs[-1]}", file=sys.stderr)
                            if ferry_modes:
                                src.call("vm-resume", name=name)
                                time.sleep(SETTLE_S)
                        continue
                    r = ferry_run(src, dst, name, mode, cap, mem)
                    runs.append(r)
                    print(f"run {i} {mode}: {r}", file=sys.stderr)
                    if r.ok:
                        src, dst = dst, src
                    time.sleep(SETTLE_S)
            if ferry_modes:
                src.call("vm-destroy", name=name)
    if a.json:
        print(json.dumps([r.__dict__ for r in runs], indent=1, default=str))
        return
    print(f"guest {mem // MiB} MiB, memstress ws {ws // MiB} MiB at {a.rate} pages/s "
          f"({a.rate * PAGE / MiB:.0f} MiB/s), link capped at {cap / MiB:.0f} MiB/s, {a.runs} runs per mode, "
          "median (worst)")
    print()
    print(table(runs))
    for r in runs:
        if not r.ok:
            print(f"\n{r.mode} failed: {r.note}")


if __name__ == "__main__":
    main()
