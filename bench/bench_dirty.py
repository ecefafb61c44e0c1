"""Dirty tracking: harvest cost per GiB and the guest's write slowdown, per backend.

For each available backend, a writer process (vmruntime.dirty.writer) maps a
memfd of ``--mem`` bytes, touches every page (so nothing is a hole), and
registers it; the benchmark process plays the agent. Measured, median of
``--runs``:

- arm: ``tracker.start()`` (write-protect everything, or hash everything);
- idle harvest: nothing written since the last harvest;
- dirty harvest: right after the guest wrote one page in ``--every`` (25 %
  by default), which are then all reported;
- guest write: ns per 8-byte store to a different page each, as the writer
  sees it, untracked (before registering) and armed (first write to each page
  after a harvest re-armed it: a write-protect fault for uffd backends).

Harvest figures are scaled to ms per GiB of guest RAM. For backends that
time their kernel calls (uffd-wp-async: ``kernel_seconds``), the dirty
harvest is split into kernel time (PAGEMAP_SCAN: walk, re-protect, TLB
flushes) and the rest (numpy turning the result into ranges); "re-merge" is
what ``Ranges.merged`` costs on a harvest's result (the migration source
re-merges every harvest). bench/bench_vec.py sets these parts, and the
round's bookkeeping, against a baseline tree in the same run.

Then the toy machine itself: ``memstress`` (random pages, random values) in
a real VM process, instructions per second untracked and with tracking armed
and harvested every ``--interval`` ms, per backend. Then, for the default
backend, the same against the harvest interval (``--intervals``): each
harvest re-arms every page the guest wrote, so each first write to a page
after a harvest costs a write-protect fault, and the slowdown grows with
(pages written per round) / (round length). In a migration a round lasts as
long as sending the previous round's dirty set takes (hundreds of ms for a
128 MiB working set), not 10 ms. The sweep also prints the guest time lost
per reported page, i.e. per fault.

    .venv/bin/python -m bench.bench_dirty [--quick] [--mem 1G] [--runs 5] [--every 4]
        [--vm-mem 256M] [--seconds 2] [--interval 50] [--intervals 10,50,200,1000]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from vmruntime import dirty
from vmruntime.control import VMHandle
from vmruntime.dirty.extents import PAGE_SIZE
from vmruntime.dirty.names import UFFD_WP_ASYNC
from vmruntime.dirty.writer import WriterProc
from vmruntime.programs import load_program

GiB = 1 << 30
T = TypeVar("T")


@dataclass
class Figures:
    arm_ms: list[float] = field(default_factory=list)
    idle_ms: list[float] = field(default_factory=list)
    dirty_ms: list[float] = field(default_factory=list)
    kernel_ms: list[float] = field(default_factory=list)
    remerge_ms: list[float] = field(default_factory=list)
    plain_ns: list[float] = field(default_factory=list)
    armed_ns: list[float] = field(default_factory=list)


def timed_ms(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def guest_ns_per_write(writer: WriterProc, npages: int, every: int) -> float:
    """The writer's own timing of one store to each of npages/every pages."""
    count = npages // every
    ns = writer.call("time", first=0, count=count, step=every, repeat=1)["ns"]
    return float(ns) / count


def one_run(backend: str, mem: int, every: int, figs: Figures) -> None:
    npages = mem // PAGE_SIZE
    writer = WriterProc(mem)
    ram = mmap.mmap(writer.memfd, mem)
    try:
        guest_ns_per_write(writer, npages, 1)  # populate every page
        figs.plain_ns.append(guest_ns_per_write(writer, npages, every))
        addr, length, uffd = writer.register(backend)
        tracker = dirty.make_tracker(
            backend, pid=writer.pid, uffd=uffd, addr=addr, length=length, ram=ram, memfd=writer.memfd
        )
        ms, _ = timed_ms(tracker.start)
        figs.arm_ms.append(ms)
        measure_harvests(tracker, writer, npages, every, figs)
        tracker.stop()
        if uffd is not None:
            os.close(uffd)
    finally:
        writer.close()
        ram.close()


