"""Disks: copy-storage throughput against cp and QEMU's mirror, write-rate sweep, downtime a disk adds.

Two agents on loopback, both allowing one shared directory (``--disk-dirs``), and three parts:

1. **Copy throughput.** A sparse raw image (8 GiB, 2 GiB of random data in 64 MiB extents spread
   evenly across it; 1 GiB / 256 MiB with ``--quick``), made once; an ``idle`` 16 MiB VM on it is
   migrated A->B->A with ``--copy-storage`` (the image moves with it, into the other agent's
   directory, ``--disk-dir``): once in the agents' STATE_DIR/disks on this host's file system, once
   on tmpfs when memory allows (no device, no dirty-page throttling: the copiers' own speed).
   Interleaved with each migration: ``cp --sparse=always --reflink=never`` of the
   same image to a new file followed by ``fdatasync`` (the migration's destination syncs its copy
   too), and QEMU's ``blockdev-mirror`` with ``sync: full`` of the image to a new sparse target
   file (its own QEMU process, KVM when /dev/kvm works, the image a read-only ``-blockdev``; timed
   from the mirror command to the job's ``ready``, and to the job's end, cancelled once ready, which
   leaves the target a full copy, with the target ``fdatasync``-ed). The image is read once before
   timing; all three read it from the page cache and write through the page cache. Every copy is
   read back and compared with the image after its timing.
2. **Write-rate sweep.** ``diskstress`` (pattern=random, ws=64M, 256 MiB image, 16 MiB RAM) at
   several rates, migrated with ``--copy-storage`` at the default limits and with ``--bandwidth
   100M``: converged or not, rounds, disk bytes of the last pre-copy round and of the final pass,
   downtime, total time.
3. **Downtime a disk adds.** A ``counter`` guest (64 MiB): no disk; an idle 64 MiB disk on shared
   storage; ``--copy-storage`` of an idle 64 MiB disk with 16 MiB written. Interleaved; the added
   downtime against the targets (shared storage within 2 ms of no disk; an idle disk copied adds at
   most one round's worth).

    .venv/bin/python -m bench.bench_storage            # 3 runs of 1 and 2, 10 of 3
    .venv/bin/python -m bench.bench_storage --quick    # 1 run of 1 and 2 (1 GiB image), 3 of 3
    .venv/bin/python -m bench.bench_storage --json     # the raw figures as one JSON object
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.client import ClientError
from bench.bench_migrate import mem_available
from bench.common import GiB, MiB, format_size, markdown_table, median
from bench.qemu_baseline import QEMU, QemuError, accel
from bench.qemu_baseline import version as qemu_version
from bench.storage_files import allocated, cp_once, extents_digest, mirror_once, write_image
from tests.agents import AgentProc, make_key, start_agent

FINAL = ("completed", "failed", "cancelled")
EXTENT = 64 * MiB  # of the throughput image's data
SWEEP_IMAGE = 256 * MiB
SWEEP_WS = 64 * MiB
SWEEP_CAP = 100 * MiB  # bytes/s: the capped runs of the sweep
# diskstress rate= is 64 KiB blocks per second, 0 meaning flat out; None: an idle guest on the
# same disk (no writes at all).
SWEEP_RATES: tuple[int | None, ...] = (None, 100, 1000, 5000, 0)
DT_DISK = 64 * MiB
DT_ALLOCATED = 16 * MiB
SHARED_TARGET_MS = 2.0  # shared storage: downtime within this of RAM-only's (median)
REFUSED_RETRY_S = 5.0  # a destination still discarding the last failed attempt refuses the next one
MAX_FAILURES = 3  # failed migrations tolerated per downtime kind before giving up on it


# --- pure helpers -----------------------------------------------------------------------------


def spread_extents(size: int, allocated: int, extent: int) -> list[int]:
    """Offsets of ``allocated // extent`` extents of ``extent`` bytes spread evenly over ``size``
    bytes: the first at 0, one every ``size // n`` bytes rounded down to a whole extent."""
    if extent <= 0 or allocated % extent or not 0 < allocated <= size:
        raise ValueError(f"{allocated} bytes in {extent}-byte extents do not fit a {size}-byte image")
    n = allocated // extent
    stride = size // n // extent * extent
    return [i * stride for i in range(n)]


