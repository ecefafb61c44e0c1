"""Guest instructions per second: the block compiler against a naive dispatch loop, same run.

    .venv/bin/python -m bench.bench_interp [--quick]

The naive loop is vmruntime.interp_ref (decode each instruction from the
code bytes, dispatch through an if/elif chain).  Each workload is booted
fresh for every measurement; the figure is instructions per second of CPU
time used by this process (the machine is shared), median of several runs.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time
from collections.abc import Callable

from vmruntime.asm import Image, assemble
from vmruntime.interp_ref import RefInterpreter
from vmruntime.machine import Machine
from vmruntime.programs import load_program

ALU_LOOP = """
start:
    movi r1, 0
    li r2, 0x9E3779B97F4A7C15
loop:
    addi r1, r1, 1
    xor r3, r3, r1
    add r4, r4, r3
    cmp r1, r2
    bne loop
    halt
"""

WORKLOADS: dict[str, Callable[[], tuple[Image, dict[str, int]]]] = {
    "alu loop": lambda: (assemble(ALU_LOOP, "alu"), {}),
    "counter": lambda: load_program("counter", {"wait": "0"}),  # flat out: its waits are not interpreter work
    "memstress seq": lambda: load_program("memstress", {"ws": "16M"}),
    "memstress random": lambda: load_program("memstress", {"ws": "16M", "pattern": "random",
                                                           "values": "random"}),
    "verify": lambda: load_program("verify", {"ws": "1M", "steps": "100000000"}),
}
RAM = 32 << 20


def _boot(workload: str) -> Machine:
    image, args = WORKLOADS[workload]()
    return Machine.boot(mmap.mmap(-1, RAM), image, args, time.monotonic_ns)


def rate(workload: str, naive: bool, instructions: int) -> float:
    """Guest instructions per second over one fresh run of about `instructions`."""
    m = _boot(workload)
    runner = RefInterpreter(m).run if naive else m.run
    runner(1000)  # compile the hot blocks outside the timed part
    # CPU time, not wall time: the host is shared, and waiting for a core says nothing about the interpreter
    start, before = time.process_time(), m.instructions
    while m.instructions - before < instructions and m.status == "running":
        runner(50_000)
    return (m.instructions - before) / (time.process_time() - start)


def paced_rate(rate: int, seconds: float) -> float:
    """Pages per wall-clock second memstress rate=N really writes (seq over a working set it never wraps)."""
    ws = (int(rate * seconds * 1.5) + 1) * 4096  # room for every page it can write: a wrap would hide pages
    image, args = load_program("memstress", {"ws": str(ws), "rate": str(rate)})
    m = Machine.boot(mmap.mmap(-1, 0x20000 + ws), image, args, time.monotonic_ns)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        m.run(20_000)
        time.sleep(m.wait_seconds())  # as the VM process does: sleep through the guest's WAIT
    elapsed = time.monotonic() - start
    pages = sum(1 for p in range(0x20000, 0x20000 + ws, 4096) if m._ram[p] != 0)
    return pages / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    opts = ap.parse_args()
    runs, fast_n, naive_n = (3, 1_000_000, 150_000) if opts.quick else (5, 5_000_000, 600_000)
    print(f"Guest instructions per CPU-second, median of {runs} runs (M = million)\n")
    print("| workload | block compiler | naive loop | speed-up |")
    print("|---|---:|---:|---:|")
    for name in WORKLOADS:
        fast = statistics.median(rate(name, False, fast_n) for _ in range(runs))
        slow = statistics.median(rate(name, True, naive_n) for _ in range(runs))
        print(f"| {name} | {fast / 1e6:.1f} M | {slow / 1e6:.2f} M | {fast / slow:.1f}x |")
    print("\nmemstress rate=0 writes one page per 10 guest instructions (pages/s = instructions/s / 10).")
    seconds = 0.5 if opts.quick else 2.0
    print(f"\nmemstress rate=N, pages per wall-clock second over {seconds} s, median of {runs} runs\n")
    print("| rate | measured |")
    print("|---:|---:|")
    for target in (1000, 10_000, 50_000):
        got = statistics.median(paced_rate(target, seconds) for _ in range(runs))
        print(f"| {target} | {got:.0f} |")


if __name__ == "__main__":
    main()
