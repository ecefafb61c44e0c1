"""Delaying TCP proxy: a fixed one-way delay each direction, no throughput cap, for the distance bench.

There is no ``tc netem`` on these hosts, so distance is emulated in user space:
every connection accepted on the listen address is relayed to the target, and
each chunk read on one side is stamped with its arrival time and written to the
other side ``delay`` seconds later (``delay`` = round trip / 2 per direction).
Reading never waits for the delay: a reader thread drains its socket into a
queue as fast as it can, a writer thread releases what is due, so the link
holds bandwidth x delay of data in flight (up to ``--max-queue`` per direction,
then the reader stops reading, which is TCP backpressure like any full link).

What this emulates and what it does not: the protocol sees the round trip (a
request/answer waits for it, a stop-and-wait per batch would crawl), but each
hop is a loopback TCP connection whose own round trip is microseconds, so the
end-to-end TCP window (SO_SNDBUF/SO_RCVBUF) never limits throughput here as it
would on a real 50 ms path. ``--window`` adds that limit explicitly: at most
that many bytes may be in flight (read and not yet "acknowledged", i.e. less
than one round trip old), the bound a real path puts on a TCP sender whose
window is that size.

Run as its own process (the bench does), so its GIL is not the bench's:

    .venv/bin/python -m bench.delay_proxy --listen 127.0.0.1:0 --target 127.0.0.1:7000 --rtt-ms 50

It prints ``listening HOST:PORT`` on stdout once ready, then serves until killed.

``--tun NETNS`` is the other mode, a delayed *link* rather than a relay, for what the proxy cannot
show (the TCP window): a network namespace ``NETNS`` joined to this one by two TUN devices, with
this process moving every IP packet from one to the other ``rtt/2`` later. TCP then runs end to
end over a real round trip (windows, slow start, buffers all count). It prints
``ready LOCAL_IP REMOTE_IP`` (REMOTE_IP is the address inside the namespace; run a process there
with ``ip netns exec NETNS``) and removes the namespace when killed (SIGTERM) or on exit. Root only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20  # bytes per recv: large reads keep the syscall count (and the GIL) low
SOCK_BUF = 4 << 20  # the proxy's own socket buffers: never its bottleneck at 0 ms
MAX_QUEUE = 64 << 20  # per direction: > 0.6 GiB/s x 25 ms (~16 MB), small enough that a sender cannot run far ahead
IOV_BATCH = 64  # most due chunks written with one sendmsg


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _big_buffers(sock: socket.socket) -> None:
    """Large socket buffers, forced past net.core.*mem_max when root (CAP_NET_ADMIN); best effort."""
    for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
                         (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Pipe:
    """One direction of one connection: a reader thread, a delay line, a writer thread."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, window: int | None,
                 max_queue: int, on_done: threading.Event) -> None:
        self.src, self.dst = src, dst
        self.delay = delay
        self.window = window
        self.max_queue = max_queue
        self.on_done = on_done
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, data); b"" is EOF
        self.queued = 0  # bytes in the queue (not yet written)
        self.in_flight: collections.deque[tuple[float, int]] = collections.deque()  # (acked at, n) for --window
        self.flying = 0
        self.cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _room(self) -> float:
        """0 when a read may proceed, else seconds to wait (window full) or -1 (queue full: wait on cond)."""
        if self.queued >= self.max_queue:
            return -1.0
        if self.window is not None:
            now = time.monotonic()
            while self.in_flight and self.in_flight[0][0] <= now:
                self.flying -= self.in_flight.popleft()[1]
            if self.flying >= self.window:
                return max(self.in_flight[0][0] - now, 1e-4)
        return 0.0

    def _read(self) -> None:
        try:
            while True:
                with self.cond:
                    while (wait := self._room()) != 0.0:
                        self.cond.wait(None if wait < 0 else wait)
                want = CHUNK if self.window is None else max(1, min(CHUNK, self.window - self.flying))
                data = self.src.recv(want)
                now = time.monotonic()
                with self.cond:
                    self.queue.append((now + self.delay, data))
                    self.queued += len(data)
                    if self.window is not None and data:
                        # acknowledged one round trip after it left the sender: the window opens again then
                        self.in_flight.append((now + 2 * self.delay, len(data)))
                        self.flying += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            with self.cond:
                self.queue.append((0.0, b""))
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue:
                        self.cond.wait()
                    due = self.queue[0][0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with self.cond:  # everything due now goes in one sendmsg
                    now = time.monotonic()
                    bufs: list[bytes] = []
                    while self.queue and self.queue[0][0] <= now and self.queue[0][1] and len(bufs) < IOV_BATCH:
                        bufs.append(self.queue.popleft()[1])  # an EOF marker (b"") stays until it is first
                    eof = not bufs
                if eof:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    return
                self._send_all(bufs)
                with self.cond:
                    self.queued -= sum(len(b) for b in bufs)
                    self.cond.notify_all()
        except OSError:
            for s in (self.src, self.dst):  # the peer is gone: end both directions
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            self.on_done.set()

    def _send_all(self, bufs: list[bytes]) -> None:
        views = [memoryview(b) for b in bufs]
        while views:
            n = self.dst.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


def relay(client: socket.socket, target: tuple[str, int], delay: float, window: int | None,
          max_queue: int) -> None:
    """Relay one accepted connection to ``target`` until both directions are done, then close both."""
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        _big_buffers(s)
    done = (threading.Event(), threading.Event())
    Pipe(client, upstream, delay, window, max_queue, done[0]).start()
    Pipe(upstream, client, delay, window, max_queue, done[1]).start()
    for d in done:
        d.wait()
    client.close()
    upstream.close()


def serve(listener: socket.socket, target: tuple[str, int], delay: float, window: int | None,
          max_queue: int = MAX_QUEUE) -> None:
    """Accept forever; each connection gets its own relay thread."""
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, target, delay, window, max_queue), daemon=True).start()


