"""Post-copy fault serving: faults per second and the time one fault costs the guest.

A ``memstress`` guest (sequential pages, one store each, flat out) is paused on a "source" VM
process, whose working set is then filled with non-zero bytes, and restored on a "destination"
VM process whose working set is all holes, registered for userfaultfd MISSING faults
(vmruntime/postcopy.py). The benchmark process plays the destination agent: a FaultServer
(agent/migration/postcopy_faults.py) serves every first touch of a page from the source's memfd
(a PageSource in this process: no network). Timed: from the restore's reply until every page of
the working set is present (the guest's first pass over it). Configurations:

- ``inline``: the source answers inside ``request``, in the fault-serving thread (the floor of
  the fault path: read the message, UFFDIO_COPY, wake);
- ``thread``: the answer comes from another thread through a queue, as a return channel's
  receiving thread would place it;
- ``thread+socket``: that thread sends the pages over a socket instead, which the fault server's
  own thread reads (FaultServer.serve's ``readers``) and places;
- ``thread+readahead``: as ``thread``, asking for 15 pages after each faulting one;
- ``present``: every page there before the restore (no fault): the guest's own time for the pass.

Reported: faults per second (one page each, readahead off), the guest time one fault costs
((time - present time) / faults), the request latency p50/p99 (asked -> installed, as
FaultServer counts it), and the block time per fault. Median over ``--runs``.

    .venv/bin/python -m bench.bench_postcopy_faults [--quick] [--ws 64M] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from agent.migration.postcopy_faults import FaultServer
from bench.common import markdown_table, median
from vmruntime import guestram, postcopy
from vmruntime.control import VMHandle
from vmruntime.dirty.extents import written_extents
from vmruntime.isa import DATA_ADDR
from vmruntime.programs import load_program

PAGE = 4096
SLACK = 1 << 20  # RAM beyond the working set (which starts at DATA_ADDR): image, boot block, stack


class MemfdSource:
    """A PageSource over a mapping of the source's memfd: answered inline or by a thread of its own,
    which places the pages itself or (``via_socket``) sends them over a socket the server reads."""

    def __init__(self, ram: mmap.mmap, inline: bool, via_socket: bool = False) -> None:
        self.ram = ram
        self.inline = inline
        self.server: FaultServer | None = None
        self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if via_socket else None
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if not inline:
            self._thread.start()

    def request(self, offset: int, npages: int) -> None:
        if self.inline:
            self._answer(offset, npages)
        else:
            self._queue.put((offset, npages))

    def _answer(self, offset: int, npages: int) -> None:
        assert self.server is not None
        if self.sock is not None:
            self.sock[0].send(offset.to_bytes(8, "little") + self.ram[offset:offset + npages * PAGE])
            return
        with memoryview(self.ram) as view:
            self.server.place(offset, view[offset:offset + npages * PAGE])

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._answer(*item)

    def receive(self) -> None:
        """Called by the fault server's thread when an answer waits on the socket."""
        assert self.server is not None and self.sock is not None
        data = self.sock[1].recv(1 << 20)
        self.server.place(int.from_bytes(data[:8], "little"), memoryview(data)[8:])

    def readers(self) -> dict[int, Callable[[], None]]:
        return {} if self.sock is None else {self.sock[1].fileno(): self.receive}

    def close(self) -> None:
        if not self.inline:
            self._queue.put(None)
            self._thread.join(10)
        if self.sock is not None:
            for s in self.sock:
                s.close()


@contextlib.contextmanager
def serving(server: FaultServer, readers: dict[int, Callable[[], None]]) -> Iterator[None]:
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop, 0.02, readers), name="fault-server")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def source_state(ws: int) -> tuple[VMHandle, dict[str, Any], mmap.mmap]:
    """A paused memstress guest and its RAM, the working set filled with non-zero bytes."""
    mem = ws + SLACK
    vm = VMHandle.spawn(mem, "pc-source")
    image, args = load_program("memstress", {"ws": str(ws), "pattern": "seq", "values": "const", "rate": "0"})
    vm.boot(image, args, paused=True)
    state = vm.pause()
    ram = mmap.mmap(vm.ram_fd, mem)
    return vm, state, ram


