"""Post-copy's stale pages: punching them out of the memfd against userfaultfd MINOR mode, on this kernel.

Results: docs/PERFORMANCE.md, section 20.

A post-copy destination holds copies of pages the source dirtied since it sent them. Either it
punches them out of the memfd (FALLOC_FL_PUNCH_HOLE: the guest's touch faults MISSING, the page
is fetched and installed with UFFDIO_COPY), or, in MINOR mode, it leaves them in the page cache
with no page-table entry in the VM's mapping: the guest's touch faults MINOR, the agent writes
the fresh copy into the memfd and maps it with UFFDIO_CONTINUE, and the pages that are up to date
are mapped in bulk, one UFFDIO_CONTINUE per contiguous range.

Measured in this process over a memfd of ``--mem`` bytes, all written, mapped twice (the agent's
mapping and a "VM" mapping, both populated as after a restore):

- ``punch``: FALLOC_FL_PUNCH_HOLE of ``--pages`` scattered single pages, and of the same number
  of pages as runs of 64 and of 512 (coalesced ranges): cost per call and per page;
- ``minor``: whether UFFD_FEATURE_MINOR_SHMEM is granted and MINOR registration of the shared
  mapping offers UFFDIO_CONTINUE;
- ``zap``: MADV_DONTNEED over the whole populated "VM" mapping (page cache kept), and over the
  same mapping once its entries are gone;
- ``continue``: UFFDIO_CONTINUE of ``--pages`` scattered single pages, then of the whole mapping
  in one call (what a proactive map of the clean pages costs);
- ``pwrite``: one page written into the memfd (a stale page's fresh copy).

    .venv/bin/python -m bench.bench_uffd_minor [--quick] [--mem 512M] [--pages 20480] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import time
from collections.abc import Iterator
from typing import Any

from bench.common import markdown_table
from vmruntime import guestram, postcopy
from vmruntime.dirty import _uapi

PAGE = 4096


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1:].upper()]
    return int(text)


@contextlib.contextmanager
def _guest_ram(size: int) -> Iterator[tuple[int, mmap.mmap, mmap.mmap]]:
    """A written memfd, mapped twice (agent's, VM's), both mappings populated."""
    fd = guestram.create_memfd(size, "bench-minor")
    agent = guestram.map_shared(fd, size)
    vm = guestram.map_shared(fd, size)
    try:
        chunk = os.urandom(1 << 20)
        for off in range(0, size, len(chunk)):
            agent[off:off + len(chunk)] = chunk
        for off in range(0, size, PAGE):  # every page table entry of the "VM" mapping present
            vm[off]
        yield fd, agent, vm
    finally:
        vm.close()
        agent.close()
        os.close(fd)


def _scattered(size: int, n: int, run: int, seed: int = 7) -> list[tuple[int, int]]:
    """``n`` pages as ``n // run`` non-adjacent runs of ``run`` pages, page offsets sorted."""
    slots = size // PAGE // (run + 1)
    picks = sorted(random.Random(seed).sample(range(slots), n // run))
    return [(s * (run + 1) * PAGE, (s * (run + 1) + run) * PAGE) for s in picks]


def measure_punch(size: int, npages: int) -> list[dict[str, Any]]:
    out = []
    for run in (1, 64, 512):
        with _guest_ram(size) as (fd, _agent, _vm):
            ranges = _scattered(size, npages, run)
            t = time.perf_counter()
            for a, b in ranges:
                postcopy.punch(fd, a, b - a)
            dt = time.perf_counter() - t
        pages = sum(b - a for a, b in ranges) // PAGE
        out.append({"what": f"punch, runs of {run}", "calls": len(ranges), "pages": pages, "total ms": dt * 1000,
                    "us/call": dt / len(ranges) * 1e6, "us/page": dt / pages * 1e6})
    return out


def probe_minor() -> dict[str, Any]:
    """What the kernel grants: the feature bit, and CONTINUE on a MINOR-registered shared memfd mapping."""
    fd = _uapi.userfaultfd()
    try:
        granted = _uapi.uffd_api(fd, postcopy.FEATURES | _uapi.UFFD_FEATURE_MINOR_SHMEM)
    finally:
        os.close(fd)
    feature = bool(granted & _uapi.UFFD_FEATURE_MINOR_SHMEM)
    ioctls = 0
    if feature:
        with _registered(1 << 20) as (_fd, _agent, _vm, _uffd, ioctls):
            pass
    return {"kernel": os.uname().release, "UFFD_FEATURE_MINOR_SHMEM": feature,
            "UFFDIO_CONTINUE on the mapping": bool(ioctls & _uapi.UFFD_IOCTL_CONTINUE)}


@contextlib.contextmanager
def _registered(size: int) -> Iterator[tuple[int, mmap.mmap, mmap.mmap, int, int]]:
    with _guest_ram(size) as (fd, agent, vm):
        uffd = _uapi.userfaultfd()
        try:
            _uapi.uffd_api(uffd, postcopy.FEATURES | _uapi.UFFD_FEATURE_MINOR_SHMEM)
            ioctls = _uapi.uffd_register_missing(uffd, guestram.mapping_address(vm), size, minor=True)
            yield fd, agent, vm, uffd, ioctls
        finally:
            os.close(uffd)


def measure_minor(size: int, npages: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with _registered(size) as (fd, agent, vm, uffd, _ioctls):
        base = guestram.mapping_address(vm)
        t = time.perf_counter()
        vm.madvise(mmap.MADV_DONTNEED)
        dt = time.perf_counter() - t
        out.append({"what": "zap (MADV_DONTNEED), populated mapping", "calls": 1, "pages": size // PAGE,
                    "total ms": dt * 1000, "us/call": dt * 1e6, "us/page": dt / (size // PAGE) * 1e6})
        t = time.perf_counter()
        vm.madvise(mmap.MADV_DONTNEED)
        dt = time.perf_counter() - t
        out.append({"what": "zap (MADV_DONTNEED), no entries", "calls": 1, "pages": size // PAGE,
                    "total ms": dt * 1000, "us/call": dt * 1e6, "us/page": dt / (size // PAGE) * 1e6})
        singles = _scattered(size, npages, 1)
        t = time.perf_counter()
        for a, b in singles:
            err, _n = _uapi.uffd_continue(uffd, base + a, b - a)
            assert err == 0, os.strerror(err)
        dt = time.perf_counter() - t
        out.append({"what": "UFFDIO_CONTINUE, single pages", "calls": len(singles), "pages": len(singles),
                    "total ms": dt * 1000, "us/call": dt / len(singles) * 1e6, "us/page": dt / len(singles) * 1e6})
        vm.madvise(mmap.MADV_DONTNEED)
        t = time.perf_counter()
        err, n = _uapi.uffd_continue(uffd, base, size)
        dt = time.perf_counter() - t
        assert err == 0 and n == size, (os.strerror(err), n)
        out.append({"what": "UFFDIO_CONTINUE, whole mapping in one call", "calls": 1, "pages": size // PAGE,
                    "total ms": dt * 1000, "us/call": dt * 1e6, "us/page": dt / (size // PAGE) * 1e6})
        page = os.urandom(PAGE)
        t = time.perf_counter()
        for a, _b in singles:
            os.pwrite(fd, page, a)
        dt = time.perf_counter() - t
        out.append({"what": "pwrite of one page into the memfd", "calls": len(singles), "pages": len(singles),
                    "total ms": dt * 1000, "us/call": dt / len(singles) * 1e6, "us/page": dt / len(singles) * 1e6})
    del agent
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="128M and 8192 pages")
    p.add_argument("--mem", help="guest RAM size (default 512M)")
    p.add_argument("--pages", type=int, help="stale pages to discard (default 20480)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    size = _parse_size(args.mem or ("128M" if args.quick else "512M"))
    args.pages = args.pages or (8192 if args.quick else 20480)
    if size % (1 << 20) or args.pages < 512 or args.pages * 2 > size // PAGE:
        p.error("--mem must be whole MiB and hold twice --pages (at least 512)")
    facts = probe_minor()
    rows = measure_punch(size, args.pages)
    if facts["UFFDIO_CONTINUE on the mapping"]:
        rows += measure_minor(size, args.pages)
    if args.json:
        print(json.dumps({"facts": facts, "rows": rows}, indent=2))
        return
    print(" ".join(f"{k}: {v}" for k, v in facts.items()))
    cols = ["what", "calls", "pages", "total ms", "us/call", "us/page"]
    print(markdown_table(cols, [[r[c] if isinstance(r[c], str | int) else f"{r[c]:.2f}" for c in cols]
                                for r in rows]))


if __name__ == "__main__":
    main()
