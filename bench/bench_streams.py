"""Several streams: ferry over 1, 2, 4 streams, plaintext and TLS, against QEMU multifd and the
raw copy at the same number of streams, in the same run (docs/PERFORMANCE.md section 21).

For each guest size (a paused guest whose RAM is random, so nothing compresses and no page is
zero) and each run, interleaved so the machine's load hits every row alike:

* **ferry**: two agents in plaintext and two with ``--tls-dir`` (certificates from
  agent/certs.py), the guest migrated back and forth with ``streams`` 1, 2 and 4; the figures are
  ferry's MigrationInfo (total time, downtime);
* **raw copy**: N threads each sending 1/N of the guest's size (64 MiB of random bytes, over and
  over) over its own loopback TCP connection to N
  receiver threads that ``recv_into`` one reused 512 KiB buffer and ``pwrite`` it into a fresh
  memfd (the fastest plain-Python copy; the path ferry's destination uses);
* **QEMU multifd** (when installed; KVM when /dev/kvm is usable, else TCG): the ``multifd``
  capability with ``multifd-channels`` N on both ends (1 channel: multifd off, QEMU's single
  stream), max-bandwidth lifted; the destination's RAM is anonymous memory as QEMU's ``-m`` gives
  (``memory-backend-ram``, under the source's block name), as users run it; the source's is a file on tmpfs, filled once from /dev/urandom.

The host's memory is touched once at the start and freed (bench/common.warm_host_memory): on a
microVM the first touch of guest-physical memory costs a fault in the host. Median and worst of
``--runs`` runs.

    .venv/bin/python -m bench.bench_streams [--quick] [--sizes 1G,4G] [--runs 3] [--streams 1,2,4] [--no-qemu]
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
from pathlib import Path
from typing import Any

from agent.vms import close_guest_ram, create_guest_ram
from bench import qemu_baseline as qb
from bench.bench_migrate import FILL_PROGRAM, mem_available, wait_filled
from bench.bench_tls import Agent, make_pki
from tests.agents import make_key
from vmruntime.isa import DATA_ADDR

PIECE = 512 * 1024
SLICE = 4 << 20
RAW_SOURCE = 64 << 20  # the raw copy's source: random bytes sent over and over (a multiple of SLICE)


def warm_host_memory(keep: int = 3 << 30, most: int = 16 << 30) -> int:
    """Touch most of the host's available memory once, then free it; returns the bytes touched.

    On a microVM the first touch of guest-physical memory costs a fault in the host (the same 1 GiB
    copy measured 0.6-3.4 s depending on it), so the bench's fresh GiBs would be measured against
    the host's faults, not against the copy. ``keep`` bytes stay untouched for the other processes."""
    import mmap

    size = max(0, min(most, mem_available() - keep)) // mmap.PAGESIZE * mmap.PAGESIZE
    if size == 0:
        return 0
    mm = mmap.mmap(-1, size)
    one = b"\1"
    for off in range(0, size, mmap.PAGESIZE):
        mm[off:off + 1] = one
    mm.close()
    return size