def rotations(kinds: Sequence[str], runs: int) -> list[str]:
    """``runs`` rounds of every kind, each round starting one kind later than the one before, so no
    kind always runs right after the same other one (a cache it warms, a writeback it leaves)."""
    order: list[str] = []
    for r in range(runs):
        k = r % len(kinds) if kinds else 0
        order += list(kinds[k:]) + list(kinds[:k])
    return order


def med_worst(values: Sequence[float], higher_is_worse: bool = True) -> tuple[float, float] | None:
    """(median, worst) of ``values``; None when there are none."""
    if not values:
        return None
    return median(values), (max(values) if higher_is_worse else min(values))


def fmt_mw(values: Sequence[float], fmt: str = ".1f", higher_is_worse: bool = True) -> str:
    """``median / worst`` as a table cell, ``-`` without values."""
    mw = med_worst(values, higher_is_worse)
    return "-" if mw is None else f"{mw[0]:{fmt}} / {mw[1]:{fmt}}"


def disk_tail(info: dict[str, Any]) -> tuple[int, int]:
    """Disk bytes of a migration's last pre-copy round and of its final pass (0 when absent)."""
    rounds = info.get("rounds", [])
    pre = [r for r in rounds if not r.get("final")]
    final = [r for r in rounds if r.get("final")]
    return (int(pre[-1].get("disk-bytes", 0)) if pre else 0, int(final[-1].get("disk-bytes", 0)) if final else 0)


def last_round_ms(info: dict[str, Any]) -> float:
    """Milliseconds of a migration's last pre-copy round (0 without one)."""
    pre = [r for r in info.get("rounds", []) if not r.get("final")]
    return float(pre[-1]["seconds"]) * 1000 if pre else 0.0


def downtime_ms(info: dict[str, Any]) -> float:
    """A migration's downtime in ms, to the microsecond: the sum of its breakdown's parts (timed one
    after another from the pause to RESUMED), unless that strays over a millisecond from ``downtime``
    (whole ms)."""
    whole = float(info["downtime"])
    parts = sum(float(v) for v in info.get("downtime-breakdown", {}).values())
    return parts if abs(parts - whole) <= 1.0 else whole


def rate_label(rate: int | None) -> str:
    if rate is None:
        return "none (idle guest)"
    return "flat out (rate=0)" if rate == 0 else f"{rate} blocks/s"


# --- agents -----------------------------------------------------------------------------------


@dataclass
class Hosts:
    """The two agents, their shared directory, where a bench file may go, and a directory on tmpfs
    both agents allow (None without /dev/shm)."""

    a: AgentProc
    b: AgentProc
    shared: Path
    scratch: Path
    tmpfs: Path | None

    def other(self, agent: AgentProc) -> AgentProc:
        return self.b if agent is self.a else self.a


@dataclass(frozen=True)
class Place:
    """Where part 1's files live: each agent's copy of the image (by agent name), the baselines' targets."""

    dirs: dict[str, Path]
    scratch: Path

    def fstype(self) -> str:
        """The file system's type (findmnt), or ``?``."""
        try:
            out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(self.scratch)], capture_output=True,
                                 text=True, timeout=10).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        return out[0] if out else "?"  # one line per mount of the same file system there


def places(h: Hosts, alloc: int) -> list[Place]:
    """The agents' own STATE_DIR/disks (this host's file system), and tmpfs when there is room for
    the image and two copies: there nothing reaches a device, fdatasync included."""
    found = [Place({h.a.name: h.a.state_dir / "disks", h.b.name: h.b.state_dir / "disks"}, h.scratch)]
    if h.tmpfs is not None and mem_available() > 3 * alloc + 2 * GiB:
        found.append(Place({n: h.tmpfs / n for n in (h.a.name, h.b.name)}, h.tmpfs / "scratch"))
    for place in found:
        for d in (*place.dirs.values(), place.scratch):
            d.mkdir(parents=True, exist_ok=True)
    return found


