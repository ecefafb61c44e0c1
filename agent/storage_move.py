"""A storage move on one host (`ferry vm move-storage`, vCenter's Storage vMotion, QEMU's
blockdev-mirror): a running VM's disk image mirrored to a new path, the disk switched to it at a
short pause, the old image removed only after the switch.

This module owns one move's engine, `StorageMove`, which runs in its own thread (all of it is
blocking file I/O and requests on the VM process's lane: never on the event loop), its report
`MoveInfo` (snapshots read from the loop for the status op), and the pure round policy
`next_step`. The pieces of the copy are agent/disk_copy.py's; the moves of an agent, their checks
and their threads are agent/storage_moves.py's.

The move, as the engine runs it:

1. the dirty marks are cleared, then every data extent of the image is copied (holes stay holes);
2. rounds: the blocks the guest wrote meanwhile are harvested and copied again, until `next_step`
   says the rest is small (or stopped shrinking: then switch if it is small enough, else fail);
3. the vCPU is paused (unless the operator had paused it), the last dirty blocks copied, the copy
   synced, and the VM process's disk switched to the copy (`disk-switch`: it flushes the old image,
   locks the new one, and closes the old one only once the new one is in place);
4. the VM's record names the new image, the vCPU resumes, the old image and its identity go.

Until step 3's switch, a cancel or any failure resumes the VM on its old image and removes the
copy; a failed switch leaves the old image in place (the VM process keeps it open). After the switch
the move cannot be undone: what fails later (the resume, removing the old image) is reported.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent import disk_copy
from agent.disks import DiskConfig
from agent.migration.common import Cancelled, LoopBridge, describe, error_code
from agent.migration.info import Status
from agent.migration.seams import Lane, LogLike
from proto.errors import ErrorCode
from vmruntime import control as vmctl
from vmruntime.dirty import merge_ranges
from vmruntime.diskimage import remove_created

# The dirty set at which a mirror switches at once: copied inside the pause in a few milliseconds.
SWITCH_BYTES = 1 << 20
# A dirty set that stopped shrinking is still switched when at most this: its copy is the pause.
MAX_FINAL_BYTES = 64 << 20
MAX_ROUNDS = 30  # rounds after the first pass; a guest that keeps up with the copy cannot hold it longer
# A VM process answers a pause between two vCPU slices (one huge instruction can take a second).
PAUSE_TIMEOUT_S = 10.0
SWITCH_TIMEOUT_S = 30.0  # the switch flushes the old image: bounded by the file system, not the vCPU


class Step(enum.Enum):
    COPY_AGAIN = "copy-again"
    SWITCH = "switch"
    ABORT = "abort"


def next_step(remainders: Sequence[int], *, switch_bytes: int = SWITCH_BYTES,
              max_final: int = MAX_FINAL_BYTES, max_rounds: int = MAX_ROUNDS) -> tuple[Step, str]:
    """What the mirror does after a round: ``remainders`` holds the dirty bytes left after each
    round so far (the first pass first, the latest last). Switch once the rest is small; when it
    stops shrinking (or the rounds run out) switch if it is at most ``max_final``, else give up (the
    guest writes faster than the copy: the VM stays on its image)."""
    if not remainders:
        raise ValueError("next_step needs the dirty bytes of at least one round")
    dirty = remainders[-1]
    if dirty <= switch_bytes:
        return Step.SWITCH, f"dirty set small ({_mib(dirty)})"
    stalled = len(remainders) >= 2 and dirty >= remainders[-2]
    if not stalled and len(remainders) <= max_rounds:
        return Step.COPY_AGAIN, ""
    why = "stopped shrinking" if stalled else f"{max_rounds} rounds copied"
    if dirty <= max_final:
        return Step.SWITCH, f"dirty set {why} at {_mib(dirty)}"
    return Step.ABORT, (f"did not converge: the guest writes faster than the copy ({why} at {_mib(dirty)}, "
                        f"more than the {_mib(max_final)} a pause may copy)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass(slots=True)
class MoveRound:
    """One pass of the copy: the first (every extent), a round of dirty blocks, or the final one (paused)."""

    bytes: int = 0  # data copied
    zero_bytes: int = 0  # zeros written as holes
    seconds: float = 0.0
    dirty_bytes: int = 0  # what the guest wrote meanwhile (the next round's work)
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "zero-bytes": self.zero_bytes, "seconds": round(self.seconds, 6),
                "dirty-bytes": self.dirty_bytes, "final": self.final}


@dataclass
class MoveInfo:
    """The live report of one storage move. The engine's thread changes it; the loop reads
    ``to_dict()`` snapshots (every field a plain value)."""

    vm: str
    source: str
    target: str
    size: int
    status: Status = Status.SETUP
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    downtime_s: float | None = None
    found: int = 0  # bytes found to copy: the data extents, then every dirty block added
    transferred: int = 0  # data bytes written to the copy
    zero_bytes: int = 0  # zeros written as holes
    remaining: int = 0  # dirty bytes known and not copied yet
    dirty_sync_count: int = 0
    rounds: list[MoveRound] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)  # the pause's parts, seconds
    error: str | None = None
    error_code: str | None = None
    summary: str = ""

    def finish(self, status: Status, error: str | None = None, code: str | None = None) -> None:
        self.status = status
        if error is not None and self.error is None:
            self.error = error
        if code is not None and self.error_code is None:
            self.error_code = code
        self.finished = time.monotonic()

    def total_s(self) -> float:
        return (self.finished if self.finished is not None else time.monotonic()) - self.started

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `vm-move-storage-status` and `ferry vm move-storage --json`: migrate's names
        where they apply (status, total-time, downtime in ms, disk.*, rounds, error-desc, error-code)."""
        seconds = self.total_s()
        d: dict[str, Any] = {
            "vm": self.vm,
            "from": self.source,
            "to": self.target,
            "status": self.status.value,
            "total-time": _ms(seconds),
            "downtime": _ms(self.downtime_s) if self.downtime_s is not None else 0,
            "disk": {"total": self.found, "transferred": self.transferred, "zero": self.zero_bytes,
                     "remaining": self.remaining, "size": self.size, "dirty-sync-count": self.dirty_sync_count,
                     "mbps": round(self.transferred * 8 / 1e6 / max(seconds, 1e-6), 3)},
            "rounds": [r.to_dict() for r in list(self.rounds)],
            "downtime-breakdown": {k: round(v * 1000, 3) for k, v in list(self.breakdown.items())},
            "summary": self.summary,
        }
        if self.error is not None:
            d["error-desc"] = self.error
        if self.error_code is not None:
            d["error-code"] = self.error_code
        return d


