"""Live migration benchmark: two real agents on loopback, real VMs, the real data path, against baselines.

Two parts, both measured in one run so ferry's figures read as ratios to baselines of the same moment:

* **Data path**: a guest whose every page is non-zero (bench/fill_random.fasm over all RAM
  above the code: incompressible-looking data, no zero page) migrated paused (pure copy: the source
  pauses it before each migration) and running (the filler idles after filling, so pre-copy sees
  one dense round), at 1 and 4 GiB. Its round-0 throughput is set against the raw Python copy of
  bench/baseline_copy.py (``sendall`` from a memfd, ``recv_into`` a fresh memfd, with and without
  ``MADV_HUGEPAGE``), one of each right before every migration, same size; target >= 90 %. The
  other baselines run in the same loop, once per ferry migration, same size and
  mode: iperf3 over loopback, and QEMU's pre-copy (bench/qemu_baseline.py: a guest whose RAM file
  was filled from /dev/urandom, driven over QMP, figures from ``query-migrate``), set against
  ferry's total time; target: at least as fast as QEMU. Each is reported as skipped, with the
  reason, when its program is missing or fails.
* **Cases**: an idle guest, the random-filled guest, memstress at three dirty rates (the last flat
  out with auto-converge): median total time, downtime, bytes, throughput and the downtime breakdown.

``--set-shmem-thp advise`` sets the host-wide ``shmem_enabled`` for the run and restores it after
(opt-in, root): the agent advises huge pages on guest RAM, and this shows what shared-memory huge pages
buy (docs/PERFORMANCE.md section 2).

    .venv/bin/python -m bench.bench_migrate            # 1 and 4 GiB data path, 1 GiB cases, 3 runs each
    .venv/bin/python -m bench.bench_migrate --quick    # 1 GiB data path, 256 MiB cases, 1 run each
    .venv/bin/python -m bench.bench_migrate --only-data-path --runs 3 --sizes 1G   # the data path alone
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.migration.pages import PAGE_SIZE as PAGE
from agent.migration.pages import plan_batches
from agent.migration.transport import Connection, connect, prepare_socket
from agent.vms import close_guest_ram, create_guest_ram
from bench.qemu_baseline import QemuError, QemuPingPong, QemuResult
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
        wait_filled(a, name, timeout=120)
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
    lsock = socket.create_server(("127.0.0.1", 0))
    tx = Connection(connect(lsock.getsockname()[:2]))
    server, _ = lsock.accept()
    lsock.close()
    return time_transfer(tx, Connection(prepare_socket(server), guest_size=mem), mem, scattered)


def time_transfer(tx: Connection, rx: Connection, mem: int, scattered: bool) -> float:
    """Seconds to send ``mem`` bytes of non-zero data (every other page when ``scattered``) from a
    memfd over ``tx`` into a fresh memfd behind ``rx``; closes both connections."""
    src_fd, src = create_guest_ram("bench-src", mem)
    dst_fd, dst = create_guest_ram("bench-dst", mem)
    block = os.urandom(1 << 20)
    for off in range(0, mem, 1 << 20):
        src[off:off + (1 << 20)] = block
    ranges = [(off, off + PAGE) for off in range(0, mem, 2 * PAGE)] if scattered else [(0, mem)]
    smv, dmv = memoryview(src), memoryview(dst)

    def receive() -> None:
        while isinstance(rx.recv(dmv), PageBatch):
            pass

    t = threading.Thread(target=receive)
    t0 = time.perf_counter()
    t.start()
    for batch in plan_batches(smv, ranges):
        tx.send_pages(smv, batch.ranges.tolist(), batch.zeros.tolist())
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


# --- the data path scenario -------------------------------------------------------------------


@dataclass
class DataPathRow:
    """One guest size and mode: per-run figures of completed migrations, each with the raw copies
    (plain memfd, memfd + MADV_HUGEPAGE) of the same size measured right before it."""

    size: int
    mode: str  # paused | running
    ferry_s: list[float] = field(default_factory=list)  # round 0 seconds, scaled to `size` bytes
    raw_s: list[float] = field(default_factory=list)
    raw_huge_s: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    setup_ms: list[float] = field(default_factory=list)
    failed: int = 0
    # Same moment, one per completed ferry run (None where that baseline was skipped or failed).
    qemu: list[QemuResult | None] = field(default_factory=list)
    iperf_s: list[float | None] = field(default_factory=list)

    def gib_s(self, seconds: list[float]) -> float:
        return self.size / 2**30 / med(seconds)

    def ratio(self, raw: list[float]) -> float:
        """Median of the per-run ratios ferry / raw: each pair measured moments apart."""
        return med([r / f for f, r in zip(self.ferry_s, raw, strict=True)])

    def qemu_pairs(self) -> list[tuple[float, QemuResult]]:
        """(ferry total ms, QEMU result) of the runs where both completed, moments apart."""
        return [(f, q) for f, q in zip(self.total_ms, self.qemu, strict=True) if q is not None]


class Sidekicks:
    """The baselines that run next to each ferry migration besides the raw copy: QEMU's pre-copy
    (one guest per size, migrated back and forth) and iperf3. Either is dropped, with the reason
    kept for the report, when it is missing or fails; the bench goes on without it."""

    def __init__(self, qemu: bool, iperf3: bool) -> None:
        from bench.qemu_baseline import available

        self.qemu_note: str | None = None if qemu else "skipped (--no-qemu)"  # set: QEMU is off for good
        if self.qemu_note is None and (reason := available()) is not None:
            self.qemu_note = f"skipped: {reason}"
        self.qemu_skips: list[str] = []  # sizes left out (memory), QEMU still on for the others
        self.iperf3 = shutil.which("iperf3") if iperf3 else None
        self.iperf3_note: str | None = None if iperf3 else "skipped (--no-iperf3)"
        if iperf3 and self.iperf3 is None:
            self.iperf3_note = "skipped: `iperf3` is not installed"
        self.pp: QemuPingPong | None = None

    @contextlib.contextmanager
    def qemu_guest(self, size: int) -> Iterator[None]:
        """The QEMU guest of one size (filled once), for the runs of that size; none when skipped."""
        # The QEMU guest exists twice during its migrations, next to ferry's guest and the raw copy's
        # buffer: on a machine shared with others, leave a size out rather than push it into OOM.
        avail = mem_available()
        if self.qemu_note is None and avail < 2 * size + (1 << 30):
            self.qemu_skips.append(f"{size / 2**30:g} GiB skipped: {avail / 2**30:.1f} GiB of memory available, "
                                   f"{2 * size / 2**30 + 1:g} GiB wanted")
        elif self.qemu_note is None:
            try:
                self.pp = QemuPingPong(size)
            except (QemuError, OSError, ValueError) as exc:
                self.qemu_note = f"failed to start: {exc}"
        try:
            yield
        finally:
            if self.pp is not None:
                self.pp.close()
                self.pp = None

    def qemu_run(self, paused: bool) -> QemuResult | None:
        if self.pp is None:
            return None
        try:
            return self.pp.migrate(paused)
        except (QemuError, OSError) as exc:
            self.qemu_note = f"stopped after an error: {exc}"
            print(f"QEMU baseline: {exc}", file=sys.stderr)
            self.pp.close()
            self.pp = None
            return None

    def iperf3_run(self, size: int) -> float | None:
        from bench.baseline_copy import iperf3_once

        if self.iperf3 is None:
            return None
        try:
            return iperf3_once(self.iperf3, size)
        except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, KeyError) as exc:
            self.iperf3_note = f"stopped after an error: {exc}"
            self.iperf3 = None
            return None


def fill_guest(agent: AgentProc, name: str, mem: int, ws: int | None = None) -> None:
    """Create a bench/fill_random.fasm guest over ``ws`` bytes (all RAM above the code by default)
    and wait until it has filled them."""
    ws = mem - DATA_ADDR if ws is None else ws
    agent.call("vm-create", name=name, program=FILL_PROGRAM, mem=str(mem), args={"ws": str(ws)})
    wait_filled(agent, name, timeout=600)


def wait_filled(agent: AgentProc, name: str, timeout: float) -> None:
    """Wait for bench/fill_random.fasm's console byte: its fill is done, it idles from then on."""
    wait_for(lambda: agent.call("vm-info", name=name)["console-bytes"] >= 1, timeout=timeout, what="fill")


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (large when unknown: the check is a guard, not a gate)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 1 << 62


