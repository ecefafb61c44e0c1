"""Scaling and cost: sparse and fully written guests of 1-8 GiB, total time, CPU and memory per migration.

The *sparse guests*, *scaling* and *cost* scenarios, with two real agents on loopback
(tests/agents.py) migrating real VMs through the control API, back and forth:

* **Sparse**: 1, 4 and 8 GiB guests that wrote 64 MiB (bench/fill_random.fasm's fill with ``ws=64M``, then an
  idle loop that spins no host core: non-zero data over 64 MiB; the rest of guest RAM never touched, so holes of the
  memfd). Median ``total-time``, ``setup-time``, downtime, rounds and bytes of the migration info.
  Target: 8 GiB that touched 64 MiB in <= 1 s.
* **Full**: guests whose every page above the code is non-zero (the same fill over all RAM, then idle),
  1, 2, 4, 8 GiB: total time and throughput, against the raw Python copy of the same number of bytes
  (bench/baseline_copy.py: ``sendall`` from a memfd, ``recv_into`` a fresh memfd, another process)
  measured in the same run right before that size's migrations.
  docs/scaling.png plots total time against size for both series and the raw copy, with least-squares
  lines.
* **Cost**: CPU seconds (utime + stime from /proc/PID/stat) of the source agent, the destination agent
  and the VM processes over each migration, per GiB moved; memory (RSS split into anonymous and
  shared memory, PSS of the VM process from smaps_rollup) before and after, and the agents' peak
  anonymous RSS sampled during the migration. The source VM process exits (and is reaped by its
  agent) when the migration completes, so its CPU is read from the source agent's ``cutime +
  cstime`` delta minus what it had used before the migration.

Guest RAM is one shared memfd that the agent and its VM process both map: RSS counts the guest pages
each process has touched through its own mapping (``RssShmem``), so the same page appears in both RSSes;
PSS splits each such page between the processes that map it. The agent's own cost is ``RssAnon``.

A fully written guest exists twice during its migration: full sizes of 2 GiB and more take
``/tmp/ferry-bigmem.lock`` (flock, shared with the other big jobs of this machine) for the duration of
that size, and a size is skipped when ``MemAvailable`` cannot hold it twice plus a margin.

    .venv/bin/python -m bench.bench_scaling            # sparse 1,4,8 GiB; full 1,2,4,8 GiB; 3 runs (2 at 8 GiB full)
    .venv/bin/python -m bench.bench_scaling --quick    # sparse 256M,1G; full 256M,512M; 1 run each
    .venv/bin/python -m bench.bench_scaling --json     # raw per-run figures
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_migrate import fill_guest, migrate_once
from bench.common import (
    NO_PLOT,
    GiB,
    MiB,
    format_size,
    load_average,
    markdown_table,
    median,
    pyplot,
    save_figure,
)
from tests.agents import AgentProc, make_key, start_agent, wait_for
from vmruntime.isa import DATA_ADDR

PLOT = Path(__file__).resolve().parent.parent / "docs" / "scaling.png"
BIGMEM_LOCK = "/tmp/ferry-bigmem.lock"
LOCK_FROM = 2 * GiB  # full guests this big or bigger hold more than 3 GiB during a migration
TOUCHED = 64 * MiB
TARGET_S = 1.0  # 8 GiB that touched 64 MiB
MAX_FAILURES = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc readings ---------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of ``pid`` in seconds; (0, 0) once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return own, children


def status_kib(pid: int, keys: tuple[str, ...] = ("VmRSS", "RssAnon", "RssShmem")) -> dict[str, int]:
    """Chosen kB fields of /proc/PID/status (zeros once the process is gone)."""
    out = dict.fromkeys(keys, 0)
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0])
    return out


def rollup_kib(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, Pss_Shmem, ...)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0])
    return out


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples the anonymous RSS of some processes every few ms in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.01) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for label, pid in self.pids.items():
                self.peak_kib[label] = max(self.peak_kib[label], status_kib(pid, ("RssAnon",))["RssAnon"])
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def bigmem_lock(needed: bool) -> Iterator[float]:
    """Hold /tmp/ferry-bigmem.lock (flock, like `flock /tmp/ferry-bigmem.lock cmd`) when ``needed``;
    yields the seconds spent waiting for it."""
    if not needed:
        yield 0.0
        return
    t0 = time.monotonic()
    with open(BIGMEM_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- one migration, measured ------------------------------------------------------------------


@dataclass
class Run:
    """One completed migration with its cost."""

    info: dict[str, Any]
    cpu: dict[str, float]  # seconds during the migration: src-agent, dst-agent, src-vm, dst-vm
    mem_before: dict[str, dict[str, int]]  # kB: src-agent (status), src-vm (status + rollup)
    mem_after: dict[str, dict[str, int]]  # kB: dst-agent, dst-vm, and src-agent after
    peak_anon_kib: dict[str, int]

    def total_ms(self) -> float:
        return float(self.info["total-time"])


def vm_pid(agent: AgentProc, name: str) -> int:
    return int(agent.call("vm-info", name=name)["pid"])


def measured_migration(src: AgentProc, dst: AgentProc, name: str) -> Run | str:
    """Migrate ``name`` from ``src`` to ``dst`` with default parameters, reading CPU and memory around
    it; the Run, or the failure's text."""
    spid = vm_pid(src, name)
    sa0, sa0_children = cpu_times(src.proc.pid)
    da0, _ = cpu_times(dst.proc.pid)
    svm0, _ = cpu_times(spid)
    before = {"src-agent": status_kib(src.proc.pid), "src-vm": {**status_kib(spid), **rollup_kib(spid)}}
    with PeakSampler({"src-agent": src.proc.pid, "dst-agent": dst.proc.pid}) as peaks:
        info = migrate_once(src, dst, name, {})
    if info["status"] != "completed":
        return f"{info['status']}: {info.get('error-desc')}"
    dpid = vm_pid(dst, name)
    # The source's VM process has exited; its agent reaps it, then its CPU is in cutime/cstime.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not Path(f"/proc/{spid}").exists(), timeout=5.0, what="source VM to be reaped")
    sa1, sa1_children = cpu_times(src.proc.pid)
    da1, _ = cpu_times(dst.proc.pid)
    dvm1, _ = cpu_times(dpid)  # started for this migration: all its CPU is the migration's (and since)
    after = {"dst-agent": status_kib(dst.proc.pid), "dst-vm": {**status_kib(dpid), **rollup_kib(dpid)},
             "src-agent": status_kib(src.proc.pid)}
    cpu = {"src-agent": sa1 - sa0, "dst-agent": da1 - da0,
           "src-vm": max(0.0, sa1_children - sa0_children - svm0), "dst-vm": dvm1}
    return Run(info, cpu, before, after, dict(peaks.peak_kib))


