"""Shared helpers for the proto tests: one sample of every message, hypothesis strategies."""

from __future__ import annotations

import random
from dataclasses import fields
from typing import Any, get_type_hints

from hypothesis import strategies as st

import proto
from proto.messages import Message, Ranges

GUEST = 64 * proto.PAGE_SIZE

SAMPLES: dict[type[Message], Message] = {
    proto.Hello: proto.Hello(1, 1, "agent-a", "migration", b"n" * 32),
    proto.HelloReply: proto.HelloReply(1, "agent-b", b"s" * 32, b"m" * 32),
    proto.Auth: proto.Auth(b"c" * 32),
    proto.AuthOk: proto.AuthOk(),
    proto.Request: proto.Request(7, "vm-list", {"all": True, "names": ["a", "b"], "n": 3}),
    proto.Response: proto.Response(7, [{"name": "vm1", "mem": 1 << 20}]),
    proto.ErrorResponse: proto.ErrorResponse(7, "no-such-vm", "no VM named 'x'"),
    proto.Event: proto.Event(7, "console", b"hello\n"),
    proto.MigrateStart: proto.MigrateStart(
        "mig-1", "vm1", GUEST, proto.PAGE_SIZE, 1, ("base", "fill"), "uffd-wp-async", {"max_downtime_ms": 300}
    ),
    proto.MigrateAccept: proto.MigrateAccept("mig-1"),
    proto.MigrateRefuse: proto.MigrateRefuse("vm-exists", "a VM named vm1 already runs here"),
    proto.PageBatch: proto.PageBatch(((0, 8192), (12288, 16384)), ((8192, 12288), (20480, 32768))),
    proto.RoundEnd: proto.RoundEnd(2, 100, 5, 409600, 0.25, 40, 160.0),
    proto.DeviceState: proto.DeviceState({"version": 1, "regs": [1, 2, 3], "pc": 64, "console": b""}),
    proto.Digest: proto.Digest("xxh3_128", "00ff" * 8),
    proto.Ready: proto.Ready(),
    proto.Commit: proto.Commit("mig-1"),
    proto.Resumed: proto.Resumed(),
    proto.Abort: proto.Abort("cancelled", "operator cancelled"),
    proto.InDoubtQuery: proto.InDoubtQuery("vm1", "mig-1"),
    proto.InDoubtAnswer: proto.InDoubtAnswer("mig-1", True),
    proto.Sync: proto.Sync(3),
    proto.SyncAck: proto.SyncAck(3),
    proto.CodeHint: proto.CodeHint(0x100, bytes(range(256)) * 4, (0x110, 0x4FC, 0x180)),
    # Image offsets beyond the guest's RAM: a disk's batch is bounded by the disk, not by GUEST.
    proto.DiskBatch: proto.DiskBatch(((1 << 40, (1 << 40) + 8192),), ((0, 65536),)),
    proto.PostcopyDiscard: proto.PostcopyDiscard(((0, 8192), (16384, 20480))),
    proto.PostcopyStart: proto.PostcopyStart(3),
    proto.PageRequest: proto.PageRequest(8192, 4),
    proto.PostcopyAttach: proto.PostcopyAttach("m-1", "vm-1"),
    proto.StreamAttach: proto.StreamAttach("mig-1", 1, bytes(32)),
    proto.PostcopyDone: proto.PostcopyDone(3, 1),
    proto.PostcopyRecover: proto.PostcopyRecover("m-1", "vm-1"),
    proto.PostcopyLacking: proto.PostcopyLacking(((0, 8192), (16384, 20480))),
    proto.PostcopyRecovered: proto.PostcopyRecovered(3),
}


def sample_payload(batch: proto.RangeBatch) -> bytes:
    """Distinct bytes for each payload position, so misplaced data is visible."""
    return bytes(i % 251 for i in range(batch.payload_len))


@st.composite
def ranges(draw: st.DrawFn, guest_pages: int = 64, max_count: int = 8) -> Ranges:
    """Sorted, disjoint, page-aligned ranges inside a guest of ``guest_pages`` pages."""
    cuts = sorted(draw(st.sets(st.integers(0, guest_pages), max_size=2 * max_count)))
    pairs = list(zip(cuts[0::2], cuts[1::2], strict=False))
    return tuple((a * proto.PAGE_SIZE, b * proto.PAGE_SIZE) for a, b in pairs)


