"""A balancing plan (DRS-like): which VMs to move where so the hosts' load evens out (pure).

A host's load is its committed guest memory over its capacity (0..1). The plan is greedy with a
one-step look-ahead, in the spirit of Ganeti's hbal: at each step every move of one VM to another
host that fits it is scored by the standard deviation of the hosts' load it would leave, and the
best is taken while it lowers that deviation by at least `MIN_GAIN` and the deviation is above
the threshold's tolerance. A VM moves at most once per plan, so a plan never moves a VM back and
forth. Threshold 1 (conservative: only a large imbalance) .. 5 (aggressive), as DRS's levels.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from agent.cluster.model import HostRecord

# The deviation of the hosts' load a threshold level accepts without moving anything.
TOLERANCE = {1: 0.20, 2: 0.15, 3: 0.10, 4: 0.05, 5: 0.02}
MIN_GAIN = 0.005  # a move must lower the deviation by this much (hysteresis: no moves for crumbs)
MAX_MOVES = 20


@dataclass(frozen=True, slots=True)
class PlacedVM:
    """A VM as the plan sees it: its name, its guest memory, the host that runs it."""

    name: str
    mem: int
    host: str


@dataclass(frozen=True, slots=True)
class Move:
    vm: str
    mem: int
    source: str
    destination: str


@dataclass(frozen=True, slots=True)
class Plan:
    moves: tuple[Move, ...]
    before: float  # standard deviation of the hosts' load now
    after: float  # ... once the moves are done
    load_before: dict[str, float]
    load_after: dict[str, float]


def _deviation(loads: dict[str, float]) -> float:
    return statistics.pstdev(loads.values()) if len(loads) > 1 else 0.0


def plan(hosts: Iterable[HostRecord], vms: Iterable[PlacedVM], threshold: int = 3,
         max_moves: int = MAX_MOVES) -> Plan:
    """The moves that even the load out (see the module docstring); none when it is even enough."""
    if threshold not in TOLERANCE:
        raise ValueError(f"threshold must be 1..5, got {threshold}")
    live = {h.name: h for h in hosts}
    used = {n: h.mem_used for n, h in live.items()}
    count = {n: h.vms for n, h in live.items()}
    placed = [vm for vm in vms if vm.host in live]

    def loads() -> dict[str, float]:
        return {n: used[n] / live[n].mem_total if live[n].mem_total else 0.0 for n in live}

    start = loads()
    moves: list[Move] = []
    moved: set[str] = set()
    current = _deviation(start)
    while len(moves) < max_moves and current > TOLERANCE[threshold]:
        best: tuple[float, PlacedVM, str] | None = None
        for vm in placed:
            if vm.name in moved:
                continue
            for dst, h in live.items():
                if dst == vm.host or h.maintenance or count[dst] >= h.slots or h.mem_total - used[dst] < vm.mem:
                    continue
                used[vm.host] -= vm.mem
                used[dst] += vm.mem
                score = _deviation(loads())
                used[vm.host] += vm.mem
                used[dst] -= vm.mem
                if best is None or (score, vm.name, dst) < (best[0], best[1].name, best[2]):
                    best = (score, vm, dst)
        if best is None or best[0] > current - MIN_GAIN:
            break
        score, vm, dst = best
        moves.append(Move(vm.name, vm.mem, vm.host, dst))
        moved.add(vm.name)
        used[vm.host] -= vm.mem
        used[dst] += vm.mem
        count[vm.host] -= 1
        count[dst] += 1
        current = score
    return Plan(tuple(moves), _deviation(start), current, start, loads())
