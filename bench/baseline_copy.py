"""Raw Python copy baseline: guest-RAM-sized transfers over loopback TCP, no ferry code involved.

The ceiling ferry's data path is measured against, in the same run and on
the same (shared, noisy) machine. Two processes: this one is the sender, a
child (``--receiver PORT``) the receiver. The sender fills a memfd with
random non-zero bytes (a random 16 MiB block tiled, so no page is zero or a
hole) and ``sendall``-s it from its mmap; the receiver ``recv_into``-s a
*fresh* mapping of a new memfd for every transfer, as a migration
destination fills guest RAM it has just reserved:

- ``memfd``: ``MAP_SHARED``, no advice (4 KiB pages: one fault and one
  zeroing per page);
- ``memfd + MADV_HUGEPAGE``: the same with huge pages advised. Whether the
  advice takes effect depends on the host's
  ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` (read and printed;
  changed for the run only with ``--set-shmem-thp``); the receiver also reports the share of the mapping the
  kernel really mapped with huge pages (``ShmemPmdMapped`` in smaps).

Seconds are the sender's: from the receiver's "mapped, ready" to its "all
bytes in", median of ``--runs``. iperf3 runs too when it is on PATH (its
buffers stay in cache, so it is a loopback ceiling, not a reachable one).

    .venv/bin/python -m bench.baseline_copy [--quick] [--runs 5] [--sizes 1G,4G] [--json]
        [--set-shmem-thp advise]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import resource
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    bracketed,
    describe_machine,
    format_size,
    markdown_table,
    median,
    module_argv,
    rate_gib_s,
)

SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
RECV_NAME = "ferry-baseline-recv"
TILE = 16 << 20
REQUEST = struct.Struct("<QB")  # size of the transfer, 1 if the receiver advises huge pages
REPLY = struct.Struct("<dd")  # receiver: its CPU seconds for the transfer, share of its mapping in huge pages
IO_TIMEOUT = 300.0  # a wedged peer fails the bench instead of hanging it (the runner has a limit too)
MODES = (("memfd", False), ("memfd + MADV_HUGEPAGE", True))


@dataclass(frozen=True, slots=True)
class Transfer:
    """One transfer's figures."""

    seconds: float  # wall clock, receiver ready -> receiver done, as the sender sees it
    send_cpu: float
    recv_cpu: float
    huge_share: float


@dataclass
class Row:
    """One receiver mode at one size: the per-run seconds and what the kernel did with huge pages."""

    receiver: str
    size: int
    seconds: list[float] = field(default_factory=list)
    send_cpu: list[float] = field(default_factory=list)
    recv_cpu: list[float] = field(default_factory=list)
    huge_share: list[float] = field(default_factory=list)

    def add(self, t: Transfer) -> None:
        self.seconds.append(t.seconds)
        self.send_cpu.append(t.send_cpu)
        self.recv_cpu.append(t.recv_cpu)
        self.huge_share.append(t.huge_share)

    def as_dict(self) -> dict[str, object]:
        med = median(self.seconds)
        return {"receiver": self.receiver, "size": self.size, "seconds": self.seconds,
                "median_s": med, "gib_s": rate_gib_s(self.size, med),
                "send_cpu_s": median(self.send_cpu) if self.send_cpu else None,
                "recv_cpu_s": median(self.recv_cpu) if self.recv_cpu else None,
                "recv_gib_per_cpu_s": rate_gib_s(self.size, median(self.recv_cpu)) if self.recv_cpu else None,
                "huge_share": median(self.huge_share) if self.huge_share else None}


# --- host facts -------------------------------------------------------------------------------


def shmem_thp_mode(text: str | None = None) -> str:
    """The bracketed choice of ``shmem_enabled`` (``never``, ``advise``, ...), or ``unknown``."""
    if text is None:
        try:
            with open(SHMEM_THP) as f:
                text = f.read()
        except OSError:
            return "unknown"
    return bracketed(text)


def huge_share_of(smaps: str, name: str) -> float:
    """Share (0..1) of the mappings of memfd ``name`` that the kernel maps with PMD huge pages."""
    rss = pmd = 0
    inside = False
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            inside = f"memfd:{name}" in line  # a VMA header line: address range, perms, ..., path
        elif inside and fields[:1] == ["Rss:"]:
            rss += int(fields[1])
        elif inside and fields[:1] == ["ShmemPmdMapped:"]:
            pmd += int(fields[1])
    return pmd / rss if rss else 0.0


@contextlib.contextmanager
def shmem_thp(mode: str | None) -> Iterator[None]:
    """Run with ``shmem_enabled`` set to ``mode`` (nothing changes for None), restored afterwards.

    Only on request: the setting is host-wide and other users of the machine
    would see their shared memory change under them.
    """
    if mode is None:
        yield
        return
    before = shmem_thp_mode()
    with open(SHMEM_THP, "w") as f:
        f.write(mode)
    try:
        yield
    finally:
        if before != "unknown":
            with open(SHMEM_THP, "w") as f:
                f.write(before)


