"""MigrationInfo and MigrationParams: what a migration reports and what it was asked to do.

This module owns the shape of a migration's report. ``MigrationInfo.to_dict``
gives the JSON object the control API and ``ferry migrate --json`` return; it
uses QEMU's query-migrate field names where they apply (status, total-time,
setup-time, downtime, expected-downtime, cpu-throttle-percentage, ram.*, disk.*) and
ferry's own for the rest (rounds, dirty-tracker, downtime-breakdown,
error-desc, summary). Times are in milliseconds, like QEMU.

A session mutates its MigrationInfo from its own thread; readers on the event
loop take ``to_dict()`` snapshots. Every field is a plain value, so a
snapshot is always a usable view for a progress display.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.announce import Schedule
from agent.config import valid_postcopy_after
from agent.nics import NicError
from proto.limits import COMPRESSION_VERSION, MAX_STREAMS, STREAMS_VERSION

if TYPE_CHECKING:
    from agent.migration.compression import CompressionStats

PAGE_SIZE = 4096


class Status(enum.Enum):
    """QEMU's migration status names (the subset ferry goes through)."""

    SETUP = "setup"  # connecting, handshake, compatibility check
    ACTIVE = "active"  # pre-copy rounds, the VM runs
    DEVICE = "device"  # stop-and-copy: the VM is paused
    POSTCOPY_ACTIVE = "postcopy-active"  # the VM runs on the destination, pages still arrive
    POSTCOPY_PAUSED = "postcopy-paused"  # post-copy lost its link: the VM runs there, both keep their halves
    POSTCOPY_RECOVER = "postcopy-recover"  # post-copy's recovery handshake is under way
    COMPLETED = "completed"  # the VM runs on the destination only
    FAILED = "failed"  # the VM runs where it ran before (see error-desc)
    CANCELLED = "cancelled"  # the operator cancelled; the VM runs on the source


FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