def migrate(src: AgentProc, dst: AgentProc, name: str, params: dict[str, Any],
            timeout: float = 900.0) -> dict[str, Any]:
    """One migration of ``name`` from ``src`` to ``dst``: its final MigrationInfo, as the source
    reports it (cancelled after ``timeout`` s: a stuck run must not eat the bench's time limit); a
    refused request is a failed migration too."""
    retry_until = time.monotonic() + REFUSED_RETRY_S
    while True:
        try:
            src.call("migrate", name=name, to=dst.control, params=params)
            break
        except ClientError as e:
            # Right after a failed attempt the source already reports it, while the destination may
            # still be discarding that attempt's reservation of the name for a moment.
            if e.code != "vm-exists" or time.monotonic() > retry_until:
                return {"status": "failed", "error-desc": f"refused: {e}", "refused": True}
            time.sleep(0.05)
    deadline: float | None = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = src.call("migrate-status", name=name)
        if info["status"] in FINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                src.call("migrate-cancel", name=name)
            deadline = None
        time.sleep(0.01)


def create(agent: AgentProc, name: str, program: str, mem: str, args: dict[str, str] | None = None,
           disk: dict[str, Any] | None = None) -> None:
    extra: dict[str, Any] = {"disk": disk} if disk is not None else {}
    agent.call("vm-create", name=name, program=program, mem=mem, args=args or {}, **extra)


def destroy(agent: AgentProc, name: str) -> None:
    with contextlib.suppress(Exception):
        agent.call("vm-destroy", name=name)


def disk_path(agent: AgentProc, name: str) -> Path:
    return Path(agent.call("vm-info", name=name)["disks"][0]["path"])


# --- 1. copy throughput -----------------------------------------------------------------------


@dataclass
class Throughput:
    where: str  # the file system the files were on
    size: int
    allocated: int  # bytes the image occupies
    qemu: str  # QEMU's version, or why its mirror was skipped
    ferry: list[dict[str, Any]] = field(default_factory=list)  # completed migrations
    ferry_failed: list[str] = field(default_factory=list)
    cp: list[tuple[float, float]] = field(default_factory=list)
    mirror: list[tuple[float, float]] = field(default_factory=list)
    mirror_failed: list[str] = field(default_factory=list)
    # Every copy checked after its timing: kind -> bytes each copy occupied, and the copies whose
    # data differed from the image's.
    occupied: dict[str, list[int]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)


def copy_throughput(h: Hosts, place: Place, size: int, alloc: int, runs: int) -> Throughput:
    name = "bench-copy"
    img = place.dirs[h.a.name] / "bench-copy.img"
    offsets = spread_extents(size, alloc, EXTENT)
    write_image(img, size, offsets, EXTENT)
    digest = extents_digest(img, offsets, EXTENT)  # and the warm-up: the image's first read

    def check(kind: str, path: Path) -> None:
        t.occupied.setdefault(kind, []).append(allocated(path))
        if extents_digest(path, offsets, EXTENT) != digest or os.stat(path).st_size != size:
            t.wrong.append(f"{kind} run {len(t.occupied[kind])}")

    qemu_ok = shutil.which(QEMU) is not None
    t = Throughput(place.fstype(), size, allocated(img),
                   (qemu_version() or QEMU) if qemu_ok else f"`{QEMU}` not installed")
    create(h.a, name, "idle", "16M", disk={"path": str(img)})
    where = h.a
    try:
        for kind in rotations(("ferry", "cp", "qemu"), runs):
            src = disk_path(where, name)
            target = place.scratch / "copy-target.img"
            if kind == "ferry":
                to = h.other(where)
                info = migrate(where, to, name, {"copy-storage": True, "disk-dir": str(place.dirs[to.name])})
                if info["status"] == "completed":
                    t.ferry.append(info)
                    where = h.other(where)
                    check(kind, disk_path(where, name))
                else:
                    t.ferry_failed.append(f"{info['status']}: {info.get('error-desc')}")
            elif kind == "cp":
                t.cp.append(cp_once(src, target))
                check(kind, target)
            elif qemu_ok:
                try:
                    t.mirror.append(mirror_once(src, target, place.scratch))
                    check(kind, target)
                except QemuError as e:
                    t.mirror_failed.append(str(e))
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    finally:
        with contextlib.suppress(Exception):
            path = disk_path(where, name)
            destroy(where, name)
            path.unlink()
    return t


