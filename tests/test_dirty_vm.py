"""Dirty tracking over a real VM process running the toy machine (the seam with vmproc).

The VM process registers guest RAM on "track-start" (vm_register) and sends
the uffd; this test plays the agent: it copies what each harvest names while
``memstress`` runs, pauses, copies the last harvest, and the copy must equal
guest RAM, bit for bit: the pre-copy loop of a migration in miniature.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import SpawnVM, tracking
from vmruntime import dirty
from vmruntime.programs import load_program

MiB = 1 << 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", dirty.available_backends())
def test_precopy_copy_equals_guest_ram(spawn_vm: SpawnVM, backend: str) -> None:
    vm = spawn_vm(ram_size=4 * MiB)
    image, args = load_program("memstress", {"ws": "2M", "pattern": "random", "values": "random"})
    vm.boot(image, args, paused=True)
    with tracking(vm, backend) as (info, tracker, ram):
        assert info.backend == backend and info.length == 4 * MiB
        copy = bytearray(vm.ram_size)  # round 0: the written extents
        for s, e in dirty.written_extents(vm.ram_fd, vm.ram_size):
            copy[s:e] = ram[s:e]
        vm.resume()
        rounds = 0
        give_up = time.monotonic() + 60  # liveness bound only
        while rounds < 5 and time.monotonic() < give_up:
            time.sleep(0.01)
            ranges = tracker.harvest()
            for s, e in ranges:
                copy[s:e] = ram[s:e]
            rounds += bool(ranges)
        vm.pause()
        for s, e in tracker.harvest():
            copy[s:e] = ram[s:e]
        assert rounds == 5, "the guest kept writing, so every round found dirty pages"
        assert bytes(copy) == ram[:]
