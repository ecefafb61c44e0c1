"""The destination's post-copy record (agent/migration/postcopy_record.py): its file, and the
received map a restarted agent rebuilds from it."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from agent.migration import postcopy_record as pr
from agent.migration.postcopy_faults import MISSING, PRESENT, ZERO
from agent.records import VMRecords
from vmruntime import guestram

P = pr.PAGE_SIZE


def _rec(stale: bytes = bytes(8), minor: bool = False, vm: str = "vm1") -> pr.PostcopyRecord:
    return pr.PostcopyRecord(vm=vm, migration_id="m-1", peer="src", mem=len(stale) * P, minor=minor,
                             addr=0x7f0000000000, vm_fd=7, stale=stale)


def test_a_record_survives_its_file(tmp_path: Path) -> None:
    stale = bytes([0, 1, 1, 0, 0, 0, 1, 0] * 1000)
    rec = _rec(stale, minor=True)
    pr.write(tmp_path, rec)
    assert pr.names(tmp_path) == ["vm1"]
    got = pr.read(tmp_path, "vm1")
    assert got == rec
    assert got is not None and got.stale_ranges()[:2] == [(1 * P, 3 * P), (6 * P, 7 * P)]
    pr.remove(tmp_path, "vm1")
    pr.remove(tmp_path, "vm1")  # idempotent
    assert pr.read(tmp_path, "vm1") is None and pr.names(tmp_path) == []
    assert pr.names(tmp_path / "absent") == []


@pytest.mark.parametrize("damage", [
    lambda raw: "not json",
    lambda raw: json.dumps({**raw, "format": 99}),
    lambda raw: json.dumps({k: v for k, v in raw.items() if k != "peer"}),
    lambda raw: json.dumps({**raw, "stale": "%%%"}),
    lambda raw: json.dumps({**raw, "mem": raw["mem"] * 2}),  # the map is shorter than guest RAM
    lambda raw: json.dumps({**raw, "vm": "other"}),
    lambda raw: json.dumps([raw]),
])
def test_a_damaged_record_is_refused_not_guessed(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    pr.write(tmp_path, _rec())
    path = tmp_path / "vm1.json"
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(pr.RecordError):
        pr.read(tmp_path, "vm1")


def test_bad_records_are_refused_at_construction() -> None:
    with pytest.raises(pr.RecordError):
        _rec(vm="../x")
    with pytest.raises(pr.RecordError):
        pr.PostcopyRecord(vm="v", migration_id="m", peer="p", mem=3 * P, minor=False, addr=1, vm_fd=3,
                          stale=bytes(2))


def _states(rebuilt: pr.Rebuilt, npages: int) -> list[int]:
    """The FaultServer's map the rebuilt ranges make (stale pages missing, as its constructor does)."""
    out = [MISSING] * npages
    for state, ranges in ((ZERO, rebuilt.zero), (PRESENT, rebuilt.present)):
        for a, b in ranges:
            out[a // P:b // P] = [state] * ((b - a) // P)
    for i, s in enumerate(rebuilt.stale_map):
        if s:
            out[i] = MISSING
    return out


def test_rebuild_missing_mode() -> None:
    # pages: 0 data, 1 hole (zero in pre-copy), 2 stale and a hole (not placed yet), 3 stale with data (placed since)
    rec = _rec(bytes([0, 0, 1, 1]))
    got = pr.rebuild(rec, data=[(0, P), (3 * P, 4 * P)], mapped=None)
    assert _states(got, 4) == [PRESENT, ZERO, MISSING, PRESENT]
    assert got.missing == 1


def test_rebuild_minor_mode_never_shows_an_unmapped_stale_copy() -> None:
    # pages: 0 clean data unmapped (mapped by map_present or a MINOR fault later), 1 stale data mapped (the fresh
    # copy, placed and maybe written by the guest), 2 stale data unmapped (the stale copy, or a fresh one the guest
    # never saw), 3 stale hole, 4 hole (zero)
    rec = _rec(bytes([0, 1, 1, 1, 0]), minor=True)
    got = pr.rebuild(rec, data=[(0, 3 * P)], mapped=bytes([0, 1, 0, 0, 0]))
    assert _states(got, 5) == [PRESENT, PRESENT, MISSING, MISSING, ZERO]
    # page 2 stays "present" to the FaultServer too: its copy is cached, written over before it is mapped
    assert any(a <= 2 * P < b for a, b in got.present)
    with pytest.raises(pr.RecordError, match="swap"):
        pr.rebuild(rec, data=[(0, 3 * P)], mapped=bytes(5), swap=True)
    with pytest.raises(pr.RecordError):
        pr.rebuild(rec, data=[(0, 3 * P)], mapped=None)


def test_mapped_pages_reads_this_process_pagemap() -> None:
    fd = os.memfd_create("pc-record-test")
    try:
        os.ftruncate(fd, 8 * P)
        mm = mmap.mmap(fd, 8 * P, mmap.MAP_SHARED)
        try:
            mm[2 * P] = 1
            mm[5 * P] = 1
            assert pr.mapped_pages(os.getpid(), guestram.mapping_address(mm), 8 * P) == bytes([0, 0, 1, 0, 0, 1, 0, 0])
        finally:
            mm.close()
    finally:
        os.close(fd)


def test_swap_active(tmp_path: Path) -> None:
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")
    assert not pr.swap_active(swaps)
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n/swapfile file 1024 0 -2\n")
    assert pr.swap_active(swaps)
    assert pr.swap_active(tmp_path / "absent")


def test_dir_for_an_agents_manager(tmp_path: Path) -> None:
    class Manager:
        records = VMRecords(tmp_path)

    assert pr.dir_for(Manager()) == tmp_path / "postcopy"
    assert pr.dir_for(object()) is None


class _Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, object]]] = []

    def warning(self, msg: str, **kw: object) -> None:
        self.warnings.append((msg, kw))


