"""How an outgoing migration ends for the VM on the source host: let go, taken back, or kept paused.

The session (agent/migration/source.py) owns the exchange with the destination; once that
exchange has settled who owns the VM, these put the VM here in the state the ownership rules
(docs/RELIABILITY.md) give it:

* `complete`: the destination runs it: tracking stopped, the VM process and its RAM released,
  a copied disk's source image removed, the migration recorded completed;
* `restore_vm`: it stays here (a failure or cancel before COMMIT, or "not resumed" after it):
  tracking off, throttle lifted, a released disk image taken back, the vCPU resumed if it ran;
  `resume_after_commit` does that after a "not resumed";
* `stay_in_doubt`: nobody can say: the VM stays paused for the operator (migrate-resolve);
* `roll_back`: any failure or cancel before COMMIT: the destination is told to discard (best
  effort: it discards on a closed connection anyway) and the VM runs here again (`restore_vm`).

They run in the session's thread and reach the loop through its bridge.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from agent.migration import disk_move, nic_move, storage_copy
from agent.migration.common import Cancelled, describe, error_code
from agent.migration.info import Status
from proto.errors import ErrorCode, ProtocolError
from proto.messages import Abort

if TYPE_CHECKING:
    from agent.migration.source import SourceSession


def complete(s: SourceSession, downtime_s: float | None = None) -> None:
    """The destination runs the VM: the copy here goes (tracking, the VM process, a copied disk's
    image), and the migration is recorded completed. ``downtime_s``: measured at RESUMED by a
    post-copy, whose pages went after it."""
    info = s.info
    resumed_at = time.monotonic()
    info.downtime_s = resumed_at - s._pause_t if downtime_s is None else downtime_s
    info.remaining = 0
    s._release_ram()
    info.rx_dropped_at_switchover = nic_move.count_drops(s._lane, s.vm.nic, s._tap_dropped, s.log)
    try:
        s.bridge.call(s.vm.track_stop())
    except Exception as exc:  # the VM process is about to go anyway
        s.log.warning("track-stop after commit failed", vm=s.vm.name, error=describe(exc))
    try:
        s.bridge.call(s.vms.remove_migrated(s.vm.name))
    except Exception as exc:  # the VM runs on the destination whatever happens to our copy
        s.log.error("removing the migrated VM failed", vm=s.vm.name, error=describe(exc))
    if s._copy is not None:  # the destination runs the VM on its copy of the image
        why = storage_copy.remove_source(s._copy.disk.path)
        if why is not None:
            s.log.error("removing the copied disk image failed", vm=s.vm.name, error=why)
    s._book.note_downtime(s.params.max_downtime_ms)
    # The migration is over when the destination runs the VM (QEMU's total-time ends there too):
    # stopping our copy and freeing its RAM come after, outside total-time.
    info.finish(Status.COMPLETED, at=resumed_at)
    s.log.info("migration completed", vm=s.vm.name, peer=info.peer,
               downtime_ms=round(info.downtime_s * 1000, 1), rounds=len(info.rounds))


def resume_after_commit(s: SourceSession) -> None:
    """The destination said it did not resume and never will: the VM is ours again."""
    restore_vm(s)
    s.info.finish(Status.FAILED, s.info.error or "the destination did not resume the VM")
    s.log.warning("migration failed after commit; VM resumed here", vm=s.vm.name, error=s.info.error)


def stay_in_doubt(s: SourceSession) -> None:
    """Nobody can say whether the destination runs the VM: keep it paused, tell the operator."""
    s.in_doubt = True
    s._release_ram()
    s.bridge.call(s.vm.end_migration("paused"))
    s.info.finish(Status.FAILED, (
        f"in doubt: COMMIT sent but no answer from {s.dest[0]}:{s.dest[1]} within "
        f"{s.in_doubt_timeout:g} s; the VM stays paused here. Check the destination, then resolve it: "
        "ferry migrate-resolve NAME --resume-here | --resumed-on-destination"))
    s.log.error("migration in doubt; VM kept paused", vm=s.vm.name, migration_id=s.migration_id)


def restore_vm(s: SourceSession) -> None:
    """Tracking off, throttle lifted, vCPU resumed (if it ran before), state back to normal."""
    s._release_ram()
    vm = s.vm
    steps: list[Coroutine[Any, Any, None]] = []
    if s._tracker is not None:
        steps.append(vm.track_stop())
        s._tracker = None
    if s._throttle:
        steps.append(vm.throttle(0))
        s._throttle = s.info.throttle = 0
    errors = []
    if s._paused and s._shares_disk and s._lane is not None:
        errors.append(disk_move.take_back(s._lane))  # a VM that stays paused keeps its image locked too
    if s._paused and s._was_running:
        steps.append(vm.resume())
        s._paused = False
    errors += [_quiet_call(s, step) for step in steps]
    s.bridge.call(vm.end_migration("running" if s._was_running else "paused"))
    for err in errors:
        if err:
            s.log.error("restoring the VM after a failed migration", vm=vm.name, error=err)


def _quiet_call(s: SourceSession, coro: Coroutine[Any, Any, None]) -> str | None:
    try:
        s.bridge.call(coro)
    except Exception as exc:
        return describe(exc)
    return None


ROLLBACK_LINGER_S = 2.0  # a failure is reported once the destination dropped its copy and closed, or after this


def roll_back(s: SourceSession, exc: BaseException) -> None:
    """Any failure before COMMIT: the destination discards, the VM runs here again."""
    exc = s._failure or exc  # the connection shut down by interrupt() only says it was shut
    cancelled = isinstance(exc, Cancelled) or (s._cancel.is_set() and isinstance(exc, OSError | ProtocolError))
    why = "cancelled by the operator" if cancelled else describe(exc)
    _tell_abort(s, error_code(exc), why)
    # Linger so an immediate retry finds the VM's name free there; a stalled peer reads nothing.
    if s.conn is not None and not isinstance(exc, TimeoutError):
        s.conn.linger(ROLLBACK_LINGER_S)
    s._close()
    try:
        restore_vm(s)
    finally:
        s.info.finish(Status.CANCELLED if cancelled else Status.FAILED, None if cancelled else why,
                      ErrorCode.CANCELLED if cancelled else error_code(exc))
        s.log.warning("migration cancelled" if cancelled else "migration failed", vm=s.vm.name, error=why)


def _tell_abort(s: SourceSession, code: str, why: str) -> None:
    """Best effort: the peer discards on a closed connection anyway."""
    if s.conn is None or s._cancel.is_set() or not s.machine.can_send(Abort):
        return
    try:
        s._send(Abort(code, why[:500]))
    except (OSError, ProtocolError):
        pass
