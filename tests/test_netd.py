"""The guest program netd on a Machine with a NIC: ARP, ping, UDP echo, the key-value service,
its state across save/restore, and frames it must ignore without faulting.

Frames are built and checked here with struct and an independent Internet checksum, so a reply
with a wrong field or checksum fails the test.
"""

from __future__ import annotations

import mmap
import random
import struct
from collections.abc import Iterable
from typing import Any

import pytest

from tests.netclient import checksum  # the Internet checksum: 0 over a block that carries a right one
from tests.test_machine import FakeClock
from vmruntime import isa
from vmruntime.machine import Machine
from vmruntime.programs import load_program, parse_ipv4, program_arguments, program_help

RAM = 1 << 20
MAC = 0x525400123456
MAC_B = MAC.to_bytes(6, "big")
PEER_MAC = bytes.fromhex("02aabbccddee")
OTHER_MAC = bytes.fromhex("02aabbccdd00")
BROADCAST = b"\xff" * 6
IP = "10.0.0.2"
IP_B = bytes([10, 0, 0, 2])
PEER_IP = bytes([10, 0, 0, 1])
ARP_CACHE = isa.DATA_ADDR + 2 * 16 * 2048  # after the RX and TX rings (docs/isa.md, netd)
KV_ENTRY = 8 + 32 + 256


# ---- frames ----


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + spa + tha + tpa


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0x1234, frag: int = 0,
         options: bytes = b"", total: int | None = None, fix_checksum: bool = True) -> bytes:
    ihl = 5 + len(options) // 4
    length = 4 * ihl + len(payload) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, ident, frag, 64, proto, 0, src, dst) + options
    if fix_checksum:
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(ident: int, seq: int, data: bytes, kind: int = 8) -> bytes:
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ip_frame(proto: int, l4: bytes, **kw: Any) -> bytes:
    return eth(MAC_B, PEER_MAC, 0x0800, ipv4(PEER_IP, IP_B, proto, l4, **kw))


def ping(ident: int, seq: int, data: bytes) -> bytes:
    return ip_frame(1, icmp_echo(ident, seq, data))


def udp_frame(dport: int, payload: bytes, sport: int = 40000) -> bytes:
    return ip_frame(17, udp(sport, dport, payload))


def parse_ip_reply(frame: bytes, proto: int) -> bytes:
    """Check the Ethernet and IPv4 headers of a reply to PEER; return the L4 bytes."""
    assert frame[:6] == PEER_MAC and frame[6:12] == MAC_B and frame[12:14] == b"\x08\x00"
    hdr = frame[14:34]
    ver_ihl, _, total, _, _, ttl, p, _, src, dst = struct.unpack("!BBHHHBBH4s4s", hdr)
    assert ver_ihl == 0x45 and p == proto and ttl == 64
    assert src == IP_B and dst == PEER_IP
    assert checksum(hdr) == 0, "IPv4 header checksum"
    assert 14 + total <= len(frame) and len(frame) >= 60
    return frame[34:14 + total]


def parse_udp_reply(frame: bytes, dport: int, sport: int = 40000) -> bytes:
    l4 = parse_ip_reply(frame, 17)
    src, dst, length, csum = struct.unpack("!HHHH", l4[:8])
    assert (src, dst, csum) == (dport, sport, 0) and length == len(l4)
    return l4[8:]


# ---- the machine ----


def boot(args: dict[str, str] | None = None, ram: int = RAM, nic: bool = True) -> Machine:
    image, boot_args = load_program("netd", {"ip": IP, **(args or {})})
    m = Machine.boot(mmap.mmap(-1, ram), image, boot_args, FakeClock(), nic_mac=MAC if nic else None)
    settle(m)
    return m


def settle(m: Machine) -> None:
    """Run until the guest waits for the next frame (or stops)."""
    for _ in range(1000):
        m.run(1 << 20)
        if m.status != "running" or m.wait_until_ns is not None:
            return
    raise AssertionError("netd never went idle")


