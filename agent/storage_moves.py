"""The storage moves of one agent: `vm-move-storage`, its status and its cancel (docs/cli.md).

This module owns what happens on the event loop around a move (agent/storage_move.py runs the
move itself in a thread): the checks that refuse one (a VM without a disk, halted, already moving,
a disk that cannot be copied, a target outside the allowed directories, existing, or the image
itself), making the empty copy and its identity (off the loop: a file system), the VM's record of
the move, the move's thread, and the report of each VM's current or last move.

`--to` is a directory (then the image keeps its file name there) or a file path, relative ones
taken in STATE_DIR/disks as for `--disk` (agent/disks.py). The copy keeps the image's identity
(vmruntime/diskimage.py `image_id`): it is the same disk, moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import disk_copy
from agent.disks import DiskConfig, DiskError, clash, resolve_path
from agent.logs import Log
from agent.migration.common import LoopBridge
from agent.storage_move import MoveInfo, StorageMove
from agent.vms import VM, VMError, VMManager
from proto.errors import ErrorCode
from vmruntime.diskimage import ID_SUFFIX, ImageError, image_id, remove_created

CANCEL_WAIT_S = 30.0  # a cancel returns once the VM runs on its old image again, or after this
SHUTDOWN_WAIT_S = 60.0


@dataclass
class _Move:
    engine: StorageMove
    over: asyncio.Future[None]  # done once the move's thread ended and the VM's record says so


class StorageMoves:
    """The storage moves of one VM manager's VMs; everything here runs on the event loop."""

    def __init__(self, vms: VMManager, log: Log) -> None:
        self.vms = vms
        self.log = log
        self._running: dict[str, _Move | None] = {}  # vm name -> its move (None while it is set up)
        self._infos: dict[str, MoveInfo] = {}  # vm name -> its current or last move

    def running(self, name: str) -> bool:
        return name in self._running

    def info(self, name: str) -> dict[str, Any] | None:
        info = self._infos.get(name)
        return None if info is None else info.to_dict()

    async def start(self, name: str, to: str) -> dict[str, Any]:
        """Start moving VM ``name``'s disk to ``to``; returns the move's first report once its
        thread runs, or raises VMError (refused: nothing made, nothing changed)."""
        vm = self.vms.get(name)
        disk = self._check(vm)
        self._running[name] = None  # taken now: a second move or a migration is refused from here
        vm.storage_move = {"from": disk.path, "to": None, "run-before": None}
        try:
            target = await asyncio.to_thread(make_copy, disk, to, self.vms.allowed_disk_dirs(),
                                             self.vms.disks_in_use())
        except BaseException:
            self._running.pop(name, None)
            vm.storage_move = None
            raise
        try:
            await vm.begin_storage_move(target)
        except BaseException:
            await asyncio.to_thread(remove_created, target)
            self._running.pop(name, None)
            vm.storage_move = None
            raise
        info = MoveInfo(vm=name, source=disk.path, target=target, size=disk.size)
        loop = asyncio.get_running_loop()
        engine = StorageMove(vm=vm, disk=disk, target=target, was_paused=vm.state == "paused",
                             bridge=LoopBridge(loop), info=info, log=vm.log)
        move = _Move(engine, loop.create_future())
        self._infos[name] = info
        self._running[name] = move
        vm.log.info("storage move starting", source=disk.path, to=target, size=disk.size)

        def body() -> None:
            try:
                engine.run()
            finally:
                asyncio.run_coroutine_threadsafe(self._over(vm, move), loop)

        threading.Thread(target=body, name="ferry-storage-move", daemon=True).start()
        return info.to_dict()

    def _check(self, vm: VM) -> DiskConfig:
        """The VM's disk, if a move of it may start now; VMError says why not."""
        name = vm.name
        if not self.vms.accepting:
            raise VMError(ErrorCode.BUSY, f"agent {self.vms.agent_name} is shutting down")
        if vm.disk is None:
            raise VMError(ErrorCode.BAD_REQUEST, f"VM {name!r} has no disk to move")
        if name in self._running or vm.storage_move is not None:
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is already moving its storage")
        if vm.migrating:
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is migrating: move its storage once the migration is over")
        if vm.lock.locked():
            raise VMError(ErrorCode.BUSY, f"VM {name!r} is busy (being paused, resumed or destroyed)")
        if vm.state not in ("running", "paused"):
            raise VMError(ErrorCode.BAD_REQUEST, f"VM {name!r} is {vm.state}: only a running or paused VM's "
                                                 "disk is moved (destroy it and move the image file instead)")
        reason = disk_copy.check_copyable(vm.disk.size)
        if reason is not None:
            raise VMError(ErrorCode.BAD_REQUEST, f"cannot move VM {name!r}'s disk: {reason}")
        return vm.disk

    async def _over(self, vm: VM, move: _Move) -> None:
        """On the loop, once a move's thread ended: the record no longer names a move."""
        try:
            await vm.end_storage_move()
        except Exception as e:  # a record that cannot be written is logged by the recorder already
            vm.log.warning("recording the end of the storage move failed", error=str(e))
        finally:
            if self._running.get(vm.name) is move:
                del self._running[vm.name]
            if not move.over.done():
                move.over.set_result(None)

    async def cancel(self, name: str) -> dict[str, Any]:
        """Cancel VM ``name``'s move; returns its report once the VM runs on its old image again
        (or the move completed: a cancel after the switch cannot apply)."""
        move = self._running.get(name)
        if move is None:
            if name in self._running:
                raise VMError(ErrorCode.BUSY, f"VM {name!r}'s storage move is starting; cancel it again")
            raise VMError(ErrorCode.NOT_FOUND, f"no storage move of VM {name!r} is under way on agent "
                                               f"{self.vms.agent_name}")
        if not move.engine.cancel():
            self.log.info("storage move cancel ignored: the disk is switching", vm=name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await asyncio.shield(move.over)
        return move.engine.info.to_dict()

    async def shutdown(self) -> None:
        """The agent is stopping: cancel every move and wait until each VM runs on one image."""
        moves = [m for m in self._running.values() if m is not None]
        for move in moves:
            move.engine.cancel()
        if moves:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_WAIT_S):
                    await asyncio.gather(*(asyncio.shield(m.over) for m in moves), return_exceptions=True)


