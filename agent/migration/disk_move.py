"""A VM's disk across a migration on shared storage: what the source proposes, what the destination checks.

vMotion's case: both hosts see the same image, so nothing of the disk is copied; what moves is
the right to write it. The source sends the disk (path, size, dirty block size and the image's
identity, vmruntime/diskimage.py `image_id`) in MigrateStart's ``params`` under the key ``disk``.
The destination applies the operator's ``--disk-map SRC=DST`` (a path or a directory prefix), and
before any page moves refuses an image outside its allowed directories (agent/disks.py), missing,
of another size, or not the source's (another identity, or none). The image's lock changes hands
inside the downtime: the source's VM process flushes and releases it at the pause, the
destination's takes it when it restores the VM, and a source that keeps the VM after all takes it
back before the vCPU runs (vmruntime/devices.py). Copying the image (a destination without shared
storage) is not built yet: such a destination refuses.

`proposal` and `incoming` read the file system: blocking, for the session thread, never the loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.disks import DiskConfig, DiskError, resolve_path
from agent.migration.common import MigrationError, map_items
from agent.migration.seams import Lane
from proto.errors import ErrorCode
from vmruntime.control import VMError, VMGone
from vmruntime.disk import DEFAULT_BLOCK_SIZE
from vmruntime.diskimage import ImageError, check_existing, check_size, image_id

PARAMS_KEY = "disk"  # the key in MigrateStart.params
TAKE_BACK_TIMEOUT_S = 10.0  # a VM process answers between two slices; this only bounds a stuck one


def proposal(disk: DiskConfig) -> dict[str, Any]:
    """What travels: the image's path, size, dirty block size and identity (written now if the
    image has none yet). MigrationError when the identity cannot be read or written."""
    try:
        ident = image_id(disk.path, create=True)
    except ImageError as e:
        raise MigrationError(ErrorCode.BAD_REQUEST, f"the VM's disk: {e}") from None
    return {"path": disk.path, "size": disk.size, "block-size": disk.block_size, "id": ident}


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


def incoming(params: Mapping[str, Any], disk_map: Mapping[str, str], allowed: Sequence[Path]) -> DiskConfig | None:
    """The disk a MigrateStart proposes, as this host sees it; None without one. DiskError says why
    this host cannot take it over (the VM then keeps running on the source)."""
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
                        f"not the same image (shared storage needed)")
    return DiskConfig(path=here, size=size, block_size=block)


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