@dataclass(frozen=True, slots=True)
class MigrationParams:
    """The operator's parameters for one outgoing migration."""

    max_downtime_ms: float = 300.0
    bandwidth: int | None = None  # bytes/s cap on the sender; None: no cap
    # On by default: a migration converges unless the operator turned this and post-copy off
    # (docs/PERFORMANCE.md section 17 says why this and not post-copy is the default).
    auto_converge: bool = True
    max_rounds: int = 30
    timeout_s: float | None = None  # whole migration; None: no limit but the round cap
    force: bool = False  # when it does not converge: True -> switch over anyway, False -> abort
    # uffd-wp-async hot blocks: densely written 2 MiB blocks left un-protected and sent whole
    # (fewer guest write faults, more bytes; see vmruntime.dirty.uffd_async). Ignored by other trackers.
    hot_blocks: bool = False
    # Send COMMIT right behind the digest instead of after READY: one round trip less downtime,
    # in doubt from the digest on (docs/protocol.md, "commit ahead").
    commit_ahead: bool = False
    # The destination's announce after switch-over (agent/announce.py; QEMU's announce-self
    # defaults): rounds (0: off), the first gap, the cap, the step between gaps, milliseconds.
    announce_rounds: int = 5
    announce_initial_ms: float = 50.0
    announce_max_ms: float = 550.0
    announce_step_ms: float = 100.0
    # Source bridge -> destination bridge for the VM's NIC (--nic-map SRC_BR=DST_BR).
    nic_map: dict[str, str] = field(default_factory=dict)
    # Source image path (or directory) -> the destination's, for a disk on shared storage (--disk-map SRC=DST).
    disk_map: dict[str, str] = field(default_factory=dict)
    # Send the code hint (agent/migration/code_hint.py): off only to measure what it saves.
    code_hint: bool = True
    # Copy the disk image to the destination (agent/migration/storage_copy.py), into disk_dir there
    # (None: its STATE_DIR/disks), instead of expecting it on shared storage.
    copy_storage: bool = False
    disk_dir: str | None = None
    # "background": the guest writes its disk freely, the rounds send what it wrote; "write-blocking":
    # the guest's vCPU waits while the disk's unsent dirty blocks reach a cap (storage_copy.py).
    storage_mode: str = "background"
    # The progress deadline of every wait on the migration's connections, on both sides (None: each
    # agent's stall-timeout setting); and the migration's: no new byte on its connection for this
    # long fails it before COMMIT (None: off). docs/RELIABILITY.md, "Stalls".
    stall_timeout_s: float | None = None
    progress_timeout_s: float | None = None
    # When to switch to post-copy (agent/migration/postcopy_source.py): "never", after round N
    # ("1": right after the first full round, ``--postcopy``), or "auto" (when the policy sees
    # that pre-copy will not converge); None: the agent's postcopy-after setting.
    postcopy_after: str | None = None
    # Page and disk batches in zstd: "auto" when it pays (agent/migration/compress_policy.py), or always, or never.
    compress: str = "auto"
    # Data connections the RAM batches are spread over (agent/migration/streams.py); None: the
    # agent's streams setting. 1 towards a peer older than STREAMS_VERSION.
    streams: int | None = None

    def __post_init__(self) -> None:
        if self.postcopy_after is not None and not valid_postcopy_after(self.postcopy_after):
            raise ValueError(f"postcopy-after must be never, auto or a round number >= 1, got {self.postcopy_after!r}")
        if self.max_downtime_ms <= 0:
            raise ValueError("max-downtime must be positive (milliseconds)")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError("bandwidth must be a positive number of bytes per second")
        if self.max_rounds < 1:
            raise ValueError("max-rounds must be at least 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout must be positive (seconds)")
        for name, value in (("stall-timeout", self.stall_timeout_s), ("progress-timeout", self.progress_timeout_s)):
            if value is not None and not 0 < value <= MAX_STALL_S:
                raise ValueError(f"{name} must be in (0, {MAX_STALL_S:g}] seconds")
        if self.disk_dir is not None and not (self.copy_storage and os.path.isabs(self.disk_dir)):
            raise ValueError("disk-dir must be an absolute directory on the destination, with copy-storage")
        if self.storage_mode not in STORAGE_MODES:
            raise ValueError(f"storage-mode must be one of {', '.join(STORAGE_MODES)}, got {self.storage_mode!r}")
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}, got {self.compress!r}")
        if self.streams is not None and not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 1..{MAX_STREAMS}, got {self.streams}")
        if self.storage_mode != "background" and not self.copy_storage:
            raise ValueError("storage-mode applies to copy-storage only")
        self.announce()  # its own checks

    def receive_stall(self, default_s: float) -> float:
        """The receiving side's progress deadline: the stall timeout (these params', else
        ``default_s``), plus the pause a bandwidth cap puts between two batches on the sender (a
        batch's bytes at the cap: the sender's rate limiter sleeps before it sends them)."""
        from agent import disk_copy
        from agent.migration import pages

        stall = self.stall_timeout_s or default_s
        if self.bandwidth is None:
            return stall
        return stall + max(pages.BATCH_BYTES, disk_copy.BATCH_BYTES) / self.bandwidth

    def announce(self) -> Schedule:
        """The announce rounds these params ask for."""
        return Schedule(self.announce_rounds, self.announce_initial_ms, self.announce_max_ms, self.announce_step_ms)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> MigrationParams:
        """Build params from control-API arguments (CLI flag names, dashes or underscores)."""
        norm = {str(k).replace("_", "-"): v for k, v in args.items() if v is not None}
        unknown = set(norm) - PARAM_KEYS
        if unknown:
            raise ValueError(f"unknown migration parameter(s): {', '.join(sorted(unknown))}")
        return cls(
            max_downtime_ms=float(norm.get("max-downtime", 300.0)),
            bandwidth=int(norm["bandwidth"]) if "bandwidth" in norm else None,
            auto_converge=bool(norm.get("auto-converge", True)),
            max_rounds=int(norm.get("max-rounds", 30)),
            timeout_s=float(norm["timeout"]) if "timeout" in norm else None,
            force=bool(norm.get("force", False)),
            hot_blocks=bool(norm.get("hot-blocks", False)),
            commit_ahead=bool(norm.get("commit-ahead", False)),
            announce_rounds=int(norm.get("announce-rounds", 5)),
            announce_initial_ms=float(norm.get("announce-initial", 50.0)),
            announce_max_ms=float(norm.get("announce-max", 550.0)),
            announce_step_ms=float(norm.get("announce-step", 100.0)),
            nic_map=_nic_map(norm.get("nic-map")),
            disk_map=_disk_map(norm.get("disk-map")),
            code_hint=bool(norm.get("code-hint", True)),
            copy_storage=bool(norm.get("copy-storage", False)),
            disk_dir=str(norm["disk-dir"]) if "disk-dir" in norm else None,
            storage_mode=str(norm.get("storage-mode", "background")),
            stall_timeout_s=float(norm["stall-timeout"]) if "stall-timeout" in norm else None,
            progress_timeout_s=float(norm["progress-timeout"]) if "progress-timeout" in norm else None,
            postcopy_after=str(norm["postcopy-after"]) if "postcopy-after" in norm else None,
            compress=str(norm.get("compress", "auto")),
            streams=int(norm["streams"]) if "streams" in norm else None,
        )

    def for_peer(self, version: int) -> dict[str, Any]:
        """``to_dict`` for a peer speaking protocol ``version``: without the params it does not know."""
        return {k: v for k, v in self.to_dict().items() if PARAMS_SINCE.get(k, 1) <= version}

    def to_dict(self) -> dict[str, Any]:
        """The params under the same names ``from_dict`` accepts."""
        return {
            "max-downtime": self.max_downtime_ms,
            "bandwidth": self.bandwidth,
            "auto-converge": self.auto_converge,
            "max-rounds": self.max_rounds,
            "timeout": self.timeout_s,
            "force": self.force,
            "hot-blocks": self.hot_blocks,
            "commit-ahead": self.commit_ahead,
            "announce-rounds": self.announce_rounds,
            "announce-initial": self.announce_initial_ms,
            "announce-max": self.announce_max_ms,
            "announce-step": self.announce_step_ms,
            "nic-map": dict(self.nic_map),
            "disk-map": dict(self.disk_map),
            "code-hint": self.code_hint,
            "copy-storage": self.copy_storage,
            "disk-dir": self.disk_dir,
            "storage-mode": self.storage_mode,
            "stall-timeout": self.stall_timeout_s,
            "progress-timeout": self.progress_timeout_s,
            "postcopy-after": self.postcopy_after,
            "compress": self.compress,
            "streams": self.streams,
        }


