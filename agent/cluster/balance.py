"""A balancing plan (DRS-like): which VMs to move where so the hosts' load evens out (pure).

A host's load is its committed guest memory over its capacity (0..1). The plan is greedy with a
one-step look-ahead, in the spirit of Ganeti's hbal: at each step every move of one VM to another
host that fits it is scored by the variance of the hosts' load it would leave, and the best is
taken while the deviation is above the threshold's tolerance and the move lowers the sum of the
hosts' squared deviations by at least `MIN_GAIN` (hysteresis: no moves for crumbs). That sum, not
the deviation, measures the gain because one move changes the deviation of H hosts by about 1/H:
a fixed minimum on the deviation would forbid every move in a large cluster. A VM moves at most
once per plan, so a plan never moves a VM back and forth. Threshold 1 (conservative: only a large
imbalance) .. 5 (aggressive), as DRS's levels.

Cost: a step scores every (source host, VM size) pair against every host at once, as one numpy
array per block of pairs (the loads' sum and sum of squares, updated for the two hosts a move
touches), so a step is O(distinct pairs x hosts) in vectorised arithmetic
(docs/PERFORMANCE.md, "Cluster mode: etcd at COMMIT, and the balancing plan").
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from agent.cluster.model import HostRecord

# The deviation of the hosts' load a threshold level accepts without moving anything.
TOLERANCE = {1: 0.20, 2: 0.15, 3: 0.10, 4: 0.05, 5: 0.02}
# A move must lower the sum of the hosts' squared load deviations by this much: moving a VM of
# load share d from a host at load x to one at y gains 2d(x - y - d), so 0.005 asks, say, a VM of
# 5 % of a host to close a gap of at least 10 points.
MIN_GAIN = 0.005
MAX_MOVES = 20
BLOCK = 256  # candidates scored at once (a block x hosts array of float64 each)


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


class _Cluster:
    """The hosts as arrays (sorted by name, so ties go to the first name), updated move by move."""

    def __init__(self, hosts: Iterable[HostRecord]) -> None:
        live = sorted({h.name: h for h in hosts}.values(), key=lambda h: h.name)
        self.names = [h.name for h in live]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.cap = np.array([h.mem_total for h in live], dtype=np.float64)
        self.used = np.array([h.mem_used for h in live], dtype=np.float64)
        self.count = np.array([h.vms for h in live], dtype=np.int64)
        self.slots = np.array([h.slots for h in live], dtype=np.int64)
        self.open = np.array([not h.maintenance and h.mem_total > 0 for h in live], dtype=bool)
        self.inv_cap = np.divide(1.0, self.cap, out=np.zeros_like(self.cap), where=self.cap > 0)

    def loads(self) -> np.ndarray:
        return self.used * self.inv_cap

    def loads_by_name(self) -> dict[str, float]:
        return {n: float(x) for n, x in zip(self.names, self.loads(), strict=True)}

    def best_of(self, src: np.ndarray, mem: np.ndarray, loads: np.ndarray, s1: float,
                s2: float) -> tuple[np.ndarray, np.ndarray]:
        """For each candidate (a VM of ``mem[g]`` off host ``src[g]``): the sum of squared
        deviations (times H) the move to each host would leave (inf where the VM does not fit),
        as a candidates x hosts array, with the loads' sum and sum of squares updated for the two
        hosts a move touches."""
        h = len(self.names)
        fits = (self.open & (self.count < self.slots))[None, :] & ((self.cap - self.used)[None, :] >= mem[:, None])
        fits[np.arange(len(src)), src] = False
        out_src = mem * self.inv_cap[src]  # the load the VM leaves on its host
        into = mem[:, None] * self.inv_cap[None, :]  # ... and adds on each destination
        n1 = s1 - out_src[:, None] + into
        n2 = (s2 - loads[src] ** 2 + (loads[src] - out_src) ** 2)[:, None] + 2 * loads[None, :] * into + into ** 2
        return np.where(fits, n2 - n1 * n1 / h, np.inf), fits

    def move(self, src: int, dst: int, mem: int) -> None:
        self.used[src] -= mem
        self.used[dst] += mem
        self.count[src] -= 1
        self.count[dst] += 1


def plan(hosts: Iterable[HostRecord], vms: Iterable[PlacedVM], threshold: int = 3,
         max_moves: int = MAX_MOVES) -> Plan:
    """The moves that even the load out (see the module docstring); none when it is even enough."""
    if threshold not in TOLERANCE:
        raise ValueError(f"threshold must be 1..5, got {threshold}")
    cluster = _Cluster(hosts)
    h = len(cluster.names)
    # VMs of one size on one host are interchangeable for the score: one candidate each, the
    # first name (ties go to it), the rest waiting behind it.
    groups: dict[tuple[int, int], list[str]] = {}
    for vm in sorted(vms, key=lambda v: v.name):
        if vm.host in cluster.index:
            groups.setdefault((cluster.index[vm.host], vm.mem), []).append(vm.name)
    start = cluster.loads_by_name()
    moves: list[Move] = []
    while len(moves) < max_moves and h > 1:
        loads = cluster.loads()
        s1, s2 = float(loads.sum()), float((loads * loads).sum())
        current = s2 - s1 * s1 / h  # H times the variance: the sum of squared deviations
        if (max(current, 0.0) / h) ** 0.5 <= TOLERANCE[threshold]:
            break
        keys = [k for k, names in groups.items() if names]
        best: tuple[float, str, str, int, int, int] | None = None
        for at in range(0, len(keys), BLOCK):  # blocks bound the arrays' memory in a large cluster
            block = keys[at:at + BLOCK]
            score, _ = cluster.best_of(np.array([k[0] for k in block], dtype=np.int64),
                                       np.array([k[1] for k in block], dtype=np.float64), loads, s1, s2)
            low = float(score.min())
            if low == np.inf:
                continue
            for g, j in np.argwhere(score == low):  # exact ties: the first VM name, then host name
                key = (low, groups[block[g]][0], cluster.names[int(j)], block[g][0], int(j), block[g][1])
                if best is None or key[:3] < best[:3]:
                    best = key
        if best is None or best[0] > current - MIN_GAIN:
            break
        _, name, _, i, j, mem = best
        groups[(i, mem)].pop(0)
        cluster.move(i, j, mem)
        moves.append(Move(name, mem, cluster.names[i], cluster.names[j]))
    after = cluster.loads_by_name()
    return Plan(tuple(moves), _deviation(start), _deviation(after), start, after)