def target_path(source: str, to: str, allowed: Sequence[Path]) -> str:
    """Where a move of image ``source`` to ``to`` puts the copy: ``to`` itself, or the image's file
    name inside ``to`` when that is a directory; resolved and allowed (DiskError otherwise)."""
    if not allowed:
        raise DiskError("this agent allows no disk image directories")
    given = to if os.path.isabs(to) else os.path.join(allowed[0], to)
    if to.endswith("/") or os.path.isdir(given):
        if not os.path.isdir(given):
            raise DiskError(f"directory {to} does not exist")
        given = os.path.join(given, os.path.basename(source))
    path = resolve_path(given, allowed)
    if path == source:
        raise DiskError(f"{to} is the VM's disk image already")
    return path


def make_copy(disk: DiskConfig, to: str, allowed: Sequence[Path], in_use: Mapping[str, DiskConfig]) -> str:
    """Create the move's copy of ``disk``: empty at the disk's size, with the image's identity beside
    it (written now for the image too if it has none); returns its path. VMError refuses; nothing
    is left behind. Blocking (a file system): for a worker thread."""
    try:
        target = target_path(disk.path, to, allowed)
        reason = clash(target, in_use)
        if reason is not None:
            raise DiskError(reason)
        if os.path.lexists(target):
            raise DiskError(f"{target} exists: a move never overwrites a file (remove it, or pick another path)")
        if os.path.lexists(target + ID_SUFFIX):
            raise DiskError(f"{target + ID_SUFFIX} exists (an image identity without its image): remove it first")
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise DiskError(f"directory {parent} does not exist")
        ident = image_id(disk.path, create=True)
    except (DiskError, ImageError) as e:
        raise VMError(ErrorCode.BAD_REQUEST, f"cannot move the disk to {to}: {e}") from None
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise _refusal(target, e) from None
    try:
        try:
            os.ftruncate(fd, disk.size)
        finally:
            os.close(fd)
        side = os.open(target + ID_SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        os.unlink(target)  # only the image: an identity file that appeared meanwhile is not ours
        raise _refusal(target, e) from None
    try:
        with os.fdopen(side, "w") as f:
            f.write(f"{ident}\n")
    except OSError as e:
        remove_created(target)
        raise _refusal(target, e) from None
    return target


def _refusal(target: str, e: OSError) -> VMError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return VMError(ErrorCode.INSUFFICIENT_STORAGE, f"cannot create the disk image copy {target}: "
                                                       f"{e.strerror or e}")
    if e.errno == errno.EEXIST:
        return VMError(ErrorCode.BAD_REQUEST, f"{target} exists: a move never overwrites a file")
    return VMError(ErrorCode.BAD_REQUEST, f"cannot create the disk image copy {target}: {e.strerror or e}")