def throughput_markdown(ts: list[Throughput], runs: int) -> str:
    rows: list[list[object]] = []
    checks: list[str] = []
    for t in ts:
        rows += throughput_rows(t)
        sizes = ", ".join(f"{kind} {median(v) / MiB:.0f} MiB" for kind, v in t.occupied.items())
        checks.append(f"On {t.where}: " + (f"**{len(t.wrong)} differed**: {', '.join(t.wrong)}." if t.wrong
                                           else "all identical to the image.")
                      + f" Space the copies occupy (median): {sizes}; the image {t.allocated / MiB:.0f} MiB.")
        for what, failed in (("ferry", t.ferry_failed), ("QEMU", t.mirror_failed)):
            if failed:
                checks.append(f"On {t.where}, {what}: {len(failed)} failed run(s): " + "; ".join(failed[:3]))
    t0 = ts[0]
    lines = [
        f"A {format_size(t0.size)} sparse raw image with {t0.allocated / MiB:.0f} MiB of random data in "
        f"{format_size(EXTENT)} extents spread evenly across it; an `idle` 16 MiB guest on it migrated A->B->A "
        f"with `--copy-storage` (the image moves between the two agents' directories, `--disk-dir`), "
        f"interleaved with `cp` and QEMU's mirror of the same image to a new file in the same file system. "
        f"{runs} run(s) of each; median / worst. GiB/s is of the allocated bytes. Page cache to page cache "
        f"for all three (the image read once before timing; nothing dropped, nothing `O_DIRECT`), plus the "
        f"destination's `fdatasync` where the row says so (ferry's destination syncs its copy at every round's "
        f"end and before it installs it). Once on this host's file system, where the write side meets the "
        f"kernel's dirty-page limits (vm.dirty_background_ratio {sysctl('vm/dirty_background_ratio')} %, "
        f"vm.dirty_ratio {sysctl('vm/dirty_ratio')} % of memory) and the fdatasync a device, and once on tmpfs, "
        f"where neither does (room permitting). QEMU: {t0.qemu}, accel `{accel()}`, `blockdev-mirror` "
        f"sync=full from a read-only `-blockdev` to a sparse target (discard=unmap, so holes stay holes), same "
        f"host: QEMU's NBD-over-TCP to another host would add the network.",
        "",
        markdown_table(["files on", "copy", "runs", "GiB/s median / worst", "seconds median / worst", "note"],
                       rows, "llrrrl"),
        "",
        "Every copy checked after its timing (its data extents read back and compared, its size). "
        + " ".join(checks),
    ]
    return "\n".join(lines)


def throughput_rows(t: Throughput) -> list[list[object]]:
    gib = t.allocated / GiB

    def row(what: str, seconds: list[float], note: str) -> list[object]:
        return [t.where, what, len(seconds), fmt_mw([gib / s for s in seconds], ".2f", higher_is_worse=False),
                fmt_mw(seconds, ".2f"), note]

    ferry_s = [float(i["total-time"]) / 1000 for i in t.ferry]
    sent = [int(i.get("disk", {}).get("transferred", 0)) for i in t.ferry]
    round0 = [float(i["rounds"][0]["seconds"]) for i in t.ferry if i["rounds"]]
    rows = [row("ferry migrate --copy-storage", ferry_s,
                f"the whole migration (16 MiB idle guest: its RAM too); of which round 0 (the image's data) "
                f"{fmt_mw(round0, '.2f')} s; disk data sent {median(sent) / MiB:.0f} MiB" if sent else "-")]
    rows.append(row("cp --sparse=always + fdatasync", [c + s for c, s in t.cp],
                    f"of which fdatasync {fmt_mw([s for _, s in t.cp], '.2f')} s" if t.cp else "-"))
    if t.mirror:
        rows.append(row("QEMU blockdev-mirror to ready", [r for r, _ in t.mirror],
                        "target not synced at ready"))
        rows.append(row("QEMU blockdev-mirror to its end + fdatasync", [d for _, d in t.mirror],
                        "cancelled once ready (the job flushes the target as it ends)"))
    return rows


def sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


# --- 2. write-rate sweep ----------------------------------------------------------------------


@dataclass
class SweepCase:
    rate: int | None
    capped: bool
    infos: list[dict[str, Any]] = field(default_factory=list)  # every migration that ran, completed or not
    refused: list[str] = field(default_factory=list)  # requests refused before any migration ran

    @property
    def params(self) -> dict[str, Any]:
        return {"copy-storage": True, **({"bandwidth": SWEEP_CAP} if self.capped else {})}


def sweep(h: Hosts, runs: int) -> list[SweepCase]:
    cases = [SweepCase(rate, capped) for capped in (False, True) for rate in SWEEP_RATES]
    for i, case in enumerate(cases):
        name = f"bench-sweep{i}"
        if case.rate is None:
            program, args = "idle", {}
        else:
            program, args = "diskstress", {"ws": str(SWEEP_WS), "rate": str(case.rate), "pattern": "random"}
        create(h.a, name, program, "16M", args, disk={"path": f"{name}.img", "size": SWEEP_IMAGE})
        where = h.a
        try:
            time.sleep(1.0)  # diskstress reaches its rate and touches its working set
            for _ in range(runs):
                info = migrate(where, h.other(where), name, case.params)
                if info.get("refused"):
                    case.refused.append(str(info["error-desc"]))
                    continue
                case.infos.append(info)
                if info["status"] == "completed":
                    where = h.other(where)
                    time.sleep(0.3)  # the guest runs on its copy a while before the next move
                else:
                    print(f"sweep {rate_label(case.rate)}: {info['status']}: {info.get('error-desc')}",
                          file=sys.stderr)
        finally:
            path = disk_path(where, name)
            destroy(where, name)
            with contextlib.suppress(OSError):
                path.unlink()
    return cases


def sweep_markdown(cases: list[SweepCase], runs: int) -> str:
    rows: list[list[object]] = []
    for c in cases:
        done = [i for i in c.infos if i["status"] == "completed"]
        tails = [disk_tail(i) for i in c.infos]
        rows.append([
            rate_label(c.rate), f"{SWEEP_CAP // MiB} MiB/s" if c.capped else "none",
            f"{len(done)} / {len(c.infos)}",
            fmt_mw([len(i["rounds"]) for i in c.infos], ".0f"),
            fmt_mw([t[0] / MiB for t in tails], ".2f"), fmt_mw([t[1] / MiB for t in tails], ".2f"),
            fmt_mw([downtime_ms(i) for i in done], ".0f"),
            fmt_mw([float(i["total-time"]) for i in c.infos], ".0f"),
            fmt_mw([int(i.get("disk", {}).get("transferred", 0)) / MiB for i in c.infos], ".0f"),
        ])
    failed = [f"{rate_label(c.rate)}{' capped' if c.capped else ''}: {i.get('error-desc')}"
              for c in cases for i in c.infos if i["status"] != "completed"]
    lines = [
        f"`diskstress` (pattern=random, ws={format_size(SWEEP_WS)}: 4 KiB written at the start of a random "
        f"64 KiB block, the disk's dirty-tracking unit) on a {format_size(SWEEP_IMAGE)} image, 16 MiB RAM, "
        f"migrated back and forth with `--copy-storage`, default max-downtime (300 ms) and max-rounds (30), "
        f"without and with `--bandwidth {SWEEP_CAP // MiB}M`. {runs} run(s) per row, median / worst (rows and "
        f"round counts over every run, converged or not; downtime over the converged ones). rate= is 64 KiB "
        f"blocks per second (at most 1024 distinct blocks in the working set); `none` is an `idle` guest on "
        f"the same disk. Last round / final: disk bytes (data and zero grains) of the last pre-copy round and of "
        f"the final pass in the downtime.",
        "",
        markdown_table(["writes", "bandwidth cap", "converged", "rounds", "last round disk MiB",
                        "final disk MiB", "downtime ms", "total ms", "disk sent MiB"], rows, "llrrrrrrr"),
    ]
    if failed:
        lines += ["", "Not converged: " + "; ".join(failed[:4]) + (" ..." if len(failed) > 4 else "")]
    refused = [f"{rate_label(c.rate)}{' capped' if c.capped else ''}: {r}" for c in cases for r in c.refused]
    if refused:
        lines += ["", "Refused (not counted): " + "; ".join(refused[:4])]
    return "\n".join(lines)