def exchange(m: Machine, *frames: bytes) -> list[bytes]:
    for f in frames:
        assert m.nic_deliver(f)
    settle(m)
    assert m.status == "running", m.fault_reason
    return m.nic_take_tx()


def kv(m: Machine, request: bytes) -> bytes:
    (reply,) = exchange(m, udp_frame(5000, request))
    return parse_udp_reply(reply, 5000)


@pytest.fixture
def netd() -> Machine:
    return boot()


# ---- start ----


def test_banner_and_idle(netd: Machine) -> None:
    assert netd.console_drain() == b"netd: up ip=10.0.0.2/24 mac=52:54:00:12:34:56 kv-entries=221\n"
    assert netd.status == "running" and netd.wait_until_ns is not None
    assert netd.nic_take_tx() == []


def test_no_nic_or_too_little_ram_halts_with_a_line() -> None:
    m = boot(nic=False)
    assert m.status == "halted" and m.console_drain() == b"netd: no NIC\n"
    m = boot(ram=0x30000)
    assert m.status == "halted" and m.console_drain() == b"netd: RAM too small\n"


def test_arguments() -> None:
    assert program_arguments("netd") == ("ip", "prefix", "kv")
    assert parse_ipv4("10.0.0.2") == 0x0A000002 == parse_ipv4(str(0x0A000002))
    for bad in ("10.0.0", "10.0.0.256", "1.2.3.4.5", str(1 << 32), "x"):
        with pytest.raises(ValueError, match="IPv4"):
            parse_ipv4(bad)
    with pytest.raises(ValueError, match="needs ip="):
        load_program("netd", {})
    with pytest.raises(ValueError, match="at most 32"):
        load_program("netd", {"ip": IP, "prefix": "33"})
    _, args = load_program("netd", {"ip": "192.168.1.7", "kv": "1K"})
    assert args == {"ip": 0xC0A80107, "prefix": 24, "kv": 1024}
    assert "ip= (its IPv4 address, a.b.c.d, required)" in program_help("netd")


# ---- ARP ----


def test_arp_request_gets_a_reply(netd: Machine) -> None:
    request = eth(BROADCAST, PEER_MAC, 0x0806, arp(1, PEER_MAC, PEER_IP, bytes(6), IP_B))
    (reply,) = exchange(netd, request)
    assert len(reply) == 60 and reply[42:] == bytes(18)
    assert reply[:42] == eth(PEER_MAC, MAC_B, 0x0806, arp(2, MAC_B, IP_B, PEER_MAC, PEER_IP))
    info = netd.nic_info()
    assert info["rx-packets"] == 1 and info["tx-packets"] == 1


def test_arp_for_others_and_arp_replies_are_not_answered(netd: Machine) -> None:
    other = eth(BROADCAST, PEER_MAC, 0x0806, arp(1, PEER_MAC, PEER_IP, bytes(6), bytes([10, 0, 0, 9])))
    answer = eth(MAC_B, PEER_MAC, 0x0806, arp(2, PEER_MAC, PEER_IP, MAC_B, IP_B))
    assert exchange(netd, other, answer) == []


def arp_cache(m: Machine) -> dict[int, bytes]:
    raw = bytes(m._ram[ARP_CACHE:ARP_CACHE + 8 * 16])
    out = {}
    for i in range(8):
        key, mac = struct.unpack_from("<QQ", raw, 16 * i)
        if key:
            assert key >> 32 == 1
            out[key & 0xFFFFFFFF] = mac.to_bytes(6, "big")
    return out


