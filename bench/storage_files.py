"""The files of the storage bench (bench/bench_storage.py) and its two copy baselines.

The throughput image (sparse, random data in extents, synced), the digest of its data extents that
checks every copy, the allocated size, ``cp --sparse=always`` followed by ``fdatasync``, and QEMU's
``blockdev-mirror`` (``sync: full``) of the image to a new sparse target in its own QEMU process
(bench/qemu_baseline.py's QMP client).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.qemu_baseline import QEMU, QemuError, Qmp, accel
from tests.agents import wait_for

WRITE_CHUNK = 8 << 20
QEMU_READY_TIMEOUT = 600.0


def write_image(path: Path, size: int, offsets: Sequence[int], extent: int) -> None:
    """A sparse image of ``size`` bytes with random data in ``extent`` bytes at each offset, synced
    (so none of its writeback runs during a measurement)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            left = extent
            while left:
                n = min(WRITE_CHUNK, left)
                f.write(os.urandom(n))
                left -= n
        f.flush()
        os.fsync(f.fileno())


def extents_digest(path: Path, offsets: Sequence[int], extent: int) -> str:
    """A digest of the image's data extents (its content where it was written: elsewhere it reads
    as zeros, which ``allocated`` checks stayed holes); reading it is also the warm-up."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as f:
        for off in offsets:
            f.seek(off)
            left = extent
            while left:
                chunk = f.read(min(WRITE_CHUNK, left))
                if not chunk:
                    raise ValueError(f"{path} ends before its extent at {off}")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fdatasync_path(path: Path) -> float:
    """fdatasync ``path``; the seconds it took."""
    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def cp_once(src: Path, dst: Path) -> tuple[float, float]:
    """``cp --sparse=always`` of ``src`` to the new file ``dst``, then its fdatasync: (copy s,
    sync s). ``--reflink=never``: a file system that shares extents would copy nothing at all."""
    t = time.monotonic()
    subprocess.run(["cp", "--sparse=always", "--reflink=never", str(src), str(dst)], check=True)
    copy_s = time.monotonic() - t
    return copy_s, fdatasync_path(dst)


def mirror_once(src: Path, dst: Path, workdir: Path) -> tuple[float, float]:
    """QEMU's ``blockdev-mirror`` (sync full) of the raw image ``src`` into the new sparse file
    ``dst``, in a QEMU process of its own: seconds from the mirror command to the job's ready, and
    to the job's end (cancelled once ready: the target stays a complete copy) and the target's
    fdatasync."""
    with open(dst, "wb") as f:
        f.truncate(os.stat(src).st_size)
    sock, log = workdir / "mirror.qmp", workdir / "mirror.log"
    # locking=off: the ferry VM holds its image's lock meanwhile; this process only reads it.
    argv = [QEMU, "-machine", "pc", "-accel", accel(), "-m", "64M", "-nodefaults", "-display", "none",
            "-serial", "none", "-monitor", "none",
            "-blockdev", f"driver=file,filename={src},node-name=src-file,read-only=on,locking=off",
            "-blockdev", "driver=raw,file=src-file,node-name=src,read-only=on",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    qmp: Qmp | None = None
    try:
        qmp = Qmp(str(sock))
        # discard=unmap: the mirror writes the image's holes as zeroes; unmapped, they stay holes.
        qmp.execute("blockdev-add", driver="file", filename=str(dst), discard="unmap", **{"node-name": "dst-file"})
        qmp.execute("blockdev-add", driver="raw", file="dst-file", discard="unmap", **{"node-name": "dst"})
        t = time.monotonic()
        qmp.execute("blockdev-mirror", **{"job-id": "m", "device": "src", "target": "dst", "sync": "full"})
        while True:
            jobs = qmp.execute("query-block-jobs")
            if not jobs:
                raise QemuError("the mirror job ended before it was ready")
            if jobs[0].get("ready"):
                break
            if time.monotonic() - t > QEMU_READY_TIMEOUT:
                raise QemuError(f"the mirror job not ready after {QEMU_READY_TIMEOUT:.0f} s")
            time.sleep(0.002)
        ready_s = time.monotonic() - t
        qmp.execute("block-job-cancel", device="m")  # on a ready job: stop with the target a copy
        try:
            wait_for(lambda: not qmp.execute("query-block-jobs"), timeout=60, interval=0.002, what="mirror job end")
        except AssertionError as e:
            raise QemuError(str(e)) from None
        fdatasync_path(dst)  # the job's end flushes the target already: this finds little left
        done_s = time.monotonic() - t
        qmp.execute("blockdev-del", **{"node-name": "dst"})
        qmp.execute("blockdev-del", **{"node-name": "dst-file"})
        return ready_s, done_s
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()  # by its pid
        proc.wait()
        for p in (sock, log):
            with contextlib.suppress(OSError):
                p.unlink()
