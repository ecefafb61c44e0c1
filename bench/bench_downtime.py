"""Downtime distribution: 20 migrations each of an idle guest and of memstress at 25% of bandwidth.

The downtime scenario, with two real agents on loopback: a 1 GiB
``idle`` guest, and a 1 GiB guest running ``memstress`` over a 64 MiB
working set at a quarter of the bandwidth ferry's data path measured in this
same run (a random-filled guest migrated first, its round-0 bytes/second;
one page per 4 KiB of that rate). Each VM is migrated back and forth
``--runs`` times with default parameters; the report gives p50, p99 and max
of the downtime (pause to RESUMED, as the source measures it) and of each
of its parts (``downtime-breakdown``: pause, final copy, state, digest,
verify, commit; the destination's VM start is inside commit), and whether
the targets (idle p99 <= 10 ms, memstress p99 <= 50 ms) held. Percentiles
are nearest-rank over the runs: with 20 runs, p99 is the largest value.

    .venv/bin/python -m bench.bench_downtime            # 1 GiB guests, 20 runs each
    .venv/bin/python -m bench.bench_downtime --quick    # 256 MiB guests, 5 runs each
    .venv/bin/python -m bench.bench_downtime --json     # raw per-run figures

With matplotlib installed (the ``bench`` extra) it also draws docs/downtime.png: the distribution
of downtimes per scenario and the median of each phase.
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

from bench.bench_migrate import FILL_PROGRAM, migrate_once, wait_filled
from bench.common import NO_PLOT, MiB, format_size, markdown_table, percentile, pyplot, save_figure
from tests.agents import AgentProc, make_key, start_agent
from vmruntime.isa import DATA_ADDR

PHASES = ("pause", "final-copy", "state", "digest", "verify", "commit")
PLOT = Path(__file__).resolve().parent.parent / "docs" / "downtime.png"
WS = 64 * MiB
SHARE = 0.25  # memstress dirties this share of the measured bandwidth
TARGETS_MS = {"idle": 10.0, "memstress": 50.0}
MAX_FAILURES = 5  # failed migrations tolerated per scenario (reported) before giving up on it


@dataclass
class Scenario:
    """One guest migrated back and forth, and what each completed migration reported."""

    name: str
    program: str
    args: dict[str, str]
    target_ms: float
    infos: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def downtimes(self) -> list[float]:
        return [float(i["downtime"]) for i in self.infos]

    def phase(self, part: str) -> list[float]:
        return [float(i["downtime-breakdown"].get(part, 0.0)) for i in self.infos]


def measure_bandwidth(a: AgentProc, b: AgentProc, mem: int) -> float:
    """Bytes/s of ferry's data path now: round 0 of a paused, random-filled guest's migration."""
    a.call("vm-create", name="bench-bw", program=FILL_PROGRAM, mem=str(mem), args={"ws": str(mem - DATA_ADDR)})
    try:
        wait_filled(a, "bench-bw", timeout=120)
        a.call("vm-pause", name="bench-bw")
        info = migrate_once(a, b, "bench-bw", {})
        if info["status"] != "completed":
            raise RuntimeError(f"bandwidth probe migration {info['status']}: {info.get('error-desc')}")
        r0 = info["rounds"][0]
        return float(r0["bytes"]) / max(float(r0["seconds"]), 1e-6)
    finally:
        with contextlib.suppress(Exception):
            b.call("vm-destroy", name="bench-bw")
        with contextlib.suppress(Exception):
            a.call("vm-destroy", name="bench-bw")


def run_scenario(a: AgentProc, b: AgentProc, sc: Scenario, mem: int, runs: int) -> None:
    """Create the VM on ``a``, migrate it back and forth until ``runs`` migrations completed."""
    name = f"bench-{sc.name}"
    a.call("vm-create", name=name, program=sc.program, mem=str(mem), args=sc.args)
    time.sleep(1.0)  # let memstress reach its rate (and touch its working set) first
    src, dst = a, b
    while len(sc.infos) < runs and len(sc.failed) <= MAX_FAILURES:
        info = migrate_once(src, dst, name, {})
        if info["status"] == "completed":
            sc.infos.append(info)
            src, dst = dst, src
            time.sleep(0.2)  # the destination's VM settles; memstress catches up with its rate
        else:  # the VM stays where it was
            sc.failed.append(f"{info['status']}: {info.get('error-desc')}")
            print(f"{sc.name}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
    src.call("vm-destroy", name=name)


def scenarios(bandwidth: float) -> list[Scenario]:
    rate = max(1, int(bandwidth * SHARE / 4096))
    return [
        Scenario("idle", "idle", {}, TARGETS_MS["idle"]),
        Scenario("memstress", "memstress", {"ws": str(WS), "rate": str(rate), "pattern": "random"},
                 TARGETS_MS["memstress"]),
    ]


# --- output -----------------------------------------------------------------------------------


def stats(values: list[float]) -> tuple[str, str, str]:
    if not values:
        return "-", "-", "-"
    return tuple(f"{v:.1f}" for v in (percentile(values, 0.5), percentile(values, 0.99), max(values)))  # type: ignore[return-value]


def summary_rows(scs: list[Scenario]) -> list[list[object]]:
    rows: list[list[object]] = []
    for sc in scs:
        p50, p99, mx = stats(sc.downtimes())
        held = "-" if not sc.infos else ("yes" if percentile(sc.downtimes(), 0.99) <= sc.target_ms else "**no**")
        total = f"{percentile([float(i['total-time']) for i in sc.infos], 0.5):.0f}" if sc.infos else "-"
        rounds = f"{percentile([len(i['rounds']) for i in sc.infos], 0.5):.0f}" if sc.infos else "-"
        rows.append([sc.name, len(sc.infos), len(sc.failed), p50, p99, mx, f"<= {sc.target_ms:g}", held,
                     total, rounds])
    return rows


def phase_rows(scs: list[Scenario]) -> list[list[object]]:
    rows: list[list[object]] = []
    for sc in scs:
        for part in PHASES:
            rows.append([sc.name, part, *stats(sc.phase(part))])
    return rows


def markdown(scs: list[Scenario], mem: int, bandwidth: float, runs: int) -> str:
    memstress = next(s for s in scs if s.name == "memstress")
    lines = [
        f"{format_size(mem)} guests, two agents on loopback, {runs} completed migrations per scenario "
        f"(back and forth), default parameters (max downtime 300 ms). Bandwidth measured in this run: "
        f"{bandwidth / MiB:.0f} MiB/s (round 0 of a paused random-filled guest); memstress writes "
        f"{memstress.args['rate']} random pages/s over {format_size(WS)} ({SHARE:.0%} of it).",
        "",
        markdown_table(["scenario", "runs", "failed", "downtime p50 ms", "p99 ms", "max ms", "target p99 ms",
                        "held", "total p50 ms", "rounds p50"], summary_rows(scs), "lrrrrrrlrr"),
        "",
        "Downtime by phase (ms): pause = vCPU stop; final-copy = last harvest + last pages; state = CPU and "
        "device state; digest = what of the RAM digest the final copy did not hide; verify = destination's "
        "digest check until READY; commit = COMMIT until RESUMED (the destination restores and resumes the VM).",
        "",
        markdown_table(["scenario", "phase", "p50", "p99", "max"], phase_rows(scs), "llrrr"),
    ]
    for sc in scs:
        if sc.failed:
            lines += ["", f"{sc.name}: {len(sc.failed)} failed migration(s): " + "; ".join(sc.failed[:3])]
    return "\n".join(lines)


def plot(scs: list[Scenario], path: Path) -> str:
    """Draw the downtime distributions and the median phases into ``path``; a line for the report."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for sc in scs:
        values = sorted(sc.downtimes())
        if values:
            left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=sc.name)
        left.axvline(sc.target_ms, linestyle=":", color="grey")
    left.set(xlabel="downtime (ms)", ylabel="share of migrations", title="Downtime distribution (targets dotted)")
    left.legend()
    bottom = [0.0] * len(scs)
    for part in PHASES:
        medians = [percentile(sc.phase(part), 0.5) if sc.infos else 0.0 for sc in scs]
        right.barh([sc.name for sc in scs], medians, left=bottom, label=part)
        bottom = [b + m for b, m in zip(bottom, medians, strict=True)]
    right.set(xlabel="ms (median of each phase)", title="Where the downtime goes")
    right.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(plt, fig, path, "downtime distribution and phases")


