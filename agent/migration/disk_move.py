"""A VM's disk across a migration on shared storage: what the source proposes, what the destination checks.

vMotion's case: both hosts see the same image, so nothing of the disk is copied; what moves is
the right to write it. The source sends the disk (path, size, dirty block size and the image's
identity, vmruntime/diskimage.py `image_id`) in MigrateStart's ``params`` under the key ``disk``.
The destination applies the operator's ``--disk-map SRC=DST`` (a path or a directory prefix), and
before any page moves refuses an image outside its allowed directories (agent/disks.py), missing,
of another size, or not the source's (another identity, or none). The image's lock changes hands
inside the downtime: the source's VM process flushes and releases it at the pause, the
destination's takes it when it restores the VM, and a source that keeps the VM after all takes it
back before the vCPU runs (vmruntime/devices.py). With ``--copy-storage`` the proposal says so
(``copy``, the bytes the image holds, the destination's ``--disk-dir``), the destination checks
where its copy goes instead (`_copy_target`), and agent/migration/storage_copy.py moves the bytes.

`proposal` and `incoming` read the file system: blocking, for the session thread, never the loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.disk_copy import DiskFull, check_copyable
from agent.disks import DiskConfig, DiskError, resolve_path
from agent.migration.common import MigrationError, map_items
from agent.migration.info import MigrationParams
from agent.migration.seams import Lane
from proto.errors import ErrorCode
from proto.messages import DiskBatch
from vmruntime.control import VMError, VMGone
from vmruntime.disk import DEFAULT_BLOCK_SIZE
from vmruntime.diskimage import ImageError, allocated_bytes, check_existing, check_size, image_id

PARAMS_KEY = "disk"  # the key in MigrateStart.params
TAKE_BACK_TIMEOUT_S = 10.0  # a VM process answers between two slices; this only bounds a stuck one


def proposal(disk: DiskConfig | None, params: MigrationParams, version: int) -> dict[str, Any]:
    """What travels: the image's path, size, dirty block size and identity (written now if the
    image has none yet); to copy it (``params.copy_storage``), also the bytes it holds and the
    destination's directory for it. MigrationError when the identity cannot be read or written,
    or the image cannot be copied (none; a destination speaking protocol ``version`` < 3)."""
    copy = params.copy_storage
    if copy and disk is None:
        raise MigrationError(ErrorCode.BAD_REQUEST, "--copy-storage: the VM has no disk")
    if copy and version < DiskBatch.SINCE:
        raise MigrationError(ErrorCode.INCOMPATIBLE, f"--copy-storage: the destination speaks protocol version "
                             f"{version}, copying a disk needs {DiskBatch.SINCE}")
    assert disk is not None
    try:
        ident = image_id(disk.path, create=True)
        st = os.stat(disk.path)
    except ImageError as e:
        raise MigrationError(ErrorCode.BAD_REQUEST, f"the VM's disk: {e}") from None
    except OSError as e:
        raise MigrationError(ErrorCode.BAD_REQUEST, f"the VM's disk {disk.path}: {e.strerror or e}") from None
    out: dict[str, Any] = {"path": disk.path, "size": disk.size, "block-size": disk.block_size, "id": ident}
    if copy:
        why = check_copyable(disk.size)
        if why is not None:
            raise MigrationError(ErrorCode.BAD_REQUEST, f"--copy-storage: {why}")
        out.update({"copy": True, "allocated": allocated_bytes(st)})
        if params.disk_dir is not None:
            out["dir"] = params.disk_dir
    return out


def take_back(lane: Lane) -> str | None:
    """Have the VM process behind ``lane`` lock again the image its pause released (a migration that
    did not happen: the VM stays here); why not, if that failed."""
    try:
        lane.request("disk-reopen", timeout=TAKE_BACK_TIMEOUT_S)
    except (VMError, VMGone, OSError) as e:
        return f"taking the disk image back: {e}"
    return None


def map_path(path: str, disk_map: Mapping[str, str]) -> str:
    """``path`` with ``--disk-map`` applied: an exact entry first, then the longest directory prefix."""
    if path in disk_map:
        return disk_map[path]
    for src in sorted(disk_map, key=len, reverse=True):
        prefix = src.rstrip("/") + "/"
        if path.startswith(prefix):
            return os.path.join(disk_map[src], path[len(prefix):])
    return path


def incoming(params: Mapping[str, Any], disk_map: Mapping[str, str],
             allowed: Sequence[Path]) -> tuple[DiskConfig, str | None] | None:
    """The disk a MigrateStart proposes, as this host sees it, and the identity a copy of it is to
    carry (None: not copied, the image is shared); None without a disk. DiskError says why this
    host cannot take it over, DiskFull that a copy would not fit (the VM then keeps running on the
    source)."""
    raw = params.get(PARAMS_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DiskError("the proposed disk is not a map")
    path, size, block, ident = raw.get("path"), raw.get("size"), raw.get("block-size", DEFAULT_BLOCK_SIZE), raw.get("id")
    if not (isinstance(path, str) and os.path.isabs(path) and isinstance(size, int) and isinstance(block, int)
            and isinstance(ident, str)):
        raise DiskError(f"the proposed disk {dict(raw)!r} is malformed")
    try:
        size = check_size(size)
    except ImageError as e:
        raise DiskError(str(e)) from None
    config = DiskConfig(path=path, size=size, block_size=block)
    if raw.get("copy"):
        return _copy_target(config, raw.get("dir"), raw.get("allocated", 0), allowed), ident
    return _shared(config, ident, disk_map, allowed), None


def _shared(disk: DiskConfig, ident: str, disk_map: Mapping[str, str], allowed: Sequence[Path]) -> DiskConfig:
    """The source's image on shared storage, as this host names it (--disk-map)."""
    path, size = disk.path, disk.size
    mapped = map_path(path, disk_map)
    how = "" if mapped == path else f" (mapped from {path} by --disk-map)"
    here = resolve_path(mapped, allowed)
    try:
        st = os.stat(here)
    except FileNotFoundError:
        raise DiskError(f"disk image {mapped}{how} does not exist on the destination: a VM with a disk migrates "
                        f"only where its image is on shared storage (--disk-map SRC=DST names it there)") from None
    except OSError as e:
        raise DiskError(f"disk image {mapped}{how} on the destination: {e.strerror or e}") from None
    try:
        if check_existing(here, st, size) != size or st.st_size != size:
            raise DiskError(f"disk image {mapped}{how} on the destination holds {st.st_size} bytes, "
                            f"the source's {size}: not the same image")
        found = image_id(here)
    except ImageError as e:
        raise DiskError(str(e)) from None
    if found != ident:
        what = "has no identity" if found is None else f"is image {found}"
        raise DiskError(f"disk image {mapped}{how} on the destination {what}, the source's is {ident}: "
                        f"not the same image (shared storage needed, or --copy-storage)")
    return DiskConfig(path=here, size=size, block_size=disk.block_size)