# Params a peer learned in a later protocol version than 1: an older destination refuses a key it
# does not know (and would then lose the maps beside it), so they are left out for it (for_peer).
PARAMS_SINCE = {"copy-storage": 3, "disk-dir": 3, "storage-mode": 3, "stall-timeout": 3, "progress-timeout": 3,
                "postcopy-after": 4, "compress": COMPRESSION_VERSION,
                "streams": STREAMS_VERSION}
PARAM_KEYS = frozenset({"max-downtime", "bandwidth", "auto-converge", "max-rounds", "timeout", "force",
                         "hot-blocks", "commit-ahead", "announce-rounds", "announce-initial", "announce-max",
                         "announce-step", "nic-map", "disk-map", "code-hint", "copy-storage",
                         "disk-dir", "storage-mode", "stall-timeout", "progress-timeout", "postcopy-after",
                         "compress", "streams"})
COMPRESS_MODES = ("auto", "zstd", "none")
MAX_STALL_S = 3600.0  # the longest stall or progress timeout accepted


STORAGE_MODES = ("background", "write-blocking")


def _nic_map(raw: object) -> dict[str, str]:
    from agent.migration.nic_move import parse_nic_map

    try:
        return parse_nic_map(raw)
    except NicError as e:
        raise ValueError(str(e)) from None


