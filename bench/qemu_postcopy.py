"""QEMU's post-copy of a guest that dirties memory at a set rate: the QEMU side of bench/bench_postcopy.py.

QEMU's own guests need an OS to dirty memory; this one is a multiboot kernel of a few dozen bytes
of 32-bit x86, built here (no assembler needed), doing what ferry's ``memstress`` guest does:
forever, an LCG picks a page of a working set at 16 MiB and the guest stores the LCG's value at its
start, paced by the TSC to ``rate`` pages a second (when it falls more than 10 ms behind, it
skips ahead rather than bursting), and counts its stores in a word at 2 MiB: the bench reads that
counter over QMP (``xp``) as the guest's progress.

One migration (:meth:`QemuPostcopy.run`): a fresh destination QEMU with ``-incoming defer``, the
``postcopy-ram`` capability on both sides (``postcopy-blocktime`` on the destination), QEMU's
default RAM backend, ``max-bandwidth`` and ``max-postcopy-bandwidth`` at the cap; ``migrate``,
then ``migrate-start-postcopy`` once the first pass over RAM is done (the second dirty sync,
like ferry's ``postcopy-after 1``); ``query-migrate`` polled until completed. The old source is
then killed, the destination is the next run's source, paused until its run (the host has two
cores, and this guest spins on the TSC between stores). KVM when /dev/kvm is usable and the
firmware reaches the kernel under it (nested KVM may hang in it), else TCG.
When QEMU is missing and this process may use apt-get (root), ``qemu-system-x86`` is installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.qemu_baseline import QEMU, QemuError, QemuProcess, accel, free_port

PAGE = 4096
WS_BASE = 16 << 20
COUNTER = 2 << 20
LOAD_ADDR = 0x100000
POLL_S = 0.005
BEHIND_S = 0.01  # the guest skips ahead when it is this far behind its pace
BOOT_S = 5.0  # the firmware reaches the kernel within this, or the accelerator is given up
SETTLE_S = 1.0  # resumed before a run: the guest back at its pace


def tsc_hz(window: float = 0.2) -> float:
    """The host's TSC rate (a KVM guest's TSC runs at it): rdtsc from a few bytes of machine code
    in an executable mapping, against the monotonic clock."""
    code = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")  # rdtsc; shl rdx,32; or rax,rdx; ret
    buf = mmap.mmap(-1, PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    t0, c0 = time.perf_counter(), rdtsc()
    time.sleep(window)
    t1, c1 = time.perf_counter(), rdtsc()
    del rdtsc
    return (c1 - c0) / (t1 - t0)


def guest_kernel(ws: int, rate: int, hz: float) -> bytes:
    """The multiboot ELF32 image of the dirtying guest (see the module's docstring)."""
    pages = ws // PAGE
    if pages & (pages - 1) or pages < 2:
        raise ValueError("the QEMU guest's working set must be a power of two pages")
    ticks = max(1, round(hz / rate))
    behind = round(hz * BEHIND_S)
    u32 = lambda v: struct.pack("<I", v & 0xFFFFFFFF)  # noqa: E731
    code = b"".join([
        b"\xfa",                                  # cli
        b"\xbb" + u32(0x2545F491),                # mov ebx, seed
        b"\x0f\x31", b"\x89\xc7", b"\x89\xd5",     # rdtsc; mov edi, eax; mov ebp, edx (deadline)
        # wait: (offset 12)
        b"\x0f\x31", b"\x89\xc1", b"\x89\xd6",     # rdtsc; mov ecx, eax; mov esi, edx (the time)
        b"\x29\xf8", b"\x19\xea",                 # sub eax, edi; sbb edx, ebp (time - deadline)
        b"\x78\xf4",                              # js wait
        b"\x85\xd2", b"\x75\x07",                 # test edx, edx; jnz reset
        b"\x3d" + u32(behind), b"\x72\x04",       # cmp eax, behind; jb ok
        b"\x89\xcf", b"\x89\xf5",                 # reset: mov edi, ecx; mov ebp, esi
        b"\x81\xc7" + u32(ticks), b"\x83\xd5\x00",  # ok: add edi, ticks; adc ebp, 0
        b"\x69\xdb" + u32(1103515245),            # imul ebx, ebx, 1103515245
        b"\x81\xc3" + u32(12345),                 # add ebx, 12345
        b"\x89\xd8", b"\xc1\xe8\x08",             # mov eax, ebx; shr eax, 8
        b"\x25" + u32(pages - 1), b"\xc1\xe0\x0c",  # and eax, pages-1; shl eax, 12
        b"\x05" + u32(WS_BASE), b"\x89\x18",      # add eax, WS_BASE; mov [eax], ebx
        b"\xff\x05" + u32(COUNTER),               # inc dword [COUNTER]
    ])
    wait_at = 12
    code += b"\xe9" + struct.pack("<i", wait_at - (len(code) + 5))  # jmp wait
    assert code[wait_at:wait_at + 2] == b"\x0f\x31"
    header_at = 96
    entry_at = header_at + 12
    magic, flags = 0x1BADB002, 0
    multiboot = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    size = entry_at + len(code)
    elf = struct.pack("<4sBBBBB7xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0, 2, 3, 1, LOAD_ADDR + entry_at, 52, 0, 0,
                      52, 32, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 0, LOAD_ADDR, LOAD_ADDR, size, size, 5, PAGE)
    image = elf + phdr
    image += bytes(header_at - len(image)) + multiboot + code
    assert len(image) == size
    return image


def ensure_qemu() -> str | None:
    """None when QEMU is here (installed first if it is missing and apt-get may run), else why not."""
    if shutil.which(QEMU):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"`{QEMU}` is not installed and apt-get cannot run here (apt-get install qemu-system-x86)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"]):
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode:
            return f"{' '.join(argv)} failed: {r.stderr.strip()[-300:]}"
    return None if shutil.which(QEMU) else f"`{QEMU}` still missing after apt-get install"


