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

Harvest figures are scaled to ms per GiB of guest RAM.

Then the toy machine itself: ``memstress`` (random pages, random values) in
a real VM process, instructions per second untracked and with tracking armed
and harvested every ``--interval`` ms, as during pre-copy rounds.

    .venv/bin/python -m bench.bench_dirty [--quick] [--mem 1G] [--runs 5] [--every 4]
        [--vm-mem 256M] [--seconds 2] [--interval 50]
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
from vmruntime.dirty.writer import WriterProc
from vmruntime.programs import load_program

GiB = 1 << 30
T = TypeVar("T")


@dataclass
class Figures:
    arm_ms: list[float] = field(default_factory=list)
    idle_ms: list[float] = field(default_factory=list)
    dirty_ms: list[float] = field(default_factory=list)
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


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def table(results: dict[str, Figures], mem: int, every: int) -> str:
    med = statistics.median
    lines = [
        f"Guest RAM {mem >> 20} MiB, all pages populated; dirty = 1 page in {every}; medians.",
        "",
        "| backend | arm (ms) | idle harvest (ms/GiB) | dirty harvest (ms/GiB) "
        "| guest write untracked (ns) | guest write armed (ns) | slowdown |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in results.items():
        plain, armed = med(f.plain_ns), med(f.armed_ns)
        lines.append(
            f"| {name} | {med(f.arm_ms):.1f} | {med(f.idle_ms):.1f} | {med(f.dirty_ms):.1f} "
            f"| {plain:.0f} | {armed:.0f} | {armed / plain:.1f}x |"
        )
    return "\n".join(lines)


def memstress_ips(backend: str | None, mem: int, seconds: float, interval: float) -> float:
    """memstress instructions/s in a VM process, untracked (None) or tracked by ``backend``."""
    image, args = load_program("memstress", {"ws": str(mem // 2), "pattern": "random", "values": "random"})
    with VMHandle.spawn(mem, name="bench-dirty") as vm:
        vm.boot(image, args)
        time.sleep(0.2)  # past start-up
        with _tracked(vm, backend) as tracker:
            i0, t0 = vm.status()["instructions"], time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                time.sleep(interval)
                if tracker is not None:
                    tracker.harvest()
            i1, t1 = vm.status()["instructions"], time.perf_counter()
        vm.stop()
    return (i1 - i0) / (t1 - t0)


@contextlib.contextmanager
def _tracked(vm: VMHandle, backend: str | None) -> Iterator[dirty.DirtyTracker | None]:
    if backend is None:
        yield None
        return
    info = vm.track_start(backend)
    ram = mmap.mmap(vm.ram_fd, vm.ram_size)
    tracker = dirty.make_tracker(
        backend, pid=vm.pid, uffd=info.uffd, addr=info.addr, length=info.length, ram=ram, memfd=vm.ram_fd
    )
    tracker.start()
    try:
        yield tracker
    finally:
        tracker.stop()
        if info.uffd is not None:
            os.close(info.uffd)
        ram.close()


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


def main() -> None:
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
    args = ap.parse_args()
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
    try:
        print(vm_table(list(results), vm_mem, seconds, args.interval / 1e3, runs))
    except Exception as e:  # the toy machine is another part: report, do not hide the table above
        print(f"memstress table skipped: the VM process could not run memstress ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