def test_arp_cache_learns_senders_round_robin(netd: Machine) -> None:
    for host in range(1, 11):  # ten senders into eight entries: the first two are replaced
        mac = bytes([2, 0, 0, 0, 0, host])
        frame = eth(BROADCAST, mac, 0x0806, arp(1, mac, bytes([10, 0, 0, 100 + host]), bytes(6), IP_B))
        assert len(exchange(netd, frame)) == 1
    cache = arp_cache(netd)
    assert cache == {0x0A000064 + h: bytes([2, 0, 0, 0, 0, h]) for h in range(3, 11)}
    # a sender already cached updates its entry instead of taking a new one
    moved = bytes([2, 0, 0, 0, 0, 0x77])
    exchange(netd, eth(BROADCAST, moved, 0x0806, arp(1, moved, bytes([10, 0, 0, 110]), bytes(6), IP_B)))
    assert arp_cache(netd)[0x0A00006E] == moved and len(arp_cache(netd)) == 8
    # IPv4 senders are learnt too
    exchange(netd, ping(1, 1, b"x"))
    assert arp_cache(netd)[0x0A000001] == PEER_MAC


# ---- ICMP ----


@pytest.mark.parametrize("data", [b"", b"a", b"0123456789abcdef" * 3 + b"xyz", bytes(range(256)) * 5 + bytes(192)])
def test_ping_gets_an_echo_reply(netd: Machine, data: bytes) -> None:
    (reply,) = exchange(netd, ping(0xBEEF, 7, data))
    icmp = parse_ip_reply(reply, 1)
    assert checksum(icmp) == 0, "ICMP checksum"
    kind, code, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    assert (kind, code, ident, seq) == (0, 0, 0xBEEF, 7) and icmp[8:] == data


def test_padded_frames_are_read_by_their_ip_length(netd: Machine) -> None:
    (reply,) = exchange(netd, ping(3, 4, b"ab") + bytes(16))
    assert parse_ip_reply(reply, 1)[8:] == b"ab"
    (reply,) = exchange(netd, udp_frame(7, b"") + bytes(18))
    assert parse_udp_reply(reply, 7) == b""


def test_pings_across_ring_wraps_and_in_bursts(netd: Machine) -> None:
    for seq in range(40):
        (reply,) = exchange(netd, ping(1, seq, b"p%d" % seq))
        assert struct.unpack("!H", parse_ip_reply(reply, 1)[6:8])[0] == seq
    replies = exchange(netd, *(ping(2, seq, b"burst") for seq in range(10)))
    assert [struct.unpack("!H", parse_ip_reply(r, 1)[6:8])[0] for r in replies] == list(range(10))


def test_a_frame_delivered_at_any_point_of_the_loop_is_served_without_waiting(netd: Machine) -> None:
    """The host delivers between run() calls; wherever a slice ends, the frame must not sleep for 1 s."""
    # The FakeClock never moves: a frame left waiting for the deadline would never be answered.
    for slices in range(1000):
        assert netd.nic_deliver(ping(5, slices, b"first"))
        for _ in range(slices):
            netd.run(1)  # at most one block per call: stops the guest at each block boundary in turn
        if netd.wait_until_ns is not None:
            break
        assert netd.nic_deliver(ping(6, slices, b"second"))
        settle(netd)
        replies = netd.nic_take_tx()
        assert [parse_ip_reply(r, 1)[8:] for r in replies] == [b"first", b"second"], slices
    else:
        raise AssertionError("netd never reached its wait")
    assert slices > 10
    netd.nic_take_tx()


def test_icmp_other_than_echo_request_is_ignored(netd: Machine) -> None:
    bad_sum = bytearray(icmp_echo(1, 1, b"abc"))
    bad_sum[2] ^= 1
    assert exchange(netd, ip_frame(1, icmp_echo(1, 1, b"abc", kind=0)), ip_frame(1, bytes(bad_sum))) == []


# ---- UDP ----


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(256)) * 5 + bytes(192)])
def test_udp_echo(netd: Machine, payload: bytes) -> None:
    (reply,) = exchange(netd, udp_frame(7, payload, sport=5555))
    assert parse_udp_reply(reply, 7, sport=5555) == payload