# --- the series -------------------------------------------------------------------------------


@dataclass
class Series:
    """One guest size of one kind (sparse | full): its completed migrations and raw copies."""

    kind: str
    size: int
    touched: int
    runs: list[Run] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    raw_s: list[float] = field(default_factory=list)
    raw_cpu_s: list[float] = field(default_factory=list)  # sender + receiver CPU of each raw copy
    skipped: str = ""
    lock_wait_s: float = 0.0

    def med(self, key: str) -> float:
        return median([float(r.info[key]) for r in self.runs])

    def rounds(self) -> float:
        return median([len(r.info["rounds"]) for r in self.runs])

    def transferred(self) -> float:
        return median([float(r.info["ram"]["transferred"]) for r in self.runs])

    def cpu(self, who: str) -> float:
        return median([r.cpu[who] for r in self.runs])

    def parts(self) -> dict[str, float]:
        """Median ms of where the total time went: setup, pre-copy rounds (their send and harvest),
        downtime, and the rest (arming dirty tracking before round 0, the digest set-up, and after
        RESUMED the source's track-stop and release of its guest RAM)."""
        out: dict[str, list[float]] = {"setup": [], "rounds": [], "downtime": [], "other": []}
        for r in self.runs:
            rounds = sum(float(x["seconds"]) for x in r.info["rounds"] if not x.get("final")) * 1000
            out["setup"].append(float(r.info["setup-time"]))
            out["rounds"].append(rounds)
            out["downtime"].append(float(r.info["downtime"]))
            out["other"].append(r.total_ms() - rounds - float(r.info["setup-time"]) - float(r.info["downtime"]))
        return {k: median(v) for k, v in out.items()}

    def raw_ms(self) -> float:
        return median(self.raw_s) * 1000 if self.raw_s else float("nan")