def _disk_map(raw: object) -> dict[str, str]:
    from agent.disks import DiskError
    from agent.migration.disk_move import parse_disk_map

    try:
        return parse_disk_map(raw)
    except DiskError as e:
        raise ValueError(str(e)) from None


@dataclass(slots=True)
class DiskProgress:
    """The disk's part of a migration's figures (query-migrate's ``disk``): bytes of the image
    found to copy (``total``: the data extents, then every dirty block added), sent with payload
    (``transferred``), sent as holes (``zero``), and known dirty, not sent yet (``remaining``)."""

    total: int = 0
    transferred: int = 0
    zero: int = 0
    remaining: int = 0
    cap: int = 0  # write-blocking: the dirty bytes at which the guest's vCPU waits (0: none)

    def to_dict(self) -> dict[str, int]:
        d = {"total": self.total, "transferred": self.transferred, "zero": self.zero, "remaining": self.remaining}
        if self.cap:
            d["dirty-cap"] = self.cap
        return d


@dataclass(slots=True)
class RoundStat:
    """One pre-copy round (or the final stop-and-copy pass)."""

    pages: int = 0  # pages covered (data and zero)
    bytes: int = 0  # payload bytes sent
    seconds: float = 0.0
    zero_pages: int = 0
    dirty_pages: int = 0  # pages the guest dirtied while this round ran
    final: bool = False  # the stop-and-copy pass (VM paused), always the last entry
    start: float = 0.0  # when the round began sending (received, on the destination), seconds into the migration
    sync_rtt: float = 0.0  # of ``seconds``: the path's round trip in the wait for SyncAck (not bandwidth)
    held: float = 0.0  # of ``seconds``: the destination held SyncAck for its code warm-up (not bandwidth)
    disk_bytes: int = 0  # bytes of the disk image sent (--copy-storage), data and holes
    saved: int = 0  # bytes compression kept off the wire (the pages' size less their compressed size)

    def to_dict(self) -> dict[str, Any]:
        d = {"pages": self.pages, "bytes": self.bytes, "seconds": round(self.seconds, 6),
             "zero-pages": self.zero_pages, "dirty-pages": self.dirty_pages, "final": self.final,
             "start": _ms(self.start)}
        if self.held:
            d["warm-up-wait"] = _ms(self.held)
        if self.disk_bytes:
            d["disk-bytes"] = self.disk_bytes
        if self.saved:
            d["compression-saved"] = self.saved
        return d


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass
class MigrationInfo:
    """The live record of one migration, in or out."""

    vm: str
    direction: str  # "out" on the source, "in" on the destination
    peer: str = ""  # the other agent's name or address
    status: Status = Status.SETUP
    params: MigrationParams = field(default_factory=MigrationParams)
    dirty_tracker: str = ""
    mem: int = 0  # guest RAM size
    started: float = field(default_factory=time.monotonic)
    setup_s: float = 0.0
    finished: float | None = None
    downtime_s: float | None = None
    expected_downtime_s: float = 0.0
    throttle: int = 0
    transferred: int = 0  # bytes on the wire (payload and framing)
    duplicate: int = 0  # zero pages sent as ranges
    normal: int = 0  # pages sent with payload
    remaining: int = 0  # bytes known dirty and not sent yet
    dirty_pages_rate: float = 0.0  # pages/s, latest round
    bandwidth: float = 0.0  # bytes/s, latest round
    dirty_sync_count: int = 0  # harvests of the dirty set
    rounds: list[RoundStat] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)  # downtime parts, seconds
    error: str | None = None
    error_code: str | None = None  # stable proto ErrorCode value of the failure
    summary: str = ""
    # A VM with a NIC, on the source: frames that reached its TAP after the pause and were never
    # read (left in the TAP's queue or dropped by it); None without a NIC or before the end.
    rx_dropped_at_switchover: int | None = None
    # The destination: guest blocks its VM process had translated from the source's code hint by
    # the restore, and those named but not ready then (compiled on first run instead); None
    # without a hint (vmruntime/warmup.py).
    code_blocks_warm: int | None = None
    code_blocks_cold: int | None = None
    disk: DiskProgress | None = None  # the disk's copy (--copy-storage); None when it is not copied
    queued: int | None = None  # waiting for a turn (agent/migration/slots.py): how many wait before it
    # A post-copy's figures under QEMU's names (postcopy-requests, postcopy-blocktime,
    # postcopy-vcpu-blocktime) and the request latency (postcopy-latency-p50/p99, ms);
    # None for a migration that never switched to post-copy.
    postcopy: dict[str, Any] | None = None
    compression: CompressionStats | None = None  # the source's (agent/migration/compression.py), once connected
    streams: int = 1  # data connections the pages went over (agent/migration/streams.py), the main one included

    def finish(self, status: Status, error: str | None = None, code: str | None = None,
               at: float | None = None) -> None:
        """Close the record: final status, error text and code, end time (``at``, default now)."""
        self.status = status
        if error is not None and self.error is None:
            self.error = error
        if code is not None and self.error_code is None:
            self.error_code = code
        self.finished = time.monotonic() if at is None else at

    def first_round_rate(self, sent: int, round_start_s: float) -> None:
        """Until a round ended, the bandwidth reported is the first round's so far (``sent`` bytes
        since ``round_start_s``), so a display reads a rate from the first batches on instead of 0
        through a long first round; every round's end sets the measured figure (rounds.py)."""
        elapsed = time.monotonic() - self.started - round_start_s
        if not self.rounds and elapsed > 0.05:
            self.bandwidth = sent / elapsed

    def total_s(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return end - self.started

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of query-migrate, plus ferry's fields."""
        d: dict[str, Any] = {
            "vm": self.vm,
            "direction": self.direction,
            "peer": self.peer,
            "status": self.status.value,
            "total-time": _ms(self.total_s()),
            "setup-time": _ms(self.setup_s),
            "downtime": _ms(self.downtime_s) if self.downtime_s is not None else 0,
            "expected-downtime": _ms(self.expected_downtime_s),
            "cpu-throttle-percentage": self.throttle,
            "ram": self._ram_dict(),
            # list(...) snapshots in one step: the session thread appends meanwhile.
            "rounds": [r.to_dict() for r in list(self.rounds)],
            "dirty-tracker": self.dirty_tracker,
            "downtime-breakdown": {k: round(v * 1000, 3) for k, v in list(self.breakdown.items())},
            "params": self.params.to_dict(),
            "summary": self.summary,
            "streams": self.streams,
        }
        if self.queued is not None:
            d["queued"] = self.queued
        if self.rx_dropped_at_switchover is not None:
            d["rx-dropped-at-switchover"] = self.rx_dropped_at_switchover
        if self.disk is not None:
            d["disk"] = self.disk.to_dict()
        if self.postcopy is not None:
            d.update(self.postcopy)
        if self.compression is not None:
            d["compression"] = self.compression.to_dict()
        if self.code_blocks_warm is not None:
            d["code-blocks"] = {"warm": self.code_blocks_warm, "cold": self.code_blocks_cold}
        if self.error is not None:
            d["error-desc"] = self.error
        if self.error_code is not None:
            d["error-code"] = self.error_code
        return d

    def _ram_dict(self) -> dict[str, Any]:
        return {
            "transferred": self.transferred,
            "total": self.mem,
            "remaining": self.remaining,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "dirty-pages-rate": int(self.dirty_pages_rate),
            "mbps": round(self.bandwidth * 8 / 1e6, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "page-size": PAGE_SIZE,
        }