def test_udp_to_other_ports_is_ignored(netd: Machine) -> None:
    assert exchange(netd, udp_frame(8, b"x"), udp_frame(4999, b"GET a")) == []


# ---- the key-value service ----


def test_kv_put_get_del(netd: Machine) -> None:
    assert kv(netd, b"GET colour") == b"NOTFOUND\n"
    assert kv(netd, b"PUT colour deep blue sea\n") == b"OK\n"
    assert kv(netd, b"GET colour\n") == b"VALUE deep blue sea\n"
    assert kv(netd, b"PUT colour red\r\n") == b"OK\n"
    assert kv(netd, b"GET colour") == b"VALUE red\n"
    assert kv(netd, b"PUT shape ") == b"OK\n"  # an empty value
    assert kv(netd, b"GET shape") == b"VALUE \n"
    assert kv(netd, b"DEL colour") == b"OK\n"
    assert kv(netd, b"GET colour") == b"NOTFOUND\n"
    assert kv(netd, b"DEL colour") == b"NOTFOUND\n"
    assert kv(netd, b"GET shape") == b"VALUE \n"


def test_kv_limits(netd: Machine) -> None:
    key, value = b"k" * 32, bytes(range(1, 256)) + b"!"
    assert kv(netd, b"PUT " + key + b" " + value) == b"OK\n"
    assert kv(netd, b"GET " + key) == b"VALUE " + value + b"\n"
    assert kv(netd, b"PUT " + key + b" " + value + b"!") == b"ERR value too long\n"
    assert kv(netd, b"GET " + key) == b"VALUE " + value + b"\n"
    assert kv(netd, b"PUT " + key + b"k 1") == b"ERR bad key\n"
    assert kv(netd, b"GET " + key + b"k") == b"ERR bad key\n"
    assert kv(netd, b"PUT  1") == b"ERR bad key\n"
    for bad in (b"", b"\n", b"GET", b"GET ", b"get a", b"PUT a", b"GET a b", b"DEL a b", b"LIST a", b"GETa"):
        assert kv(netd, bad) == (b"ERR bad key\n" if bad == b"GET " else b"ERR bad command\n"), bad


def test_kv_table_full() -> None:
    m = boot({"kv": str(2 * KV_ENTRY + 100)})
    assert m.console_drain().endswith(b" kv-entries=2\n")
    assert kv(m, b"PUT a 1") == b"OK\n"
    assert kv(m, b"PUT b 2") == b"OK\n"
    assert kv(m, b"PUT c 3") == b"ERR full\n"
    assert kv(m, b"PUT a 11") == b"OK\n"  # replacing needs no room
    assert kv(m, b"DEL a") == b"OK\n"
    assert kv(m, b"PUT c 3") == b"OK\n"
    assert [kv(m, b"GET " + k) for k in (b"a", b"b", b"c")] == [b"NOTFOUND\n", b"VALUE 2\n", b"VALUE 3\n"]


def test_kv_table_clamped_to_ram() -> None:
    m = boot({"kv": "16M"}, ram=0x31000 + 10 * KV_ENTRY)
    assert m.console_drain().endswith(b" kv-entries=10\n")
    for i in range(10):
        assert kv(m, b"PUT k%d %d" % (i, i)) == b"OK\n"
    assert kv(m, b"PUT k10 10") == b"ERR full\n"
    assert kv(m, b"GET k9") == b"VALUE 9\n"


def test_kv_values_survive_save_and_restore(netd: Machine) -> None:
    assert kv(netd, b"PUT city Lisbon") == b"OK\n"
    state = netd.save_state()
    ram = mmap.mmap(-1, RAM)
    ram[:] = netd._ram[:]
    restored = Machine.restore(ram, state, FakeClock(5_000_000_000))
    assert kv(restored, b"GET city") == b"VALUE Lisbon\n"
    assert kv(restored, b"PUT town Porto") == b"OK\n"
    assert kv(restored, b"GET town") == b"VALUE Porto\n"