# --- 3. downtime a disk adds ------------------------------------------------------------------


@dataclass
class DtKind:
    name: str
    label: str
    make: Callable[[AgentProc, str], None]  # creates the VM on the agent
    params: dict[str, Any]
    infos: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def downtimes(self) -> list[float]:
        return [downtime_ms(i) for i in self.infos]


def downtime_kinds(h: Hosts) -> list[DtKind]:
    shared_img = h.shared / "bench-dt-shared.img"

    def none(agent: AgentProc, name: str) -> None:
        create(agent, name, "counter", "64M")

    def shared(agent: AgentProc, name: str) -> None:
        create(agent, name, "counter", "64M", disk={"path": str(shared_img), "size": DT_DISK})

    def copy(agent: AgentProc, name: str) -> None:
        img = agent.state_dir / "disks" / "bench-dt-copy.img"
        if not img.exists():  # made once; it then moves with the VM
            img.parent.mkdir(parents=True, exist_ok=True)
            write_image(img, DT_DISK, spread_extents(DT_DISK, DT_ALLOCATED, 4 * MiB), 4 * MiB)
        create(agent, name, "counter", "64M", disk={"path": img.name})

    return [DtKind("none", "no disk", none, {}),
            DtKind("shared", f"idle {format_size(DT_DISK)} disk, shared storage", shared, {}),
            DtKind("copy", f"idle {format_size(DT_DISK)} disk ({format_size(DT_ALLOCATED)} written), "
                           f"--copy-storage", copy, {"copy-storage": True})]


def downtimes(h: Hosts, runs: int) -> list[DtKind]:
    kinds = downtime_kinds(h)
    where = {k.name: h.a for k in kinds}
    by_name = {k.name: k for k in kinds}
    for kname in rotations([k.name for k in kinds], runs):
        k = by_name[kname]
        if len(k.failed) > MAX_FAILURES:
            continue
        name, src = f"bench-dt-{k.name}", where[k.name]
        k.make(src, name)
        try:
            time.sleep(0.5)  # the counter runs (and dirties its RAM) before it moves
            info = migrate(src, h.other(src), name, k.params)
            if info["status"] == "completed":
                k.infos.append(info)
                where[k.name] = h.other(src)
            else:
                k.failed.append(f"{info['status']}: {info.get('error-desc')}")
        finally:
            destroy(where[k.name], name)
    for agent in (h.a, h.b):
        with contextlib.suppress(OSError):
            (agent.state_dir / "disks" / "bench-dt-copy.img").unlink()
    return kinds


def downtime_markdown(kinds: list[DtKind], runs: int) -> str:
    base = median(kinds[0].downtimes()) if kinds[0].infos else None
    rows: list[list[object]] = []
    for k in kinds:
        dts = k.downtimes()
        added = "-" if base is None or not dts else f"{median(dts) - base:+.1f}"
        if k.name == "shared":
            target = f"<= +{SHARED_TARGET_MS:g}"
            held = "-" if added == "-" else ("yes" if float(added) <= SHARED_TARGET_MS else "**no**")
        elif k.name == "copy":
            one_round = median([last_round_ms(i) for i in k.infos]) if k.infos else 0.0
            target = f"<= +{one_round:.0f} (one round)"
            held = "-" if added == "-" else ("yes" if float(added) <= one_round else "**no**")
        else:
            target, held = "-", "-"
        final_disk = [disk_tail(i)[1] / 1024 for i in k.infos] if k.name == "copy" else []
        rows.append([k.label, len(dts), len(k.failed), fmt_mw(dts), added, target, held,
                     fmt_mw([len(i["rounds"]) for i in k.infos], ".0f"),
                     fmt_mw([float(i["downtime-breakdown"].get("pause", 0.0)) for i in k.infos]),
                     fmt_mw([float(i["downtime-breakdown"].get("commit", 0.0)) for i in k.infos]),
                     fmt_mw(final_disk, ".0f") if final_disk else "-",
                     fmt_mw([float(i["total-time"]) for i in k.infos], ".0f")])
    lines = [
        f"A `counter` guest (64 MiB) migrated back and forth with default parameters, {runs} completed "
        f"migrations per kind, the kinds interleaved (each run of a kind is a fresh VM; the copied image "
        f"moves with it). Median / worst in ms. Added = median downtime minus the median with no disk. "
        f"Targets: shared storage within {SHARED_TARGET_MS:g} ms of RAM-only; --copy-storage of an idle disk "
        f"adds at most one round's worth (here: the median duration of its last pre-copy round). Rounds count "
        f"the final pass; pause includes, on shared storage, the source releasing the image (flushed, "
        f"unlocked); commit runs from COMMIT to RESUMED (the destination installs the copied image, "
        f"synced, then restores the VM on it).",
        "",
        markdown_table(["disk", "runs", "failed", "downtime ms", "added ms", "target ms", "held", "rounds",
                        "pause ms", "commit ms", "final disk KiB", "total ms"], rows, "lrrrrllrrrrr"),
    ]
    for k in kinds:
        if k.failed:
            lines += ["", f"{k.label}: {len(k.failed)} failed: " + "; ".join(k.failed[:3])]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