def raw_copies(size: int, runs: int) -> list[Any]:
    """The Transfers (seconds, sender and receiver CPU) of ``runs`` raw Python copies of ``size`` bytes (bench/baseline_copy.py), its memfd
    freed again before the guest is created (an 8 GiB guest and an 8 GiB baseline must not coexist)."""
    from bench.baseline_copy import filled_memfd, receiver, send_once

    out = []
    src = filled_memfd(size)
    try:
        with receiver() as conn:
            for _ in range(runs):
                out.append(send_once(conn, src, False))
    finally:
        src.close()
    return out


def run_series(a: AgentProc, b: AgentProc, s: Series, runs: int, log: Any) -> None:
    name = f"scale-{s.kind}-{s.size >> 20}m"
    fill_guest(a, name, s.size, s.touched)
    src, dst = a, b
    try:
        while len(s.runs) < runs and len(s.failed) <= MAX_FAILURES:
            res = measured_migration(src, dst, name)
            if isinstance(res, str):
                s.failed.append(res)
                print(f"{name}: migration {res}", file=log)
                continue
            s.runs.append(res)
            print(f"{name}: total {res.total_ms():.0f} ms, setup {res.info['setup-time']} ms, downtime "
                  f"{res.info['downtime']} ms, rounds {len(res.info['rounds'])}", file=log)
            src, dst = dst, src
            time.sleep(0.3)  # the source's guest RAM is freed; the destination VM settles
    finally:
        with contextlib.suppress(Exception):
            src.call("vm-destroy", name=name)


def warm_up(a: AgentProc, b: AgentProc) -> None:
    """One small migration each way, not measured: a fresh agent's first migration pays imports and
    first-use costs (about a second of setup-time seen here) that are no part of scaling."""
    a.call("vm-create", name="scale-warmup", program="idle", mem=str(64 * MiB))
    where = a
    for src, dst in ((a, b), (b, a)):
        if migrate_once(src, dst, "scale-warmup", {})["status"] == "completed":
            where = dst
    where.call("vm-destroy", name="scale-warmup")


def measure_all(a: AgentProc, b: AgentProc, sparse: list[int], full: list[int], runs: int,
                big_runs: int, log: Any) -> list[Series]:
    out: list[Series] = []
    warm_up(a, b)
    for size in sparse:
        s = Series("sparse", size, TOUCHED)
        out.append(s)
        run_series(a, b, s, runs, log)
    for size in full:
        s = Series("full", size, size - DATA_ADDR)
        out.append(s)
        n = big_runs if size >= 8 * GiB else runs
        with bigmem_lock(size >= LOCK_FROM) as waited:
            s.lock_wait_s = waited
            # Two copies of the guest (source and destination) plus headroom for everyone else.
            if mem_available() < 2 * size + 2 * GiB:
                s.skipped = f"MemAvailable {mem_available() / GiB:.1f} GiB < 2 x size + 2 GiB"
                print(f"full {format_size(size)}: skipped, {s.skipped}", file=log)
                continue
            copies = raw_copies(size, n)
            s.raw_s = [t.seconds for t in copies]
            s.raw_cpu_s = [t.send_cpu + t.recv_cpu for t in copies]
            run_series(a, b, s, n, log)
    return out


# --- output -----------------------------------------------------------------------------------


def sparse_rows(series: list[Series]) -> list[list[object]]:
    rows: list[list[object]] = []
    for s in series:
        if not s.runs:
            rows.append([format_size(s.size), 0, len(s.failed), *["-"] * 7])
            continue
        total = s.med("total-time")
        held = ("yes" if total <= TARGET_S * 1000 else "**no**") if s.size == 8 * GiB else ""
        rows.append([format_size(s.size), len(s.runs), len(s.failed), f"{total:.0f}", held,
                     f"{s.med('setup-time'):.0f}", f"{s.med('downtime'):.0f}", f"{s.rounds():.0f}",
                     f"{s.transferred() / MiB:.1f}",
                     f"{median([float(r.info['ram']['duplicate']) for r in s.runs]) * 4096 / GiB:.2f}"])
    return rows