# --- the receiver (child process) -------------------------------------------------------------


def receiver_main(port: int) -> None:
    """Serve transfers on one connection until a zero-size request."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        while True:
            size, hugepage = REQUEST.unpack(recv_exact(sock, REQUEST.size))
            if size == 0:
                return
            cpu, share = receive_once(sock, size, bool(hugepage))
            sock.sendall(b"D" + REPLY.pack(cpu, share))


def receive_once(sock: socket.socket, size: int, hugepage: bool) -> tuple[float, float]:
    """Map a fresh memfd, say ready, receive ``size`` bytes into it: (CPU seconds, huge page share)."""
    fd = os.memfd_create(RECV_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            if hugepage:
                mm.madvise(mmap.MADV_HUGEPAGE)
            sock.sendall(b"R")
            before = cpu_seconds()
            recv_into_all(sock, mm)
            cpu = cpu_seconds() - before
            with open("/proc/self/smaps") as f:
                return cpu, huge_share_of(f.read(), RECV_NAME)
    finally:
        os.close(fd)  # with the mapping gone the pages are freed before the next transfer


def recv_into_all(sock: socket.socket, mm: mmap.mmap) -> None:
    """Fill all of ``mm`` from the socket: the plain loop a Python receiver would write."""
    view = memoryview(mm)
    try:
        got, size = 0, len(mm)
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError(f"sender closed after {got} of {size} bytes")
            got += n
    finally:
        view.release()


def cpu_seconds() -> float:
    """User + system CPU time of this process: the cost of a transfer whatever else runs on the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


# --- the sender (this process) ----------------------------------------------------------------