class _Recorder:
    def __init__(self, recs: list[dict[str, object]]) -> None:
        self.recs = recs

    async def read_all(self) -> list[dict[str, object]]:
        return self.recs


class _Manager:
    """What postcopy_readopt.take_up uses of the VM manager."""

    def __init__(self, state_dir: Path, recs: list[dict[str, object]]) -> None:
        self.records = VMRecords(state_dir)
        self.recorder = _Recorder(recs)
        self.log = _Log()
        self.held: dict[str, int] = {}

    def hold_name(self, name: str, mem: int, held: bool = True) -> None:
        if held:
            self.held[name] = mem
        else:
            self.held.pop(name, None)


@pytest.mark.asyncio
async def test_an_unusable_record_is_removed_and_the_vm_left_to_the_ordinary_adoption(tmp_path: Path) -> None:
    """A record whose VM process is gone, one without a VM record, a damaged one: none is taken up
    (the VMs go to the ordinary adoption), each is removed, no name stays held."""
    import asyncio

    from agent.migration import postcopy_readopt
    from agent.migration.common import LoopBridge

    records = pr.directory(tmp_path)
    for name in ("gone", "norecord", "damaged"):
        pr.write(records, _rec(vm=name))
    (records / "damaged.json").write_text("{")
    manager = _Manager(tmp_path, [{"name": "gone", "pid": os.getpid(), "pid-start": -1, "arrived-by": "m-1"},
                                  {"name": "damaged", "pid": os.getpid(), "pid-start": -1}])
    taken = await postcopy_readopt.take_up(manager, LoopBridge(asyncio.get_running_loop()))  # type: ignore[arg-type]
    assert taken == set()
    assert pr.names(records) == [] and manager.held == {}
    why = {kw["vm"]: str(kw["error"]) for _, kw in manager.log.warnings}
    assert "is gone" in why["gone"] and "no VM record" in why["norecord"] and "not JSON" in why["damaged"], why
