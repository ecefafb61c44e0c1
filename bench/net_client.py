"""The load client of bench/bench_net.py, run inside the LAN's client namespace.

    ip netns exec NS python -m bench.net_client ADDR [--rate 1000] [--timeout 0.02] [--retries 3]
        [--ping-every 0.01]

Until its stdin closes: a UDP key-value request (`GET bench`) to ADDR:5000 every 1/rate s, each on
its own socket (netd's answers carry no request id, so the source port tells them apart), resent
after ``timeout`` without an answer up to ``retries`` times; and an ICMP echo every ``ping_every``
s. Every 100 ms it prints ``last T`` (T: CLOCK_MONOTONIC send time of the newest request answered
on its first try), so the bench can tell when the guest answers again. At the end one JSON line:
``requests`` as [send, answer or null, retries] and ``pings`` as [send, answered], times in
CLOCK_MONOTONIC seconds (one clock for every namespace, so the bench's times compare).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from tests.netclient import ICMP_ECHO_REPLY, echo_request

KV_PORT = 5000
PING_TIMEOUT = 1.0  # s: an echo unanswered by then is lost
STATUS_EVERY = 0.1  # s between `last T` lines


@dataclass
class Request:
    sock: socket.socket
    send: float
    deadline: float
    retries: int = 0
    first_answered: bool = False


@dataclass
class Load:
    addr: str
    rate: float
    timeout: float
    retries: int
    ping_every: float
    requests: list[list[float | int | None]] = field(default_factory=list)
    pings: list[list[float | bool]] = field(default_factory=list)
    last_first_try: float = 0.0

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        icmp.setblocking(False)
        sel.register(icmp, selectors.EVENT_READ, None)
        sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
        ident = os.getpid() & 0xFFFF
        inflight: dict[int, Request] = {}  # by fd
        pings: dict[int, int] = {}  # seq -> index in self.pings
        msg = b"GET bench"
        now = time.monotonic()
        next_req, next_ping, next_status = now, now, now
        seq = 0
        while True:
            now = time.monotonic()
            if now >= next_req:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.sendto(msg, (self.addr, KV_PORT))
                inflight[s.fileno()] = Request(s, now, now + self.timeout)
                sel.register(s, selectors.EVENT_READ, "kv")
                next_req += 1 / self.rate
                if next_req < now - 1:  # a long stall: do not burst to catch up
                    next_req = now
            if now >= next_ping:
                seq = (seq + 1) & 0xFFFF
                pings[seq] = len(self.pings)
                self.pings.append([now, False])
                try:
                    icmp.sendto(echo_request(ident, seq, b"ferry-bench"), (self.addr, 0))
                except OSError:
                    pass  # no neighbour yet: counted lost
                next_ping += self.ping_every
                if next_ping < now - 1:
                    next_ping = now
            for fd, r in list(inflight.items()):
                if now < r.deadline:
                    continue
                if r.retries < self.retries:
                    r.retries += 1
                    r.deadline = now + self.timeout
                    r.sock.sendto(msg, (self.addr, KV_PORT))
                else:
                    self._done(sel, inflight, fd, None)
            for sq, i in list(pings.items()):
                if now - float(self.pings[i][0]) > PING_TIMEOUT:
                    del pings[sq]
            if now >= next_status:
                print(f"last {self.last_first_try:.6f}", flush=True)
                next_status = now + STATUS_EVERY
            wake = min(next_req, next_ping, *(r.deadline for r in inflight.values()))
            for key, _ in sel.select(max(0.0, wake - time.monotonic())):
                if key.data == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        self._finish(sel, inflight)
                        return
                elif key.data == "kv":
                    self._answer(sel, inflight, key.fd)
                else:
                    self._echo(icmp, ident, pings)

    def _answer(self, sel: selectors.BaseSelector, inflight: dict[int, Request], fd: int) -> None:
        r = inflight[fd]
        try:
            r.sock.recv(2048)
        except OSError:
            return
        if r.retries == 0 and r.send > self.last_first_try:
            self.last_first_try = r.send
        self._done(sel, inflight, fd, time.monotonic())

    def _done(self, sel: selectors.BaseSelector, inflight: dict[int, Request], fd: int,
              answer: float | None) -> None:
        r = inflight.pop(fd)
        sel.unregister(r.sock)
        r.sock.close()
        self.requests.append([r.send, answer, r.retries])

    def _echo(self, icmp: socket.socket, ident: int, pings: dict[int, int]) -> None:
        while True:
            try:
                packet, (src, _) = icmp.recvfrom(2048)
            except BlockingIOError:
                return
            icmp_part = packet[(packet[0] & 0x0F) * 4:]
            if src != self.addr or len(icmp_part) < 8:
                continue
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp_part[:8])
            if kind == ICMP_ECHO_REPLY and rid == ident and rseq in pings:
                self.pings[pings.pop(rseq)][1] = True

    def _finish(self, sel: selectors.BaseSelector, inflight: dict[int, Request]) -> None:
        for r in inflight.values():  # still waiting: neither answered nor lost, left out
            sel.unregister(r.sock)
            r.sock.close()
        inflight.clear()
        self.requests.sort(key=lambda r: float(r[0] or 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.net_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("addr")
    ap.add_argument("--rate", type=float, default=1000.0, help="KV requests per second")
    ap.add_argument("--timeout", type=float, default=0.02, help="seconds before a request is resent")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--ping-every", type=float, default=0.01, help="seconds between ICMP echoes")
    a = ap.parse_args(argv)
    load = Load(a.addr, a.rate, a.timeout, a.retries, a.ping_every)
    load.run()
    print(json.dumps({"requests": load.requests, "pings": load.pings}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
