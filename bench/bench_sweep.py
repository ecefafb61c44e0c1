"""Dirty-rate sweep: memstress at 1% to 200% of the measured bandwidth, and one migration round by round.

The dirty-rate scenario, with two real agents on loopback. This module
owns the sweep, its Markdown, docs/sweep.png and docs/rounds.png.

1. **Sweep.** The bandwidth of ferry's data path is measured first in this
   same run (round 0 of a paused random-filled guest, as bench_downtime
   does); then for each cell of a grid of dirty rates (a share of that
   bandwidth, one 4 KiB page per 4096 bytes/s) and working sets, a fresh
   guest runs ``memstress pattern=random`` and is migrated with auto-converge
   on and the default max downtime (300 ms); ``--runs`` times per cell (3, or
   1 with --quick), a fresh guest each time. Per cell (medians): status,
   total time, rounds, downtime, the highest ``cpu-throttle-percentage``
   seen while polling (the source lifts the throttle when a migration fails,
   so the final record alone would lose it), bytes on the wire over guest
   size, and whether the max downtime held (downtime <= the bound, or else
   whether the summary explains it: the source appends "downtime X ms
   exceeded the bound"). A failed migration is a result, not a crash.
2. **Achieved rate.** The interpreter has a ceiling, and on a shared host the
   guest may not get a core: before migrating, after a warm-up long enough
   for random writes to touch most of the working set (fresh guest RAM
   costs a page fault per first write, which halves the rate over 512 MiB in
   the first second), the guest's instruction counter is sampled over
   ``--probe`` seconds (untracked) and turned into
   pages/s with the instruction cost of memstress' paced random loop
   (12 instructions per page plus about 7 per batch of ceil(rate/1000)
   pages; within ~10%, exact enough to flag a guest far behind).
3. **Rounds.** One representative migration (memstress at 50% of bandwidth
   over 256 MiB, auto-converge) drawn round by round in docs/rounds.png:
   dirty pages, bytes sent and bandwidth against time (round start = setup
   time + the cumulative ``seconds`` of the previous rounds).

    .venv/bin/python -m bench.bench_sweep            # 1 GiB guest, 6 rates x 3 working sets, 3 runs per cell
    .venv/bin/python -m bench.bench_sweep --quick    # 256 MiB guest, 2 rates x 2 working sets
    .venv/bin/python -m bench.bench_sweep --json     # raw figures
    .venv/bin/python -m bench.bench_sweep --json-out s.json; ... --from-json s.json   # redraw without measuring
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_downtime import measure_bandwidth
from bench.bench_migrate import FINAL
from bench.common import (
    NO_PLOT,
    MiB,
    format_load,
    format_size,
    load_average,
    markdown_table,
    median,
    pyplot,
    save_figure,
)
from tests.agents import AgentProc, make_key, start_agent

DOCS = Path(__file__).resolve().parent.parent / "docs"
SWEEP_PLOT = DOCS / "sweep.png"
ROUNDS_PLOT = DOCS / "rounds.png"
PAGE = 4096
MAX_DOWNTIME_MS = 300.0  # the default of MigrationParams; passed explicitly so the table states it
PARAMS: dict[str, Any] = {"auto-converge": True, "max-downtime": MAX_DOWNTIME_MS}
FULL_SHARES = (0.01, 0.10, 0.25, 0.50, 1.00, 2.00)
FULL_WS = (16 * MiB, 64 * MiB, 512 * MiB)
QUICK_SHARES = (0.10, 1.00)
QUICK_WS = (16 * MiB, 64 * MiB)
ROUNDS_SHARE = 0.50
ROUNDS_WS = 256 * MiB  # clamped to a quarter of the guest in quick mode
REACHED = 0.9  # the guest "reached" its rate when it wrote at least this share of it
WARMUP_S = 0.5  # before probing: the VM process starts and memstress sets its pace
# ... plus the time to write this many times the working set's pages at the asked rate (capped below):
# random writes then cover most of it (1 - e^-2 = 86%), so the probe sees the steady rate, not the
# first-touch page faults of fresh guest RAM (which halve the rate over 512 MiB in the first second).
TOUCH_PASSES = 2.0
TOUCH_MAX_S = 3.0


@dataclass
class Run:
    """One migration of a cell: the guest's rate before it, the final record, the highest throttle seen."""

    achieved: float  # pages/s, untracked, before migrating
    info: dict[str, Any]
    max_throttle: int

    @property
    def status(self) -> str:
        return str(self.info.get("status", "?"))

    def held(self) -> str:
        """yes (downtime <= bound), explained (over, and the summary says so), silent (over, unexplained), -."""
        if self.status != "completed":
            return "-"
        if float(self.info["downtime"]) <= MAX_DOWNTIME_MS:
            return "yes"
        return "explained" if "exceeded" in str(self.info.get("summary", "")) else "silent"