def full_rows(series: list[Series]) -> list[list[object]]:
    rows: list[list[object]] = []
    for s in series:
        if s.skipped or not s.runs:
            rows.append([format_size(s.size), 0, len(s.failed), s.skipped or "-", *["-"] * 6])
            continue
        total = s.med("total-time")
        gib_s = s.size / GiB / (total / 1000)
        raw = s.raw_ms()
        rows.append([format_size(s.size), len(s.runs), len(s.failed), f"{total:.0f}", f"{gib_s:.2f}",
                     f"{raw:.0f}", f"{s.size / GiB / (raw / 1000):.2f}", f"{raw / total:.0%}",
                     f"{s.med('downtime'):.0f}", f"{s.rounds():.0f}"])
    return rows


WHO = ("src-agent", "dst-agent", "src-vm", "dst-vm")


def cost_rows(series: list[Series]) -> list[list[object]]:
    rows: list[list[object]] = []
    for s in series:
        if not s.runs:
            continue
        moved = s.transferred() / GiB
        cells: list[object] = [s.kind, format_size(s.size), f"{moved:.2f}"]
        for who in WHO:
            cells.append(f"{s.cpu(who):.2f}")
        total_cpu = sum(s.cpu(w) for w in WHO)
        cells.append(f"{total_cpu:.2f}")
        cells.append(f"{total_cpu / moved:.2f}" if moved > 0.01 else "-")
        cells.append(f"{total_cpu / (s.size / GiB):.2f}")
        cells.append(f"{median(s.raw_cpu_s) / (s.size / GiB):.2f}" if s.raw_cpu_s else "-")
        rows.append(cells)
    return rows


def part_rows(series: list[Series]) -> list[list[object]]:
    rows: list[list[object]] = []
    for s in series:
        if s.runs:
            p = s.parts()
            rows.append([s.kind, format_size(s.size), f"{s.med('total-time'):.0f}",
                         *(f"{p[k]:.0f}" for k in ("setup", "rounds", "downtime", "other"))])
    return rows


def mem_rows(series: list[Series]) -> list[list[object]]:
    def m(runs: list[Run], get: Any) -> str:
        return f"{median([get(r) for r in runs]) / 1024:.0f}"

    rows: list[list[object]] = []
    for s in series:
        if not s.runs:
            continue
        r = s.runs
        rows.append([
            s.kind, format_size(s.size),
            m(r, lambda x: x.mem_before["src-agent"]["RssAnon"]),
            m(r, lambda x: x.mem_before["src-agent"]["RssShmem"]),
            m(r, lambda x: x.peak_anon_kib["src-agent"]),
            m(r, lambda x: x.peak_anon_kib["dst-agent"]),
            m(r, lambda x: x.mem_after["dst-agent"]["RssAnon"]),
            m(r, lambda x: x.mem_after["dst-agent"]["RssShmem"]),
            m(r, lambda x: x.mem_before["src-vm"]["VmRSS"]),
            m(r, lambda x: x.mem_before["src-vm"].get("Pss", 0)),
            m(r, lambda x: x.mem_after["dst-vm"]["VmRSS"]),
            m(r, lambda x: x.mem_after["dst-vm"].get("Pss", 0)),
            m(r, lambda x: x.mem_after["dst-vm"].get("Pss_Shmem", 0)),
        ])
    return rows


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line y = a + b x; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def series_points(series: list[Series], kind: str) -> tuple[list[float], list[float]]:
    done = [s for s in series if s.kind == kind and s.runs]
    return [s.size / GiB for s in done], [s.med("total-time") for s in done]


def raw_points(series: list[Series]) -> tuple[list[float], list[float]]:
    done = [s for s in series if s.kind == "full" and s.raw_s]
    return [s.size / GiB for s in done], [s.raw_ms() for s in done]


def fit_lines(series: list[Series]) -> list[str]:
    out = []
    for label, (xs, ys) in (("sparse (64 MiB touched)", series_points(series, "sparse")),
                            ("full", series_points(series, "full")), ("raw copy", raw_points(series))):
        line = fit(xs, ys)
        if line:
            out.append(f"{label}: total ms = {line[0]:.0f} + {line[1]:.0f} x GiB")
    return out