def data_path(a: AgentProc, b: AgentProc, sizes: list[int], runs: int, side: Sidekicks) -> list[DataPathRow]:
    """Each size: one filled guest, ``runs`` migrations paused then ``runs`` running, back and forth,
    each right after one raw copy of each kind (bench/baseline_copy.py's sender and receiver), one
    iperf3 run and one QEMU migration of the same size and mode, so that the load of a shared
    machine hits ferry and its baselines alike."""
    from bench.baseline_copy import filled_memfd, receiver

    rows: list[DataPathRow] = []
    with receiver() as conn:
        for size in sizes:
            fill_guest(a, "bench-dense", size)
            raw_src = filled_memfd(size)
            try:
                with side.qemu_guest(size):
                    where = _data_path_size(a, b, conn, raw_src, size, runs, rows, side)
            finally:
                raw_src.close()
            where.call("vm-destroy", name="bench-dense")
    return rows


def _data_path_size(a: AgentProc, b: AgentProc, conn: socket.socket, raw_src: Any, size: int, runs: int,
                    rows: list[DataPathRow], side: Sidekicks) -> AgentProc:
    """The runs of one size; returns the agent the guest ends on."""
    from bench.baseline_copy import send_once

    src, dst = a, b
    for mode in ("paused", "running"):
        row = DataPathRow(size, mode)
        while len(row.total_ms) < runs and row.failed <= MAX_FAILURES:
            raw, raw_huge = send_once(conn, raw_src, False).seconds, send_once(conn, raw_src, True).seconds
            iperf = side.iperf3_run(size)
            qemu = side.qemu_run(mode == "paused")
            # A paused guest arrives paused: the running rows resume it first (without that they would
            # measure the paused guest twice).
            state = src.call("vm-info", name="bench-dense")["state"]
            if mode == "paused" and state != "paused":
                src.call("vm-pause", name="bench-dense")
            elif mode == "running" and state == "paused":
                src.call("vm-resume", name="bench-dense")
            info = migrate_once(src, dst, "bench-dense", {})
            if info["status"] != "completed":
                row.failed += 1
                print(f"data path {mode}: migration {info['status']}: {info.get('error-desc')}", file=sys.stderr)
                continue
            r0 = info["rounds"][0]
            row.ferry_s.append(float(r0["seconds"]) * size / max(int(r0["bytes"]), 1))
            row.raw_s.append(raw)
            row.raw_huge_s.append(raw_huge)
            row.total_ms.append(float(info["total-time"]))
            row.downtime_ms.append(float(info["downtime"]))
            row.setup_ms.append(float(info.get("setup-time", 0)))
            row.qemu.append(qemu)
            row.iperf_s.append(iperf)
            # One line per run on stderr (stdout is the report): the pairs behind the medians.
            print(f"data path {size >> 20} MiB {mode}: ferry total {row.total_ms[-1]:.0f} ms, setup {row.setup_ms[-1]:.0f} ms, down "
                  f"{row.downtime_ms[-1]:.0f} ms, round 0 {row.ferry_s[-1]:.3f} s; raw {raw:.3f} s, raw+THP "
                  f"{raw_huge:.3f} s; iperf3 {iperf if iperf is None else round(iperf, 3)} s; QEMU total "
                  f"{qemu and qemu.total_ms} ms, down {qemu and qemu.downtime_ms} ms; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
            src, dst = dst, src
        rows.append(row)
    return src


def data_path_markdown(rows: list[DataPathRow], runs: int, side: Sidekicks) -> str:
    from bench.baseline_copy import shmem_thp_mode
    from bench.common import format_size, markdown_table

    table = []
    for r in rows:
        if not r.total_ms:
            table.append([format_size(r.size), r.mode, 0, r.failed, "-", "-", "-", "-", "-", "-", "-"])
            continue
        table.append([format_size(r.size), r.mode, len(r.total_ms), r.failed, f"{r.gib_s(r.ferry_s):.2f}",
                      f"{r.gib_s(r.raw_s):.2f}", f"{r.ratio(r.raw_s):.0%}", f"{r.gib_s(r.raw_huge_s):.2f}",
                      f"{r.ratio(r.raw_huge_s):.0%}", f"{med(r.total_ms):.0f}", f"{med(r.downtime_ms):.0f}"])
    notes = [
        f"Every page non-zero (bench/fill_random.fasm), {runs} completed migration(s) per row, two agents "
        f"on loopback; host `shmem_enabled`: `{shmem_thp_mode()}`. ferry GiB/s is round 0 (the guest's "
        "size over the round's seconds, scaled from its wire bytes). Right before each migration the raw "
        "Python copy of bench/baseline_copy.py moves the same size once into a fresh memfd without and "
        "once with `MADV_HUGEPAGE` (ferry's destination advises it, so the second is like for like; "
        "while `shmem_enabled` is `never` the two are the same); medians, and the median of the "
        "per-run ratios ferry / raw. Target: >= 90 % of the raw copy.",
        "",
        markdown_table(["guest", "mode", "runs", "failed", "ferry GiB/s", "raw copy GiB/s", "ratio",
                        "raw copy + THP GiB/s", "ratio (THP)", "total ms", "downtime ms"], table,
                       "llrrrrrrrrr"),
        "",
        qemu_markdown(rows, side),
    ]
    return "\n".join(notes)


def qemu_markdown(rows: list[DataPathRow], side: Sidekicks) -> str:
    """ferry against QEMU's pre-copy and iperf3, measured in the same loop as the table above."""
    from bench.common import format_size, markdown_table
    from bench.qemu_baseline import accel, version

    lines = ["#### Against QEMU's pre-copy and iperf3", ""]
    table = []
    for r in rows:
        pairs = r.qemu_pairs()
        iperf = [s for s in r.iperf_s if s is not None]
        iperf_cell = f"{r.size / 2**30 / med(iperf):.2f}" if iperf else "-"
        if not pairs:
            table.append([format_size(r.size), r.mode, 0] + ["-"] * 10 + [iperf_cell])
            continue
        ferry = [f for f, _ in pairs]
        qs = [q for _, q in pairs]
        speed = med([q.total_ms / f for f, q in pairs])  # > 1: ferry is faster
        ferry_down = med([d for d, q in zip(r.downtime_ms, r.qemu, strict=True) if q is not None])
        ferry_setup = med([d for d, q in zip(r.setup_ms, r.qemu, strict=True) if q is not None])
        table.append([format_size(r.size), r.mode, len(pairs), f"{med(ferry):.0f}",
                      f"{med([q.total_ms for q in qs]):.0f}", f"{speed:.2f}x",
                      f"{ferry_down:.0f}", f"{med([q.downtime_ms for q in qs]):.0f}",
                      f"{r.size / 2**30 / (med(ferry) / 1000):.2f}", f"{med([q.gib_s for q in qs]):.2f}",
                      f"{ferry_setup:.0f}", f"{med([q.setup_ms for q in qs]):.0f}",
                      f"{med([q.transferred for q in qs]) / 2**20:.0f}",
                      iperf_cell])
    lines.append(markdown_table(
        ["guest", "mode", "pairs", "ferry total ms", "QEMU total ms", "ferry speed vs QEMU", "ferry downtime ms",
         "QEMU downtime ms", "ferry GiB/s (size / total)", "QEMU GiB/s (size / total)", "ferry setup ms",
         "QEMU setup ms", "QEMU sent MiB", "iperf3 GiB/s"],
        table, "llrrrrrrrrrrrr"))
    lines.append("")
    if side.qemu_note is None or any(r.qemu_pairs() for r in rows):
        lines.append(
            f"QEMU: {version() or 'qemu-system-x86_64'}, accel `{accel()}`, a guest with no disk (it sits in its "
            "firmware) whose RAM is a `memory-backend-file` (`share=on`, tmpfs) filled from /dev/urandom once per "
            "size, migrated back and forth between fresh QEMU processes (destination `-incoming tcp:...` on an "
            "empty RAM file), `max-bandwidth` raised to 1 TiB/s, default downtime limit (300 ms, as ferry's "
            "`max-downtime`), driven over QMP; paused rows `stop` the source first. Its figures are "
            "`query-migrate`'s. One QEMU migration of the same size and mode right before each ferry migration; "
            "\"ferry speed vs QEMU\" is the median of the per-pair QEMU total / ferry total (> 1x: ferry is "
            "faster; target >= 1x); GiB/s is guest size over total time for both.")
    if side.qemu_note is not None:
        lines.append(f"QEMU pre-copy baseline {side.qemu_note}.")
    lines += [f"QEMU pre-copy baseline, {skip}." for skip in side.qemu_skips]
    lines.append("iperf3: one loopback run of the guest's size (`-n`) per ferry migration, buffers in cache "
                 "(a ceiling for any copy, not a reachable target), median." if side.iperf3_note is None
                 else f"iperf3 baseline {side.iperf3_note}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB cases and a 1 GiB data path, one run each")
    ap.add_argument("--mem", default=None, help="guest RAM of the cases (bytes, or with M/G suffix); default 1G")
    ap.add_argument("--sizes", default=None, help="data path guest sizes, comma-separated (default 1G,4G; 1G quick)")
    ap.add_argument("--runs", type=int, default=None, help="migrations per case (default 3, --quick 1)")
    ap.add_argument("--set-shmem-thp", choices=("never", "advise", "always", "within_size"),
                    help="set shmem_enabled for the run and restore it after (root; host-wide, so opt-in)")
    ap.add_argument("--only-data-path", action="store_true", help="the data path scenario alone (no cases)")
    ap.add_argument("--no-qemu", action="store_true", help="leave QEMU's pre-copy baseline out")
    ap.add_argument("--no-iperf3", action="store_true", help="leave the iperf3 baseline out")
    ns = ap.parse_args(argv)
    from bench.baseline_copy import shmem_thp
    from vmruntime.programs import parse_size

    mem = parse_size(ns.mem or ("256M" if ns.quick else "1G"))
    sizes = [parse_size(x) for x in (ns.sizes or ("1G" if ns.quick else "1G,4G")).split(",")]
    runs = ns.runs or (1 if ns.quick else 3)
    side = Sidekicks(qemu=not ns.no_qemu, iperf3=not ns.no_iperf3)
    with shmem_thp(ns.set_shmem_thp):
        transport = [] if ns.only_data_path else transport_rows(mem, runs)
        tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
        key = make_key(tmp)
        table, breakdown = [], []
        # The agents' logs (printed when they stop) go to stderr: stdout is the Markdown report.
        try:
            with contextlib.redirect_stdout(sys.stderr), start_agent(tmp, "A", key) as a, \
                    start_agent(tmp, "B", key) as b:
                dp = data_path(a, b, sizes, runs, side)
                for case in [] if ns.only_data_path else cases(mem):
                    results = run_case(a, b, case, mem, runs)
                    table.append(row(case, results))
                    breakdown.append(breakdown_row(case, results))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        text = data_path_markdown(dp, runs, side)
    print("### Data path against the raw copy\n")
    print(text)
    if ns.only_data_path:
        return
    print(f"\n### Cases: {mem / 2**20:.0f} MiB guests, loopback, median of {runs} run(s)\n")
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
