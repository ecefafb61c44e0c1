"""Guest slowdown under dirty tracking: instructions/s untracked, armed, and during migrations, hot blocks off and on.

The target "guest slowdown with tracking armed <= 10 %". With the
uffd-wp-async tracker, the first write to each page after a harvest costs the
guest a write-protect fault, many times the cost of the store itself
(docs/PERFORMANCE.md section 5), so a guest rewriting a large working set pays that for
every page every round. Hot blocks (``MigrationParams.hot_blocks``, ``ferry
migrate --hot-blocks``) leave 2 MiB blocks written at >= 75 % in a round
un-protected and send them whole instead. This module measures both ways,
for several guests:

- (a)/(b) one VM process per guest, the benchmark playing the agent (the
  tracker and helpers of bench_dirty): instructions/s untracked, then with
  tracking armed and a harvest every R ms, hot blocks off and on, for each R.
  The three windows of one R run back to back on the same VM, their order
  rotated each repetition; the ratio is taken per repetition against the
  adjacent untracked window, on instructions per CPU second of the VM
  process (robust to other jobs preempting it; the fault time is the VM
  process's system time, so it is counted), and the median of the
  repetitions reported. Wall-clock instructions/s are shown too.
- (c) real migrations between two agents on loopback, hot blocks off and on
  alternately, the guest going back and forth: its instructions/s during the
  pre-copy rounds (vm-info ``instructions`` and the VM process's CPU, sampled
  while migrate-status says ``active``) against the second before the
  migration; and bytes sent / guest size, rounds, downtime and total time
  from migrate-status. Both agents and the VM compete for the 2 cores there:
  the wall ratio measures that too, the per-CPU ratio less so. A full run
  then migrates the dense guests (AUTO_CONVERGE_GUESTS) the same way with
  auto-converge, whose first throttle step turns hot blocks off.

The moderate guest is bench_downtime's: memstress over 64 MiB at 25 % of
the bandwidth measured in this run (round 0 of a paused random-filled guest).

    .venv/bin/python -m bench.bench_slowdown            # full: all guests, R in 50/200/1000 ms (< 10 min)
    .venv/bin/python -m bench.bench_slowdown --quick    # 3 guests, R = 200 ms, fewer runs (< 2 min)
    .venv/bin/python -m bench.bench_slowdown --json     # raw figures
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_dirty import Sample, measure_window, process_cpu_seconds, tracked
from bench.bench_downtime import measure_bandwidth
from bench.common import MiB, markdown_table
from tests.agents import AgentProc, make_key, start_agent, wait_for
from vmruntime import dirty
from vmruntime.control import VMHandle
from vmruntime.dirty.names import UFFD_WP_ASYNC
from vmruntime.programs import load_program

TARGET = 0.90  # guest speed tracked / untracked: "slowdown <= 10 %"
BYTES_BOUND = 1.3  # hot blocks worth turning on by default if they cost at most this many times the bytes
# Guests migrated once more with auto-converge in a full run: the dense ones, where hot blocks and the
# throttle meet (auto-converge turns hot blocks off with its first step, agent/migration/policy.py).
AUTO_CONVERGE_GUESTS = ("seq 256 MiB", "random 128 MiB")
MODERATE_SHARE = 0.25  # the moderate guest dirties this share of the measured bandwidth (bench_downtime's)
FALLBACK_RATE = 48_000  # pages/s if the bandwidth probe fails (25 % of ~760 MiB/s, docs/BENCHMARKS.md)
WARMUP_S = 0.6  # a fresh guest first faults its working set in; not part of any window


@dataclass
class Guest:
    name: str
    program: str
    args: dict[str, str]
    mem: int


def guests(rate: int, quick: bool) -> list[Guest]:
    def memstress(ws: int, pattern: str, r: int = 0) -> dict[str, str]:
        return {"ws": str(ws), "pattern": pattern, "values": "random", "rate": str(r)}

    allg = [
        Guest("seq 256 MiB", "memstress", memstress(256 * MiB, "seq"), 320 * MiB),
        Guest("random 16 MiB", "memstress", memstress(16 * MiB, "random"), 32 * MiB),
        Guest("random 64 MiB", "memstress", memstress(64 * MiB, "random"), 96 * MiB),
        Guest("random 128 MiB", "memstress", memstress(128 * MiB, "random"), 160 * MiB),
        Guest(f"random 64 MiB at {rate} pages/s", "memstress", memstress(64 * MiB, "random", rate), 96 * MiB),
        Guest("counter", "counter", {}, 32 * MiB),
    ]
    if quick:
        return [allg[2], allg[4], allg[5]]
    return allg


# ---- (a)/(b): agent-side tracker in this process -------------------------------------------------------

@dataclass
class Armed:
    """One guest's windows: per harvest interval, the untracked and tracked samples of each repetition."""

    guest: Guest
    plain: dict[float, list[Sample]] = field(default_factory=dict)
    off: dict[float, list[Sample]] = field(default_factory=dict)
    on: dict[float, list[Sample]] = field(default_factory=dict)
    load: float = 0.0