class MovingVM(Protocol):
    """The VM whose disk moves (agent.vms.VM), as the engine uses it (on the loop, via the bridge)."""

    @property
    def name(self) -> str: ...

    def open_lane(self) -> Awaitable[Lane]: ...

    def paused_by_lane(self, state: dict[str, Any]) -> None: ...

    def resume(self) -> Awaitable[None]: ...

    def storage_switched(self, disk: DiskConfig) -> Awaitable[None]:
        """The VM process writes ``disk`` now: the VM and its record name it (on disk when done)."""


class MoveError(Exception):
    """A move that cannot go on; ``code`` is a stable ErrorCode value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


class StorageMove:
    """One storage move of one VM's disk, run by ``run()`` in a thread of its own.

    The copy (``target``) exists already, empty at the disk's size with its identity beside it
    (agent/storage_moves.py made it): the engine fills it and switches to it, or removes it.
    """

    def __init__(self, *, vm: MovingVM, disk: DiskConfig, target: str, was_paused: bool, bridge: LoopBridge,
                 info: MoveInfo, log: LogLike) -> None:
        self.vm = vm
        self.disk = disk
        self.target = target
        self.was_paused = was_paused
        self.bridge = bridge
        self.info = info
        self.log = log
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # orders cancel() against the switch
        self._switching = False
        self._lane: Lane | None = None
        self._src = -1
        self._dst = -1
        self._writer: disk_copy.ImageWriter | None = None
        self._buf = bytearray(disk_copy.BATCH_BYTES)
        self._paused = False
        self._pause_t = 0.0

    # -- control from the loop ------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Ask the move to stop; False once the switch is under way (the move then completes)."""
        with self._lock:
            if self._switching:
                return False
            self._cancel.set()
        return True

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the operator")

    # -- the thread body ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            try:
                self._open()
                self.info.status = Status.ACTIVE
                pending = self._mirror()
                self._pause_and_copy(pending)
                self._switch()
            except BaseException as exc:  # every failure before the switch: the VM keeps its image
                self._roll_back(exc)
                return
            self._complete()
        finally:
            self._close()

    def _open(self) -> None:
        self._lane = self.bridge.call(self.vm.open_lane())
        try:
            self._src = os.open(self.disk.path, os.O_RDONLY | os.O_CLOEXEC)
            self._dst = os.open(self.target, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MoveError(ErrorCode.INTERNAL, f"cannot open the images: {e.strerror or e}") from e
        self._writer = disk_copy.ImageWriter(self._dst, self.target, self.disk.size)

    # -- the mirror's rounds ----------------------------------------------------------------------------
    def _mirror(self) -> list[disk_copy.Range]:
        """The first pass and the rounds until the policy switches; returns the dirty set left."""
        assert self._lane is not None
        disk_copy.clear_dirty(self._lane)  # before the first read: every later write is marked
        ranges = disk_copy.data_extents(self._src, self.disk.size)
        remainders: list[int] = []
        while True:
            stat = self._copy(ranges)
            ranges = self._harvest()
            stat.dirty_bytes = disk_copy.total_bytes(ranges)
            remainders.append(stat.dirty_bytes)
            step, why = next_step(remainders)
            if step is Step.ABORT:
                raise MoveError(ErrorCode.MIGRATION_FAILED, why)
            if step is Step.SWITCH:
                self.info.summary = why
                return ranges

    def _harvest(self) -> list[disk_copy.Range]:
        assert self._lane is not None
        ranges = disk_copy.harvest(self._lane)
        self.info.dirty_sync_count += 1
        self.info.remaining = disk_copy.total_bytes(ranges)
        return ranges

    def _copy(self, ranges: list[disk_copy.Range], final: bool = False) -> MoveRound:
        """Copy ``ranges`` of the image to the copy, as one round of the report."""
        assert self._writer is not None
        t0 = time.monotonic()
        stat = MoveRound(final=final)
        self.info.rounds.append(stat)
        left = disk_copy.total_bytes(ranges)
        self.info.found += left
        for batch in disk_copy.read_batches(self._src, ranges, self._buf):
            self._check_cancel()
            for (a, _), piece in zip(batch.ranges, batch.pieces, strict=True):
                self._writer.write(a, piece)
            self._writer.punch(batch.zeros)
            stat.bytes += batch.data_bytes
            stat.zero_bytes += batch.zero_bytes
            self.info.transferred += batch.data_bytes
            self.info.zero_bytes += batch.zero_bytes
            left -= batch.data_bytes + batch.zero_bytes
            self.info.remaining = left
            stat.seconds = time.monotonic() - t0
        stat.seconds = time.monotonic() - t0
        return stat

    # -- the switch -------------------------------------------------------------------------------------
    def _pause_and_copy(self, pending: list[disk_copy.Range]) -> None:
        """Sync what is copied and the image itself (outside the pause: the switch flushes the image,
        and only what the guest writes from here is then left to write back), pause, copy the last
        dirty blocks, sync them."""
        assert self._writer is not None
        self._writer.sync()
        try:
            os.fdatasync(self._src)
        except OSError as e:
            raise MoveError(ErrorCode.INTERNAL, f"flushing the disk image {self.disk.path} failed: "
                                                f"{e.strerror or e}") from e
        self._check_cancel()
        self.info.status = Status.DEVICE
        t = self._pause_t = time.monotonic()
        if not self.was_paused:
            self._paused = True  # first: a pause that fails half-way is undone by a resume all the same
            self._pause()
        t = self._lap("pause", t)
        last = merge_ranges(pending + self._harvest())
        self._copy(last, final=True)
        t = self._lap("final-copy", t)
        self._writer.sync()
        self._lap("sync", t)

    def _pause(self) -> None:
        assert self._lane is not None
        try:
            reply = self._lane.request("pause", timeout=PAUSE_TIMEOUT_S)
        except (vmctl.VMError, vmctl.VMGone) as exc:
            raise MoveError(ErrorCode.INTERNAL, f"pausing the VM failed: {exc}") from exc
        self.bridge.submit(self.vm.paused_by_lane, reply.get("state", {}))

    def _switch(self) -> None:
        """The VM process's disk onto the copy: from here on the move cannot be cancelled."""
        with self._lock:
            self._check_cancel()
            self._switching = True
        t = time.monotonic()
        assert self._lane is not None
        try:
            self._lane.request("disk-switch", path=self.target, timeout=SWITCH_TIMEOUT_S)
        except (vmctl.VMError, vmctl.VMGone) as exc:  # the VM process kept its old image
            raise MoveError(ErrorCode.INTERNAL, f"switching the disk to {self.target} failed: {exc}") from exc
        self._lap("switch", t)

    def _complete(self) -> None:
        """After the switch: the record names the new image, the VM resumes, the old image goes."""
        info = self.info
        t = time.monotonic()
        new = DiskConfig(path=self.target, size=self.disk.size, block_size=self.disk.block_size)
        problems = []
        try:
            self.bridge.call(self.vm.storage_switched(new))
        except Exception as exc:  # the VM process's own path is the truth at a restart (agent/vms/adopt.py)
            problems.append(f"recording the new image failed: {describe(exc)}")
        t = self._lap("record", t)
        if self._paused:
            try:
                self.bridge.call(self.vm.resume())
                self._paused = False
            except Exception as exc:
                problems.append(f"resuming the VM failed (it stays paused): {describe(exc)}")
        self._lap("resume", t)
        info.downtime_s = time.monotonic() - self._pause_t if not self.was_paused else 0.0
        info.remaining = 0
        try:
            remove_created(self.disk.path)  # the old image and its identity
        except OSError as exc:
            problems.append(f"removing the old image {self.disk.path} failed: {exc.strerror or exc}")
        if problems:
            info.error = "; ".join(problems)
        info.finish(Status.COMPLETED)
        self.log.info("storage move completed", vm=self.vm.name, to=self.target,
                      downtime_ms=round((info.downtime_s or 0) * 1000, 1), rounds=len(info.rounds),
                      problems=info.error)

    # -- rolling back -----------------------------------------------------------------------------------
    def _roll_back(self, exc: BaseException) -> None:
        """Before the switch: the VM runs on its old image, the copy is removed."""
        cancelled = isinstance(exc, Cancelled)
        why = "cancelled by the operator" if cancelled else describe(exc)
        problems = []
        if self._paused:
            try:
                self.bridge.call(self.vm.resume())
                self._paused = False
            except Exception as e:
                problems.append(f"resuming the VM failed (it stays paused): {describe(e)}")
        self._close()
        try:
            remove_created(self.target)
        except OSError as e:
            problems.append(f"removing the copy {self.target} failed: {e.strerror or e}")
        if problems:
            why = "; ".join([why, *problems])
        code = ErrorCode.CANCELLED if cancelled else _code(exc)
        self.info.finish(Status.CANCELLED if cancelled else Status.FAILED,
                         why if not cancelled or problems else None, code)
        self.log.warning("storage move cancelled" if cancelled else "storage move failed", vm=self.vm.name,
                         to=self.target, error=why)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _lap(self, name: str, t: float) -> float:
        now = time.monotonic()
        self.info.breakdown[name] = now - t
        return now

    def _close(self) -> None:
        for fd in (self._src, self._dst):
            if fd >= 0:
                os.close(fd)
        self._src = self._dst = -1
        if self._lane is not None:
            self._lane.close()
            self._lane = None


def _code(exc: BaseException) -> str:
    if isinstance(exc, (vmctl.VMError, vmctl.VMGone)):
        return ErrorCode.INTERNAL
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return ErrorCode.INTERNAL
    return error_code(exc)
