"""QEMU pre-copy baseline: QEMU's own live migration of a guest with non-zero RAM, over loopback TCP.

This module owns the QEMU baseline of the data-path scenario: a
minimal QMP client (JSON lines over a unix socket), the QEMU command lines,
and the migration driver; bench/bench_migrate.py interleaves it with ferry's
migrations, and ``__main__`` prints a small Markdown table on its own.

How one run goes:

- guest RAM is a ``memory-backend-file`` (``share=on``) on tmpfs, filled from
  /dev/urandom before the source starts, so no page is zero (QEMU sends zero
  pages as a flag, which would flatter it); the guest has no disk and sits in
  its firmware, which dirties almost nothing;
- the destination is started with ``-incoming tcp:127.0.0.1:PORT`` on its own,
  empty (sparse) RAM file, like a migration destination reserving fresh RAM;
- ``max-bandwidth`` is raised (QEMU's default throttles to 128 MiB/s), the
  downtime limit stays at QEMU's default (300 ms) unless asked otherwise;
- ``migrate`` over QMP, ``query-migrate`` polled until ``completed``; the
  figures are QEMU's: total-time, downtime, setup-time, ram.transferred, mbps.
- ``paused`` runs send ``stop`` to the source first (a pure copy), running
  runs keep (or ``cont``) it running.

The guest migrates back and forth (:class:`QemuPingPong`): the destination of
one run is the source of the next, so the random fill is paid once per size,
and only one copy of the RAM stays resident between runs (two during one).
Uses KVM when /dev/kvm is usable, TCG otherwise (the accelerator is reported;
it hardly matters to a guest that does not run).

    .venv/bin/python -m bench.qemu_baseline [--quick] [--sizes 1G,4G] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
# QEMU's max-bandwidth is bytes/s; its default (128 MiB/s) would make the baseline a throttle test.
MAX_BANDWIDTH = 1 << 40
FILL_CHUNK = 64 << 20
START_TIMEOUT = 30.0
POLL_S = 0.005  # query-migrate poll period: the figures are QEMU's own, this only bounds our latency
QMP_TIMEOUT = 60.0


class QemuError(RuntimeError):
    """QEMU could not be started, refused a command, or a migration did not complete."""


def available() -> str | None:
    """None when the baseline can run here, else the reason it cannot (shown as the skip note)."""
    if shutil.which(QEMU) is None:
        return f"`{QEMU}` is not installed (Debian: `apt-get install qemu-system-x86`)"
    if not os.path.isdir(shm_dir()):
        return "no tmpfs for the guest RAM files"
    return None


def shm_dir() -> str:
    """Where the RAM files go: tmpfs, so guest RAM is memory as it is for ferry's memfds."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def accel() -> str:
    """``kvm`` when /dev/kvm is usable by this process, else ``tcg``."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass(frozen=True, slots=True)
class QemuResult:
    """One completed QEMU migration: ``query-migrate``'s figures on the source."""

    size: int
    paused: bool
    total_ms: float
    downtime_ms: float
    setup_ms: float
    transferred: int  # ram.transferred: bytes QEMU put on the wire for RAM
    mbps: float  # QEMU's ram.mbps: megabits/s (decimal) over total - setup
    accel: str

    @property
    def seconds(self) -> float:
        return self.total_ms / 1000.0

    @property
    def gib_s(self) -> float:
        """Guest size over total time: the same measure as ferry's total time of a dense guest."""
        return self.size / 2**30 / max(self.seconds, 1e-9)


# --- QMP --------------------------------------------------------------------------------------