class _Guest(QemuProcess):
    """One QEMU process (default RAM backend) booting ``kernel``; ``close`` kills it by pid."""

    def __init__(self, workdir: Path, name: str, mem: int, kernel: Path, incoming: bool, accel: str) -> None:
        super().__init__(workdir, name, ["-machine", f"pc,accel={accel}", "-m", f"{mem >> 20}M", "-kernel", str(kernel)],
                         ["-incoming", "defer"] if incoming else None)

    def counter(self) -> tuple[float, int]:
        out = self.qmp.execute("human-monitor-command", **{"command-line": f"xp /1wx {COUNTER:#x}"})
        m = re.search(r":\s*(0x[0-9a-fA-F]+)", str(out))
        if m is None:
            raise QemuError(f"cannot read the guest's counter: {out!r}")
        return time.monotonic(), int(m.group(1), 16)


class QemuPostcopy:
    """The QEMU guest, migrated back and forth by post-copy; a context manager (kills what is left)."""

    def __init__(self, mem: int, ws: int, rate: int, cap: int) -> None:
        self.mem, self.cap = mem, cap
        self.workdir = Path(tempfile.mkdtemp(prefix="ferry-qemu-postcopy-"))
        self.kernel = self.workdir / "dirty.elf"
        self.kernel.write_bytes(guest_kernel(ws, rate, tsc_hz()))
        self.turn = 0
        self.src: _Guest | None = None
        # Under nested KVM the firmware may never reach the kernel: then TCG (the guest is a loop).
        for self.accel in dict.fromkeys([accel(), "tcg"]):
            self.src = _Guest(self.workdir, "vm0", mem, self.kernel, incoming=False, accel=self.accel)
            give_up = time.monotonic() + BOOT_S
            while self.src.counter()[1] == 0 and time.monotonic() < give_up:
                time.sleep(0.1)
            if self.src.counter()[1]:
                break
            self.src.close()
            self.src = None
        if self.src is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise QemuError(f"the QEMU guest did not start under {accel()} nor tcg")
        self.src.qmp.execute("stop")  # paused between its own runs: the ferry runs get the CPU

    def __enter__(self) -> QemuPostcopy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.src is not None:
            self.src.close()
            self.src = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self, window: float = 1.0, timeout: float = 300.0) -> Any:
        from bench.bench_postcopy import Run

        src = self.src
        assert src is not None
        self.turn += 1
        dst = _Guest(self.workdir, f"vm{self.turn}", self.mem, self.kernel, incoming=True, accel=self.accel)
        try:
            src.qmp.execute("cont")
            time.sleep(SETTLE_S)
            t0, c0 = src.counter()
            time.sleep(window)
            t1, c1 = src.counter()
            before = (c1 - c0) / (t1 - t0)
            info, incoming, during = self._migrate(src, dst, timeout)
        except QemuError as e:
            dst.close()
            return Run("qemu", False, note=str(e))
        src.close()
        self.src = dst
        with contextlib.suppress(QemuError):
            dst.qmp.execute("stop")
        ram = info.get("ram", {})
        return Run("qemu", True, total_ms=float(info["total-time"]), downtime_ms=float(info.get("downtime", 0)),
                   bytes_ratio=float(ram.get("transferred", 0)) / self.mem, slowdown=max(0.0, 1.0 - during / before),
                   blocktime_ms=incoming.get("postcopy-blocktime"), note=f"QEMU {self.accel}",
                   raw={"source": info, "destination": incoming})

    def _migrate(self, src: _Guest, dst: _Guest, timeout: float) -> tuple[dict[str, Any], dict[str, Any], float]:
        port = free_port()
        caps = [{"capability": "postcopy-ram", "state": True}]
        dst.qmp.execute("migrate-set-capabilities",
                        capabilities=[*caps, {"capability": "postcopy-blocktime", "state": True}])
        dst.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.qmp.execute("migrate-set-capabilities", capabilities=caps)
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": self.cap, "max-postcopy-bandwidth": self.cap})
        t0, c0 = src.counter()
        src.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        switched = False
        while True:
            info: dict[str, Any] = src.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                with contextlib.suppress(QemuError):
                    src.qmp.execute("migrate_cancel")
                raise QemuError(f"QEMU migration still {status} after {timeout:.0f} s")
            if not switched and status == "active" and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                src.qmp.execute("migrate-start-postcopy")
                switched = True
            time.sleep(POLL_S)
        t1, c1 = dst.counter()
        incoming: dict[str, Any] = dst.qmp.execute("query-migrate")
        return info, incoming, (c1 - c0) / (t1 - t0)


def prepare(mem: int, ws: int, rate: int, cap: int) -> tuple[QemuPostcopy | None, str]:
    """The QEMU side, started (its guest running), or None and why it cannot run here."""
    why = ensure_qemu()
    if why is not None:
        return None, why
    if ws + WS_BASE > mem:
        return None, f"the QEMU guest needs {WS_BASE >> 20} MiB below its working set"
    try:
        return QemuPostcopy(mem, ws, rate, cap), ""
    except (QemuError, OSError, ValueError) as e:
        return None, str(e)