def per_cpu(s: Sample) -> float:
    return s.instructions / s.cpu if s.cpu > 0 else s.ips


def measure_armed(g: Guest, intervals: list[float], seconds: float, reps: int) -> Armed:
    out = Armed(g)
    image, args = load_program(g.program, g.args)
    with VMHandle.spawn(g.mem, name="bench-slowdown") as vm:
        vm.boot(image, args)
        time.sleep(WARMUP_S)
        for rep in range(reps):
            for r in intervals:
                secs = max(seconds, 3 * r)  # at least 3 harvests per window
                modes: list[bool | None] = [None, False, True]
                modes = modes[rep % 3:] + modes[: rep % 3]  # rotate: no mode always first
                for mode in modes:
                    with tracked(vm, None if mode is None else UFFD_WP_ASYNC, bool(mode)) as t:
                        s = measure_window(vm, t, secs, r)
                    {None: out.plain, False: out.off, True: out.on}[mode].setdefault(r, []).append(s)
        vm.stop()
    out.load = os.getloadavg()[0]
    return out


def ratios(tracked_samples: list[Sample], plain: list[Sample]) -> list[float]:
    """Per-repetition ratio (per CPU second) of a tracked window to the untracked one of the same repetition."""
    return [per_cpu(t) / per_cpu(p) for t, p in zip(tracked_samples, plain, strict=True)]


def armed_rows(results: list[Armed]) -> list[list[object]]:
    med = statistics.median
    rows: list[list[object]] = []
    for a in results:
        for r in sorted(a.plain):
            base = a.plain[r]
            row: list[object] = [a.guest.name, f"{r * 1e3:.0f}", f"{med(s.ips for s in base) / 1e6:.1f}"]
            for samples in (a.off[r], a.on[r]):
                rs = ratios(samples, base)
                pages = med(s.pages / max(s.harvests, 1) for s in samples)
                row += [f"{med(s.ips for s in samples) / 1e6:.1f}", f"**{med(rs):.2f}**" if med(rs) < TARGET
                        else f"{med(rs):.2f}", f"{min(rs):.2f}-{max(rs):.2f}", f"{pages:,.0f}"]
            row.append(f"{a.load:.1f}")
            rows.append(row)
    return rows


# ---- (c): real migrations ----------------------------------------------------------------------------

@dataclass
class MigRun:
    hot: bool
    info: dict[str, Any]
    before_ips: float
    before_cpu_ips: float
    during_ips: float
    during_cpu_ips: float
    load: float


def _vm(agent: AgentProc, name: str) -> dict[str, Any]:
    info: dict[str, Any] = agent.call("vm-info", name=name)
    return info


def _speed(agent: AgentProc, name: str, seconds: float) -> tuple[float, float]:
    """(instructions per wall second, per CPU second of the VM process) over ``seconds``."""
    v0 = _vm(agent, name)
    c0, t0 = process_cpu_seconds(int(v0["pid"])), time.perf_counter()
    time.sleep(seconds)
    v1 = _vm(agent, name)
    c1, t1 = process_cpu_seconds(int(v0["pid"])), time.perf_counter()
    n = v1["instructions"] - v0["instructions"]
    return n / (t1 - t0), n / max(c1 - c0, 1e-3)