@contextlib.contextmanager
def hosts() -> Iterator[Hosts]:
    tmp = Path(tempfile.mkdtemp(prefix="ferry-storage-"))
    shm: Path | None = None
    try:
        shared, scratch = tmp / "shared", tmp / "scratch"
        shared.mkdir()
        scratch.mkdir()
        dirs = [shared]
        if os.path.isdir("/dev/shm"):
            shm = Path(tempfile.mkdtemp(prefix="ferry-storage-", dir="/dev/shm"))
            dirs.append(shm)
        key = make_key(tmp)
        allowed = ":".join(str(d) for d in dirs)
        with start_agent(tmp, "A", key, disk_dirs=allowed) as a, start_agent(tmp, "B", key, disk_dirs=allowed) as b:
            yield Hosts(a, b, shared, scratch, shm)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 GiB image (256 MiB data), 1 run of 1 and 2, 3 of 3")
    ap.add_argument("--runs", type=int, help="runs of parts 1 and 2 (default 3, 1 with --quick)")
    ap.add_argument("--dt-runs", type=int, help="completed migrations per kind of part 3 (default 10, 3 quick)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    a = ap.parse_args(argv)
    runs = a.runs or (1 if a.quick else 3)
    dt_runs = a.dt_runs or (3 if a.quick else 10)
    size, alloc = (1 * GiB, 256 * MiB) if a.quick else (8 * GiB, 2 * GiB)
    parts = {p.strip() for p in a.parts.split(",")}
    out: list[str] = []
    raw: dict[str, Any] = {}
    # The agents' logs (printed when they stop) go to stderr: stdout is the report.
    with contextlib.redirect_stdout(sys.stderr), hosts() as h:
        if "1" in parts:
            ts = [copy_throughput(h, place, size, alloc, runs) for place in places(h, alloc)]
            out += ["### Copy throughput", throughput_markdown(ts, runs)]
            raw["throughput"] = [{"where": t.where, "size": t.size, "allocated": t.allocated, "qemu": t.qemu,
                                  "cp": t.cp, "mirror": t.mirror, "ferry": t.ferry, "ferry-failed": t.ferry_failed,
                                  "wrong": t.wrong} for t in ts]
        if "2" in parts:
            cases = sweep(h, runs)
            out += ["### Write rate against convergence", sweep_markdown(cases, runs)]
            raw["sweep"] = [{"rate": c.rate, "capped": c.capped, "infos": c.infos} for c in cases]
        if "3" in parts:
            kinds = downtimes(h, dt_runs)
            out += ["### Downtime a disk adds", downtime_markdown(kinds, dt_runs)]
            raw["downtime"] = [{"kind": k.name, "infos": k.infos, "failed": k.failed} for k in kinds]
    if a.json:
        print(json.dumps(raw, indent=1))
        return
    out.append("> The machine's 2 cores are shared with other work while this runs: expect noise; "
               "medians with the worst beside them.")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