def as_json(scs: list[Scenario], mem: int, bandwidth: float) -> dict[str, Any]:
    return {"mem": mem, "bandwidth": bandwidth, "scenarios": [
        {"name": s.name, "args": s.args, "target_ms": s.target_ms, "failed": s.failed,
         "downtime": s.downtimes(), "breakdown": {p: s.phase(p) for p in PHASES},
         "total": [i["total-time"] for i in s.infos]} for s in scs]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB guests, 5 runs per scenario")
    ap.add_argument("--runs", type=int, help="completed migrations per scenario (default 20, 5 with --quick)")
    ap.add_argument("--mem", help="guest RAM, e.g. 1G (default 1G, 256M with --quick)")
    ap.add_argument("--json", action="store_true", help="print raw figures as JSON")
    ap.add_argument("--plot", type=Path, default=PLOT, help=f"PNG to draw (default {PLOT})")
    a = ap.parse_args(argv)
    from vmruntime.programs import parse_size

    mem = parse_size(a.mem or ("256M" if a.quick else "1G"))
    runs = a.runs or (5 if a.quick else 20)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    key = make_key(tmp)
    # The agents' logs (printed when they stop) go to stderr: stdout is the report.
    with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a_, start_agent(tmp, "B", key) as b_:
        bandwidth = measure_bandwidth(a_, b_, min(mem, 256 * MiB))
        scs = scenarios(bandwidth)
        for sc in scs:
            run_scenario(a_, b_, sc, mem, runs)
    if a.json:
        print(json.dumps(as_json(scs, mem, bandwidth), indent=1))
        return
    print(markdown(scs, mem, bandwidth, runs) + "\n\n" + plot(scs, a.plot))


if __name__ == "__main__":
    main()