def migrate_sampled(src: AgentProc, dst: AgentProc, name: str, hot: bool, auto_converge: bool = False) -> MigRun:
    """One migration, with the guest's speed in the second before it and during its pre-copy rounds."""
    before, before_cpu = _speed(src, name, 1.0)
    pid = int(_vm(src, name)["pid"])
    params: dict[str, Any] = {"hot-blocks": hot}
    if auto_converge:
        params["auto-converge"] = True
    src.call("migrate", name=name, to=dst.control, params=params)
    first: tuple[int, float, float] | None = None  # (instructions, cpu, time) when ACTIVE was first seen
    last = first
    while True:
        status = src.call("migrate-status", name=name)["status"]
        if status in ("completed", "failed", "cancelled"):
            break
        if status == "active":
            with contextlib.suppress(Exception):  # the VM may leave between the two calls
                sample = (int(_vm(src, name)["instructions"]), process_cpu_seconds(pid), time.perf_counter())
                if first is None:
                    first = sample
                elif src.call("migrate-status", name=name)["status"] == "active":  # still pre-copy
                    last = sample
        time.sleep(0.05)
    info: dict[str, Any] = src.call("migrate-status", name=name)
    during = during_cpu = float("nan")
    if first is not None and last is not None and last[2] - first[2] > 0.05:
        n = last[0] - first[0]
        during = n / (last[2] - first[2])
        # /proc counts CPU time in 10 ms ticks: a window with fewer than 5 of them (a paced guest
        # that mostly waits, a short pre-copy) gives no usable per-CPU figure.
        if last[1] - first[1] >= 0.05:
            during_cpu = n / (last[1] - first[1])
    return MigRun(hot, info, before, before_cpu, during, during_cpu, os.getloadavg()[0])


def measure_migrations(a: AgentProc, b: AgentProc, g: Guest, reps: int, auto_converge: bool = False) -> list[MigRun]:
    name = "bench-slow"
    a.call("vm-create", name=name, program=g.program, mem=str(g.mem), args=g.args,
           **{"dirty-tracker": UFFD_WP_ASYNC})
    wait_for(lambda: _vm(a, name)["instructions"] > 100_000, what=f"{g.name} under way")
    time.sleep(WARMUP_S)
    runs: list[MigRun] = []
    src, dst = a, b
    try:
        for rep in range(reps):
            for hot in ((False, True) if rep % 2 == 0 else (True, False)):  # interleaved, order alternating
                run = migrate_sampled(src, dst, name, hot, auto_converge)
                runs.append(run)
                if run.info["status"] == "completed":
                    src, dst = dst, src
                else:
                    print(f"{g.name}: migration {run.info['status']}: {run.info.get('error-desc')}", file=sys.stderr)
                time.sleep(0.3)  # the destination's VM settles
    finally:
        with contextlib.suppress(Exception):
            src.call("vm-destroy", name=name)
    return runs