# --- the raw copy over N streams ------------------------------------------------------------------
def raw_copy(src: memoryview, size: int, n: int) -> float:
    """Seconds to copy ``size`` bytes into a fresh memfd over ``n`` loopback connections, one
    thread per connection on each side; the bytes sent are ``src`` (smaller than ``size``, whole
    slices of it) over and over, so the source costs no memory of the guest's size."""
    dst_fd, dst = create_guest_ram("raw-dst", size)
    lsock = socket.create_server(("127.0.0.1", 0))
    outs = [socket.create_connection(lsock.getsockname()[:2]) for _ in range(n)]
    ins = [lsock.accept()[0] for _ in range(n)]
    lsock.close()
    share = -(-size // n // SLICE) * SLICE
    parts = [(i * share, min(size, (i + 1) * share)) for i in range(n)]

    def send(sock: socket.socket, a: int, b: int) -> None:
        for off in range(a, b, SLICE):
            pos = off % len(src)
            sock.sendall(src[pos:pos + min(SLICE, b - off)])

    def receive(sock: socket.socket, a: int, b: int) -> None:
        buf = memoryview(bytearray(PIECE))
        pos = a
        while pos < b:
            k = min(PIECE, b - pos)
            got = 0
            while got < k:
                got += sock.recv_into(buf[got:k], k - got)
            os.pwrite(dst_fd, buf[:k], pos)
            pos += k

    threads = [threading.Thread(target=receive, args=(s, a, b)) for s, (a, b) in zip(ins, parts, strict=True)]
    threads += [threading.Thread(target=send, args=(s, a, b)) for s, (a, b) in zip(outs, parts, strict=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for s in outs + ins:
        s.close()
    close_guest_ram(dst_fd, dst)
    return seconds


# --- QEMU multifd, default RAM on the destination --------------------------------------------------
class QemuDefaultRamDest(qb.QemuProcess):
    """A QEMU destination with QEMU's default RAM (``-m``), ``-incoming defer`` so multifd can be
    set before it listens."""

    def __init__(self, workdir: Path, name: str, size: int) -> None:
        # memory-backend-ram is the anonymous memory QEMU's plain -m gives; named mem0 as the
        # source's RAM block is, which the stream names.
        super().__init__(workdir, name, ["-machine", f"pc,accel={qb.accel()},memory-backend=mem0", "-m",
                                         f"{size >> 20}M", "-object", f"memory-backend-ram,id=mem0,size={size >> 20}M"],
                         ["-incoming", "defer"])


def _multifd(vm: qb.QemuProcess, channels: int) -> None:
    on = channels > 1
    vm.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": on}])
    if on:
        vm.qmp.execute("migrate-set-parameters", **{"multifd-channels": channels})


class QemuMultifd:
    """A paused random guest whose RAM file is filled once, migrated to a fresh default-RAM
    destination each run, which is the next run's source."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workdir = Path(tempfile.mkdtemp(prefix="ferry-qemu-mfd-", dir=qb.shm_dir()))
        qb.fill_random(self.workdir / "src.ram", size)
        self.src: qb.QemuProcess = qb.QemuVM(self.workdir, "src", size)
        self.src.qmp.execute("stop")
        self.turn = 0
        # Once untimed: from then on the source's RAM is anonymous memory too (the destination's
        # kind), as a user's QEMU has on both ends; the file-backed first source is the fill only.
        self.migrate(1)

    def migrate(self, channels: int) -> float:
        self.turn += 1
        dst = QemuDefaultRamDest(self.workdir, f"dst{self.turn}", self.size)
        ok = False
        try:
            _multifd(dst, channels)
            port = qb.free_port()
            dst.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            q = self.src.qmp
            _multifd(self.src, channels)
            q.execute("migrate-set-parameters", **{"max-bandwidth": qb.MAX_BANDWIDTH})
            q.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + 60 + 30 * self.size / 2**30
            while True:
                info = q.execute("query-migrate")
                if info.get("status") == "completed":
                    ok = True
                    return float(info["total-time"]) / 1000
                if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise qb.QemuError(f"QEMU multifd migration {info.get('status')}: {info.get('error-desc', '')}")
                time.sleep(qb.POLL_S)
        finally:
            # QEMU migrates no VM a migration paused: the destination is the next run's source.
            if ok:
                self.src.close()
                self.src = dst
            else:
                dst.close()

    def close(self) -> None:
        self.src.close()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)


# --- ferry -----------------------------------------------------------------------------------------
class FerryPair:
    """Two agents (plaintext or TLS) and a paused random guest migrated back and forth."""

    def __init__(self, root: Path, size: int, pki: dict[str, Path] | None) -> None:
        tmp = Path(tempfile.mkdtemp(dir=root))
        key = make_key(tmp)
        self.agents = []
        for name in ("A", "B"):
            agent = Agent(tmp, name, key, pki[name] if pki else None, pki["cli"] if pki else None)
            self.agents.append(agent)
            agent.wait_ready()
        a = self.agents[0]
        a.call("vm-create", name="s", program=FILL_PROGRAM, mem=str(size), args={"ws": str(size - DATA_ADDR)})
        wait_filled(a, "s", timeout=900)
        a.call("vm-pause", name="s")
        self.src, self.dst = self.agents

    def migrate(self, streams: int) -> float:
        self.src.call("migrate", name="s", to=self.dst.control, params={"streams": streams})
        info = self._wait()
        if info["status"] != "completed":
            raise RuntimeError(f"ferry migration {info['status']}: {info.get('error-desc')}")
        assert info["streams"] == streams, info
        self.src, self.dst = self.dst, self.src
        return float(info["total-time"]) / 1000

    def _wait(self) -> dict[str, Any]:
        while True:
            info: dict[str, Any] = self.src.call("migrate-status", name="s")
            if info["status"] in ("completed", "failed", "cancelled"):
                return info
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            for agent in self.agents:
                with contextlib.suppress(Exception):
                    for vm in agent.call("vm-list")["vms"]:
                        agent.call("vm-destroy", name=vm["name"])
                agent.stop()


def _size(text: str) -> int:
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({max(values):.2f})" if values else "-"


def run_size(root: Path, size: int, runs: int, counts: list[int], pki: dict[str, Path], qemu: bool) -> str:
    rows: dict[str, list[float]] = {}
    plain = FerryPair(root, size, None)
    secure = FerryPair(root, size, pki)
    mfd = QemuMultifd(size) if qemu else None
    src_fd, src_mm = create_guest_ram("raw-src", RAW_SOURCE)
    for off in range(0, RAW_SOURCE, 1 << 20):
        src_mm[off:off + (1 << 20)] = os.urandom(1 << 20)
    src = memoryview(src_mm)
    try:
        for _ in range(runs):
            for n in counts:
                for label, fn in ((f"ferry plaintext, {n}", lambda n=n: plain.migrate(n)),
                                  (f"ferry TLS, {n}", lambda n=n: secure.migrate(n)),
                                  (f"raw copy, {n}", lambda n=n: raw_copy(src, size, n)),
                                  *(((f"QEMU multifd, {n}", lambda n=n: mfd.migrate(n)),) if mfd else ())):
                    try:
                        rows.setdefault(label, []).append(fn())
                    except Exception as e:  # one failed run is reported, the rest goes on
                        print(f"{label}: {e}", file=sys.stderr)
    finally:
        src.release()
        close_guest_ram(src_fd, src_mm)
        plain.close()
        secure.close()
        if mfd is not None:
            mfd.close()
    out = [f"### {size >> 20} MiB paused random guest, seconds: median (worst) of {runs}\n",
           "| streams | ferry plaintext | ferry TLS | TLS / plaintext | raw copy | ferry / raw | QEMU multifd |"
           " QEMU / ferry |", "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    med = statistics.median
    for n in counts:
        p, t, r, q = (rows.get(f"{k}, {n}", []) for k in ("ferry plaintext", "ferry TLS", "raw copy", "QEMU multifd"))
        out.append(f"| {n} | {_cell(p)} | {_cell(t)} | {med(t) / med(p) if p and t else 0:.2f} | {_cell(r)} | "
                   f"{med(p) / med(r) if p and r else 0:.2f} | {_cell(q)} | {med(q) / med(p) if p and q else 0:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1 run")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.runs = "256M", 1
    qemu = not a.no_qemu and qb.available() is None
    counts = [int(x) for x in a.streams.split(",")]
    warmed = warm_host_memory()
    print(f"Host memory warmed: {warmed >> 20} MiB touched and freed. QEMU: "
          f"{qb.version() + ' (' + qb.accel() + ')' if qemu else 'not run'}.\n")
    with tempfile.TemporaryDirectory(prefix="ferry-bench-streams-") as tmpdir:
        root = Path(tmpdir)
        pki = make_pki(root / "pki")
        for size in (_size(s) for s in a.sizes.split(",")):
            print(run_size(root, size, a.runs, counts, pki, qemu), flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