@dataclass
class Cell:
    """One point of the grid (or the rounds plot's migration): the rate asked and every run of it."""

    ws: int
    share: float
    rate: int  # asked, pages/s
    runs: list[Run] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the bench could not run it (not a failed migration)

    def done(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def achieved(self) -> float:
        return median([r.achieved for r in self.runs]) if self.runs else 0.0

    def reached(self) -> bool:
        return self.achieved() >= REACHED * self.rate

    def med(self, key: str, runs: list[Run] | None = None) -> float | None:
        """Median of a top-level numeric field over the completed runs (or ``runs``); None when none."""
        pick = self.done() if runs is None else runs
        return median([float(r.info[key]) for r in pick]) if pick else None

    def representative(self) -> Run | None:
        """The completed run of median downtime (for the rounds plot), else the first run."""
        done = sorted(self.done(), key=lambda r: float(r.info["downtime"]))
        return done[(len(done) - 1) // 2] if done else (self.runs[0] if self.runs else None)


def pages_per_instruction(rate: int) -> float:
    """memstress pattern=random rate=N: pages written per guest instruction (see memstress.fasm).

    Its paced loop costs 12 instructions per page; each batch of ceil(N/1000)
    pages adds about 7 (clock, compare, wait, jumps; a guest running behind
    takes a 4-instruction detour instead of the wait).
    """
    batch = max(1, math.ceil(rate / 1000))
    return batch / (12 * batch + 7)


def warmup_for(cell: Cell, base_s: float) -> float:
    """Seconds memstress runs before the probe: ``base_s``, plus time to touch its working set (capped)."""
    return base_s + min(TOUCH_MAX_S, TOUCH_PASSES * (cell.ws // PAGE) / max(cell.rate, 1))


def probe_rate(agent: AgentProc, name: str, rate: int, seconds: float) -> float:
    """Pages/s the guest writes now, from its instruction counter over ``seconds`` (no tracking armed)."""
    i0, t0 = int(agent.call("vm-info", name=name)["instructions"]), time.monotonic()
    time.sleep(seconds)
    i1, t1 = int(agent.call("vm-info", name=name)["instructions"]), time.monotonic()
    return (i1 - i0) / (t1 - t0) * pages_per_instruction(rate)


def migrate_watching(src: AgentProc, dst: AgentProc, name: str) -> tuple[dict[str, Any], int]:
    """Migrate and poll to the end; the final record and the highest throttle seen on the way."""
    src.call("migrate", name=name, to=dst.control, params=PARAMS)
    top = 0
    while True:
        info: dict[str, Any] = src.call("migrate-status", name=name)
        top = max(top, int(info.get("cpu-throttle-percentage", 0)))
        if info["status"] in FINAL:
            return info, top
        time.sleep(0.02)


def run_cell(a: AgentProc, b: AgentProc, cell: Cell, mem: int, probe_s: float, warmup_s: float = WARMUP_S) -> None:
    """One run: a fresh guest on ``a``, probe its rate, migrate it to ``b``, destroy it wherever it is.

    A fresh guest each time, not one migrated back and forth: every run then
    starts from the same state (memstress booted ``warmup_for(cell, warmup_s) + probe_s`` ago).
    """
    name = f"sweep-{cell.ws // MiB}m-{int(cell.share * 100)}"
    args = {"ws": str(cell.ws), "rate": str(cell.rate), "pattern": "random", "values": "random"}
    try:
        a.call("vm-create", name=name, program="memstress", mem=str(mem), args=args)
        time.sleep(warmup_for(cell, warmup_s))
        achieved = probe_rate(a, name, cell.rate, probe_s)
        info, top = migrate_watching(a, b, name)
        cell.runs.append(Run(achieved, info, top))
        if info["status"] != "completed":
            print(f"ws {format_size(cell.ws)} {cell.share:.0%}: migration {info['status']}: "
                  f"{info.get('error-desc')}", file=sys.stderr)
    except Exception as exc:  # a broken run is reported, the sweep goes on
        cell.errors.append(f"{type(exc).__name__}: {exc}")
        print(f"ws {format_size(cell.ws)} {cell.share:.0%}: {cell.errors[-1]}", file=sys.stderr)
    finally:
        for agent in (b, a):  # the VM is on b after a completed migration, else still on a
            with contextlib.suppress(Exception):
                agent.call("vm-destroy", name=name)


# --- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _status(cell: Cell) -> str:
    """``completed`` when every run completed, else the count of each outcome."""
    outcomes = [r.status for r in cell.runs] + ["bench error"] * len(cell.errors)
    if outcomes and all(o == "completed" for o in outcomes):
        return "completed" if len(outcomes) == 1 else f"completed x{len(outcomes)}"
    return ", ".join(f"{o} x{outcomes.count(o)}" for o in sorted(set(outcomes))) or "-"


def _held(cell: Cell) -> str:
    verdicts = [r.held() for r in cell.done()]
    if not verdicts:
        return "-"
    if all(v == "yes" for v in verdicts):
        return "yes" if len(verdicts) == 1 else f"yes {len(verdicts)}/{len(verdicts)}"
    parts = [f"{verdicts.count(v)} {label}" for v, label in
             (("yes", "held"), ("explained", "over, summary says why"), ("silent", "**over, silently**"))
             if verdicts.count(v)]
    return ", ".join(parts)


def sweep_rows(cells: list[Cell], mem: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for c in cells:
        done = c.done()
        reached = f"{c.achieved():,.0f}" + ("" if c.reached() or not c.runs else " (**short**)")
        throttle = median([r.max_throttle for r in c.runs]) if c.runs else None
        sent = median([float(r.info["ram"]["transferred"]) / mem for r in done]) if done else None
        rounds = median([len(r.info["rounds"]) for r in done]) if done else None
        down_max = max(float(r.info["downtime"]) for r in done) if done else None
        rows.append([format_size(c.ws), f"{c.share:.0%}", f"{c.rate:,}", reached, _status(c),
                     _fmt(c.med("total-time")), _fmt(rounds), _fmt(c.med("downtime")), _fmt(down_max),
                     _fmt(throttle, ".0f") + ("%" if throttle is not None else ""), _fmt(sent, ".2f"), _held(c)])
    return rows


def notes(cells: list[Cell]) -> list[str]:
    """One line per run worth a look: failures, overruns of the bound, rates not reached."""
    out = []
    for c in cells:
        tag = f"ws {format_size(c.ws)} at {c.share:.0%}"
        out += [f"- {tag}: the bench could not run it: {e}" for e in c.errors]
        for r in c.runs:
            if r.status != "completed":
                out.append(f"- {tag}: {r.status} after {r.info.get('total-time')} ms, "
                           f"{len(r.info.get('rounds', []))} rounds, throttle up to {r.max_throttle}%: "
                           f"{r.info.get('error-desc', '')}")
            elif r.held() != "yes":
                final = r.info["rounds"][-1] if r.info.get("rounds") else {}
                out.append(f"- {tag}: downtime {r.info['downtime']} ms (policy expected "
                           f"{r.info.get('expected-downtime')} ms; final pass {final.get('pages', 0):,} pages, "
                           f"the last harvest before it {_last_dirty(r.info):,}); summary: "
                           f"{r.info.get('summary') or '(empty)'}")
        if c.runs and not c.reached():
            out.append(f"- {tag}: asked {c.rate:,} pages/s, the guest wrote about {c.achieved():,.0f} "
                       f"({c.achieved() / max(c.rate, 1):.0%}) in the probe before migrating")
    return out


def _last_dirty(info: dict[str, Any]) -> int:
    """Dirty pages of the last pre-copy round: what the policy saw when it decided to switch over."""
    pre = [r for r in info.get("rounds", []) if not r["final"]]
    return int(pre[-1]["dirty-pages"]) if pre else 0


def _unaccounted_ms(info: dict[str, Any]) -> float:
    """Total time minus setup, the pre-copy rounds and the downtime: what the record explains nowhere."""
    pre = sum(float(r["seconds"]) for r in info.get("rounds", []) if not r["final"]) * 1000
    return float(info["total-time"]) - float(info["setup-time"]) - pre - float(info["downtime"])


def round_rows(info: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    start = float(info.get("setup-time", 0)) / 1000
    for i, r in enumerate(info.get("rounds", [])):
        secs = float(r["seconds"])
        bw = float(r["bytes"]) / secs / MiB if secs > 0 else 0.0
        rows.append([("final" if r["final"] else str(i)), f"{start * 1000:.0f}", f"{secs * 1000:.1f}",
                     f"{r['pages']:,}", f"{r['zero-pages']:,}", f"{float(r['bytes']) / MiB:.1f}", f"{bw:.0f}",
                     f"{r['dirty-pages']:,}"])
        start += secs
    return rows


def markdown(sw: Sweep, sweep_png: str, rounds_png: str) -> str:
    cells, rounds, mem, bw, runs, load = sw.cells, sw.rounds, sw.mem, sw.bw, sw.runs, sw.load
    warmup_s, probe_s = sw.warmup_s, sw.probe_s
    each = ("one migration per cell (one run each: single figures, read them with the noise of a shared host "
            "in mind)" if runs == 1 else f"{runs} migrations per cell (medians)")
    tracker = next((str(r.info.get("dirty-tracker")) for c in cells for r in c.runs), "?")
    lines = [
        f"{format_size(mem)} guest running `memstress pattern=random values=random`, two agents on loopback, "
        f"{each}, a fresh guest for each, dirty tracker `{tracker}`, auto-converge on, max downtime {MAX_DOWNTIME_MS:g} ms. Bandwidth "
        f"measured in this run: {bw.value / MiB:.0f} MiB/s = {bw.value / PAGE:,.0f} pages/s (median round 0 of "
        f"{len(bw.samples)} paused random-filled {format_size(bw.mem)} guest(s): "
        f"{', '.join(f'{x / MiB:.0f}' for x in bw.samples)} MiB/s); the rates are shares of it. "
        f"Load average at the end: {load}.",
        "",
        "*achieved* = pages/s the guest wrote in a probe of its instruction counter before migrating (no "
        f"tracking armed; **short** = under {REACHED:.0%} of the asked rate). *throttle* = highest "
        "`cpu-throttle-percentage` seen during the migration. *sent/size* = bytes on the wire over guest RAM. "
        "*held* = downtime <= the bound, else whether the summary says by how much and why. Before migrating, "
        f"memstress runs {warmup_s:g} s plus the time to write {TOUCH_PASSES:g}x its working set's pages at its "
        f"rate (at most {TOUCH_MAX_S:g} s more), then the {probe_s:g} s probe: round 0 carries what it touched by "
        "then (a large working set at a low rate stays partly untouched, zero pages).",
        "",
        markdown_table(["ws", "rate", "asked pages/s", "achieved pages/s", "status", "total ms", "rounds",
                        "downtime ms", "max downtime ms", "throttle", "sent/size", "held"],
                       sweep_rows(cells, mem), "lrrrlrrrrrrl"),
    ]
    extra = notes(cells)
    if extra:
        lines += ["", "Runs worth a look:", "", *extra]
    lines += ["", sweep_png]
    rep = rounds.representative() if rounds is not None else None
    if rounds is not None and rep is not None:
        info = rep.info
        lines += [
            "",
            f"One migration round by round: memstress at {rounds.share:.0%} of bandwidth "
            f"({rounds.rate:,} pages/s asked, {rep.achieved:,.0f} achieved) over {format_size(rounds.ws)}, "
            f"{format_size(mem)} guest, auto-converge (the run of median downtime of {len(rounds.runs)}). "
            f"Status {info['status']}, total {info['total-time']} ms, setup {info['setup-time']} ms, downtime "
            f"{info['downtime']} ms, highest throttle {rep.max_throttle}%. Summary: {info.get('summary') or '-'}.",
            "",
            "Round start = setup time + the durations of the rounds before it; *dirty* = distinct pages the guest "
            "dirtied while the round ran (the next round's work); the final round runs with the VM paused. "
            f"{_unaccounted_ms(info):.0f} ms of the total lie in no round or phase of the record (arming the "
            "tracker before round 0, the digest and policy work between rounds, which a round's `seconds` "
            "leave out, the source's clean-up after the resume; the record does not say which, so the plot "
            "hatches them after the resume): the real round starts are later than drawn by up to that.",
            "",
            markdown_table(["round", "start ms", "ms", "pages", "zero pages", "MiB sent", "MiB/s", "dirty"],
                           round_rows(info), "lrrrrrrr"),
            "",
            rounds_png,
        ]
    elif rounds is not None:
        lines += ["", f"(No round-by-round migration: {'; '.join(rounds.errors) or 'no run'}.)"]
    return "\n".join(lines)




def plot_sweep(cells: list[Cell], path: Path) -> str:
    """Downtime and total time (medians) against the dirty rate, one line per working set."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (down, total) = plt.subplots(1, 2, figsize=(11, 4.4))
    for ws in sorted({c.ws for c in cells}):
        mine = sorted((c for c in cells if c.ws == ws), key=lambda c: c.share)
        ok = [c for c in mine if c.done()]
        label = f"ws {format_size(ws)}"
        x = [c.share * 100 for c in ok]
        line = down.plot(x, [c.med("downtime") for c in ok], marker="o", label=f"{label} (median, band: min-max)")[0]
        if any(len(c.done()) > 1 for c in ok):  # the spread of the runs: single runs vary a lot on a shared host
            down.fill_between(x, [min(float(r.info["downtime"]) for r in c.done()) for c in ok],
                              [max(float(r.info["downtime"]) for r in c.done()) for c in ok],
                              color=line.get_color(), alpha=0.15, linewidth=0)
        total.plot(x, [float(c.med("total-time") or 0) / 1000 for c in ok], marker="o", color=line.get_color(),
                   label=label)
        failed = [(c.share * 100, float(r.info["total-time"]) / 1000) for c in mine for r in c.runs
                  if r.status != "completed"]
        if failed:  # failed migrations: a cross at the time they took (no downtime: the VM stayed)
            total.scatter(*zip(*failed, strict=True), marker="x", s=80, color=line.get_color(),
                          label=f"{label}: failed")
    down.axhline(MAX_DOWNTIME_MS, linestyle=":", color="grey", label=f"max downtime {MAX_DOWNTIME_MS:g} ms")
    for ax in (down, total):
        ax.set_xscale("log")
        ax.set_xlabel("memstress dirty rate (% of measured bandwidth, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    down.set(ylabel="downtime (ms)", title="Downtime vs dirty rate (auto-converge)")
    total.set(ylabel="total time (s)", title="Total migration time vs dirty rate (median)")
    fig.tight_layout()
    return save_figure(plt, fig, path, "downtime and total time against the dirty rate")


def plot_rounds(cell: Cell, run: Run, path: Path) -> str:
    """Three stacked panels sharing time: dirty pages, MiB sent and MiB/s per round (bars span the round)."""
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    info = run.info
    rounds = info["rounds"]
    setup = float(info.get("setup-time", 0)) / 1000
    starts, t = [], setup
    for r in rounds:
        starts.append(t)
        t += float(r["seconds"])
    widths = [float(r["seconds"]) for r in rounds]
    colors = ["tab:red" if r["final"] else "tab:blue" for r in rounds]
    series = [
        ([float(r["dirty-pages"]) for r in rounds], "dirty pages\n(during the round)"),
        ([float(r["bytes"]) / MiB for r in rounds], "MiB sent"),
        ([float(r["bytes"]) / MiB / max(float(r["seconds"]), 1e-6) for r in rounds], "bandwidth (MiB/s)"),
    ]
    end = float(info["total-time"]) / 1000
    down = float(info.get("downtime", 0)) / 1000
    pause = starts[-1] if rounds and rounds[-1]["final"] else None
    resumed = (pause + down) if pause is not None else t
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    for ax, (values, label) in zip(axes, series, strict=True):
        ax.axvspan(0, setup, color="grey", alpha=0.15, label="setup (connect, handshake, proposal)")
        if pause is not None and down > 0:  # the final pass starts with the pause
            ax.axvspan(pause, pause + down, color="tab:red", alpha=0.12, label=f"downtime {down * 1000:.0f} ms")
        ax.bar(starts, values, width=widths, align="edge", color=colors, edgecolor="black", linewidth=0.4)
        if resumed < end:  # the record gives this time to no phase: arming before round 0, clean-up after
            ax.axvspan(resumed, end, facecolor="none", edgecolor="grey", hatch="//", linewidth=0,
                       label="in no round or phase of the record (before round 0, between rounds, after the "
                             "resume), drawn here at the end")
        ax.axvline(end, color="black", linestyle="--", linewidth=0.8, label=f"{info['status']} at {end:.2f} s")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize="small")  # under the plots, off the bars
    axes[0].set_title(f"One migration round by round: memstress {cell.rate:,} pages/s ({cell.share:.0%} of "
                      f"bandwidth) over {format_size(cell.ws)}\nauto-converge (highest throttle "
                      f"{run.max_throttle}%); blue: pre-copy rounds, VM running; red: final stop-and-copy, VM paused",
                      fontsize="medium")
    axes[-1].set_xlabel("time since the migration started (s); round start = setup + the rounds before it")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(plt, fig, path, "dirty pages, bytes and bandwidth per round")


@dataclass
class Bandwidth:
    """The data path's bytes/s measured in this run: the median of a few probes."""

    mem: int
    samples: list[float]

    @property
    def value(self) -> float:
        return median(self.samples)


@dataclass
class Sweep:
    """Everything one run measured: what the Markdown, the plots and the JSON are made of."""

    mem: int
    bw: Bandwidth
    runs: int
    warmup_s: float
    probe_s: float
    cells: list[Cell]
    rounds: Cell | None
    load: str = ""


def _cell_json(c: Cell) -> dict[str, Any]:
    return {"ws": c.ws, "share": c.share, "rate": c.rate, "errors": c.errors,
            "runs": [{"achieved": r.achieved, "max-throttle": r.max_throttle, "info": r.info} for r in c.runs]}


def _cell_from(d: dict[str, Any]) -> Cell:
    return Cell(int(d["ws"]), float(d["share"]), int(d["rate"]),
                [Run(float(r["achieved"]), r["info"], int(r["max-throttle"])) for r in d["runs"]], list(d["errors"]))


def as_json(sw: Sweep) -> dict[str, Any]:
    return {"mem": sw.mem, "bandwidth": sw.bw.value, "bandwidth-guest": sw.bw.mem, "bandwidth-samples": sw.bw.samples,
            "runs": sw.runs, "warmup": sw.warmup_s, "probe": sw.probe_s, "load": sw.load,
            "cells": [_cell_json(c) for c in sw.cells],
            "rounds": _cell_json(sw.rounds) if sw.rounds is not None else None}


def from_json(d: dict[str, Any]) -> Sweep:
    """A sweep saved with --json-out, to draw and print again without measuring."""
    return Sweep(int(d["mem"]), Bandwidth(int(d["bandwidth-guest"]), [float(x) for x in d["bandwidth-samples"]]),
                 int(d["runs"]), float(d["warmup"]), float(d["probe"]), [_cell_from(c) for c in d["cells"]],
                 _cell_from(d["rounds"]) if d.get("rounds") else None, str(d.get("load", "")))


def measure(a: argparse.Namespace) -> Sweep:
    """Start two agents, measure the bandwidth, run every cell and the rounds case."""
    from vmruntime.programs import parse_size

    mem = parse_size(a.mem or ("256M" if a.quick else "1G"))
    shares = [float(s) / 100 for s in a.shares.split(",")] if a.shares else list(
        QUICK_SHARES if a.quick else FULL_SHARES)
    wss = [parse_size(w) for w in a.ws.split(",")] if a.ws else list(QUICK_WS if a.quick else FULL_WS)
    sw = Sweep(mem, Bandwidth(min(mem, 256 * MiB), []), a.runs or (1 if a.quick else 3), a.warmup, a.probe, [], None)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-sweep-"))
    try:
        key = make_key(tmp)
        # The agents' logs (printed when they stop) go to stderr: stdout is the report.
        with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a_, \
                start_agent(tmp, "B", key) as b_:
            for _ in range(a.bw_probes or (1 if a.quick else 3)):
                sw.bw.samples.append(measure_bandwidth(a_, b_, sw.bw.mem))
            per_page = sw.bw.value / PAGE
            sw.cells = [Cell(ws, share, max(1, int(per_page * share))) for ws in wss for share in shares]
            for cell in sw.cells:
                t0 = time.monotonic()
                for _ in range(sw.runs):
                    run_cell(a_, b_, cell, mem, a.probe, a.warmup)
                print(f"cell ws={format_size(cell.ws)} {cell.share:.0%}: {_status(cell)} "
                      f"in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            if not a.no_rounds:
                sw.rounds = Cell(min(ROUNDS_WS, mem // 4), ROUNDS_SHARE, max(1, int(per_page * ROUNDS_SHARE)))
                for _ in range(a.round_runs or (1 if a.quick else 3)):
                    run_cell(a_, b_, sw.rounds, mem, a.probe, a.warmup)
        sw.load = format_load(load_average())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sw


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB guest, 2x2 grid, one run each")
    ap.add_argument("--mem", help="guest RAM (default 1G, 256M with --quick)")
    ap.add_argument("--shares", help="comma-separated rates in %% of bandwidth (default 1,10,25,50,100,200)")
    ap.add_argument("--ws", help="comma-separated working sets (default 16M,64M,512M)")
    ap.add_argument("--runs", type=int, help="migrations per cell (default 3, 1 with --quick)")
    ap.add_argument("--round-runs", type=int, help="migrations of the rounds plot's case; the median downtime one "
                    "is drawn (default 3, 1 with --quick)")
    ap.add_argument("--bw-probes", type=int, help="bandwidth probes, median taken (default 3, 1 with --quick)")
    ap.add_argument("--probe", type=float, default=1.0, help="seconds of the achieved-rate probe (default 1)")
    ap.add_argument("--warmup", type=float, default=WARMUP_S,
                    help=f"seconds memstress runs before the probe, plus the time to touch its working set "
                    f"(default {WARMUP_S:g})")
    ap.add_argument("--json-out", type=Path, help="also write the raw figures as JSON to this file")
    ap.add_argument("--no-rounds", action="store_true", help="skip the round-by-round migration")
    ap.add_argument("--json", action="store_true", help="print raw figures as JSON")
    ap.add_argument("--from-json", type=Path, help="measure nothing: print and draw a sweep saved with --json-out")
    a = ap.parse_args(argv)
    sw = from_json(json.loads(a.from_json.read_text())) if a.from_json else measure(a)
    if a.json_out:
        a.json_out.write_text(json.dumps(as_json(sw), indent=1))
    if a.json:
        print(json.dumps(as_json(sw), indent=1))
        return
    sweep_png = plot_sweep(sw.cells, SWEEP_PLOT)
    rep = sw.rounds.representative() if sw.rounds is not None else None
    rounds_png = plot_rounds(sw.rounds, rep, ROUNDS_PLOT) if sw.rounds is not None and rep and \
        rep.info.get("rounds") else ""
    print(markdown(sw, sweep_png, rounds_png))


if __name__ == "__main__":
    main()
