"""Live migration benchmark: two real agents on loopback, real VMs, the real data path.

Cases (issue 4 item 7): an idle guest, a guest whose RAM is filled with pseudo-random data
(bench/fill_random.fasm), and memstress at three dirty rates (the last one flat out, with
auto-converge). Each case migrates the VM back and forth between the agents ``--runs`` times and
reports the median of total time, downtime, transferred bytes and throughput, plus the median
downtime breakdown, as Markdown tables. A migration that fails (the VM then stays where it was)
is counted in the "failed" column and retried, up to MAX_FAILURES per case.

    .venv/bin/python -m bench.bench_migrate            # 1 GiB guests, 3 runs each
    .venv/bin/python -m bench.bench_migrate --quick    # 256 MiB guests, 1 run each
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.migration.pages import PAGE_SIZE as PAGE
from agent.migration.pages import plan_batches
from agent.migration.transport import Connection, connect, prepare_socket
from agent.vms import close_guest_ram, create_guest_ram
from proto.messages import PageBatch, Ready
from tests.agents import AgentProc, make_key, start_agent, wait_for
from vmruntime.isa import DATA_ADDR

FILL_PROGRAM = str(Path(__file__).resolve().parent / "fill_random.fasm")
FINAL = ("completed", "failed", "cancelled")
MAX_FAILURES = 3  # failed migrations tolerated per case (reported) before giving up on it
failures: dict[str, int] = {}


@dataclass
class Case:
    name: str
    program: str
    args: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    warmup_s: float = 0.5


def cases(mem: int) -> list[Case]:
    ws = mem // 4
    return [
        Case("idle", "idle", {}),
        Case("random-filled", FILL_PROGRAM, {"ws": str(mem - DATA_ADDR)}),
        Case("memstress 20k pages/s", "memstress", {"ws": str(ws), "rate": "20000", "pattern": "random"},
             warmup_s=2.0),
        Case("memstress 100k pages/s", "memstress", {"ws": str(ws), "rate": "100000", "pattern": "random"},
             warmup_s=2.0),
        Case("memstress max + auto-converge", "memstress", {"ws": str(ws), "rate": "0", "pattern": "random"},
             params={"auto-converge": True}, warmup_s=2.0),
    ]


def migrate_once(src: AgentProc, dst: AgentProc, name: str, params: dict[str, Any]) -> dict[str, Any]:
    src.call("migrate", name=name, to=dst.control, params=params)
    while True:
        info: dict[str, Any] = src.call("migrate-status", name=name)
        if info["status"] in FINAL:
            return info
        time.sleep(0.02)


def run_case(a: AgentProc, b: AgentProc, case: Case, mem: int, runs: int) -> list[dict[str, Any]]:
    name = "bench-" + case.name.split()[0]
    a.call("vm-create", name=name, program=case.program, mem=str(mem), args=case.args)
    if case.program == FILL_PROGRAM:
        # The filler's copies run inside single instructions: a million more means it is done.
        wait_for(lambda: a.call("vm-info", name=name)["instructions"] > 1_000_000, timeout=120, what="fill")
    time.sleep(case.warmup_s)
    results: list[dict[str, Any]] = []
    src, dst = a, b
    for _ in range(runs + MAX_FAILURES):
        info = migrate_once(src, dst, name, case.params)
        if info["status"] == "completed":
            results.append(info)
            src, dst = dst, src
        else:  # the VM stays where it was: report the failure, try again
            print(f"{case.name}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
            failures[case.name] = failures.get(case.name, 0) + 1
        if len(results) == runs:
            break
    src.call("vm-destroy", name=name)
    return results


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def row(case: Case, results: list[dict[str, Any]]) -> str:
    total = med([r["total-time"] for r in results])
    down = med([r["downtime"] for r in results])
    moved = med([r["ram"]["transferred"] for r in results])
    tput = med([r["ram"]["transferred"] / max(r["total-time"], 1) * 1000 for r in results])
    rounds = med([len(r["rounds"]) for r in results])
    throttle = max((r["cpu-throttle-percentage"] for r in results), default=0)
    return (f"| {case.name} | {len(results)} | {failures.get(case.name, 0)} | {total:.0f} | {down:.0f} | "
            f"{moved / 2**20:.0f} | {tput / 2**20:.0f} | {rounds:.0f} | {throttle} |")


def breakdown_row(case: Case, results: list[dict[str, Any]]) -> str:
    parts = ("pause", "final-copy", "state", "digest", "verify", "commit")
    cells = [f"{med([r['downtime-breakdown'].get(p, 0.0) for r in results]):.1f}" for p in parts]
    return f"| {case.name} | " + " | ".join(cells) + " |"


def transport_once(mem: int, scattered: bool) -> float:
    """Seconds to move ``mem`` bytes of non-zero data through the data path alone (no agents):
    page batches from one memfd to a fresh one over loopback TCP, sender and receiver threads."""
    src_fd, src = create_guest_ram("bench-src", mem)
    dst_fd, dst = create_guest_ram("bench-dst", mem)
    block = os.urandom(1 << 20)
    for off in range(0, mem, 1 << 20):
        src[off:off + (1 << 20)] = block
    lsock = socket.create_server(("127.0.0.1", 0))
    tx = Connection(connect(lsock.getsockname()[:2]))
    server, _ = lsock.accept()
    lsock.close()
    rx = Connection(prepare_socket(server), guest_size=mem)
    step = 2 * PAGE if scattered else mem
    ranges = [(off, off + PAGE) for off in range(0, mem, step)] if scattered else [(0, mem)]
    smv, dmv = memoryview(src), memoryview(dst)

    def receive() -> None:
        while isinstance(rx.recv(dmv), PageBatch):
            pass

    t = threading.Thread(target=receive)
    t0 = time.perf_counter()
    t.start()
    for batch in plan_batches(smv, ranges):
        tx.send_pages(smv, batch.ranges, batch.zeros)
    tx.send(Ready())
    t.join()
    seconds = time.perf_counter() - t0
    smv.release()
    dmv.release()
    tx.close()
    rx.close()
    close_guest_ram(src_fd, src)
    close_guest_ram(dst_fd, dst)
    return seconds


def transport_rows(mem: int, runs: int) -> list[str]:
    rows = []
    for label, scattered in (("contiguous", False), ("every other page", True)):
        secs = med([transport_once(mem, scattered) for _ in range(runs)])
        moved = mem // 2 if scattered else mem
        rows.append(f"| {label} | {moved / 2**20:.0f} | {secs * 1000:.0f} | {moved / secs / 2**20:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB guests, one run per case")
    ap.add_argument("--mem", default=None, help="guest RAM (bytes, or with M/G suffix); default 1G")
    ap.add_argument("--runs", type=int, default=None, help="migrations per case (default 3, --quick 1)")
    ns = ap.parse_args()
    from vmruntime.programs import parse_size

    mem = parse_size(ns.mem or ("256M" if ns.quick else "1G"))
    runs = ns.runs or (1 if ns.quick else 3)
    transport = transport_rows(mem, runs)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    key = make_key(tmp)
    table, breakdown = [], []
    # The agents' logs (printed when they stop) go to stderr: stdout is the Markdown report.
    with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a, start_agent(tmp, "B", key) as b:
        for case in cases(mem):
            results = run_case(a, b, case, mem, runs)
            table.append(row(case, results))
            breakdown.append(breakdown_row(case, results))
    print(f"\nLive migration, {mem / 2**20:.0f} MiB guests, loopback, median of {runs} run(s)\n")
    print("| case | runs | failed | total ms | downtime ms | transferred MiB | throughput MiB/s | rounds |"
          " max throttle % |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print(f"\nrandom-filled: bench/fill_random.fasm over all RAM above the code; memstress: ws={mem // 4 // 2**20} "
          "MiB, pattern=random; each run migrates the VM back the other way; throughput = transferred / total.")
    print("\nData path alone (memfd -> loopback TCP -> fresh memfd, sender and receiver threads in one process, "
          "median; both ends then fault pages into one address space, so this understates two agents)\n")
    print("| ranges | MiB | ms | MiB/s |")
    print("|---|---|---|---|")
    print("\n".join(transport))
    print("\nDowntime breakdown (median ms)\n")
    print("| case | pause | final copy | state | digest | verify | commit |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(breakdown))


if __name__ == "__main__":
    main()