def _med(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (no pre-copy window long enough to sample)
    return statistics.median(values) if values else float("nan")


def failure_lines(results: list[tuple[Guest, list[MigRun]]]) -> list[str]:
    """Why the failed migrations of the table failed (each reason once per guest and mode, counted)."""
    reasons: dict[tuple[str, str, str], int] = {}
    for g, runs in results:
        for r in runs:
            if not _ok(r):
                key = (g.name, "on" if r.hot else "off", str(r.info.get("error-desc") or r.info["status"]))
                reasons[key] = reasons.get(key, 0) + 1
    if not reasons:
        return []
    return ["", "Failed migrations (the VM kept running on its source each time):", "",
            *[f"- {name}, hot blocks {hot}, {n}x: {why}" for (name, hot, why), n in reasons.items()]]


def mig_rows(results: list[tuple[Guest, list[MigRun]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for g, runs in results:
        off_bytes = _med([r.info["ram"]["transferred"] for r in runs if not r.hot and _ok(r)])
        for hot in (False, True):
            rs = [r for r in runs if r.hot == hot and _ok(r)]
            failed = sum(1 for r in runs if r.hot == hot and not _ok(r))
            if not rs:
                rows.append([g.name, "on" if hot else "off", 0, failed, *["-"] * 8])
                continue
            sent = _med([r.info["ram"]["transferred"] for r in rs])
            wall = _med([r.during_ips / r.before_ips for r in rs])
            cpu = _med([r.during_cpu_ips / r.before_cpu_ips for r in rs])
            rows.append([
                g.name, "on" if hot else "off", len(rs), failed, _fmt(wall), _fmt(cpu),
                f"{sent / g.mem:.2f}", f"{sent / off_bytes:.2f}" if off_bytes == off_bytes else "-",
                f"{_med([len(r.info['rounds']) for r in rs]):.0f}",
                f"{_med([r.info['downtime'] for r in rs]):.0f}",
                f"{_med([r.info['total-time'] for r in rs]):.0f}",
                f"{_med([r.load for r in rs]):.1f}",
            ])
    return rows


def _ok(r: MigRun) -> bool:
    return bool(r.info["status"] == "completed")


def _fmt(x: float) -> str:
    return "-" if x != x else (f"**{x:.2f}**" if x < TARGET else f"{x:.2f}")


# ---- verdicts -------------------------------------------------------------------------------------------

def verdicts(armed: list[Armed], migs: list[tuple[Guest, list[MigRun]]]) -> list[str]:
    lines: list[str] = []
    med = statistics.median
    for r in sorted({r for a in armed for r in a.plain}):
        for hot, label in ((False, "hot blocks off"), (True, "hot blocks on")):
            got = [(a.guest.name, med(ratios((a.on if hot else a.off)[r], a.plain[r]))) for a in armed]
            bad = [f"{n} {x:.2f}" for n, x in got if x < TARGET]
            lines.append(f"- Slowdown <= 10 % with tracking armed, harvest every {r * 1e3:.0f} ms, {label}: "
                         + (f"**held** for all {len(got)} guests." if not bad else
                            f"**not held** for {len(bad)} of {len(got)} guests ({', '.join(bad)})."))
    for hot, label in ((False, "hot blocks off"), (True, "hot blocks on")):
        got = [(g.name, _med([r.during_cpu_ips / r.before_cpu_ips for r in runs if r.hot == hot and _ok(r)]))
               for g, runs in migs]
        got = [(n, x) for n, x in got if x == x]
        bad = [f"{n} {x:.2f}" for n, x in got if x < TARGET]
        if got:
            lines.append(f"- Slowdown <= 10 % during real migrations (per CPU second), {label}: "
                         + (f"**held** for all {len(got)} guests." if not bad else
                            f"**not held** for {len(bad)} of {len(got)} guests ({', '.join(bad)})."))
    lines += bytes_verdict(migs, "")
    return lines


def bytes_verdict(migs: list[tuple[Guest, list[MigRun]]], label: str) -> list[str]:
    """Whether hot blocks cost at most BYTES_BOUND times the bytes sent without them (medians)."""
    costs = []
    for g, runs in migs:
        off = _med([r.info["ram"]["transferred"] for r in runs if not r.hot and _ok(r)])
        on = _med([r.info["ram"]["transferred"] for r in runs if r.hot and _ok(r)])
        if off == off and on == on:
            costs.append((g.name, on / off))
    if not costs:
        return []
    worst = max(costs, key=lambda c: c[1])
    return [f"- Hot blocks' bytes cost <= {BYTES_BOUND}x the bytes without{label}: "
            + ("**held**" if worst[1] <= BYTES_BOUND else "**not held**")
            + f" (worst {worst[0]}: {worst[1]:.2f}x)."]


# ---- main -------------------------------------------------------------------------------------------------

def markdown(armed: list[Armed], migs: list[tuple[Guest, list[MigRun]]], rate: int, bw: float | None,
             intervals: list[float], seconds: float, reps: int, auto_converge: bool = False,
             rate_given: bool = False, ac_migs: list[tuple[Guest, list[MigRun]]] | None = None) -> str:
    bw_text = ("a rate given with --rate" if rate_given else f"{bw / MiB:.0f} MiB/s measured in this run" if bw
               else f"the bandwidth probe failed, {FALLBACK_RATE} pages/s assumed")
    la = os.getloadavg()
    out = [
        f"Guests: memstress (values=random) flat out unless a rate is given; the moderate one writes {rate} "
        f"random pages/s over 64 MiB ({bw_text if rate_given else f'{MODERATE_SHARE:.0%} of {bw_text}'}); counter writes almost nothing. "
        f"Tracker: {UFFD_WP_ASYNC} (available: {', '.join(dirty.available_backends())}).",
    ]
    out += [
        "",
        f"**Tracking armed, agent-side tracker in the benchmark process** (windows of max({seconds:g} s, "
        f"3 harvests), untracked / hot off / hot on back to back on one VM, order rotated, {reps} "
        "repetitions). \"ratio\": instructions per CPU second of the VM process, tracked over untracked "
        "of the same repetition, median (range); bold below the 0.90 target. \"pages/harvest\": pages "
        "reported per harvest (hot blocks: whole blocks, so more). The paced guest keeps its rate "
        "(wall M/s unchanged) as long as it has CPU to spare: its per-CPU ratio is the CPU overhead "
        "the faults add to its work.",
        "",
        markdown_table(["guest", "harvest ms", "untracked M/s", "off M/s", "off ratio", "off range",
                        "off pages/harvest", "hot M/s", "hot ratio", "hot range", "hot pages/harvest", "load"],
                       armed_rows(armed), "lrrrrrrrrrrr"),
    ] if armed else []
    if migs:
        out += [
            "",
            f"**During real migrations** (two agents on loopback, defaults but `hot-blocks`"
            f"{' and `auto-converge`' if auto_converge else ''}; off and on "
            "interleaved, the guest going back and forth). \"during/before\": the guest's instructions/s "
            "while migrate-status said active, over the second before the migration; wall clock (the "
            "agents compete with the VM for the 2 cores) and per CPU second of the VM process. Sent = "
            "ram.transferred; \"vs off\" = median sent with hot blocks over median sent without.",
            "",
            *mig_table(migs),
        ]
    if ac_migs:
        out += [
            "",
            "**The same with `auto-converge`**, for the dense guests (its first throttle step also turns hot "
            "blocks off: whole blocks would keep the remainder up whatever the throttle).",
            "",
            *mig_table(ac_migs),
        ]
    out += ["", "Verdicts:", "", *verdicts(armed, migs), *bytes_verdict(ac_migs or [], " (auto-converge)"), "",
            f"Load average at the end: {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (2 cores, shared)."]
    return "\n".join(out)


def mig_table(migs: list[tuple[Guest, list[MigRun]]]) -> list[str]:
    """The migrations' table, and why any of them failed."""
    return [markdown_table(["guest", "hot blocks", "runs", "failed", "during/before wall", "during/before CPU",
                            "sent / guest", "sent vs off", "rounds", "downtime ms", "total ms", "load"],
                           mig_rows(migs), "llrrrrrrrrrr"),
            *failure_lines(migs)]


def as_json(armed: list[Armed], migs: list[tuple[Guest, list[MigRun]]],
            ac_migs: list[tuple[Guest, list[MigRun]]] | None = None) -> dict[str, Any]:
    def s(x: Sample) -> dict[str, Any]:
        return {"ips": x.ips, "cpu": x.cpu, "instructions": x.instructions, "harvests": x.harvests,
                "pages": x.pages, "seconds": x.seconds}

    return {
        "armed": [{"guest": a.guest.name, "load": a.load, "windows": {
            f"{r * 1e3:.0f}": {"plain": [s(x) for x in a.plain[r]], "off": [s(x) for x in a.off[r]],
                               "on": [s(x) for x in a.on[r]]} for r in a.plain}} for a in armed],
        "migrations": mig_json(migs),
        "migrations_auto_converge": mig_json(ac_migs or []),
    }


def mig_json(migs: list[tuple[Guest, list[MigRun]]]) -> list[dict[str, Any]]:
    return [{"guest": g.name, "runs": [
        {"hot": r.hot, "status": r.info["status"], "transferred": r.info["ram"]["transferred"],
         "rounds": len(r.info["rounds"]), "downtime": r.info["downtime"], "total": r.info["total-time"],
         "before": r.before_ips, "during": r.during_ips, "before_cpu": r.before_cpu_ips,
         "during_cpu": r.during_cpu_ips, "load": r.load} for r in runs]} for g, runs in migs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 guests, R = 200 ms, 2 repetitions (< 2 min)")
    ap.add_argument("--intervals", help="harvest intervals in ms (default 50,200,1000; 200 with --quick)")
    ap.add_argument("--reps", type=int, help="repetitions of each window (default 3, 2 with --quick)")
    ap.add_argument("--mig-reps", type=int, help="migrations per mode and guest (default 3, 1 with --quick)")
    ap.add_argument("--seconds", type=float, help="window length (default 1.0, 0.6 with --quick)")
    ap.add_argument("--rate", type=int, help="pages/s of the moderate guest (default: 25 %% of measured bandwidth)")
    ap.add_argument("--no-migrate", action="store_true", help="skip the migrations (c)")
    ap.add_argument("--no-armed", action="store_true", help="skip the in-process windows (a)/(b)")
    ap.add_argument("--guests", help="only the guests whose name contains one of these comma-separated words")
    ap.add_argument("--auto-converge", action="store_true",
                    help="migrate with auto-converge only (default: without, then the dense guests with it too)")
    ap.add_argument("--json", action="store_true", help="print raw figures as JSON")
    ap.add_argument("--save", type=Path, help="also write the raw figures as JSON to this file")
    a = ap.parse_args(argv)
    if UFFD_WP_ASYNC not in dirty.available_backends():
        print(f"Skipped: the {UFFD_WP_ASYNC} tracker is not available on this kernel.")
        return
    intervals = [float(x) / 1e3 for x in (a.intervals or ("200" if a.quick else "50,200,1000")).split(",")]
    reps = a.reps or (2 if a.quick else 3)
    mig_reps = a.mig_reps or (1 if a.quick else 3)
    seconds = a.seconds or (0.6 if a.quick else 1.0)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    key = make_key(tmp)
    armed: list[Armed] = []
    migs: list[tuple[Guest, list[MigRun]]] = []
    ac_migs: list[tuple[Guest, list[MigRun]]] = []
    bw: float | None = None
    # The agents' logs (printed when they stop) go to stderr: stdout is the report.
    with (contextlib.ExitStack() as cleanup, contextlib.redirect_stdout(sys.stderr),
          start_agent(tmp, "A", key) as ag, start_agent(tmp, "B", key) as bg):
        cleanup.callback(shutil.rmtree, tmp, True)  # after the agents stopped (exits run in reverse)
        rate = a.rate
        if rate is None:
            try:
                bw = measure_bandwidth(ag, bg, (64 if a.quick else 256) * MiB)
                rate = max(1, int(bw * MODERATE_SHARE / 4096))
            except Exception as e:  # the probe is another part: report, keep measuring
                print(f"bandwidth probe failed ({type(e).__name__}: {e}); assuming {FALLBACK_RATE} pages/s",
                      file=sys.stderr)
                rate = FALLBACK_RATE
        gs = guests(rate, a.quick)
        if a.guests:
            gs = [g for g in gs if any(w in g.name for w in a.guests.split(","))]
        for g in ([] if a.no_armed else gs):
            armed.append(measure_armed(g, intervals, seconds, reps))
            print(f"armed: {g.name} done", file=sys.stderr)
        if not a.no_migrate:
            for g in gs:
                migs.append((g, measure_migrations(ag, bg, g, mig_reps, a.auto_converge)))
                print(f"migrations: {g.name} done", file=sys.stderr)
            for g in ([] if a.auto_converge or a.quick else gs):
                if g.name in AUTO_CONVERGE_GUESTS:
                    ac_migs.append((g, measure_migrations(ag, bg, g, mig_reps, auto_converge=True)))
                    print(f"migrations with auto-converge: {g.name} done", file=sys.stderr)
    if a.save:
        a.save.write_text(json.dumps(as_json(armed, migs, ac_migs), indent=1))
    if a.json:
        print(json.dumps(as_json(armed, migs, ac_migs), indent=1))
        return
    print(markdown(armed, migs, rate, bw, intervals, seconds, reps, a.auto_converge, a.rate is not None, ac_migs))


if __name__ == "__main__":
    main()
