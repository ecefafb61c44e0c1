"""A stand-in guest for dirty-tracking tests and benchmarks (not used by ferry itself).

``python -m vmruntime.dirty.writer --memfd F --size N --ctl C`` maps the memfd
shared, like a VM process, and obeys msgpack commands on the SOCK_SEQPACKET
socket C (one map per packet, one reply each):

- ``register {backend, keep}``: vm_register over its mapping; replies
  ``{addr, length}`` with the uffd in SCM_RIGHTS, then closes its own copy
  as a VM process should (see :mod:`.register`), unless ``keep``;
- ``write {pages, value}``: stamps ``value`` (8 bytes, little endian) at the
  start of each page, in order;
- ``fill {pages, byte}``: sets every byte of each page;
- ``threads {pages, value, nthreads}``: like write, from several threads at once;
- ``stream {seed, npages}``: writes continuously ``stamp(i)`` into page
  ``stream_rng(seed).randrange(npages)`` (i-th draw) for i = 0, 1, ... until the next command
  arrives, which must be ``halt``; ``halt`` replies ``{count}``;
- ``time {pages | first, count, step; repeat}``: stamps the pages (a list,
  or ``count`` pages from ``first`` every ``step``) ``repeat`` times, replies
  ``{ns}`` (the guest's view of write cost, for benchmarks);
- ``exit``.

It is independent of the toy machine so that tracking is tested on its own.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack

from .extents import PAGE_SIZE
from .register import vm_register

_CHECK_EVERY = 64  # stream: writes between polls of the control socket


def stamp(i: int) -> bytes:
    """The 8 bytes the stream writes as its i-th write (never repeats, never zero)."""
    return (i + 1).to_bytes(8, "little")


def stream_rng(seed: int) -> random.Random:
    """A stream's page sequence: ``rng.randrange(npages)`` per write, from this generator."""
    return random.Random(seed)


class Writer:
    """Child side: the mapping of guest RAM and the command loop."""

    def __init__(self, memfd: int, size: int, ctl: socket.socket) -> None:
        self.size = size
        self.ctl = ctl
        self.ram = mmap.mmap(memfd, size)
        self.mv = memoryview(self.ram)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
        self.ticks = 0

    def reply(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        data = msgpack.packb(msg)
        if fds:
            socket.send_fds(self.ctl, [data], fds)
        else:
            self.ctl.send(data)

    def serve(self) -> None:
        while True:
            raw = self.ctl.recv(1 << 20)
            if not raw:
                return
            cmd = msgpack.unpackb(raw)
            if cmd["op"] == "exit":
                self.reply({"ok": True})
                return
            getattr(self, "op_" + cmd["op"])(cmd)

    def op_register(self, cmd: dict[str, Any]) -> None:
        fd = vm_register(cmd["backend"], self.addr, self.size)
        self.reply({"addr": self.addr, "length": self.size}, [fd] if fd is not None else None)
        if fd is not None and not cmd.get("keep"):
            os.close(fd)

    def op_write(self, cmd: dict[str, Any]) -> None:
        value = int(cmd["value"]).to_bytes(8, "little")
        for p in cmd["pages"]:
            self.mv[p * PAGE_SIZE : p * PAGE_SIZE + 8] = value
        self.reply({"ok": True})

    def op_fill(self, cmd: dict[str, Any]) -> None:
        page = bytes([cmd["byte"]]) * PAGE_SIZE
        for p in cmd["pages"]:
            self.mv[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = page
        self.reply({"ok": True})

    def op_stream(self, cmd: dict[str, Any]) -> None:
        rng = stream_rng(cmd["seed"])
        self.ctl.setblocking(False)
        i = 0
        try:
            while True:
                for _ in range(_CHECK_EVERY):
                    p = rng.randrange(cmd["npages"])
                    self.mv[p * PAGE_SIZE : p * PAGE_SIZE + 8] = stamp(i)
                    i += 1
                try:
                    raw = self.ctl.recv(1 << 16)
                    break
                except BlockingIOError:
                    continue
        finally:
            self.ctl.setblocking(True)
        assert msgpack.unpackb(raw)["op"] == "halt"
        self.reply({"count": i})

    def op_threads(self, cmd: dict[str, Any]) -> None:
        """Stamp ``value`` into ``pages`` from ``nthreads`` threads at once.

        The stores go through ctypes.memmove, which drops the GIL, so several
        threads can sit in write-protect faults at the same time (a Python
        store would fault while holding the GIL and serialize them).
        """
        value = ctypes.create_string_buffer(int(cmd["value"]).to_bytes(8, "little"), 8)
        n = int(cmd["nthreads"])
        shares = [cmd["pages"][i::n] for i in range(n)]
        threads = [threading.Thread(target=self._memmove_pages, args=(share, value)) for share in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.reply({"ok": True})

    def _memmove_pages(self, pages: list[int], value: ctypes.Array[ctypes.c_char]) -> None:
        for p in pages:
            ctypes.memmove(self.addr + p * PAGE_SIZE, value, 8)

    def op_time(self, cmd: dict[str, Any]) -> None:
        pages = cmd.get("pages") or range(cmd["first"], cmd["first"] + cmd["count"] * cmd["step"], cmd["step"])
        mv = self.mv
        self.ticks += 1  # a new value each call, so that content changes (for "hash")
        value = self.ticks.to_bytes(8, "little")
        t0 = time.perf_counter_ns()
        for _ in range(cmd["repeat"]):
            for p in pages:
                mv[p * PAGE_SIZE : p * PAGE_SIZE + 8] = value
        self.reply({"ns": time.perf_counter_ns() - t0})


class WriterProc:
    """Parent side: a writer child over a fresh memfd, and its control socket."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.memfd = os.memfd_create("ferry-dirty-writer", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "vmruntime.dirty.writer", "--memfd", str(self.memfd)]
        cmd += ["--size", str(size), "--ctl", str(child.fileno())]
        self.proc = subprocess.Popen(cmd, pass_fds=(self.memfd, child.fileno()))
        child.close()
        self.pid = self.proc.pid

    def send(self, op: str, **fields: Any) -> None:
        self.sock.send(msgpack.packb({"op": op, **fields}))

    def recv(self) -> dict[str, Any]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("writer process closed its control socket")
        reply: dict[str, Any] = msgpack.unpackb(data)
        return reply

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.recv()

    def register(self, backend: str, keep: bool = False) -> tuple[int, int, int | None]:
        """vm_register in the child; returns (addr, length, uffd or None)."""
        self.send("register", backend=backend, keep=keep)
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        reply = msgpack.unpackb(data)
        return reply["addr"], reply["length"], (fds[0] if fds else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        os.close(self.memfd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--memfd", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--ctl", type=int, required=True)
    args = ap.parse_args()
    ctl = socket.socket(fileno=args.ctl)
    Writer(args.memfd, args.size, ctl).serve()


if __name__ == "__main__":
    main()
