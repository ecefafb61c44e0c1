"""A small network client for the guest network tests, run inside a client namespace.

The tests start it with `ip netns exec NS python -m tests.netclient ...`, so the packets leave from
the client namespace's own interface (a veth on the host bridge the VM's TAP is on): the kernel
there resolves the guest's IP with ARP, which the guest answers. It prints one JSON line and exits
0; it never needs a tool that might be missing (no `ping` binary: ICMP through a raw socket).

    python -m tests.netclient ping ADDR [--count N] [--timeout S]
    python -m tests.netclient udp ADDR PORT MESSAGE [MESSAGE ...] [--timeout S]
    python -m tests.netclient capture IFACE ETHERTYPE [--count N] [--timeout S]

`capture` prints "ready" once its AF_PACKET socket is bound, then, after N frames of that
ethertype (or the timeout), one JSON line: each frame's Ethernet source and, for ARP/RARP, its
opcode and sender/target hardware and protocol addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import Any

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(head + payload), ident, seq) + payload


def ping(addr: str, count: int, timeout: float) -> dict[str, Any]:
    """Send ``count`` echo requests one after the other; count the replies that match and check out."""
    ident = os.getpid() & 0xFFFF
    received, bad = 0, 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for seq in range(count):
            payload = os.urandom(32)
            s.sendto(echo_request(ident, seq, payload), (addr, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    packet, (src, _) = s.recvfrom(2048)
                except TimeoutError:
                    break
                ihl = (packet[0] & 0x0F) * 4
                icmp = packet[ihl:]
                if src != addr or len(icmp) < 8:
                    continue
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if kind != ICMP_ECHO_REPLY or rid != ident or rseq != seq:
                    continue
                if checksum(icmp) != 0 or icmp[8:] != payload or checksum(packet[:ihl]) != 0:
                    bad += 1
                else:
                    received += 1
                break
    return {"sent": count, "received": received, "bad": bad}


def udp(addr: str, port: int, messages: list[str], timeout: float) -> dict[str, Any]:
    """Send each message as one datagram and wait for its answer (None when none came)."""
    replies: list[str | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for msg in messages:
            s.sendto(msg.encode(), (addr, port))
            try:
                data, _ = s.recvfrom(65535)
                replies.append(data.decode(errors="replace"))
            except TimeoutError:
                replies.append(None)
    return {"replies": replies}


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def capture(ifname: str, ethertype: int, count: int, timeout: float) -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as s:
        s.bind((ifname, ethertype))
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while len(frames) < count and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                frame = s.recv(2048)
            except TimeoutError:
                break
            info: dict[str, Any] = {"dst": _mac(frame[0:6]), "src": _mac(frame[6:12]), "len": len(frame)}
            if len(frame) >= 42:
                op, sha, spa, tha, tpa = struct.unpack("!6xH6s4s6s4s", frame[14:42])
                info.update(op=op, sha=_mac(sha), spa=socket.inet_ntoa(spa), tha=_mac(tha), tpa=socket.inet_ntoa(tpa))
            frames.append(info)
    return {"frames": frames}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.netclient", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping", help="ICMP echo through a raw socket")
    p.add_argument("addr")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--timeout", type=float, default=2.0)
    u = sub.add_parser("udp", help="one datagram per message, one answer awaited each")
    u.add_argument("addr")
    u.add_argument("port", type=int)
    u.add_argument("messages", nargs="+")
    u.add_argument("--timeout", type=float, default=2.0)
    c = sub.add_parser("capture", help="frames of one ethertype on an interface (AF_PACKET)")
    c.add_argument("ifname")
    c.add_argument("ethertype", type=lambda t: int(t, 0))
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    if a.cmd == "capture":
        result = capture(a.ifname, a.ethertype, a.count, a.timeout)
    elif a.cmd == "ping":
        result = ping(a.addr, a.count, a.timeout)
    else:
        result = udp(a.addr, a.port, a.messages, a.timeout)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