def _copy_target(disk: DiskConfig, where: object, allocated: object, allowed: Sequence[Path]) -> DiskConfig:
    """Where this host writes the copy: the source's file name in ``where`` (default its first
    allowed directory, STATE_DIR/disks). Refused when outside the allowed directories, when an
    image is there already (never replaced), or when the file system has less room than the
    image holds."""
    if not (where is None or isinstance(where, str) and os.path.isabs(where)):
        raise DiskError(f"the proposed disk directory {where!r} is not an absolute path")
    if not isinstance(allocated, int) or allocated < 0:
        raise DiskError(f"the proposed disk's allocated size {allocated!r} is malformed")
    why = check_copyable(disk.size)
    if why is not None:
        raise DiskError(why)
    folder = where if where is not None else str(allowed[0]) if allowed else "/"
    here = resolve_path(os.path.join(folder, os.path.basename(disk.path)), allowed)
    parent = os.path.dirname(here)
    if not os.path.isdir(parent):
        raise DiskError(f"directory {parent} for the disk image copy does not exist on the destination")
    if os.path.lexists(here):
        raise DiskError(f"disk image {here} exists on the destination: --copy-storage never replaces "
                        f"an image (remove it, or choose another --disk-dir)")
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if free < allocated:
        raise DiskFull(f"the disk image copy needs {allocated} bytes, {parent} on the destination has {free} free")
    return DiskConfig(path=here, size=disk.size, block_size=disk.block_size)


def parse_disk_map(raw: object) -> dict[str, str]:
    """--disk-map values: a map {SRC: DST} or a list of "SRC=DST" (absolute paths); DiskError if malformed."""
    try:
        items = map_items(raw, "disk-map", "SRC=DST")
    except ValueError as e:
        raise DiskError(str(e)) from None
    for src, dst in items:
        if not (os.path.isabs(src) and os.path.isabs(dst)):
            raise DiskError(f"bad --disk-map {src}={dst}: both must be absolute paths")
    return dict(items)
