"""Vectorised page bookkeeping: this tree against a baseline tree, interleaved in one run.

The baseline is another checkout of ferry (say the last commit without numpy, unpacked with
``git archive <commit> | tar -x -C /tmp/ferry-base``), given with ``--baseline``. Each run
alternates the two trees, baseline first; medians and worst of ``--runs``, with the load average
of the host. Host memory is warmed once at the start (a memfd of most of the available RAM is
allocated and dropped): a fresh GiB of a microVM host costs its first-touch faults otherwise.

* **Harvest and per-round bookkeeping** (one child process per tree and run, so each imports its
  own tree's code): a writer process (vmruntime.dirty.writer) with ``--mem`` of guest RAM, all
  pages populated, registered for uffd-wp-async; the guest writes one page in four (65536 ranges
  per GiB), then:

  - harvest: total, of which kernel (PAGEMAP_SCAN), and decode (the rest: turning the region
    vector into ranges); merge: the source's re-check of the result (``merge_ranges`` on the
    list, ``Ranges.merged`` on the arrays);
  - source bookkeeping of that dirty set (256 MiB): chunk set, byte count, digest
    invalidation, batch planning with zero detection, the digest's notes per batch, the batches'
    ranges as the wire's tuples, the next round's stable chunks: what the session does per round
    besides sending and hashing;
  - destination bookkeeping of the same batches: what ``_on_pages``/``_digest_batch`` do per
    batch besides receiving, punching and hashing (merge, chunk sets, notes, byte counts).

* **End to end** (``--e2e``): a pair of agents per tree, each running a VM of ``--e2e-mem`` with
  memstress over a quarter of its RAM (random pages, ``--rate`` pages/s); migrations alternate
  between the trees: total time and downtime as ``migrate-status`` reports them.

    .venv/bin/python -m bench.bench_vec --baseline /tmp/ferry-base [--runs 5] [--mem 1G] [--e2e]
    .venv/bin/python -m bench.bench_vec --quick     # this tree alone, 3 runs (make bench)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GiB = 1 << 30
P = 4096
HERE = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def child(mem: int, every: int) -> dict[str, float]:
    """One run in this process's tree (imported from PYTHONPATH): the figures in ms."""
    from agent.migration import pages
    from vmruntime import dirty
    from vmruntime.dirty.names import UFFD_WP_ASYNC
    from vmruntime.dirty.writer import WriterProc

    vectorised = hasattr(dirty, "Ranges")
    writer = WriterProc(mem)
    ram = mmap.mmap(writer.memfd, mem)
    view = memoryview(ram)
    out: dict[str, float] = {}
    try:
        writer.call("time", first=0, count=mem // P, step=1, repeat=1)  # populate every page
        addr, length, uffd = writer.register(UFFD_WP_ASYNC)
        tracker = dirty.make_tracker(UFFD_WP_ASYNC, pid=writer.pid, uffd=uffd, addr=addr, length=length, ram=ram,
                                     memfd=writer.memfd)
        tracker.start()
        tracker.harvest()
        writer.call("time", first=0, count=mem // P // every, step=every, repeat=1)
        out["harvest"], got = timed(tracker.harvest)
        out["kernel"] = tracker.kernel_seconds * 1e3  # type: ignore[attr-defined]
        out["decode"] = out["harvest"] - out["kernel"]
        out["merge"], dirty_set = timed(got.merged if vectorised else lambda: dirty.merge_ranges(got))
        assert pages.total_bytes(dirty_set) == mem // every, "every written page must be reported"
        tracker.stop()
        os.close(uffd)

        digest = pages.RamDigest(writer.memfd, view, mem)
        digest.assume_holes_except([(0, mem)])
        digest.hexdigest()
        t0 = time.perf_counter()
        chunks = pages.chunks_of(dirty_set)
        pages.total_bytes(dirty_set)
        digest.invalidate(dirty_set, chunks)
        batches = list(pages.plan_batches(view, dirty_set))
        wire: list[tuple[Any, Any]] = []
        for b in batches:
            digest._note(b.zeros, False)  # hash_hot's bookkeeping (refresh_known less the hashing)
            digest._note(b.ranges, True)
            wire.append((b.ranges.tolist(), b.zeros.tolist()) if vectorised else (b.ranges, b.zeros))
        _ = pages.chunks_of(dirty_set) - chunks
        out["source"] = (time.perf_counter() - t0) * 1e3
        out["batches"] = len(batches)

        t0 = time.perf_counter()
        for ranges, zeros in wire:  # as the destination gets them: lists of tuples
            data: Any
            zero: Any
            if vectorised:
                data, zero, merged = pages.received(ranges, zeros)
            else:
                data, zero, merged = ranges, zeros, dirty.merge_ranges([*ranges, *zeros])
            touched = pages.chunks_of(merged)
            digest.invalidate_chunks(touched)
            covered = pages.covered_chunks(merged)
            digest._note(zero, False)
            digest._note(data, True)
            _ = touched - covered
            pages.total_bytes(ranges)
            pages.total_bytes(zeros)
        out["destination"] = (time.perf_counter() - t0) * 1e3
    finally:
        view.release()
        writer.close()
        ram.close()
    return out


def warm_host_memory(margin: int = 4 * GiB, cap: int = 16 * GiB) -> int:
    """Allocate most of MemAvailable in a memfd and drop it; returns the bytes touched."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    size = max(0, min(cap, avail - margin)) // GiB * GiB
    if size:
        fd = os.memfd_create("warm")
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    return size


def run_child(tree: Path, mem: int, every: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--mem", str(mem),
                           "--every", str(every)], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child in {tree} failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def stat(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({max(values):.1f})"


def bookkeeping(trees: dict[str, Path], mem: int, every: int, runs: int) -> str:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    loads = []
    for _ in range(runs):
        for name, tree in trees.items():
            results[name].append(run_child(tree, mem, every))
            loads.append(os.getloadavg()[0])
    cols = ("harvest", "kernel", "decode", "merge", "source", "destination")
    lines = [f"Guest RAM {mem >> 20} MiB, one page in {every} written ({mem // P // every} ranges, "
             f"{mem // every >> 20} MiB); ms, median (worst) of {runs}, trees interleaved; load average "
             f"{min(loads):.1f}-{max(loads):.1f}.", "",
             "| tree | " + " | ".join(cols) + " | batches |", "|---|" + "---:|" * (len(cols) + 1)]
    for name, rs in results.items():
        cells = [stat([r[c] for r in rs]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rs[0]['batches']:.0f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def agent_pair(tree: Path, tmp: Path) -> Iterator[tuple[Any, Any]]:
    """Two agents whose code is ``tree``'s: started from it (``python -m`` puts the cwd first)."""
    from tests.agents import make_key, start_agent

    key = make_key(tmp)
    cwd = os.getcwd()
    os.chdir(tree)
    try:
        a = start_agent(tmp, "a", key)
        b = start_agent(tmp, "b", key)
    finally:
        os.chdir(cwd)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def end_to_end(trees: dict[str, Path], mem: int, rate: int, runs: int) -> str:
    from bench.bench_migrate import migrate_once

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    loads = []
    with contextlib.ExitStack() as stack:
        pairs = {}
        for name, tree in trees.items():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"vec-{name}-")))
            a, b = stack.enter_context(agent_pair(tree, tmp))
            a.call("vm-create", name="vec", program="memstress", mem=str(mem),
                   args={"ws": str(mem // 4), "rate": str(rate), "pattern": "random"})
            pairs[name] = [a, b]
        time.sleep(2.0)  # the working set written once
        for _ in range(runs):
            for name, pair in pairs.items():
                info = migrate_once(pair[0], pair[1], "vec", {})
                loads.append(os.getloadavg()[0])
                if info["status"] == "completed":
                    results[name].append(info)
                    pair.reverse()
                else:
                    print(f"{name}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
    lines = [f"1 migration = {mem >> 20} MiB guest, memstress over {mem // 4 >> 20} MiB at {rate} pages/s "
             f"(random pages); median (worst) of the completed runs, trees interleaved; load average "
             f"{min(loads):.1f}-{max(loads):.1f}.", "",
             "| tree | runs | total (ms) | downtime (ms) | rounds | RAM sent (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, rs in results.items():
        if not rs:
            lines.append(f"| {name} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {name} | {len(rs)} | {stat([r['total-time'] for r in rs])} | "
                     f"{stat([r['downtime'] for r in rs])} | {statistics.median(len(r['rounds']) for r in rs):.0f} | "
                     f"{statistics.median(r['ram']['transferred'] for r in rs) / 2**20:.0f} |")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the tree to compare against")
    ap.add_argument("--runs", type=int, default=5, help="runs per tree (default 5)")
    ap.add_argument("--quick", action="store_true", help="3 runs per tree")
    ap.add_argument("--mem", default="1G", help="guest RAM of the harvest runs (default 1G)")
    ap.add_argument("--every", type=int, default=4, help="the guest writes one page in this many (default 4)")
    ap.add_argument("--e2e", action="store_true", help="also migrate a memstress guest end to end")
    ap.add_argument("--e2e-mem", default="1G", help="guest RAM of the end-to-end runs (default 1G)")
    ap.add_argument("--rate", type=int, default=100000, help="memstress pages/s in the end-to-end runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mem = parse_size(args.mem)
    if args.quick:
        args.runs = 3
    if args.child:
        print(json.dumps(child(mem, args.every)))
        return
    trees = {"this tree": HERE}
    if args.baseline is not None:
        if not (args.baseline / "agent" / "migration" / "pages.py").is_file():
            sys.exit(f"bench_vec: {args.baseline} is not a ferry checkout")
        trees = {"baseline": args.baseline.resolve(), **trees}
    print(f"warmed {warm_host_memory() / GiB:.0f} GiB of host memory")
    print(bookkeeping(trees, mem, args.every, args.runs))
    if args.e2e:
        print()
        print(end_to_end(trees, parse_size(args.e2e_mem), args.rate, args.runs))


if __name__ == "__main__":
    main()