# --- the TUN link ---------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
TUN_MTU = 65000  # big packets: the forwarder's cost is per packet, so fewer of them
PACKET_MAX = 65536


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _forward(src: int, dst: int, delay: list[float]) -> None:
    """Move packets from tun ``src`` to tun ``dst``, each ``delay[0]`` seconds after it was read."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    cond = threading.Condition()

    def read() -> None:
        while True:
            try:
                pkt = os.read(src, PACKET_MAX)
            except OSError:  # the device went away with the namespace: the link is being removed
                return
            with cond:
                queue.append((time.monotonic() + delay[0], pkt))
                cond.notify()

    def write() -> None:
        while True:
            with cond:
                while not queue:
                    cond.wait()
                due, pkt = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):  # a full queue on the other side drops the packet, as a link would
                os.write(dst, pkt)

    for fn in (read, write):
        threading.Thread(target=fn, daemon=True).start()


def tun_link(netns: str, rtt_ms: float) -> None:
    """Set up the namespace and the two TUN devices, forward until SIGTERM or the end of stdin, then
    remove them. A line ``rtt MS`` on stdin changes the round trip (answered ``ok`` on stdout)."""
    n = os.getpid() % 250 + 1
    local, remote = f"10.251.{n}.1", f"10.251.{n}.2"
    a_name, b_name = f"fda{os.getpid()}"[:15], f"fdb{os.getpid()}"[:15]
    _ip("netns", "add", netns)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fa, fb = _open_tun(a_name), _open_tun(b_name)
        _ip("link", "set", b_name, "netns", netns)  # the open fd stays attached to the moved device
        _ip("addr", "add", local, "peer", remote, "dev", a_name)
        _ip("link", "set", a_name, "mtu", str(TUN_MTU), "up")
        _ip("-n", netns, "addr", "add", remote, "peer", local, "dev", b_name)
        _ip("-n", netns, "link", "set", b_name, "mtu", str(TUN_MTU), "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        sys.setswitchinterval(0.0005)  # four threads share the GIL: a due packet should not wait 5 ms for it
        delay = [rtt_ms / 2000.0]  # shared with the forwarders, changed in place
        _forward(fa, fb, delay)
        _forward(fb, fa, delay)
        print(f"ready {local} {remote}", flush=True)

        def commands() -> None:
            for line in sys.stdin:
                if line.startswith("rtt "):
                    delay[0] = float(line.split()[1]) / 2000.0
                    print("ok", flush=True)
            stop.set()

        threading.Thread(target=commands, daemon=True).start()
        stop.wait()
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0: any free one)")
    ap.add_argument("--target", help="HOST:PORT to relay each connection to")
    ap.add_argument("--tun", metavar="NETNS", help="instead of relaying: a delayed link to a new namespace NETNS")
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round trip to add (half each way)")
    ap.add_argument("--window", type=int, default=None,
                    help="bytes in flight at most per direction (an end-to-end TCP window); default: unlimited")
    ap.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="bytes buffered per direction at most")
    a = ap.parse_args(argv)
    if a.tun:
        tun_link(a.tun, a.rtt_ms)
        return
    if not a.target:
        ap.error("--target is required (or --tun)")
    listener = socket.create_server(parse_hostport(a.listen), backlog=64)
    _big_buffers(listener)  # inherited by accepted sockets, and the window scale is chosen at the SYN
    host, port = listener.getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    try:
        serve(listener, parse_hostport(a.target), a.rtt_ms / 2000.0, a.window, a.max_queue)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
