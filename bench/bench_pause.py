"""Pause latency of a VM process: pause request sent -> acknowledgement (with state) received.

The guest runs a busy program (``counter`` by default) so every pause has to
interrupt a slice in progress. Each sample: resume, let the guest run a
random 1-5 ms, then time ``pause``. Several runs of N samples each; the
table shows the median over runs of each run's p50/p99/max, and the same
for resume (request -> reply).

    .venv/bin/python -m bench.bench_pause [--quick] [--program counter] [--samples 400] [--runs 5]
        [--throttle PERCENT] [--track uffd-wp-async]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time
from collections.abc import Iterator

from vmruntime import dirty, guestram
from vmruntime.control import VMHandle
from vmruntime.programs import load_program


def _busy_args(program: str) -> dict[str, str]:
    """Keep the vCPU busy: a counter that waits between bursts would measure pauses of a sleeping VM."""
    return {"wait": "0"} if program == "counter" else {}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank: an observed value, never interpolated."""
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def one_run(a: argparse.Namespace, samples: int, rng: random.Random) -> dict[str, list[float]]:
    image, args = load_program(a.program, _busy_args(a.program))
    with VMHandle.spawn(a.mem, name="bench-pause") as vm:
        vm.boot(image, args)
        if a.throttle:
            vm.throttle(a.throttle)
        with tracking(vm, a.track):
            return sample(vm, samples, rng)


@contextlib.contextmanager
def tracking(vm: VMHandle, backend: str | None) -> Iterator[None]:
    """Dirty tracking armed over guest RAM for the duration (as during a migration), if asked."""
    if backend is None:
        yield
        return
    info = vm.track_start(backend)
    with guestram.map_shared(vm.ram_fd, vm.ram_size) as ram:
        tracker = dirty.make_tracker(backend, pid=vm.pid, uffd=info.uffd, addr=info.addr,
                                     length=info.length, ram=ram)  # fmt: skip
        tracker.start()
        try:
            yield
        finally:
            tracker.stop()
            if info.uffd is not None:
                os.close(info.uffd)


def sample(vm: VMHandle, samples: int, rng: random.Random) -> dict[str, list[float]]:
    pause_ms: list[float] = []
    resume_ms: list[float] = []
    time.sleep(0.05)  # past start-up: the slice budget has settled
    for _ in range(samples):
        time.sleep(rng.uniform(0.001, 0.005))
        t0 = time.perf_counter()
        vm.pause()
        t1 = time.perf_counter()
        vm.resume()
        t2 = time.perf_counter()
        pause_ms.append((t1 - t0) * 1e3)
        resume_ms.append((t2 - t1) * 1e3)
        vm.poll_events()
        vm.take_console()  # drop console output as it comes
    status = vm.status()
    if status["status"] != "running":
        raise SystemExit(f"guest stopped running during the benchmark: {status}")
    return {"pause": pause_ms, "resume": resume_ms}


def restart_costs(a: argparse.Namespace, samples: int) -> dict[str, list[float]]:
    """Start-up of a VM process (spawn -> first reply) and restore of a paused guest's state in it."""
    image, args = load_program(a.program, _busy_args(a.program))
    spawn_ms: list[float] = []
    restore_ms: list[float] = []
    with VMHandle.spawn(a.mem, name="bench-source") as src:
        src.boot(image, args)
        for _ in range(samples):
            time.sleep(0.02)
            state = src.pause()
            t0 = time.perf_counter()
            with VMHandle.spawn(a.mem, name="bench-dest", ram_fd=src.ram_fd) as dst:
                dst.status()
                t1 = time.perf_counter()
                dst.restore(state)
                t2 = time.perf_counter()
                dst.stop()
            spawn_ms.append((t1 - t0) * 1e3)
            restore_ms.append((t2 - t1) * 1e3)
            src.resume()
            src.poll_events()
            src.take_console()
    return {"spawn -> first reply": spawn_ms, "restore": restore_ms}


def throttle_rates(a: argparse.Namespace, percents: list[int], seconds: float) -> dict[int, float]:
    """Guest instructions per second at each throttle setting (one VM, settings in turn)."""
    image, args = load_program(a.program, _busy_args(a.program))
    rates: dict[int, float] = {}
    with VMHandle.spawn(a.mem, name="bench-throttle") as vm:
        vm.boot(image, args)
        time.sleep(0.05)
        for percent in percents:
            vm.throttle(percent)
            n0, t0 = vm.status()["instructions"], time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                vm.poll_events(0.05)
                vm.take_console()
            rates[percent] = (vm.status()["instructions"] - n0) / (time.perf_counter() - t0)
    return rates


def summarize(runs: list[dict[str, list[float]]], key: str) -> tuple[float, float, float]:
    p50 = statistics.median(percentile(r[key], 0.50) for r in runs)
    p99 = statistics.median(percentile(r[key], 0.99) for r in runs)
    worst = statistics.median(max(r[key]) for r in runs)
    return p50, p99, worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 runs of 100 samples")
    p.add_argument("--program", default="counter")
    p.add_argument("--mem", type=int, default=16 << 20)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--throttle", type=int, default=0, help="also throttle the vCPU by this percent")
    p.add_argument("--track", choices=dirty.BACKENDS, help="arm this dirty tracker during the samples")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    samples, nruns = (100, 3) if a.quick else (a.samples, a.runs)
    rng = random.Random(a.seed)
    runs = [one_run(a, samples, rng) for _ in range(nruns)]
    load = os.getloadavg()[0]
    print(f"Pause latency, program `{a.program}`, throttle {a.throttle}%, tracking {a.track or 'off'}, "
          f"{nruns} runs x {samples} samples (median over runs), {os.cpu_count()} CPUs, "
          f"load average {load:.1f}\n")  # fmt: skip
    print("| request | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|")
    for key in ("pause", "resume"):
        p50, p99, worst = summarize(runs, key)
        print(f"| {key} | {p50:.3f} | {p99:.3f} | {worst:.3f} |")
    restarts = [restart_costs(a, 5 if a.quick else 10) for _ in range(nruns)]
    for key in restarts[0]:
        p50, p99, worst = summarize(restarts, key)
        print(f"| {key} | {p50:.3f} | {p99:.3f} | {worst:.3f} |")
    percents = [0, 25, 50, 75, 90]
    per_run = [throttle_rates(a, percents, 0.3 if a.quick else 1.0) for _ in range(nruns)]
    print(f"\nThrottle: guest speed relative to unthrottled (median over {nruns} runs)\n")
    print("| throttle % | expected | measured | M instructions/s |")
    print("|---:|---:|---:|---:|")
    for percent in percents:
        rate = statistics.median(r[percent] for r in per_run)
        base = statistics.median(r[0] for r in per_run)
        print(f"| {percent} | {(100 - percent) / 100:.2f} | {rate / base:.2f} | {rate / 1e6:.1f} |")


if __name__ == "__main__":
    main()