def filled_memfd(size: int) -> mmap.mmap:
    """A memfd of ``size`` bytes mapped shared and filled with random non-zero bytes."""
    block = os.urandom(TILE).replace(b"\x00", b"\x01")  # non-zero: nothing may look like a zero page
    fd = os.memfd_create("ferry-baseline-send", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory
    for off in range(0, size, TILE):
        piece = min(TILE, size - off)
        mm[off:off + piece] = block[:piece]
    return mm


@contextlib.contextmanager
def receiver() -> Iterator[socket.socket]:
    """Start the receiver process and yield the connection to it; stop it (by its pid) at the end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30.0)
        port = listener.getsockname()[1]
        proc = subprocess.Popen(module_argv("bench.baseline_copy", ["--receiver", str(port)]))
        try:
            conn, _ = listener.accept()
            conn.settimeout(IO_TIMEOUT)
            with conn:
                yield conn
                conn.sendall(REQUEST.pack(0, 0))
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def send_once(conn: socket.socket, src: mmap.mmap, hugepage: bool) -> Transfer:
    """One transfer of all of ``src``."""
    conn.sendall(REQUEST.pack(len(src), int(hugepage)))
    if recv_exact(conn, 1) != b"R":
        raise ConnectionError("receiver did not get ready")
    view = memoryview(src)
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        conn.sendall(view)
    finally:
        view.release()
    send_cpu = cpu_seconds() - cpu
    reply = recv_exact(conn, 1 + REPLY.size)
    seconds = time.perf_counter() - start
    if reply[:1] != b"D":
        raise ConnectionError("receiver did not confirm the transfer")
    recv_cpu, share = REPLY.unpack(reply[1:])
    return Transfer(seconds, send_cpu, recv_cpu, share)


def measure(sizes: list[int], runs: int) -> list[Row]:
    """Every size and receiver mode, ``runs`` times each, interleaved so drifting load hits all alike."""
    rows: list[Row] = []
    with receiver() as conn:
        for size in sizes:
            src = filled_memfd(size)
            try:
                size_rows = [Row(name, size) for name, _ in MODES]
                for _ in range(runs):
                    for row, (_, hugepage) in zip(size_rows, MODES, strict=True):
                        row.add(send_once(conn, src, hugepage))
                rows += size_rows
            finally:
                src.close()
    return rows


# --- iperf3 -----------------------------------------------------------------------------------


def iperf3_rows(sizes: list[int], runs: int) -> tuple[list[Row], str | None]:
    """iperf3 over loopback for each size, ``runs`` times: (rows, a note when there are none).

    A missing or failing iperf3 is a note in the output, never the end of the bench.
    """
    exe = shutil.which("iperf3")
    if exe is None:
        return [], "iperf3 is not on PATH: its row is skipped."
    rows = []
    try:
        for size in sizes:
            row = Row("iperf3 (buffers in cache)", size)
            for _ in range(runs):
                row.seconds.append(iperf3_once(exe, size))
            rows.append(row)
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, KeyError) as exc:
        return rows, f"iperf3 failed, its rows are incomplete: {exc}"
    return rows, None


def iperf3_once(exe: str, size: int) -> float:
    """One iperf3 client run against a one-shot server on a free port: seconds the receiver saw."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([exe, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = _iperf3_client(exe, port, size)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    received = json.loads(out)["end"]["sum_received"]
    return float(received["seconds"]) * size / float(received["bytes"])  # scaled to exactly `size`


def _iperf3_client(exe: str, port: int, size: int) -> str:
    """The client's JSON report; retried briefly while the server is still starting to listen."""
    for _ in range(50):
        done = subprocess.run([exe, "-c", "127.0.0.1", "-p", str(port), "-n", str(size), "-J"],
                              capture_output=True, text=True, timeout=120)
        # iperf3 3.12 exits 0 with -J even when it could not connect (the server not listening
        # yet): the JSON's "error" says so, and "end" is empty. Only a report with totals counts.
        with contextlib.suppress(ValueError):
            if done.returncode == 0 and "sum_received" in json.loads(done.stdout).get("end", {}):
                return done.stdout
        time.sleep(0.1)
    raise RuntimeError(f"iperf3 client failed: {done.stdout[-500:]} {done.stderr[-500:]}")


# --- output -----------------------------------------------------------------------------------


def results(rows: list[Row], iperf: list[Row], iperf_note: str | None, runs: int, thp: str,
            thp_set: bool = False) -> dict[str, Any]:
    return {"machine": describe_machine().as_dict(), "runs": runs, "shmem_enabled": thp, "shmem_set": thp_set,
            "rows": [r.as_dict() for r in rows], "iperf3": [r.as_dict() for r in iperf if r.seconds],
            "iperf3_note": iperf_note}


def markdown(res: dict[str, Any]) -> str:
    """The results as a short paragraph, a table and notes."""
    thp = res["shmem_enabled"]
    lines = [f"Loopback TCP, plain Python `sendall` from a filled memfd -> `recv_into` a fresh "
             f"mapping, median of {res['runs']} runs (wall seconds; CPU seconds of each side, "
             f"which the other tenants of the cores do not inflate). Host `shmem_enabled`: `{thp}`"
             f"{' (set for this run by --set-shmem-thp, restored after)' if res.get('shmem_set') else ''}.", ""]
    table = [table_row(r) for r in res["rows"] + res["iperf3"]]
    lines.append(markdown_table(["receiver memory", "size", "median s", "GiB/s", "range s", "send CPU s",
                                 "recv CPU s", "GiB per recv CPU-s", "in huge pages"], table, "llrrrrrrr"))
    lines.append("")
    if thp not in ("advise", "always"):
        lines.append(f"`MADV_HUGEPAGE` on shared memory has no effect while `shmem_enabled` is `{thp}` "
                     "(root may set `advise`); the huge-page column shows what the kernel did.")
    if res["iperf3_note"]:
        lines.append(res["iperf3_note"])
    return "\n".join(lines)


def table_row(r: dict[str, Any]) -> list[str]:
    def opt(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    share = r["huge_share"]
    return [r["receiver"], format_size(r["size"]), f"{r['median_s']:.3f}", f"{r['gib_s']:.2f}",
            f"{min(r['seconds']):.3f}-{max(r['seconds']):.3f}", opt(r["send_cpu_s"], ".3f"),
            opt(r["recv_cpu_s"], ".3f"), opt(r["recv_gib_per_cpu_s"], ".2f"), "-" if share is None else f"{share * 100:.0f} %"]


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``: a positive whole number of pages."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    value = int(text[:-1] if scale > 1 else text) * scale
    if value <= 0 or value % mmap.PAGESIZE:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of {mmap.PAGESIZE}: {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB only, 3 runs")
    ap.add_argument("--runs", type=int, help="runs per row (default 5, 3 with --quick)")
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")],
                    help="comma-separated sizes (default 1G,4G; 1G with --quick)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--set-shmem-thp", choices=("never", "advise", "always", "within_size"),
                    help="set shmem_enabled for the run and restore it after (root; host-wide, so opt-in)")
    ap.add_argument("--receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.receiver is not None:
        receiver_main(a.receiver)
        return
    runs = a.runs or (3 if a.quick else 5)
    sizes = a.sizes or ([1 << 30] if a.quick else [1 << 30, 4 << 30])
    with shmem_thp(a.set_shmem_thp):
        thp = shmem_thp_mode()
        rows = measure(sizes, runs)
    iperf, iperf_note = iperf3_rows(sizes, runs)
    res = results(rows, iperf, iperf_note, runs, thp, a.set_shmem_thp is not None)
    print(json.dumps(res, indent=2) if a.json else markdown(res))


if __name__ == "__main__":
    main()