# ---- frames to ignore ----


def garbage_frames() -> Iterable[bytes]:
    good_ping, good_udp = ping(1, 1, b"abcdefgh"), udp_frame(7, b"echo me")
    good_arp = eth(BROADCAST, PEER_MAC, 0x0806, arp(1, PEER_MAC, PEER_IP, bytes(6), IP_B))
    for good in (good_ping, good_udp, good_arp):
        for n in range(14, len(good)):
            yield good[:n]  # truncated
    yield eth(OTHER_MAC, PEER_MAC, 0x0800, good_ping[14:])  # not its MAC
    yield eth(MAC_B, PEER_MAC, 0x86DD, good_ping[14:])  # IPv6
    yield eth(MAC_B, PEER_MAC, 0x0801, good_ping[14:])
    yield eth(BROADCAST, PEER_MAC, 0x0806, arp(1, PEER_MAC, PEER_IP, bytes(6), IP_B)[:27])
    yield eth(BROADCAST, PEER_MAC, 0x0806, b"\x00\x06" + arp(1, PEER_MAC, PEER_IP, bytes(6), IP_B)[2:])
    icmp = icmp_echo(1, 1, b"abcdefgh")
    for ihl in (0, 4, 15):  # bad IPv4 header lengths, with a checksum right for the first 20 bytes
        frame = bytearray(ip_frame(1, icmp))
        frame[14] = 0x40 | ihl
        frame[24:26] = b"\0\0"
        frame[24:26] = struct.pack("!H", checksum(bytes(frame[14:34])))
        yield bytes(frame)
    frame = bytearray(ip_frame(1, icmp))
    frame[14] = 0x65  # version 6
    yield bytes(frame)
    yield ip_frame(1, icmp, total=19)
    yield ip_frame(1, icmp, total=20 + len(icmp) + 1)  # longer than the frame
    yield ip_frame(1, icmp, total=0xFFFF)
    yield ip_frame(1, icmp, fix_checksum=False)
    yield ip_frame(1, icmp, frag=0x2000)  # more fragments
    yield ip_frame(1, icmp, frag=0x0010)  # a later fragment
    yield eth(MAC_B, PEER_MAC, 0x0800, ipv4(PEER_IP, bytes([10, 0, 0, 3]), 1, icmp))  # not its IP
    yield ip_frame(6, b"\0" * 20)  # TCP
    bad_len = bytearray(udp(40000, 7, b"abc"))
    for length in (0, 7, 12):
        bad_len[4:6] = struct.pack("!H", length)
        yield ip_frame(17, bytes(bad_len))
    yield ip_frame(1, icmp[:7])
    rnd = random.Random(17)
    for _ in range(300):
        n = rnd.randrange(14, 200)
        body = bytes(rnd.randrange(256) for _ in range(n))
        yield MAC_B + body[6:12] + rnd.choice([b"\x08\x00", b"\x08\x06"]) + body[14:]


def test_malformed_frames_are_ignored_without_a_fault(netd: Machine) -> None:
    frames = list(garbage_frames())
    for i in range(0, len(frames), 8):
        assert exchange(netd, *frames[i:i + 8]) == [], i
    assert netd.status == "running"
    (reply,) = exchange(netd, ping(9, 9, b"still here"))
    assert parse_ip_reply(reply, 1)[8:] == b"still here"
    info = netd.nic_info()
    assert info["rx-packets"] == len(frames) + 1 and info["tx-packets"] == 1


def test_options_in_the_ip_header_are_skipped(netd: Machine) -> None:
    (reply,) = exchange(netd, ip_frame(17, udp(40000, 7, b"opt"), options=b"\x01\x01\x01\x00"))
    assert parse_udp_reply(reply, 7) == b"opt"