def measure_harvests(
    tracker: dirty.DirtyTracker, writer: WriterProc, npages: int, every: int, figs: Figures
) -> None:
    scale = GiB / (npages * PAGE_SIZE)
    ms, got = timed_ms(tracker.harvest)
    assert got == [], got
    figs.idle_ms.append(ms * scale)
    figs.armed_ns.append(guest_ns_per_write(writer, npages, every))
    ms, got = timed_ms(tracker.harvest)
    assert sum(e - s for s, e in got) == npages // every * PAGE_SIZE, "every written page must be reported"
    figs.dirty_ms.append(ms * scale)
    kernel = getattr(tracker, "kernel_seconds", None)
    if kernel is not None:
        figs.kernel_ms.append(kernel * 1e3 * scale)
    ms, _ = timed_ms(got.merged)
    figs.remerge_ms.append(ms * scale)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def table(results: dict[str, Figures], mem: int, every: int) -> str:
    med = statistics.median
    lines = [
        f"Guest RAM {mem >> 20} MiB, all pages populated; dirty = 1 page in {every}; medians "
        f"(load average {os.getloadavg()[0]:.2f} at the end).",
        "",
        "| backend | arm (ms) | idle harvest (ms/GiB) | dirty harvest (ms/GiB) | of which kernel "
        "| re-merge (ms/GiB) | guest write untracked (ns) | guest write armed (ns) | slowdown |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in results.items():
        plain, armed = med(f.plain_ns), med(f.armed_ns)
        kernel = f"{med(f.kernel_ms):.1f}" if f.kernel_ms else "-"
        lines.append(
            f"| {name} | {med(f.arm_ms):.1f} | {med(f.idle_ms):.1f} | {med(f.dirty_ms):.1f} | {kernel} "
            f"| {med(f.remerge_ms):.1f} | {plain:.0f} | {armed:.0f} | {armed / plain:.1f}x |"
        )
    return "\n".join(lines)


@dataclass
class Sample:
    """One memstress measurement: guest speed, and what the harvests saw meanwhile."""

    ips: float
    seconds: float
    cpu: float  # CPU seconds the VM process used meanwhile
    instructions: int
    harvests: int = 0
    pages: int = 0  # pages reported over all harvests: with uffd backends, one write fault each
    harvest_ms: list[float] = field(default_factory=list)


def memstress_run(backend: str | None, mem: int, seconds: float, interval: float, hot: bool = False) -> Sample:
    """memstress in a VM process for ``seconds``, untracked (None) or tracked by ``backend``
    (with hot blocks if ``hot``) and harvested every ``interval`` s (from the end of one
    harvest to the next)."""
    image, args = load_program("memstress", {"ws": str(mem // 2), "pattern": "random", "values": "random"})
    with VMHandle.spawn(mem, name="bench-dirty") as vm:
        vm.boot(image, args)
        time.sleep(0.2)  # past start-up
        with tracked(vm, backend, hot) as tracker:
            sample = measure_window(vm, tracker, seconds, interval)
        vm.stop()
    return sample


def measure_window(vm: VMHandle, tracker: dirty.DirtyTracker | None, seconds: float, interval: float) -> Sample:
    """The guest's speed over ``seconds`` while ``tracker`` (None: untracked) is harvested every
    ``interval`` s (from the end of one harvest to the next). Also used by bench_slowdown."""
    c0 = process_cpu_seconds(vm.pid)
    i0, t0 = vm.status()["instructions"], time.perf_counter()
    harvests, pages, hms = 0, 0, []
    while time.perf_counter() - t0 < seconds:
        time.sleep(interval)
        if tracker is not None:
            ms, got = timed_ms(tracker.harvest)
            harvests += 1
            pages += sum(e - s for s, e in got) // PAGE_SIZE
            hms.append(ms)
    i1, t1 = vm.status()["instructions"], time.perf_counter()
    c1 = process_cpu_seconds(vm.pid)
    return Sample((i1 - i0) / (t1 - t0), t1 - t0, c1 - c0, i1 - i0, harvests, pages, hms)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (from /proc, 10 ms resolution).

    Instructions per CPU second compare tracked and untracked runs fairly on
    a shared machine, where instructions per wall second also measure how
    often other people's jobs preempted the VM process.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memstress_ips(backend: str | None, mem: int, seconds: float, interval: float) -> float:
    """memstress instructions/s in a VM process, untracked (None) or tracked by ``backend``."""
    return memstress_run(backend, mem, seconds, interval).ips


@contextlib.contextmanager
def tracked(vm: VMHandle, backend: str | None, hot: bool = False) -> Iterator[dirty.DirtyTracker | None]:
    """An armed agent-side tracker of ``vm`` (None: untracked), with hot blocks if ``hot``; on leaving,
    the tracker is stopped and the VM process told, so the same VM can be tracked again."""
    if backend is None:
        yield None
        return
    info = vm.track_start(backend)
    ram = mmap.mmap(vm.ram_fd, vm.ram_size)
    tracker = dirty.make_tracker(
        backend, pid=vm.pid, uffd=info.uffd, addr=info.addr, length=info.length, ram=ram, memfd=vm.ram_fd,
        hot_blocks=hot,
    )
    tracker.start()
    try:
        yield tracker
    finally:
        tracker.stop()
        if info.uffd is not None:
            os.close(info.uffd)
        ram.close()
        with contextlib.suppress(Exception):  # the VM process may be gone (then nothing is left to undo)
            vm.track_stop()


def vm_table(backends: list[str], mem: int, seconds: float, interval: float, runs: int) -> str:
    rates: dict[str, list[float]] = {}
    for _ in range(runs):
        for name in ["untracked", *backends]:
            rate = memstress_ips(None if name == "untracked" else name, mem, seconds, interval)
            rates.setdefault(name, []).append(rate)
    base = statistics.median(rates["untracked"])
    lines = [
        f"memstress (random pages, random values, ws {mem >> 21} MiB) in a VM process of {mem >> 20} MiB, "
        f"harvest every {interval * 1e3:.0f} ms; medians of {runs} runs of {seconds:g} s.",
        "",
        "| tracking | instructions/s | vs untracked |",
        "|---|---:|---:|",
    ]
    for name, values in rates.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med / 1e6:.2f} M | {med / base:.2f} |")
    return "\n".join(lines)


def interval_table(backend: str, mem: int, intervals: list[float], seconds: float, runs: int) -> str:
    """Guest slowdown against the harvest interval (s), untracked measured alongside each.

    For uffd-wp-async also with hot blocks (dense 2 MiB blocks left un-protected and
    reported whole): fewer faults, more pages reported.
    """
    modes = [False, True] if backend == UFFD_WP_ASYNC else [False]
    lines = [
        f"{backend}: memstress (random pages, random values, ws {mem >> 21} MiB = {mem >> 13} pages) "
        f"in a VM process of {mem >> 20} MiB against the harvest interval; each run lasts "
        f"max({seconds:g} s, 3 intervals), untracked and tracked runs alternate; medians of {runs} runs. "
        "\"per CPU s\": instructions per CPU second of the VM process (robust to other jobs "
        "preempting it), the figure the ratio is taken on; \"lost per page\": the VM process's "
        "extra CPU time per reported page (one write fault each, except hot blocks).",
        "",
        "| harvest every | tracking | instr/s (wall) | instr per CPU s | vs untracked | pages per harvest "
        "| harvest (ms) | lost per page (us) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    med = statistics.median
    for interval in intervals:
        secs = max(seconds, 3 * interval)
        plain: list[Sample] = []
        tracked: dict[bool, list[Sample]] = {m: [] for m in modes}
        for _ in range(runs):
            plain.append(memstress_run(None, mem, secs, interval))
            for m in modes:
                tracked[m].append(memstress_run(backend, mem, secs, interval, hot=m))
        wall = med(s.ips for s in plain)
        base = med(s.instructions / s.cpu for s in plain)
        lines.append(
            f"| {interval * 1e3:.0f} ms | untracked | {wall / 1e6:.2f} M | {base / 1e6:.2f} M | 1.00 | | | |"
        )
        for m, samples in tracked.items():
            ips = med(s.ips for s in samples)
            per_cpu = med(s.instructions / s.cpu for s in samples)
            per_harvest = med(s.pages / max(s.harvests, 1) for s in samples)
            hms = med(ms for s in samples for ms in s.harvest_ms) if any(s.harvest_ms for s in samples) else 0.0
            # CPU time beyond what the same instructions took untracked, per reported page.
            lost_us = med(max(0.0, s.cpu - s.instructions / base) / max(s.pages, 1) * 1e6 for s in samples)
            lines.append(
                f"| {interval * 1e3:.0f} ms | {backend}{' + hot blocks' if m else ''} | {ips / 1e6:.2f} M "
                f"| {per_cpu / 1e6:.2f} M | {per_cpu / base:.2f} | {per_harvest:.0f} | {hms:.1f} | {lost_us:.2f} |"
            )
    lines.append("")
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.2f} (2 cores, shared).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 3 runs")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--every", type=int, default=4, help="dirty one page in EVERY")
    ap.add_argument("--backends", default=",".join(dirty.available_backends()))
    ap.add_argument("--no-vm", action="store_true", help="skip the memstress measurement")
    ap.add_argument("--vm-mem", default="256M", help="guest RAM of the memstress VM")
    ap.add_argument("--seconds", type=float, default=2.0, help="memstress measuring time per run")
    ap.add_argument("--interval", type=float, default=50.0, help="ms between harvests while memstress runs")
    ap.add_argument("--intervals", default="10,50,200,1000",
                    help="harvest intervals (ms) of the slowdown sweep, default backend only; '' skips it")
    args = ap.parse_args(argv)
    mem, runs = (64 << 20, 3) if args.quick else (parse_size(args.mem), args.runs)
    vm_mem, seconds = (32 << 20, 0.5) if args.quick else (parse_size(args.vm_mem), args.seconds)
    results: dict[str, Figures] = {}
    for backend in args.backends.split(","):
        figs = results.setdefault(backend, Figures())
        for _ in range(runs):
            one_run(backend, mem, args.every, figs)
    print(table(results, mem, args.every))
    if args.no_vm:
        return
    print()
    intervals = [float(x) / 1e3 for x in ("50,200" if args.quick else args.intervals).split(",") if x]
    try:
        print(vm_table(list(results), vm_mem, seconds, args.interval / 1e3, runs))
        if intervals:
            print()
            print(interval_table(list(results)[0], vm_mem, intervals, seconds, runs))
    except Exception as e:  # the toy machine is another part: report, do not hide the table above
        print(f"memstress table skipped: the VM process could not run memstress ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