def one_run(ws: int, mode: str) -> dict[str, float]:
    src, state, src_ram = source_state(ws)
    mem = src.ram_size
    boot_pages = written_extents(src.ram_fd, mem)  # image, boot block: what pre-copy delivered
    src_ram[DATA_ADDR:DATA_ADDR + ws] = (bytes(range(1, 256)) * (ws // 255 + 1))[:ws]
    dst_fd = guestram.create_memfd(mem, "pc-destination")
    try:
        for s, e in boot_pages:
            os.pwrite(dst_fd, src_ram[s:e], s)
        if mode == "present":
            os.pwrite(dst_fd, src_ram[DATA_ADDR:DATA_ADDR + ws], DATA_ADDR)
        dst = VMHandle.spawn(mem, "pc-destination", ram_fd=dst_fd)
        source = MemfdSource(src_ram, inline=mode == "inline", via_socket=mode == "thread+socket")
        reg = postcopy.request_register(dst)
        server = source.server = FaultServer(reg, dst_fd, source, present=written_extents(dst_fd, mem),
                                             zero=_holes(written_extents(src.ram_fd, mem), mem),
                                             readahead=15 if mode == "thread+readahead" else 0)
        try:
            with serving(server, source.readers()):
                dst.request("restore", state=state, timeout=30)
                t0 = time.perf_counter()
                if mode == "present":
                    _wait_pass(dst, ws)
                elif not server.wait_complete(300):
                    raise RuntimeError("the guest did not touch its whole working set in 300 s")
                elapsed = time.perf_counter() - t0
            stats = server.stats()
        finally:
            server.close()
            source.close()
            dst.close()
    finally:
        os.close(dst_fd)
        src_ram.close()
        src.close()
    faults = stats["postcopy-faults"]
    return {"seconds": elapsed, "faults": faults, "requests": stats["postcopy-requests"],
            "p50": stats["postcopy-latency-p50"] or 0.0, "p99": stats["postcopy-latency-p99"] or 0.0,
            "blocktime": stats["postcopy-blocktime"]}


def _holes(data: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The complement of ``data`` (sorted, merged) in [0, size): the source's zero pages."""
    out, pos = [], 0
    for s, e in data:
        if s > pos:
            out.append((pos, s))
        pos = e
    return out + ([(pos, size)] if pos < size else [])


def _wait_pass(vm: VMHandle, ws: int) -> None:
    """A guest without faults: until it has done as many stores as the working set has pages
    (memstress does about a dozen instructions a page; the instruction count says when)."""
    base = vm.status()["instructions"]
    pages = ws // PAGE
    per_page = 12
    while vm.status()["instructions"] - base < pages * per_page:
        time.sleep(0.001)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 16 MiB working set, one run")
    p.add_argument("--ws", default="64M", help="working set (memstress ws=)")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    from vmruntime.programs import parse_size

    ws = 16 << 20 if a.quick else parse_size(a.ws)
    runs = 1 if a.quick else a.runs
    modes = ("present", "inline", "thread", "thread+socket", "thread+readahead")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(runs):
        for mode in modes:  # interleaved: a machine's drift hits every configuration alike
            results[mode].append(one_run(ws, mode))
    base = median([r["seconds"] for r in results["present"]])
    rows = []
    for mode in modes:
        rs = results[mode]
        secs = median([r["seconds"] for r in rs])
        faults = median([r["faults"] for r in rs])
        if mode == "present":  # its faults are the stack's zero pages, not the working set's
            faults = 0
        per_fault = (secs - base) / faults * 1e6 if faults else 0.0
        rows.append([mode, f"{secs * 1000:.0f}", f"{faults:.0f}", f"{median([r['requests'] for r in rs]):.0f}",
                     f"{faults / secs:,.0f}" if faults else "-", f"{per_fault:.1f}" if faults else "-",
                     f"{median([r['p50'] for r in rs]):.3f}", f"{median([r['p99'] for r in rs]):.3f}",
                     f"{median([r['blocktime'] for r in rs]) / faults * 1000:.1f}" if faults else "-"])
    print(f"Post-copy fault serving: memstress over a {ws >> 20} MiB working set of holes, one pass, "
          f"median of {runs} run(s)\n")
    print(markdown_table(["source", "pass ms", "faults", "requests", "faults/s", "guest us per fault",
                          "request p50 ms", "request p99 ms", "block us per fault"], rows, "lrrrrrrrr"))


if __name__ == "__main__":
    main()