class Qmp:
    """A QMP connection: greeting, ``qmp_capabilities``, then one command at a time.

    Asynchronous events (STOP, RESUME, MIGRATION...) arrive on the same stream
    between replies; they are skipped, the replies are matched by ``id``.
    """

    def __init__(self, path: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the socket appears once QEMU has parsed its options
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket at {path} after {timeout:.0f} s") from None
                time.sleep(0.02)
        sock.settimeout(QMP_TIMEOUT)
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.next_id = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QemuError("QEMU closed its QMP socket")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value; a QMP error raises QemuError."""
        self.next_id += 1
        req: dict[str, Any] = {"execute": command, "id": self.next_id}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg or msg.get("id") != self.next_id:
                continue
            if "error" in msg:
                raise QemuError(f"{command}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


# --- one QEMU process ---------------------------------------------------------------------------


def fill_random(path: Path, size: int) -> None:
    """Write ``size`` bytes from /dev/urandom to ``path`` (a tmpfs file: it becomes guest RAM)."""
    buf = bytearray(min(FILL_CHUNK, size))
    with open("/dev/urandom", "rb", buffering=0) as rnd, open(path, "wb", buffering=0) as out:
        left = size
        while left:
            view = memoryview(buf)[:min(len(buf), left)]
            got = rnd.readinto(view)
            if not got:
                raise QemuError("/dev/urandom returned nothing")
            out.write(view[:got])
            left -= got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuProcess:
    """One QEMU process, headless, with its QMP socket and log under ``workdir``; ``machine`` are
    its machine and memory options, ``extra`` go last (``-incoming``). ``close`` kills it (by pid)."""

    def __init__(self, workdir: Path, name: str, machine: list[str], extra: list[str] | None = None) -> None:
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.log = workdir / f"{name}.log"
        argv = [QEMU, *machine, "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *(extra or [])]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self.qmp = Qmp(self.qmp_path)
        except Exception:
            self.close()
            raise QemuError(f"QEMU did not start: {self.log_tail()}") from None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-500:].strip()
        return ""

    def close(self) -> None:
        if hasattr(self, "qmp"):
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class QemuVM(QemuProcess):
    """A QEMU guest whose RAM is a shared file on tmpfs; ``close`` also removes its files."""

    def __init__(self, workdir: Path, name: str, size: int, incoming_port: int | None = None) -> None:
        self.ram = workdir / f"{name}.ram"
        if not self.ram.exists():  # a destination: an empty file, its pages arrive with the migration
            with open(self.ram, "wb") as f:
                f.truncate(size)
        mib = size >> 20
        super().__init__(workdir, name,
                         ["-machine", f"pc,accel={accel()},memory-backend=mem0", "-m", f"{mib}M",
                          "-object", f"memory-backend-file,id=mem0,size={mib}M,mem-path={self.ram},share=on"],
                         None if incoming_port is None else ["-incoming", f"tcp:127.0.0.1:{incoming_port}"])

    def close(self) -> None:
        super().close()
        for path in (self.ram, Path(self.qmp_path), self.log):
            with contextlib.suppress(OSError):
                path.unlink()


# --- migrations -------------------------------------------------------------------------------


class QemuPingPong:
    """A ``size``-byte guest with random RAM, migrated back and forth: each ``migrate`` starts a
    fresh destination, migrates to it, kills the old source, and keeps the destination as the
    next source. A context manager: leaving it kills whatever QEMU is left and removes the files."""

    def __init__(self, size: int, downtime_limit_ms: int | None = None, workdir: str | None = None) -> None:
        if size % (1 << 20):
            raise ValueError("QEMU guest size must be a whole number of MiB")
        self.size = size
        self.downtime_limit_ms = downtime_limit_ms
        self.workdir = Path(tempfile.mkdtemp(prefix="ferry-qemu-", dir=workdir or shm_dir()))
        self.turn = 0
        self.src: QemuVM | None = None
        try:
            first = self.workdir / "vm0.ram"
            fill_random(first, size)
            self.src = QemuVM(self.workdir, "vm0", size)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> QemuPingPong:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.src is not None:
            self.src.close()
            self.src = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def migrate(self, paused: bool, timeout: float | None = None) -> QemuResult:
        """One migration from the current source to a fresh destination; raises QemuError on failure
        (the source then stays the source)."""
        src = self.src
        if src is None:
            raise QemuError("no source VM")
        self.turn += 1
        port = free_port()
        dst = QemuVM(self.workdir, f"vm{self.turn}", self.size, incoming_port=port)
        try:
            info = self._run(src, dst, port, paused, timeout or 60.0 + 30.0 * self.size / 2**30)
        except BaseException:
            dst.close()
            raise
        src.close()
        self.src = dst
        return info

    def _run(self, src: QemuVM, dst: QemuVM, port: int, paused: bool, timeout: float) -> QemuResult:
        q = src.qmp
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
        if self.downtime_limit_ms is not None:
            params["downtime-limit"] = self.downtime_limit_ms
        q.execute("migrate-set-parameters", **params)
        running = q.execute("query-status")["running"]
        if paused and running:
            q.execute("stop")
        elif not paused and not running:
            # A destination stays paused when its source was; a running run needs it running.
            q.execute("cont")
        q.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while True:
            info = q.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU migration {status}: {info.get('error-desc', '')} {dst.log_tail()}")
            if time.monotonic() > deadline:
                with contextlib.suppress(QemuError):
                    q.execute("migrate_cancel")
                raise QemuError(f"QEMU migration still {status} after {timeout:.0f} s")
            time.sleep(POLL_S)
        ram = info.get("ram", {})
        return QemuResult(size=self.size, paused=paused, total_ms=float(info["total-time"]),
                          downtime_ms=float(info.get("downtime", 0)), setup_ms=float(info.get("setup-time", 0)),
                          transferred=int(ram.get("transferred", 0)), mbps=float(ram.get("mbps", 0.0)),
                          accel=accel())


def qemu_precopy(size_bytes: int, paused: bool) -> QemuResult:
    """One QEMU pre-copy migration of a fresh ``size_bytes`` guest with random RAM (fill included,
    not timed). For several runs, keep a :class:`QemuPingPong` instead: it fills once."""
    with QemuPingPong(size_bytes) as pp:
        return pp.migrate(paused)


def version() -> str:
    """``QEMU emulator version ...`` first line, or empty when unknown."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0].strip() if out else ""


# --- standalone -------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def markdown(results: dict[tuple[int, bool], list[QemuResult]], runs: int) -> str:
    lines = [f"{version() or QEMU}, accel `{accel()}`, loopback TCP, RAM from /dev/urandom in a "
             f"`memory-backend-file` on tmpfs, max-bandwidth raised, default downtime limit; median of "
             f"{runs} run(s), figures from `query-migrate`.", "",
             "| guest | mode | runs | total ms | downtime ms | setup ms | transferred MiB | GiB/s (size / total) "
             "| mbps |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (size, paused), rs in results.items():
        def m(key: str, rs: list[QemuResult] = rs) -> float:
            return statistics.median(getattr(r, key) for r in rs)
        lines.append(f"| {size / 2**30:g} GiB | {'paused' if paused else 'running'} | {len(rs)} | "
                     f"{m('total_ms'):.0f} | {m('downtime_ms'):.0f} | {m('setup_ms'):.0f} | "
                     f"{m('transferred') / 2**20:.0f} | {m('gib_s'):.2f} | {m('mbps'):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 GiB, one run per mode")
    ap.add_argument("--sizes", default=None, help="comma-separated guest sizes (default 1G,4G; 1G quick)")
    ap.add_argument("--runs", type=int, default=None, help="runs per size and mode (default 3, quick 1)")
    ap.add_argument("--downtime-limit", type=int, default=None, help="ms (QEMU's default 300 when unset)")
    ns = ap.parse_args(argv)
    reason = available()
    if reason:
        print(f"QEMU pre-copy baseline skipped: {reason}.")
        return
    sizes = [_parse_size(x) for x in (ns.sizes or ("1G" if ns.quick else "1G,4G")).split(",")]
    runs = ns.runs or (1 if ns.quick else 3)
    results: dict[tuple[int, bool], list[QemuResult]] = {}
    for size in sizes:
        with QemuPingPong(size, ns.downtime_limit) as pp:
            for paused in (True, False):
                results[(size, paused)] = [pp.migrate(paused) for _ in range(runs)]
    print(markdown(results, runs))


if __name__ == "__main__":
    main()
