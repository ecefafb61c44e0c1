"""Where one TLS stream's time goes: encryption, decryption, copies, Python calls per record.

Measured in one process, sender and receiver threads over loopback TCP (each blocking socket call
releases the GIL, as in the data path), 1 GiB of random bytes from a memfd into a fresh memfd the
way the destination writes guest RAM (``recv_into`` one reused 512 KiB buffer, then ``pwrite``):

* ``plaintext``: ``sendall`` of 4 MiB slices of the mapping / ``recv_into`` + ``pwrite``;
* ``TLS``: the same through ``ssl.SSLSocket`` (TLS 1.3, AES-256-GCM unless the peers pick
  otherwise); each ``recv_into`` returns at most one 16 KiB record;
* ``encrypt only`` / ``decrypt only``: the TLS records of the same bytes made and opened in
  memory (``ssl.SSLObject`` on ``MemoryBIO``s, no socket), each side's cost alone.

Each row gives the wall time and each thread's CPU time (``time.thread_time``), so the difference
between a TLS side and its plaintext side is what TLS adds there, and the calls the receiver made.

    .venv/bin/python -m bench.bench_tls_cost [--quick] [--size 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import tls
from agent.vms import close_guest_ram, create_guest_ram
from bench.bench_tls import make_pki

SLICE = 4 << 20
PIECE = 512 * 1024


def _filled(size: int) -> tuple[int, memoryview, object]:
    fd, mm = create_guest_ram("cost-src", size)
    block = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        mm[off:off + (1 << 20)] = block
    return fd, memoryview(mm), mm


def _pair(ctxs: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    out = socket.create_connection(lsock.getsockname()[:2])
    inc, _ = lsock.accept()
    lsock.close()
    if ctxs is None:
        return out, inc
    server = ctxs[1].wrap_socket(inc, server_side=True, do_handshake_on_connect=False)
    hs = threading.Thread(target=server.do_handshake)
    hs.start()
    client = ctxs[0].wrap_socket(out, server_hostname="127.0.0.1")
    hs.join()
    return client, server


def over_socket(src: memoryview, ctxs: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> dict[str, float]:
    """One transfer of ``src``: wall seconds, each side's CPU seconds, the receiver's calls."""
    size = len(src)
    tx, rx = _pair(ctxs)
    dst_fd, dst = create_guest_ram("cost-dst", size)
    got: dict[str, float] = {}

    def receive() -> None:
        buf = memoryview(bytearray(PIECE))
        c0, calls, pos = time.thread_time(), 0, 0
        while pos < size:
            n = min(PIECE, size - pos)
            have = 0
            while have < n:
                k = rx.recv_into(buf[have:n], n - have)
                if not k:
                    raise ConnectionError("closed early")
                have += k
                calls += 1
            os.pwrite(dst_fd, buf[:n], pos)
            pos += n
        got["recv_cpu"], got["calls"] = time.thread_time() - c0, calls

    t = threading.Thread(target=receive)
    w0 = time.perf_counter()
    t.start()
    c0 = time.thread_time()
    for off in range(0, size, SLICE):
        tx.sendall(src[off:off + SLICE])
    got["send_cpu"] = time.thread_time() - c0
    t.join()
    got["wall"] = time.perf_counter() - w0
    tx.close()
    rx.close()
    close_guest_ram(dst_fd, dst)
    return got


def in_memory(src: memoryview, ctxs: tuple[ssl.SSLContext, ssl.SSLContext]) -> dict[str, float]:
    """The records of ``src`` made and opened with no socket: encrypt and decrypt CPU seconds."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctxs[0].wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = ctxs[1].wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # the handshake, by hand
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    buf = memoryview(bytearray(PIECE))
    enc = dec = 0.0
    for off in range(0, len(src), SLICE):
        t = time.thread_time()
        client.write(src[off:off + SLICE])
        records = c_out.read()
        enc += time.thread_time() - t
        t = time.thread_time()
        s_in.write(records)
        left = SLICE
        while left:
            left -= int(server.read(min(PIECE, left), buf))  # type: ignore[call-overload]
        dec += time.thread_time() - t
    return {"encrypt": enc, "decrypt": dec}


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="1G", help="bytes to move (K, M, G suffixes), default 1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1 run")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.runs = "256M", 1
    size = int(a.size[:-1]) << {"K": 10, "M": 20, "G": 30}[a.size[-1]] if a.size[-1] in "KMG" else int(a.size)
    with tempfile.TemporaryDirectory(prefix="ferry-tls-cost-") as tmp:
        pki = make_pki(Path(tmp))
        ctxs = (tls.load(pki["A"]).client, tls.load(pki["B"]).server)
        fd, src, mm = _filled(size)
        plain, secure, memory = [], [], []
        for _ in range(a.runs):  # interleaved: the machine's load hits all alike
            plain.append(over_socket(src, None))
            secure.append(over_socket(src, ctxs))
            memory.append(in_memory(src, ctxs))
        src.release()
        close_guest_ram(fd, mm)  # type: ignore[arg-type]
    gib = size / 2**30
    print(f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}; {size >> 20} MiB, medians of {a.runs} runs, "
          "seconds per GiB\n")
    print("| path | wall | sender CPU | receiver CPU | receiver calls |")
    print("|---|--:|--:|--:|--:|")
    row: Callable[[str, list[dict[str, float]]], str] = lambda label, rs: (  # noqa: E731
        f"| {label} | {_median(rs, 'wall') / gib:.3f} | {_median(rs, 'send_cpu') / gib:.3f} | "
        f"{_median(rs, 'recv_cpu') / gib:.3f} | {_median(rs, 'calls') / gib:.0f} |")
    print(row("plaintext socket", plain))
    print(row("TLS socket", secure))
    print(f"| TLS records in memory | - | {_median(memory, 'encrypt') / gib:.3f} (encrypt) | "
          f"{_median(memory, 'decrypt') / gib:.3f} (decrypt) | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
