"""Compressed batches without agents: the auto policy, the packer, the transport's receive path
over real sockets into real memfds, hostile payloads, and an older peer."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zstandard

from agent.migration import compress_policy, compression
from agent.migration.compress_policy import Sample
from agent.migration.compression import CompressionStats, Packer
from agent.migration.info import MigrationInfo, MigrationParams
from agent.migration.transport import Connection
from proto import codec
from proto.errors import LocalProtocolError, RemoteProtocolError
from proto.limits import COMPRESSION_VERSION, CURRENT_VERSION, MAX_PAYLOAD_SIZE
from proto.messages import DiskBatch, PageBatch, RangeBatch, Ready, from_fields, to_fields
from tests.conftest import MapGuestRam
from tests.links import socket_link

P = 4096
MiB = 1 << 20
CONST = Sample(raw=64 * MiB, compressed=64 * MiB // 100, seconds=64 * MiB / 1.5e9)  # pages that compress
RANDOM = Sample(raw=64 * MiB, compressed=64 * MiB + 1000, seconds=64 * MiB / 250e6)


def const_pages(size: int) -> bytes:
    """Pages like memstress values=const writes: one word repeated, a page number in each."""
    return b"".join((i.to_bytes(8, "little") + b"\x5a" * (P - 8)) for i in range(size // P))


# -- the policy --------------------------------------------------------------------------------------


def test_compression_pays_on_a_thin_link_for_pages_that_compress() -> None:
    assert compress_policy.pays(CONST, None, 50e6)
    assert compress_policy.pays(CONST, 2e9, 200e6)  # the cap bounds a faster send rate
    assert compress_policy.pays(CONST, 100e6)  # a slow link without a cap


def test_compression_does_not_pay_on_loopback_nor_for_random_pages() -> None:
    assert not compress_policy.pays(CONST, 3e9)  # the link is faster than zstd and the receiver
    assert not compress_policy.pays(CONST, 400e6)  # mostly the destination's own work, which stays
    assert not compress_policy.pays(RANDOM, None, 50e6)  # nothing saved, whatever the link
    assert not compress_policy.pays(RANDOM, None, 1e6)


def test_no_sample_or_no_link_rate_means_raw() -> None:
    assert not compress_policy.pays(None, None, 50e6)
    assert not compress_policy.pays(CONST, None)
    assert not compress_policy.pays(Sample(4096, 10, 1e-6), None, 50e6)  # too small to judge


def test_the_wire_time_is_the_cap_or_the_send_rate_less_the_receiver() -> None:
    assert compress_policy.wire_time(2e9, 50e6) == 1 / 50e6
    assert compress_policy.wire_time(None, 50e6) == 1 / 50e6
    assert compress_policy.wire_time(30e6, 50e6) == pytest.approx(1 / 30e6 - 1 / compress_policy.RECEIVE_SPEED)
    assert compress_policy.wire_time(None, None) is None
    assert compress_policy.wire_time(2 * compress_policy.RECEIVE_SPEED, None) is None  # all receiver


def test_the_break_even_link_rate_follows_the_formula() -> None:
    s = Sample(raw=10 * MiB, compressed=5 * MiB, seconds=10 * MiB / 400e6)  # half, at 400 MB/s
    # ratio * w + 1/c + 1/d < (1 - margin) * w  <=>  w > (1/c + 1/d) / (1 - margin - ratio)
    even = (1 - compress_policy.MARGIN - 0.5) / (1 / 400e6 + 1 / compress_policy.DECOMPRESS_SPEED)
    assert compress_policy.pays(s, None, even * 0.99) and not compress_policy.pays(s, None, even * 1.01)


# -- the packer --------------------------------------------------------------------------------------


class FakeSend:
    """send_raw that records what would go on the wire."""

    def __init__(self) -> None:
        self.frames: list[tuple[RangeBatch, bytes]] = []

    def __call__(self, batch: RangeBatch, pieces: list[Any]) -> int:
        # Raw pieces are not copied: a link as fast as memory (no copy at all).
        payload = b"".join(bytes(p) for p in pieces) if batch.compressed else b""
        self.frames.append((batch, payload))
        return sum(map(len, pieces)) + 100


def _batches(data: bytes, n: int) -> Iterator[tuple[PageBatch, list[Any]]]:
    size = len(data)
    for i in range(n):
        yield PageBatch(((i * size, (i + 1) * size),)), [memoryview(data)]


def test_zstd_mode_compresses_every_batch_that_shrinks() -> None:
    stats = CompressionStats()
    packer, send = Packer("zstd", stats), FakeSend()
    data = const_pages(4 * MiB)
    for batch, pieces in _batches(data, 3):
        packer.send(batch, pieces, send)
    packer.send(PageBatch(((64 * MiB, 65 * MiB),)), [os.urandom(MiB)], send)  # random: goes raw
    for batch, payload in send.frames[:3]:
        assert 0 < batch.compressed == len(payload) < len(data)
        assert zstandard.ZstdDecompressor().decompress(payload) == data
    assert send.frames[3][0].compressed == 0
    d = stats.to_dict()
    assert d["pages"] == 3 * 1024 and d["raw-size"] == 3 * len(data)
    assert d["compressed-size"] == sum(len(p) for _, p in send.frames[:3]) and d["compression-rate"] > 10


def test_none_mode_and_an_older_peer_never_compress() -> None:
    assert compression.effective_mode("zstd", COMPRESSION_VERSION - 1) == "none"
    assert compression.effective_mode("auto", COMPRESSION_VERSION) == "auto"
    packer, send = Packer("none", CompressionStats()), FakeSend()
    for batch, pieces in _batches(const_pages(4 * MiB), 4):
        packer.send(batch, pieces, send)
    assert all(b.compressed == 0 for b, _ in send.frames)


def test_auto_compresses_under_a_thin_cap_and_stays_raw_for_random_pages() -> None:
    stats = CompressionStats()
    packer, send = Packer("auto", stats, cap=50e6), FakeSend()
    packer.new_round()
    for batch, pieces in _batches(const_pages(4 * MiB), 6):
        packer.send(batch, pieces, send)
    assert send.frames[0][0].compressed == 0  # the first batch only measured
    assert all(b.compressed for b, _ in send.frames[1:]) and stats.active
    rnd = os.urandom(4 * MiB)
    for batch, pieces in _batches(rnd, compression.DECIDE_EVERY + 2):
        packer.send(batch, pieces, send)
    assert not stats.active  # the stretch of random pages turned it off
    assert send.frames[-1][0].compressed == 0


def test_auto_stays_raw_on_a_fast_link() -> None:
    stats = CompressionStats()
    packer = Packer("auto", stats)  # no cap: the link's rate is what the sends took (nothing here)
    send = FakeSend()
    for batch, pieces in _batches(const_pages(4 * MiB), 2 * compression.DECIDE_EVERY + 1):
        packer.send(batch, pieces, send)
    assert not stats.active and stats.pages == 0
    assert all(b.compressed == 0 for b, _ in send.frames)


def test_the_packer_charges_the_cap_with_wire_bytes() -> None:
    taken: list[int] = []

    class Bucket:
        def take(self, n: int) -> None:
            taken.append(n)

    packer = Packer("zstd", CompressionStats(), Bucket())
    send = FakeSend()
    for batch, pieces in _batches(const_pages(4 * MiB), 2):
        packer.send(batch, pieces, send)
    assert taken == [b.compressed for b, _ in send.frames] and max(taken) < MiB


def test_params_and_info_carry_compression() -> None:
    assert MigrationParams().compress == "auto"
    assert MigrationParams.from_dict({"compress": "zstd"}).compress == "zstd"
    with pytest.raises(ValueError, match="compress"):
        MigrationParams.from_dict({"compress": "lz4"})
    p = MigrationParams(compress="zstd")
    assert "compress" not in p.for_peer(COMPRESSION_VERSION - 1)
    assert p.for_peer(COMPRESSION_VERSION)["compress"] == "zstd"
    info = MigrationInfo("v", "out")
    assert "compression" not in info.to_dict()
    compression.packer(p, CURRENT_VERSION, info, threading.Event())
    assert info.to_dict()["compression"]["mode"] == "zstd"
    compression.packer(p, COMPRESSION_VERSION - 1, info, threading.Event())
    assert info.to_dict()["compression"]["mode"] == "none"


# -- the wire ----------------------------------------------------------------------------------------


def test_an_older_peer_never_sees_the_flag() -> None:
    plain = PageBatch(((0, 8192),))
    old = COMPRESSION_VERSION - 1
    assert "compressed" not in to_fields(plain, old) and to_fields(plain)["compressed"] == 0
    with pytest.raises(LocalProtocolError, match="compressed"):
        codec.encode(PageBatch(((0, 8192),), compressed=100), old)
    # An older frame with the field is refused, one without decodes with the flag off.
    with pytest.raises(Exception, match="unexpected field"):
        from_fields(PageBatch, {**to_fields(plain, old), "compressed": 5}, old)
    assert from_fields(PageBatch, to_fields(plain, old), old).compressed == 0


def test_the_declared_sizes_bound_a_compressed_batch() -> None:
    for bad in (PageBatch(((0, 8192),), compressed=8193),  # longer than the pages it stands for
                PageBatch(((0, MAX_PAYLOAD_SIZE + P),), compressed=1000),  # would inflate past the limit
                PageBatch(((0, 8192),), compressed=-1)):
        with pytest.raises(LocalProtocolError):
            codec.encode(bad)
    frame = codec.encode(PageBatch(((0, 8192),), compressed=100))
    dec = codec.Decoder(guest_size=1 << 20)
    dec.receive_data(frame + b"x" * 100)
    msg = dec.next_event()
    assert isinstance(msg, PageBatch) and msg.compressed == 100 and len(msg.payload) == 100


@pytest.fixture
def link() -> Iterator[tuple[Connection, Connection]]:
    with socket_link(CURRENT_VERSION) as ends:
        yield ends


class Sink:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pieces: list[tuple[int, int]] = []

    def received(self, offset: int, data: memoryview) -> None:
        self.pieces.append((offset, len(data)))


@pytest.mark.parametrize("through_sink", [True, False])
def test_compressed_pages_land_at_their_offsets(guest_ram: MapGuestRam, link: tuple[Connection, Connection],
                                                through_sink: bool) -> None:
    size = 8 * MiB
    _, src = guest_ram(size)
    dfd, dst = guest_ram(size)
    src[:] = const_pages(size)
    src[5 * MiB:6 * MiB] = os.urandom(MiB)
    sender, receiver = link
    receiver.guest_size = size
    stats = CompressionStats()
    sender.packer = Packer("zstd", stats)
    ranges = [(0, 3 * P), (MiB, 2 * MiB), (5 * MiB, 8 * MiB)]
    sink = Sink(dfd)
    got: list[Any] = []

    def recv() -> None:
        got.append(receiver.recv(memoryview(dst), sink if through_sink else None))
        got.append(receiver.recv(memoryview(dst)))

    t = threading.Thread(target=recv)
    t.start()
    wire = sender.send_pages(memoryview(src), ranges, [(2 * MiB, 3 * MiB)])
    sender.send(Ready())
    t.join()
    assert isinstance(got[0], PageBatch) and got[0].compressed and isinstance(got[1], Ready)
    for a, b in ranges:
        assert dst[a:b] == src[a:b]
    assert wire < 2 * MiB  # of 4 MiB + 12 KiB of pages
    assert stats.raw_size == 4 * MiB + 3 * P and stats.compressed_size < wire
    assert bool(sink.pieces) == through_sink  # the digest's pieces, with the memfd
    if through_sink:
        assert sum(n for _, n in sink.pieces) == 4 * MiB + 3 * P


def test_a_compressed_disk_batch_lands_in_the_image(link: tuple[Connection, Connection]) -> None:
    sender, receiver = link
    sender.packer = Packer("zstd", CompressionStats())
    image = bytearray(4 * MiB)
    data = const_pages(2 * MiB)

    class Disk:
        def check(self, ranges: Any) -> None:
            pass

        def write(self, offset: int, piece: memoryview) -> None:
            image[offset:offset + len(piece)] = piece

    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(receiver.recv(disk=Disk())))
    t.start()
    wire = sender.send_disk([(MiB, 3 * MiB)], [], [memoryview(data)])
    t.join()
    assert isinstance(got[0], DiskBatch) and got[0].compressed and wire < MiB
    assert image[MiB:3 * MiB] == data and image[:MiB] == bytes(MiB)


def _hostile(batch: PageBatch, payload: bytes, guest_ram: MapGuestRam,
             link: tuple[Connection, Connection]) -> tuple[Exception | None, bytes]:
    """Send ``batch`` and ``payload`` as raw bytes; what the receiver raised, and the RAM after."""
    _, dst = guest_ram(1 * MiB)
    dst[:] = b"\x11" * MiB
    sender, receiver = link
    receiver.guest_size = MiB
    sender.sock.sendall(codec.encode(batch, CURRENT_VERSION) + payload)
    try:
        receiver.recv(memoryview(dst))
    except RemoteProtocolError as e:
        return e, bytes(dst)
    return None, bytes(dst)


@pytest.mark.parametrize("case", ["corrupt", "short", "long", "bomb", "garbage"])
def test_a_bad_compressed_payload_is_a_protocol_error_and_writes_nothing(
        guest_ram: MapGuestRam, link: tuple[Connection, Connection], case: str) -> None:
    raw = const_pages(64 * P)
    good = zstandard.ZstdCompressor().compress(raw)
    payload = {
        "corrupt": good[:len(good) // 2] + bytes(b ^ 0xFF for b in good[len(good) // 2:]),
        "short": zstandard.ZstdCompressor().compress(raw[:-P]),  # inflates to one page less
        "long": zstandard.ZstdCompressor().compress(raw + raw[:P]),  # one page more than the ranges
        "bomb": zstandard.ZstdCompressor().compress(bytes(64 * MiB))[:len(good)].ljust(len(good), b"\0"),
        "garbage": os.urandom(len(good)),
    }[case]
    batch = PageBatch(((0, 64 * P),), compressed=len(payload))
    err, ram = _hostile(batch, payload, guest_ram, link)
    assert err is not None and "compressed payload" in str(err)
    assert ram == b"\x11" * MiB  # not one byte landed


def test_the_cli_passes_compress_and_the_summary_reports_it() -> None:
    from agent import cli, cli_migrate

    p = cli.build_parser()
    assert cli_migrate.migrate_params(p.parse_args(["migrate", "c1", "--to", "b:1", "--compress", "zstd"])) == {
        "compress": "zstd"}
    with pytest.raises(SystemExit):
        p.parse_args(["migrate", "c1", "--to", "b:1", "--compress", "lz4"])
    info = MigrationInfo("v", "out")
    info.compression = CompressionStats(mode="auto", pages=2560, raw_size=10 * MiB, compressed_size=MiB // 2)
    info.compression.active = True
    assert "zstd 20x" in cli_migrate.progress_line({**info.to_dict(), "status": "active"})
    text = cli_migrate.summary_text(info.to_dict())
    assert "compression (auto): 2560 pages in 0.5 MiB (20x)" in text
    assert "compression" not in cli_migrate.summary_text(MigrationInfo("v", "out").to_dict())


def test_a_wait_behind_compressed_batches_gets_their_apply_time() -> None:
    class Conn:
        stall_s = 4.0
        set_to: list[float] = []

        def set_stall_timeout(self, seconds: float) -> None:
            self.set_to.append(seconds)

    conn = Conn()
    packer, send = Packer("zstd", CompressionStats()), FakeSend()
    for batch, pieces in _batches(const_pages(4 * MiB), 25):  # 100 MiB of pages, a few KiB on the wire
        packer.send(batch, pieces, send)
    with packer.draining(conn):
        assert conn.set_to == [4.0 + 100 * MiB / compression.APPLY_SPEED]
    assert conn.set_to[-1] == 4.0
    with packer.draining(conn):  # the answer came: nothing left to wait for
        pass
    assert len(conn.set_to) == 2