@st.composite
def near_valid_ranges(draw: st.DrawFn, guest_pages: int = 80) -> list[tuple[int, int]]:
    """A valid list with one small defect (or none): swapped, overlapping, empty, unaligned, outside."""
    pairs = list(draw(ranges(guest_pages, 10)))
    if not pairs:
        return pairs
    i = draw(st.integers(0, len(pairs) - 1))
    start, end = pairs[i]
    defect = draw(st.sampled_from(["none", "swap", "overlap", "empty", "unaligned", "outside", "reverse"]))
    if defect == "swap" and i + 1 < len(pairs):
        pairs[i], pairs[i + 1] = pairs[i + 1], pairs[i]
    elif defect == "overlap":
        pairs[i] = (start, end + proto.PAGE_SIZE)
    elif defect == "empty":
        pairs[i] = (start, start)
    elif defect == "unaligned":
        pairs[i] = (start, end + draw(st.integers(1, proto.PAGE_SIZE - 1)))
    elif defect == "outside":
        pairs[i] = (start, end + guest_pages * proto.PAGE_SIZE)
    elif defect == "reverse":
        pairs[i] = (end, start)
    return pairs


@st.composite
def page_batches(draw: st.DrawFn, guest_pages: int = 64) -> proto.PageBatch:
    """A valid batch: data and zero ranges disjoint, split from one set of ranges."""
    all_ranges = draw(ranges(guest_pages, 16))
    is_zero = draw(st.lists(st.booleans(), min_size=len(all_ranges), max_size=len(all_ranges)))
    data = tuple(r for r, z in zip(all_ranges, is_zero, strict=True) if not z)
    zeros = tuple(r for r, z in zip(all_ranges, is_zero, strict=True) if z)
    batch = proto.PageBatch(data, zeros)
    # Seeded bytes rather than st.binary: drawing up to 256 KiB from hypothesis is very slow.
    seed = draw(st.integers(0, 2**32 - 1))
    return proto.PageBatch(data, zeros, random.Random(seed).randbytes(batch.payload_len))


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
_plain = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=20))
_values = st.recursive(
    _plain,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)

_FIELD_STRATEGIES: dict[Any, st.SearchStrategy[Any]] = {
    int: st.integers(0, 2**63 - 1),
    str: _names,
    bytes: st.binary(min_size=32, max_size=32),
    bool: st.booleans(),
    float: st.floats(allow_nan=False),
    tuple[str, ...]: st.lists(_names, max_size=5).map(tuple),
    dict[str, Any]: st.dictionaries(st.text(max_size=8), _values, max_size=4),
    Any: _values,
}

_OVERRIDES: dict[tuple[type[Message], str], st.SearchStrategy[Any]] = {
    (proto.Hello, "min_version"): st.just(1),
    (proto.Hello, "max_version"): st.integers(1, 5),
    (proto.MigrateStart, "mem_size"): st.integers(1, 1 << 20).map(lambda p: p * proto.PAGE_SIZE),
    (proto.SyncAck, "held_s"): st.floats(0.0, 3600.0),
    (proto.PostcopyStart, "pages"): st.integers(0, 1 << 20),
    (proto.PostcopyRecovered, "pages"): st.integers(0, 1 << 20),
    (proto.StreamAttach, "index"): st.integers(1, proto.limits.MAX_STREAMS - 1),
}


@st.composite
def code_hints(draw: st.DrawFn) -> proto.CodeHint:
    """A valid hint: PCs inside its code."""
    start = draw(st.integers(0, 1 << 16))
    code = draw(st.binary(max_size=256))
    pcs = draw(st.lists(st.integers(start, start + len(code) - 1), max_size=20)) if code else []
    return proto.CodeHint(start, code, tuple(pcs))


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Valid instances of ``cls`` built from its field annotations."""
    if cls is proto.PageBatch:
        return page_batches()
    if cls is proto.DiskBatch:
        return page_batches().map(lambda b: proto.DiskBatch(b.ranges, b.zeros, b.payload))
    if cls is proto.CodeHint:
        return code_hints()
    if cls is proto.PostcopyDiscard:
        return ranges(64, 16).map(proto.PostcopyDiscard)
    if cls is proto.PostcopyLacking:
        return ranges(64, 16).map(proto.PostcopyLacking)
    if cls is proto.PageRequest:
        return st.builds(proto.PageRequest, st.integers(0, 31).map(lambda p: p * proto.PAGE_SIZE), st.integers(1, 32))
    hints = get_type_hints(cls)
    kwargs = {
        f.name: _OVERRIDES.get((cls, f.name), _FIELD_STRATEGIES[hints[f.name]]) for f in fields(cls)  # type: ignore[arg-type]
    }
    return st.builds(cls, **kwargs)


any_message = st.sampled_from(sorted(proto.MESSAGE_TYPES.values(), key=lambda c: c.TYPE)).flatmap(messages_of)
