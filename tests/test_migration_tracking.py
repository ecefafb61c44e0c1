"""What the migration engine needs from dirty tracking, checked at the size it migrates at.

The pre-copy loop in miniature, with the shapes a real migration produces: a 32 MiB guest,
memstress writing random pages of a 16 MiB working set flat out, so each harvest holds hundreds
of scattered ranges across many 2 MiB page-table blocks. Copy the written extents, then what
each harvest names, pause, copy the last harvest: the copy must equal guest RAM, bit for bit.
A page missing here is a page a migration would lose (its RAM digest then fails the migration).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import SpawnVM, tracking
from vmruntime import dirty
from vmruntime.programs import load_program

MiB = 1 << 20
P = 4096
TRIALS = 4


@pytest.mark.timeout(120)
def test_no_write_is_lost_across_harvests_of_scattered_pages(spawn_vm: SpawnVM) -> None:
    backend = dirty.available_backends()[0]
    lost: list[str] = []
    for trial in range(TRIALS):
        missing = _precopy_once(spawn_vm, backend)
        if missing:
            lost.append(f"trial {trial}: {len(missing)} page(s), first at {missing[0] * P:#x}")
    assert lost == [], f"{backend} lost guest writes: {lost}"


def _precopy_once(spawn_vm: SpawnVM, backend: str) -> list[int]:
    vm = spawn_vm(ram_size=32 * MiB)
    image, args = load_program("memstress", {"ws": "16M", "rate": "0", "pattern": "random", "values": "random"})
    vm.boot(image, args)
    time.sleep(0.2)  # let it touch much of its working set first
    try:
        with tracking(vm, backend) as (_, tracker, ram):
            copy = bytearray(vm.ram_size)
            todo = dirty.written_extents(vm.ram_fd, vm.ram_size)
            for _ in range(5):
                for s, e in todo:
                    copy[s:e] = ram[s:e]
                todo = dirty.merge_ranges(tracker.harvest())
            vm.pause()
            for s, e in dirty.merge_ranges([*todo, *tracker.harvest()]):
                copy[s:e] = ram[s:e]
            return [p for p in range(vm.ram_size // P) if copy[p * P:(p + 1) * P] != ram[p * P:(p + 1) * P]]
    finally:
        vm.stop()
