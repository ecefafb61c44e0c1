"""Host CPU a VM process burns for each shipped program, and how fast its guest still runs.

    .venv/bin/python -m bench.bench_wait [--quick]

Each case boots the program in a real VM process (vmruntime.control.VMHandle)
and, after a short warm-up, reads the process's own CPU time from
/proc/PID/schedstat and the guest's instruction counter over a wall-clock
window: CPU % is of one core.  Programs that WAIT (idle, counter, paced
memstress) should cost a small share; flat-out ones (counter wait=0,
memstress rate=0) a whole core.  The VM process only sleeps through a
guest's WAIT if its loop uses Machine.wait_seconds(); without that it polls
and shows ~100 % for every program.  Median of several runs.  Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from vmruntime.control import VMHandle
from vmruntime.programs import load_program

CASES: list[tuple[str, dict[str, str]]] = [
    ("idle", {}),
    ("counter", {}),
    ("counter", {"wait": "0"}),
    ("memstress", {"ws": "8M", "rate": "1000"}),
    ("memstress", {"ws": "8M", "rate": "10000"}),
    ("memstress", {"ws": "8M", "rate": "0"}),
]
RAM = 16 << 20


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process has run on a CPU (first field of schedstat)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])


def measure(program: str, args: dict[str, str], seconds: float) -> tuple[float, float]:
    """(CPU % of one core, guest instructions per second) of one fresh VM over `seconds`."""
    image, boot_args = load_program(program, args)
    with VMHandle.spawn(RAM, name=f"bench-wait-{program}") as vm:
        vm.boot(image, boot_args)
        _drain(vm, 0.2)  # warm-up: the first blocks compile
        t0, c0, n0 = time.monotonic(), cpu_ns(vm.pid), vm.status()["instructions"]
        _drain(vm, seconds)
        t1, c1, n1 = time.monotonic(), cpu_ns(vm.pid), vm.status()["instructions"]
        vm.stop()
    return 100 * (c1 - c0) / 1e9 / (t1 - t0), (n1 - n0) / (t1 - t0)


def _drain(vm: VMHandle, seconds: float) -> None:
    """Keep reading events (console) for `seconds`: a parent that stops reading stalls the vCPU."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        vm.poll_events(min(left, 0.1))
        vm.take_console()


def label(program: str, args: dict[str, str]) -> str:
    shown = " ".join(f"{k}={v}" for k, v in args.items() if k != "ws")
    return f"{program} {shown}".strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    opts = ap.parse_args()
    runs, seconds = (3, 1.0) if opts.quick else (5, 3.0)
    print(f"VM process CPU and guest speed over {seconds} s, median of {runs} runs\n")
    print("| program | CPU % of a core | guest instructions/s |")
    print("|---|---:|---:|")
    for program, args in CASES:
        results = [measure(program, args, seconds) for _ in range(runs)]
        cpu = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        print(f"| {label(program, args)} | {cpu:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