def plot(series: list[Series], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (xs, ys), style in (("full guest (every page written)", series_points(series, "full"), "o-"),
                                   ("raw Python copy, same bytes", raw_points(series), "s--"),
                                   ("sparse guest (64 MiB written)", series_points(series, "sparse"), "^-")):
        if not xs:
            continue
        line = ax.plot(xs, ys, style, label=label)[0]
        f = fit(xs, ys)
        if f:
            ax.plot([0, max(xs)], [f[0], f[0] + f[1] * max(xs)], ":", color=line.get_color(), linewidth=1)
    ax.set(xlabel="guest RAM (GiB)", ylabel="total time (ms, median)",
           title="Total time against guest size (dotted: least-squares)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    # Right: the sparse guests on their own scale, total split into its parts, and the target.
    sparse = [s for s in series if s.kind == "sparse" and s.runs]
    bottom = [0.0] * len(sparse)
    names = [format_size(s.size) for s in sparse]
    for part in ("setup", "rounds", "downtime", "other"):
        vals = [s.parts()[part] for s in sparse]
        bx.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    bx.axhline(TARGET_S * 1000, color="grey", linestyle=":", linewidth=1)
    bx.text(-0.4, TARGET_S * 1000, "8 GiB target", va="bottom", fontsize="small", color="grey")
    bx.set(xlabel="guest RAM (64 MiB written)", ylabel="ms (median of each part)",
           title="Sparse guests: where the total time goes")
    bx.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(plt, fig, path, "total time against guest size")


def markdown(series: list[Series], runs: int, big_runs: int, load: tuple[float, ...], plot_line: str) -> str:
    sparse = [s for s in series if s.kind == "sparse"]
    full = [s for s in series if s.kind == "full"]
    lines = [f"Two agents on loopback, default parameters, each guest migrated back and forth; medians of "
             f"{runs} completed migration(s) per size ({big_runs} for an 8 GiB full guest). Load average "
             f"before / after: {' / '.join(f'{x:.2f}' for x in load[:3])} / "
             f"{' / '.join(f'{x:.2f}' for x in load[3:])}.", ""]
    if sparse:
        lines += [f"**Sparse guests**: bench/fill_random.fasm's fill wrote {format_size(TOUCHED)} of non-zero "
                  f"data, then the guest idles (WAIT, no spinning); the rest of guest RAM was never touched. Target: 8 GiB in <= "
                  f"{TARGET_S * 1000:.0f} ms total.", "",
                  markdown_table(["guest", "runs", "failed", "total ms", "target held", "setup ms", "downtime ms",
                                  "rounds", "transferred MiB", "zero GiB (no payload)"], sparse_rows(sparse),
                                 "lrrrlrrrrr"), ""]
    if full:
        lines += ["**Full guests**: every page above the code non-zero (the same fill over all RAM, then idle). "
                  "The raw copy moves the same number of bytes with bench/baseline_copy.py (another process, "
                  "`recv_into` a fresh memfd), measured in this run right before that size's migrations; "
                  "ratio = raw ms / ferry total ms.", "",
                  markdown_table(["guest", "runs", "failed", "total ms", "GiB/s", "raw copy ms", "raw GiB/s",
                                  "ratio", "downtime ms", "rounds"], full_rows(full), "lrrrrrrrrr"), ""]
    lines += ["Least-squares lines: " + "; ".join(fit_lines(series)) + ".", "", plot_line, ""]
    lines += ["**Where the total time goes** (median ms): setup = connect, handshake, the destination's RAM "
              "reservation and VM process start; rounds = pre-copy rounds (send + harvest); downtime = pause to "
              "RESUMED; other = the rest: arming dirty tracking before round 0 and, after RESUMED, the source's "
              "track-stop and release of its guest RAM (all three grow with guest size, not with data).", "",
              markdown_table(["kind", "guest", "total", "setup", "rounds", "downtime", "other"], part_rows(series),
                             "llrrrrr"), ""]
    lines += ["**Cost, CPU** (seconds over one migration, median; utime + stime from /proc/PID/stat; the "
              "source VM's from its agent's cutime + cstime once reaped, less what it had used before; the "
              "destination VM's since its start). Per GiB moved = wire bytes (`ram.transferred`); per GiB "
              "of guest = guest size. Baseline: the raw copy's sender + receiver CPU (getrusage) per GiB, same "
              "run.", "",
              markdown_table(["kind", "guest", "GiB moved", "src agent", "dst agent", "src VM", "dst VM", "total",
                              "CPU s / GiB moved", "CPU s / GiB guest", "raw copy CPU s / GiB"], cost_rows(series),
                             "llrrrrrrrrr"), "",
              "**Cost, memory** (MiB, median). Guest RAM is one shared memfd mapped by the agent and by its VM "
              "process: `RssShmem` is the guest pages a process touched through its own mapping, so the same "
              "page counts in both; PSS splits each shared page between the processes mapping it (the memfd "
              "itself, i.e. the guest's real footprint, is the touched size once per host). The agent's own "
              "memory is `RssAnon`; its peak is sampled every 10 ms during the migration.", "",
              markdown_table(["kind", "guest", "src agent anon before", "src agent shmem before",
                              "src agent anon peak", "dst agent anon peak", "dst agent anon after",
                              "dst agent shmem after", "src VM RSS before", "src VM PSS before",
                              "dst VM RSS after", "dst VM PSS after", "dst VM PSS shmem after"],
                             mem_rows(series), "llrrrrrrrrrrr")]
    skipped = [s for s in series if s.skipped]
    failed = [s for s in series if s.failed]
    for s in skipped:
        lines += ["", f"{s.kind} {format_size(s.size)} skipped: {s.skipped}."]
    for s in failed:
        lines += ["", f"{s.kind} {format_size(s.size)}: {len(s.failed)} failed migration(s): "
                  + "; ".join(s.failed[:3])]
    return "\n".join(lines)


def as_json(series: list[Series]) -> list[dict[str, Any]]:
    return [{"kind": s.kind, "size": s.size, "touched": s.touched, "failed": s.failed, "skipped": s.skipped,
             "raw_s": s.raw_s, "raw_cpu_s": s.raw_cpu_s, "lock_wait_s": s.lock_wait_s,
             "runs": [{"total-time": r.info["total-time"], "setup-time": r.info["setup-time"],
                       "downtime": r.info["downtime"], "rounds": r.info["rounds"], "ram": r.info["ram"],
                       "downtime-breakdown": r.info["downtime-breakdown"], "cpu": r.cpu,
                       "mem_before": r.mem_before, "mem_after": r.mem_after, "peak_anon_kib": r.peak_anon_kib}
                      for r in s.runs]} for s in series]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each (< 2 min)")
    ap.add_argument("--sparse", help="sparse guest sizes, comma-separated (default 1G,4G,8G; quick 256M,1G)")
    ap.add_argument("--full", help="full guest sizes, comma-separated, '' for none "
                                   "(default 1G,2G,4G,8G; quick 256M,512M)")
    ap.add_argument("--runs", type=int, help="completed migrations per size (default 3, quick 1)")
    ap.add_argument("--big-runs", type=int, help="migrations of an 8 GiB full guest (default 2)")
    ap.add_argument("--json", action="store_true", help="print raw per-run figures as JSON")
    ap.add_argument("--json-out", type=Path, help="also write the raw per-run figures as JSON to this file")
    ap.add_argument("--plot", type=Path, default=PLOT, help=f"PNG to draw (default {PLOT})")
    ns = ap.parse_args(argv)
    from vmruntime.programs import parse_size

    def sizes(text: str | None, default: str) -> list[int]:
        text = default if text is None else text
        return [parse_size(x) for x in text.split(",") if x.strip()]

    sparse = sizes(ns.sparse, "256M,1G" if ns.quick else "1G,4G,8G")
    full = sizes(ns.full, "256M,512M" if ns.quick else "1G,2G,4G,8G")
    runs = ns.runs or (1 if ns.quick else 3)
    big_runs = ns.big_runs or min(runs, 2)
    load0 = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    key = make_key(tmp)
    # Agents' logs (printed when they stop) and progress go to stderr: stdout is the report.
    with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a, start_agent(tmp, "B", key) as b:
        series = measure_all(a, b, sparse, full, runs, big_runs, sys.stderr)
    load = (*load0, *load_average())
    shutil.rmtree(tmp, ignore_errors=True)
    if ns.json_out:
        ns.json_out.write_text(json.dumps(as_json(series), indent=1))
    if ns.json:
        print(json.dumps(as_json(series), indent=1))
        return
    print(markdown(series, runs, big_runs, load, plot(series, ns.plot)))


if __name__ == "__main__":
    main()
